"""AdaLoRA (HF PEFT's ``peft.tuners.adalora`` layout): config, SVD layers, the tuner and its rank allocator."""

from __future__ import annotations

from .bnb import AdaLoraQuantLinear
from .config import AdaLoraConfig
from .layer import AdaLoraLayer, SVDLinear
from .model import ADALORA_TARGET_MODULE_DEFAULTS, AdaLoraModel, RankAllocator

__all__ = ["AdaLoraConfig", "AdaLoraLayer", "SVDLinear", "AdaLoraQuantLinear", "AdaLoraModel", "RankAllocator",
           "ADALORA_TARGET_MODULE_DEFAULTS"]
