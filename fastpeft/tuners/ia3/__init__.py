"""(IA)³ (HF PEFT's ``peft.tuners.ia3`` layout): config, layers and the tuner."""

from __future__ import annotations

from .bnb import IA3QuantLinear
from .config import IA3Config
from .layer import IA3Layer, Linear
from .model import IA3_FEEDFORWARD_MODULE_DEFAULTS, IA3_TARGET_MODULE_DEFAULTS, IA3Model

__all__ = ["IA3Config", "IA3Layer", "Linear", "IA3QuantLinear", "IA3Model", "IA3_TARGET_MODULE_DEFAULTS",
           "IA3_FEEDFORWARD_MODULE_DEFAULTS"]
