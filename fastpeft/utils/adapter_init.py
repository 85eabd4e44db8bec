"""The default initialisations of LoRA and AdaLoRA adapters (HF PEFT's), one implementation for the tuner layers
and the drop-in modules (``fastpeft.LoRALinear``, ``fastpeft.AdaLoRALinear``).  Imports nothing of fastpeft, so the
drop-in modules load without the tuner packages."""

from __future__ import annotations

import math

import torch
import torch.nn as nn

__all__ = ["init_lora_pair", "init_adalora_triplet"]


def init_lora_pair(A: torch.Tensor, B: torch.Tensor, r: int, init) -> None:
    """In place, no grad: A (r, in) <- kaiming-uniform(a=√5) (``init=True``) or N(0, 1/r) (``"gaussian"``), B (out, r)
    <- 0, so the adapter starts as the identity.  The one implementation of LoRA's default inits (tuner layers and
    ``fastpeft.LoRALinear``)."""
    with torch.no_grad():
        if init is True:
            nn.init.kaiming_uniform_(A, a=math.sqrt(5))
        elif isinstance(init, str) and init.lower() == "gaussian":
            nn.init.normal_(A, std=1 / r)
        else:
            raise ValueError(f"Unknown initialization init_lora_weights={init!r}")
        nn.init.zeros_(B)


def init_adalora_triplet(A: torch.Tensor, E: torch.Tensor, B: torch.Tensor) -> None:
    """In place, no grad: E (r, 1) <- 0, A (r, in) and B (out, r) <- N(0, 0.02²) (HF PEFT's AdaLoRA init: the layer
    starts equal to its base).  Shared by the tuner layer and ``fastpeft.AdaLoRALinear``."""
    with torch.no_grad():
        nn.init.zeros_(E)
        nn.init.normal_(A, mean=0.0, std=0.02)
        nn.init.normal_(B, mean=0.0, std=0.02)
