"""LoRA around ``nn.Conv1d`` / ``nn.Conv2d`` / ``nn.Conv3d`` (HF PEFT 0.21.2's ``lora.Conv1d`` / ``Conv2d`` /
``Conv3d``): the UNet/VAE convolutions of diffusion models, audio front ends, video models.

``lora_A`` is a conv of the base's type ``(in, r, kernel_size, stride, padding, bias=False)`` and ``lora_B`` one
``(r, out, 1, 1, groups=base.groups, bias=lora_bias)`` (kernel and stride 1 in every dimension), so::

    y = base(x) + s · B(A(dropout(x)))          x: (N, in, *spatial) -> y: (N, out, *spatial')

The delta weight is ``B·A`` folded into one (out, in/groups, *kernel) kernel (PEFT's formula: a matrix product for a
1x1 Conv2d, else B convolved over Aᵀ); merging adds it to the base kernel.  As in PEFT: the rank must be divisible by
``groups``, and a grouped conv cannot be merged.  A dilated base conv is refused (PEFT builds ``lora_A`` without the
dilation, so its output does not fit the base output).  DoRA works as on Linear layers (magnitude of shape
(1, out, 1, ...)), not on a grouped conv (nor in PEFT).  (Where PEFT's merge of a Conv3d with a (1, 1, k) kernel
fails - it takes the 1x1 Conv2d product for it - fastpeft's convolves.)
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .layer import Linear

__all__ = ["Conv1d", "Conv2d", "Conv3d", "CONV_TYPES", "check_conv_target"]

_CONV_FN = {nn.Conv1d: F.conv1d, nn.Conv2d: F.conv2d, nn.Conv3d: F.conv3d}


def check_conv_target(base: nn.Module, r: int, use_dora: bool = False, name: str = "") -> None:
    """Raise ValueError when PEFT's conv LoRA cannot be applied to ``base`` (an nn.Conv1d/2d/3d) with rank ``r``."""
    where = f" ({name})" if name else ""
    kind = type(base).__name__
    if tuple(base.dilation) != (1,) * len(base.dilation):
        raise ValueError(f"LoRA on a {kind} with dilation={tuple(base.dilation)}{where} is not supported: HF PEFT "
                         "builds lora_A without the dilation, so its output shape does not match the base output")
    if r % base.groups != 0:
        raise ValueError(f"Targeting a {kind} with groups={base.groups} and rank {r}{where}: the rank must be "
                         "divisible by groups. Either choose a different rank or do not target this layer.")
    if use_dora and base.groups > 1:
        raise ValueError(f"DoRA on a {kind} with groups={base.groups}{where} is not supported (HF PEFT 0.21.2 cannot "
                         "build its magnitude either)")


class _ConvNd(Linear):
    """LoRA on an ``nn.Conv1d`` / ``nn.Conv2d`` / ``nn.Conv3d`` base (the subclasses below).  Input
    (N, C_in, *spatial), output (N, C_out, *spatial')."""

    def update_layer(self, adapter_name: str, r: int, lora_alpha: float, config) -> None:
        check_conv_target(self.base_layer, r, bool(config.use_dora))
        super().update_layer(adapter_name, r, lora_alpha, config)

    def _make_lora_modules(self, r: int, lora_bias: bool) -> tuple[nn.Module, nn.Module]:
        base = self.base_layer
        conv = type(base)
        ones = (1,) * (base.weight.dim() - 2)
        A = conv(self.in_features, r, base.kernel_size, base.stride, base.padding, bias=False)
        B = conv(r, self.out_features, ones, ones, groups=base.groups, bias=lora_bias)
        return A, B

    def get_delta_weight(self, adapter_name: str) -> torch.Tensor:
        """``B·A`` as one (out, in/groups, *kernel) kernel times scaling (fp32 math for half weights on CPU)."""
        A = self.lora_A[adapter_name].weight
        B = self.lora_B[adapter_name].weight
        out_dtype = A.dtype
        if A.device.type == "cpu" and A.dtype in (torch.float16, torch.bfloat16):
            A, B = A.float(), B.float()
        s = self.scaling[adapter_name]
        base = self.base_layer
        if type(base) is nn.Conv2d and base.weight.size()[2:4] == (1, 1):
            delta = (B.squeeze(3).squeeze(2) @ A.squeeze(3).squeeze(2)).unsqueeze(2).unsqueeze(3) * s
        elif base.groups > 1:
            delta = _CONV_FN[type(base)](A.transpose(0, 1), B) * s
        else:
            delta = _CONV_FN[type(base)](A.transpose(0, 1), B).transpose(0, 1) * s
        return delta.to(out_dtype)

    def _merge_one(self, adapter_name: str, safe_merge: bool) -> None:
        if self.base_layer.groups > 1:
            raise NotImplementedError(f"Merging is not supported for {type(self.base_layer).__name__} layers with "
                                      "groups > 1 (as in HF PEFT)")
        super()._merge_one(adapter_name, safe_merge)

    def extra_repr(self) -> str:
        return f"in_channels={self.in_features}, out_channels={self.out_features}, adapters={self.adapter_names()}"


class Conv1d(_ConvNd):
    """LoRA on an ``nn.Conv1d``: input (N, C_in, L)."""


class Conv2d(_ConvNd):
    """LoRA (and DoRA) on an ``nn.Conv2d``: input (N, C_in, H, W)."""


class Conv3d(_ConvNd):
    """LoRA on an ``nn.Conv3d``: input (N, C_in, D, H, W)."""


# base type -> its LoRA layer
CONV_TYPES = {nn.Conv1d: Conv1d, nn.Conv2d: Conv2d, nn.Conv3d: Conv3d}
