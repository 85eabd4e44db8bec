"""(IA)³ with HF PEFT's layout (``ia3_l`` ParameterDict) and math.

Attention (non-feedforward) modules scale the output, bias included: ``y = base(x) ⊙ l`` with l stored (out, 1);
feed-forward modules scale the input: ``y = base(x ⊙ l)`` with l stored (1, in).  Several active adapters multiply.
On ``nn.Conv2d`` / ``nn.Conv3d`` (PEFT's ``ia3.Conv2d`` / ``Conv3d``) l scales channels and is stored
(1, C, 1, 1[, 1]) in both modes.
"""

from __future__ import annotations

import warnings
from typing import Optional

import torch
import torch.nn as nn

from ...functional import ia3_linear
from ...utils.adapter_math import IA3_UNMERGE_EPS, ia3_scale, merge_dtype
from ...utils.other import in_out_features, is_conv1d
from ..tuners_utils import BaseTunerLayer
from .config import IA3Config

__all__ = ["IA3Layer", "Linear", "Conv2d", "Conv3d", "CONV_TYPES"]

class IA3Layer(BaseTunerLayer):
    adapter_layer_names = ("ia3_l",)
    other_param_names = ()

    def __init__(self, base_layer: nn.Module, is_feedforward: bool) -> None:
        super().__init__(base_layer)
        self.ia3_l = nn.ParameterDict({})
        self.is_feedforward = bool(is_feedforward)
        self.in_features, self.out_features = in_out_features(base_layer)
        self.fan_in_fan_out = is_conv1d(base_layer)

    def update_layer(self, adapter_name: str, config: IA3Config) -> None:
        # drawn like PEFT (randn, then ones) so the RNG stream stays aligned with a PEFT model built the same way
        self.ia3_l[adapter_name] = nn.Parameter(torch.randn(self._l_shape()))
        if config.init_ia3_weights:
            with torch.no_grad():
                self.ia3_l[adapter_name].fill_(1.0)
        w = self.base_layer.weight
        p = self.ia3_l[adapter_name]
        p.data = p.data.to(device=w.device, dtype=w.dtype if w.is_floating_point() else None)

    def _l_shape(self) -> tuple:
        """l's stored shape (PEFT's): (1, in) feed-forward, (out, 1) otherwise."""
        return (1, self.in_features) if self.is_feedforward else (self.out_features, 1)

    def _scaled(self, a: str, w: torch.Tensor, b: Optional[torch.Tensor], divide: bool):
        """(weight, bias) times adapter a's l (divided by l + eps with `divide`), in at least fp32, rounded once; the
        bias None where l does not scale it (input mode, or no bias)."""
        return ia3_scale(w, b, self.ia3_l[a].data, self.is_feedforward, self.fan_in_fan_out, divide=divide)

    def _scale_weight(self, a: str, inverse: bool, safe_merge: bool = False) -> None:
        base = self.base_layer
        new_w, new_b = self._scaled(a, base.weight.data, base.bias.data if base.bias is not None else None, inverse)
        if safe_merge and (not torch.isfinite(new_w).all() or (new_b is not None and not torch.isfinite(new_b).all())):
            raise ValueError(f"NaNs or infs detected in the merged weights; adapter {a!r} seems to be broken (the "
                             "weights were not modified)")
        base.weight.data = new_w
        if new_b is not None:
            base.bias.data = new_b

    def _merge_one(self, a: str, safe_merge: bool) -> None:
        zeros = int((self.ia3_l[a].data == 0).sum())
        if zeros:
            warnings.warn(f"ia3_l of adapter {a!r} has {zeros} zero entr{'y' if zeros == 1 else 'ies'}: merging sets "
                          "the matching base weights to zero for good (unmerge() cannot bring them back). Keep a "
                          "copy of the base model if you need it.", UserWarning, stacklevel=3)
        self._scale_weight(a, inverse=False, safe_merge=safe_merge)

    def _check_merge_finite(self, adapter_names: list[str]) -> None:
        """safe_merge's check of ``_merge_one``'s arithmetic, without writing (see BaseTunerLayer)."""
        if type(self)._merge_one is not IA3Layer._merge_one:
            return
        base = self.base_layer
        acc_w = base.weight.data
        acc_b = base.bias.data if (not self.is_feedforward and base.bias is not None) else None
        for a in adapter_names:
            acc_w, new_b = self._scaled(a, acc_w, acc_b, divide=False)
            acc_b = new_b if new_b is not None else acc_b
            if not torch.isfinite(acc_w).all() or (acc_b is not None and not torch.isfinite(acc_b).all()):
                raise ValueError(f"NaNs or infs detected in the merged weights; adapter {a!r} seems to be broken (the "
                                 "weights were not modified)")

    def unmerge(self) -> None:
        if self.merged:
            warnings.warn("Unmerge result can be inaccurate for (IA)^3.", UserWarning, stacklevel=2)
        super().unmerge()

    def _unmerge_one(self, a: str) -> None:
        self._scale_weight(a, inverse=True)


class Linear(IA3Layer):
    """(IA)³ around ``nn.Linear`` / transformers ``Conv1D`` (HF PEFT's ``ia3.Linear``).

    Input x: (..., in_features); output (..., out_features).
    """

    def __init__(self, base_layer: nn.Module, adapter_name: str, config: IA3Config, is_feedforward: bool) -> None:
        super().__init__(base_layer, is_feedforward)
        self._active_adapter = [adapter_name]
        self.update_layer(adapter_name, config)

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if self._base_only():
            return self.base_layer(x, *args, **kwargs)
        active = self._present_active()
        if not active:
            return self.base_layer(x, *args, **kwargs)
        if len(active) == 1:
            base = self._fused_base(x, args, kwargs)
            if not isinstance(base, str):
                return ia3_linear(x, base[0], base[1], self.ia3_l[active[0]], self.is_feedforward, backend=None)
        scale = 1
        dtype = x.dtype
        for a in active:
            dtype = self.ia3_l[a].dtype
            scale = scale * self.ia3_l[a].flatten()
        if self.is_feedforward:
            return self.base_layer((x.to(dtype) * scale).to(x.dtype), *args, **kwargs)
        result = self.base_layer(x, *args, **kwargs)
        return (result * scale).to(result.dtype)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"feedforward={self.is_feedforward}, adapters={self.adapter_names()}")


class _ConvNd(IA3Layer):
    """(IA)³ around an ``nn.Conv2d`` / ``nn.Conv3d`` (HF PEFT's ``ia3.Conv2d`` / ``Conv3d``): l (1, C, 1, ...) scales
    the output channels (bias included), or, feed-forward, the input channels.  PyTorch only.

    Input x: (N, C_in, *spatial); output (N, C_out, *spatial').
    """

    _fused_capable = False

    def __init__(self, base_layer: nn.Module, adapter_name: str, config: IA3Config, is_feedforward: bool) -> None:
        super().__init__(base_layer, is_feedforward)
        self.fan_in_fan_out = False
        self._active_adapter = [adapter_name]
        self.update_layer(adapter_name, config)

    def _l_shape(self) -> tuple:
        """(1, C, 1, ...): channels in or out, broadcast over the spatial dimensions (PEFT's)."""
        n = self.in_features if self.is_feedforward else self.out_features
        return (1, n) + (1,) * (self.base_layer.weight.dim() - 2)

    def _weight_scale(self, l: torch.Tensor) -> torch.Tensor:
        """l as a factor of the (out, in/groups, *kernel) weight: per output channel, or per input channel of each
        group (feed-forward)."""
        base = self.base_layer
        tail = (1,) * (base.weight.dim() - 2)
        if not self.is_feedforward:
            return l.reshape(base.out_channels, 1, *tail)
        per_group = l.reshape(base.groups, base.in_channels // base.groups)
        return per_group.repeat_interleave(base.out_channels // base.groups, dim=0).reshape(
            base.out_channels, -1, *tail)

    def _scaled(self, a: str, w: torch.Tensor, b: Optional[torch.Tensor], divide: bool):
        """``IA3Layer._scaled`` for the (out, in/groups, *kernel) weight of a convolution (``_weight_scale``)."""
        with torch.no_grad():
            ct = merge_dtype(w.dtype, self.ia3_l[a].dtype)
            lv = self.ia3_l[a].detach().to(ct)
            if divide:
                lv = lv + IA3_UNMERGE_EPS
            scale = self._weight_scale(lv)
            new_w = (w.to(ct) / scale if divide else w.to(ct) * scale).to(w.dtype)
            new_b = None
            if b is not None and not self.is_feedforward:
                flat = lv.reshape(-1)
                new_b = (b.to(ct) / flat if divide else b.to(ct) * flat).to(b.dtype)
        return new_w, new_b

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if self._base_only():
            return self.base_layer(x, *args, **kwargs)
        active = self._present_active()
        if not active:
            return self.base_layer(x, *args, **kwargs)
        # PEFT's ia3._ConvNd.forward: the adapters' l multiplied, in the adapter dtype
        scale = 1
        dtype = previous = x.dtype
        for a in active:
            dtype = self.ia3_l[a].dtype
            scale = scale * self.ia3_l[a]
        if self.is_feedforward:
            result = self.base_layer((x.to(dtype) * scale).to(self.base_layer.weight.dtype), *args, **kwargs)
        else:
            result = self.base_layer(x, *args, **kwargs).to(dtype) * scale
        return result.to(previous)

    def extra_repr(self) -> str:
        return (f"in_channels={self.in_features}, out_channels={self.out_features}, "
                f"feedforward={self.is_feedforward}, adapters={self.adapter_names()}")


class Conv2d(_ConvNd):
    """(IA)³ on an ``nn.Conv2d``: input (N, C_in, H, W)."""


class Conv3d(_ConvNd):
    """(IA)³ on an ``nn.Conv3d``: input (N, C_in, D, H, W)."""


# base type -> its IA3 layer (PEFT's IA3 adapts Conv2d and Conv3d, not Conv1d)
CONV_TYPES = {nn.Conv2d: Conv2d, nn.Conv3d: Conv3d}
