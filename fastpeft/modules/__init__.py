"""Drop-in adapter modules: ``LoRALinear``, ``AdaLoRALinear``, ``IA3Linear`` (nn.Linear / Conv1D replacements)."""

from __future__ import annotations

from .adalora import AdaLoRALinear
from .ia3 import IA3Linear
from .lora import LoRALinear

__all__ = ["LoRALinear", "AdaLoRALinear", "IA3Linear"]
