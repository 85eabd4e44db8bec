"""IA3 around a bitsandbytes-quantized base (HF PEFT's ``ia3.bnb``); see ``fastpeft.utils.quantization``."""

from __future__ import annotations

import torch
import torch.nn as nn

from ...utils.quantization import autocast_on, quant_kind, to_compute_dtype
from .layer import Linear as IA3Linear

__all__ = ["IA3QuantLinear", "make_ia3_layer"]


class IA3QuantLinear(IA3Linear):
    """(IA)³ around a bitsandbytes ``Linear4bit`` / ``Linear8bitLt`` (HF PEFT's ``ia3.bnb`` layers)."""

    _fused_capable = False  # the fused kernels need a dense nn.Linear weight

    def __init__(self, base_layer, adapter_name, config, is_feedforward) -> None:
        super().__init__(base_layer, adapter_name, config, is_feedforward)
        self.fan_in_fan_out = False
        self.quant_kind = quant_kind(base_layer)

    def update_layer(self, adapter_name, config) -> None:
        super().update_layer(adapter_name, config)
        to_compute_dtype(self, adapter_name, ("ia3_l",))

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if self._base_only():
            return self.base_layer(x)
        scale = 1
        for a in self._present_active():
            scale = scale * self.ia3_l[a].flatten()
        convert = (not autocast_on()) and x.dtype != torch.float32
        if convert:
            x = x.float()
        if self.is_feedforward:
            result = self.base_layer(x * scale)
            expected = result.dtype
        else:
            result = self.base_layer(x)
            expected = result.dtype
            result = result * scale
        if self.quant_kind == "4bit":
            result = result.clone()
        if convert:
            result = result.to(expected)
        return result

    def _merge_one(self, a: str, safe_merge: bool) -> None:
        raise ValueError(f"Cannot merge ia3 layers when the model is loaded in "
                         f"{'4' if self.quant_kind == '4bit' else '8'}-bit mode (HF PEFT cannot either)")


def make_ia3_layer(target: nn.Module, adapter_name: str, config, is_feedforward: bool):
    """An IA3 layer around a bitsandbytes base (None when ``target`` is not quantized)."""
    if quant_kind(target) is None:
        return None
    return IA3QuantLinear(target, adapter_name, config, is_feedforward)
