"""AdaLoRA around a bitsandbytes-quantized base (HF PEFT's ``adalora.bnb``); see ``fastpeft.utils.quantization``."""

from __future__ import annotations

import torch
import torch.nn as nn

from ...utils.quantization import autocast_on, merge_quantized, quant_kind, to_compute_dtype
from .layer import SVDLinear

__all__ = ["AdaLoraQuantLinear", "make_adalora_layer"]


class AdaLoraQuantLinear(SVDLinear):
    """AdaLoRA around a bitsandbytes ``Linear4bit`` / ``Linear8bitLt`` (HF PEFT's ``adalora.bnb`` layers)."""

    _fused_capable = False  # the fused kernels need a dense nn.Linear weight

    def __init__(self, base_layer, adapter_name, r, lora_alpha, config) -> None:
        super().__init__(base_layer, adapter_name, r, lora_alpha, config)
        self.fan_in_fan_out = False
        self.quant_kind = quant_kind(base_layer)

    def update_layer(self, adapter_name, r, lora_alpha, config, ranknum=None) -> None:
        super().update_layer(adapter_name, r, lora_alpha, config, ranknum=ranknum)
        to_compute_dtype(self, adapter_name, ("lora_A", "lora_E", "lora_B", "ranknum"))

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if self._base_only():
            return self.base_layer(x, *args, **kwargs)
        result = self.base_layer(x, *args, **kwargs)
        if self.quant_kind == "4bit":
            result = result.clone()
        for a in self._present_active():
            A, E, B = self.lora_A[a], self.lora_E[a], self.lora_B[a]
            convert = not autocast_on()
            if convert:
                expected = result.dtype
                if self.quant_kind == "4bit":
                    x = self._cast_input_dtype(x, A.dtype)
                elif x.dtype != torch.float32:
                    x = x.float()
            out = self.lora_dropout[a](x) @ (A * E).T @ B.T
            if convert:
                out = out.to(expected)
            result = result + out * self.scaling[a] / (self.ranknum[a] + 1e-5)
        return result

    def _merge_one(self, a: str, safe_merge: bool) -> None:
        delta = self.get_delta_weight(a).detach()
        merge_quantized(self.base_layer, lambda w: w.to(delta.dtype) + delta, safe_merge, a)

    def _unmerge_one(self, a: str) -> None:
        delta = self.get_delta_weight(a).detach()
        merge_quantized(self.base_layer, lambda w: w.to(delta.dtype) - delta, False, a, unmerge=True)


def make_adalora_layer(target: nn.Module, adapter_name: str, r: int, lora_alpha: float, config):
    """An AdaLoRA layer around a bitsandbytes base (None when ``target`` is not quantized)."""
    if quant_kind(target) is None:
        return None
    return AdaLoraQuantLinear(target, adapter_name, r, lora_alpha, config)
