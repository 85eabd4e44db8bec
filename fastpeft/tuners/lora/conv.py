"""LoRA around ``nn.Conv2d`` (HF PEFT 0.21.2's ``lora.Conv2d``), e.g. the UNet/VAE convolutions of diffusion models.

``lora_A`` is an ``nn.Conv2d(in, r, kernel_size, stride, padding, bias=False)`` and ``lora_B`` an
``nn.Conv2d(r, out, 1, 1, groups=base.groups, bias=lora_bias)``, so::

    y = base(x) + s · B(A(dropout(x)))          x: (N, in, H, W) -> y: (N, out, H', W')

The delta weight is ``B·A`` folded into one (out, in, kh, kw) kernel (PEFT's formula); merging adds it to the base
kernel.  As in PEFT: the rank must be divisible by ``groups``, and a grouped conv cannot be merged.  A dilated base
conv is refused (PEFT builds ``lora_A`` without the dilation, so its output does not fit the base output).  DoRA works
as on Linear layers (magnitude of shape (1, out, 1, 1)).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .layer import Linear

__all__ = ["Conv2d"]


def check_conv2d_target(base: nn.Module, r: int, use_dora: bool = False, name: str = "") -> None:
    """Raise ValueError when PEFT's Conv2d LoRA cannot be applied to ``base`` with rank ``r``."""
    where = f" ({name})" if name else ""
    if tuple(base.dilation) != (1,) * len(base.dilation):
        raise ValueError(f"LoRA on a Conv2d with dilation={tuple(base.dilation)}{where} is not supported: HF PEFT "
                         "builds lora_A without the dilation, so its output shape does not match the base output")
    if r % base.groups != 0:
        raise ValueError(f"Targeting a Conv2d with groups={base.groups} and rank {r}{where}: the rank must be "
                         "divisible by groups. Either choose a different rank or do not target this layer.")
    if use_dora and base.groups > 1:
        raise ValueError(f"DoRA on a Conv2d with groups={base.groups}{where} is not supported (HF PEFT 0.21.2 cannot "
                         "build its magnitude either)")


class Conv2d(Linear):
    """LoRA (and DoRA) on an ``nn.Conv2d`` base.  Input (N, C_in, H, W), output (N, C_out, H', W')."""

    def update_layer(self, adapter_name: str, r: int, lora_alpha: float, config) -> None:
        check_conv2d_target(self.base_layer, r, bool(config.use_dora))
        super().update_layer(adapter_name, r, lora_alpha, config)

    def _make_lora_modules(self, r: int, lora_bias: bool) -> tuple[nn.Module, nn.Module]:
        base = self.base_layer
        A = nn.Conv2d(self.in_features, r, base.kernel_size, base.stride, base.padding, bias=False)
        B = nn.Conv2d(r, self.out_features, (1, 1), (1, 1), groups=base.groups, bias=lora_bias)
        return A, B

    def get_delta_weight(self, adapter_name: str) -> torch.Tensor:
        """``B·A`` as one (out, in/groups, kh, kw) kernel times scaling (fp32 math for half weights on CPU)."""
        A = self.lora_A[adapter_name].weight
        B = self.lora_B[adapter_name].weight
        out_dtype = A.dtype
        if A.device.type == "cpu" and A.dtype in (torch.float16, torch.bfloat16):
            A, B = A.float(), B.float()
        s = self.scaling[adapter_name]
        base = self.base_layer
        if base.weight.size()[2:4] == (1, 1):
            delta = (B.squeeze(3).squeeze(2) @ A.squeeze(3).squeeze(2)).unsqueeze(2).unsqueeze(3) * s
        elif base.groups > 1:
            delta = F.conv2d(A.transpose(0, 1), B) * s
        else:
            delta = F.conv2d(A.transpose(0, 1), B).transpose(0, 1) * s
        return delta.to(out_dtype)

    def _merge_one(self, adapter_name: str, safe_merge: bool) -> None:
        if self.base_layer.groups > 1:
            raise NotImplementedError("Merging is not supported for Conv2d layers with groups > 1 (as in HF PEFT)")
        super()._merge_one(adapter_name, safe_merge)

    def extra_repr(self) -> str:
        return f"in_channels={self.in_features}, out_channels={self.out_features}, adapters={self.adapter_names()}"
