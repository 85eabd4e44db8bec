"""Prompt-style methods (prompt tuning, P-tuning, prefix tuning, adaption prompt) and bottleneck adapters.

Pure PyTorch (no kernels).  The configs have HF PEFT 0.21.2's names, fields and defaults and are registered with
``fastpeft.config.register_config``; the tuners (``fastpeft.prompt.tuners``) are registered with
``fastpeft.tuners.base.register_tuner``, so ``fastpeft.get_peft_model`` / ``PeftModel.from_pretrained`` dispatch to
them.  See ``docs/ARCHITECTURE.md`` and each module's docstring for the math.
"""

from __future__ import annotations

from .config import (  # noqa: F401
    AdaptionPromptConfig,
    BottleneckConfig,
    PrefixTuningConfig,
    PromptEncoderConfig,
    PromptEncoderReparameterizationType,
    PromptLearningConfig,
    PromptTuningConfig,
    PromptTuningInit,
)
from .encoders import PrefixEncoder, PromptEmbedding, PromptEncoder  # noqa: F401

__all__ = [
    "AdaptionPromptConfig", "BottleneckConfig", "PrefixTuningConfig", "PromptEncoderConfig",
    "PromptEncoderReparameterizationType", "PromptLearningConfig", "PromptTuningConfig", "PromptTuningInit",
    "PromptEmbedding", "PromptEncoder", "PrefixEncoder",
]

from . import tuners  # noqa: E402,F401  (registers the tuners with fastpeft.tuners.base.register_tuner)
