"""Injected tuners (LoRA, AdaLoRA, IA3) with HF PEFT's module layout, and the registries other methods plug into.

``fastpeft.tuners.base`` defines ``BaseTuner`` / ``BaseTunerLayer`` / ``register_tuner`` / ``TUNER_CLASSES``; the
method modules (``lora``, ``adalora``, ``ia3``) register themselves when imported, which ``_load_builtin_tuners``
does on first use (lazily, so ``import fastpeft`` stays light).
"""

from __future__ import annotations

import importlib

from .base import TUNER_CLASSES, BaseTuner, BaseTunerLayer, ModulesToSaveWrapper, register_tuner  # noqa: F401

_BUILTIN = ("fastpeft.tuners.lora", "fastpeft.tuners.adalora", "fastpeft.tuners.ia3")
_OPTIONAL = ("fastpeft.prompt",)


def _load_builtin_tuners() -> None:
    """Import the modules that register tuners (the prompt methods are optional)."""
    for mod in _BUILTIN:
        importlib.import_module(mod)
    for mod in _OPTIONAL:
        try:
            importlib.import_module(mod)
        except ImportError:
            pass


def get_tuner_class(peft_type) -> type:
    """The BaseTuner subclass registered for ``peft_type`` (ValueError if none)."""
    key = getattr(peft_type, "value", peft_type)
    if key not in TUNER_CLASSES:
        _load_builtin_tuners()
    if key not in TUNER_CLASSES:
        raise ValueError(f"peft_type {key!r} is not supported by fastpeft (supported: {sorted(TUNER_CLASSES)})")
    return TUNER_CLASSES[key]
