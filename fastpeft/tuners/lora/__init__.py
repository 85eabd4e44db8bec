"""LoRA (HF PEFT's ``peft.tuners.lora`` layout): config, layers and the tuner, with its variants as modules here:
``dora`` (weight-decomposed LoRA), ``conv`` (Conv1d/2d/3d targets), ``embedding`` (nn.Embedding targets), ``bnb``
(bitsandbytes-quantized bases) and ``init`` (PiSSA / OLoRA / orthogonal initialisations)."""

from __future__ import annotations

from .bnb import LoraQuantLinear
from .config import LoraConfig, LoraRuntimeConfig
from .conv import Conv1d, Conv2d, Conv3d
from .embedding import Embedding
from .layer import Linear, LoraLayer
from .model import LORA_TARGET_MODULE_DEFAULTS, LoraModel

__all__ = ["LoraConfig", "LoraRuntimeConfig", "LoraLayer", "Linear", "Embedding", "Conv1d", "Conv2d", "Conv3d",
           "LoraQuantLinear", "LoraModel", "LORA_TARGET_MODULE_DEFAULTS"]
