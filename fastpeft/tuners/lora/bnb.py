"""LoRA around a bitsandbytes-quantized base (``Linear4bit`` nf4/fp4, ``Linear8bitLt``); HF PEFT's ``lora.bnb``.

See ``fastpeft.utils.quantization`` for what changes with a quantized base (forward order, merge by dequantize / add /
requantize).  bitsandbytes is never imported here.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from ...utils.quantization import autocast_on, merge_quantized, quant_kind, to_compute_dtype
from .layer import Linear as LoraLinear

__all__ = ["LoraQuantLinear", "make_lora_layer"]


class LoraQuantLinear(LoraLinear):
    """LoRA around a bitsandbytes ``Linear4bit`` / ``Linear8bitLt`` (HF PEFT's ``lora.bnb`` layers).

    Input x: (..., in_features); output (..., out_features) in the base layer's output dtype.
    """

    _fused_capable = False  # the fused kernels need a dense nn.Linear weight

    def __init__(self, base_layer, adapter_name, r, lora_alpha, config) -> None:
        super().__init__(base_layer, adapter_name, r, lora_alpha, config)
        self.fan_in_fan_out = False
        self.quant_kind = quant_kind(base_layer)

    def update_layer(self, adapter_name, r, lora_alpha, config) -> None:
        super().update_layer(adapter_name, r, lora_alpha, config)
        to_compute_dtype(self, adapter_name, ("lora_A", "lora_B"))

    def get_delta_weight(self, adapter_name: str) -> torch.Tensor:
        """``B @ A * scaling`` in the adapter dtype (PEFT's bnb layers do not upcast)."""
        return (self.lora_B[adapter_name].weight @ self.lora_A[adapter_name].weight) * self.scaling[adapter_name]

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if self._base_only():
            return self.base_layer(x, *args, **kwargs)
        if self._batch_adapter_names is not None:
            return self._mixed_batch_forward(x, self._batch_adapter_names, *args, **kwargs)
        result = self.base_layer(x, *args, **kwargs)
        if self.quant_kind == "4bit":
            result = result.clone()  # PEFT's defensive copy: backprop through a view of the 4-bit output
        for a in self._present_active():
            A = self.lora_A[a]
            convert = not autocast_on()
            if convert:
                expected = result.dtype
                x = self._cast_input_dtype(x, A.weight.dtype)
            out = self.lora_B[a](A(self.lora_dropout[a](x))) * self.scaling[a]
            if convert:
                out = out.to(expected)
            result = result + out
        return result

    def _merge_one(self, adapter_name: str, safe_merge: bool) -> None:
        bias_delta = self._bias_delta(adapter_name)
        b = getattr(self.base_layer, "bias", None)
        if safe_merge and bias_delta is not None and not torch.isfinite(b.data + bias_delta.to(b.dtype)).all():
            raise ValueError(f"NaNs detected in the merged bias; adapter {adapter_name} seems to be broken (the "
                             "weights were not modified)")
        delta = self.get_delta_weight(adapter_name).detach()
        if self.quant_kind == "4bit":
            update = lambda w: w + delta  # noqa: E731  (PEFT: dequantized dtype promoted with the delta's)
        else:
            update = lambda w: w.to(delta.dtype).to(delta.device) + delta  # noqa: E731
        merge_quantized(self.base_layer, update, safe_merge, adapter_name)
        if bias_delta is not None:
            b.data += bias_delta.detach().to(b.dtype)

    def _unmerge_one(self, adapter_name: str) -> None:
        delta = self.get_delta_weight(adapter_name).detach()
        if self.quant_kind == "4bit":
            update = lambda w: w - delta  # noqa: E731
        else:
            update = lambda w: w.to(delta.dtype).to(delta.device) - delta  # noqa: E731
        merge_quantized(self.base_layer, update, False, adapter_name, unmerge=True)
        if self.lora_bias.get(adapter_name, False):
            b = self.base_layer.bias
            b.data -= (self.lora_B[adapter_name].bias * self.scaling[adapter_name]).detach().to(b.dtype)


def make_lora_layer(target: nn.Module, adapter_name: str, r: int, lora_alpha: float, config):
    """A LoRA layer around a bitsandbytes base (None when ``target`` is not quantized)."""
    if quant_kind(target) is None:
        return None
    if getattr(config, "use_dora", False):
        raise ValueError("use_dora=True on a bitsandbytes-quantized base is not supported by fastpeft yet")
    init = getattr(config, "init_lora_weights", True)
    if init not in (True, False, "gaussian"):
        raise ValueError(f"init_lora_weights={init!r} on a bitsandbytes-quantized base is not supported by fastpeft "
                         "yet (supported there: True, False, 'gaussian')")
    return LoraQuantLinear(target, adapter_name, r, lora_alpha, config)
