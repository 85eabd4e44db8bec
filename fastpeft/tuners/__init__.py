"""The PEFT methods, one package each (HF PEFT's layout), on top of the tuner machinery in ``tuners_utils``.

Each method package holds its config (registered with ``fastpeft.config.register_config``), its layers and its tuner
(registered with ``register_tuner``).  Importing this package imports every built-in method, which fills both
registries; ``PeftModel`` then finds a method by ``peft_type`` alone.
"""

from __future__ import annotations

from .tuners_utils import TUNER_CLASSES, BaseTuner, BaseTunerLayer, register_tuner
from ..utils.other import ModulesToSaveWrapper

from . import (adalora, adaption_prompt, bottleneck, ia3, lora, p_tuning, prefix_tuning,  # noqa: E402,F401,I001
               prompt_tuning, trainable_tokens)

__all__ = ["BaseTuner", "BaseTunerLayer", "ModulesToSaveWrapper", "register_tuner", "TUNER_CLASSES",
           "get_tuner_class"]


def get_tuner_class(peft_type) -> type:
    """The BaseTuner subclass registered for ``peft_type`` (ValueError if none)."""
    key = getattr(peft_type, "value", peft_type)
    if key not in TUNER_CLASSES:
        raise ValueError(f"peft_type {key!r} is not supported by fastpeft (supported: {sorted(TUNER_CLASSES)})")
    return TUNER_CLASSES[key]
