"""Shared plumbing of the drop-in adapter modules: the frozen base (nn.Linear or transformers' Conv1D) and checks.

transformers' ``Conv1D`` (GPT-2 style) stores its weight as (in_features, out_features), i.e. ``fan_in_fan_out``.
The modules keep that Parameter as it is (so the storage stays shared with the wrapped layer) and hand the op the
transposed view ``weight.t()`` (out, in); merging adds the transposed delta.  transformers is an optional
dependency, so it is never imported here: a module can only be a transformers ``Conv1D`` if transformers is
already in ``sys.modules``.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn as nn

from ..utils.adapter_math import add_delta
from ..utils.other import is_conv1d


def base_params(module, cls_name: str) -> tuple[nn.Parameter, Optional[nn.Parameter], int, int, bool]:
    """(weight, bias, in_features, out_features, fan_in_fan_out) of an ``nn.Linear`` or transformers ``Conv1D``.

    Raises TypeError naming the type for anything else.
    """
    if isinstance(module, nn.Linear):
        return module.weight, module.bias, module.in_features, module.out_features, False
    if is_conv1d(module):
        w = module.weight  # (in, out)
        return w, module.bias, w.shape[0], w.shape[1], True
    raise TypeError(f"{cls_name}.from_linear expects an nn.Linear or a transformers Conv1D, got "
                    f"{type(module).__module__}.{type(module).__name__}")


def check_features(in_features, out_features) -> None:
    for name, v in (("in_features", in_features), ("out_features", out_features)):
        if isinstance(v, bool) or not isinstance(v, int):
            raise TypeError(f"{name} must be an int, got {type(v).__name__}")
        if v < 1:
            raise ValueError(f"{name} must be >= 1, got {v}")


def check_rank(r) -> int:
    if isinstance(r, bool) or not isinstance(r, int):
        raise TypeError(f"r must be an int, got {type(r).__name__} ({r!r})")
    if r <= 0:
        raise ValueError(f"r must be a positive int, got {r}")
    return r


def check_dropout(p) -> float:
    if isinstance(p, bool) or not isinstance(p, (int, float)):
        raise TypeError(f"lora_dropout must be a float, got {type(p).__name__} ({p!r})")
    p = float(p)
    if not (0.0 <= p < 1.0):
        raise ValueError(f"lora_dropout must be in [0, 1), got {p}")
    return p


def check_alpha(alpha) -> float:
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)):
        raise TypeError(f"lora_alpha must be a number, got {type(alpha).__name__} ({alpha!r})")
    if not math.isfinite(alpha):
        raise ValueError(f"lora_alpha must be finite, got {alpha}")
    return alpha


class AdapterBase(nn.Module):
    """Holds the frozen base ``weight``/``bias`` and the merge state shared by the adapter modules.

    ``weight`` is (out_features, in_features) for an nn.Linear base and (in_features, out_features) when
    ``fan_in_fan_out`` (a wrapped Conv1D); ``weight_nk`` is always the (out, in) view.
    """

    in_features: int
    out_features: int
    fan_in_fan_out: bool

    def _init_base(self, in_features: int, out_features: int, bias: bool, device, dtype) -> None:
        check_features(in_features, out_features)
        fk = {"device": device, "dtype": dtype}
        self.in_features, self.out_features, self.fan_in_fan_out = in_features, out_features, False
        self.weight = nn.Parameter(torch.empty(out_features, in_features, **fk), requires_grad=False)
        if bias:
            self.bias = nn.Parameter(torch.empty(out_features, **fk), requires_grad=False)
        else:
            self.register_parameter("bias", None)
        self._merged = False

    def _share_base(self, module) -> None:
        weight, bias, in_f, out_f, fifo = base_params(module, type(self).__name__)
        self.in_features, self.out_features, self.fan_in_fan_out = in_f, out_f, fifo
        # The very same Parameter objects: no copy.  They are frozen by _freeze_base() once the adapter has been
        # built, so that a bad argument leaves the wrapped layer exactly as it was.
        self.weight = weight
        if bias is not None:
            self.bias = bias
        else:
            self.register_parameter("bias", None)
        self._merged = False

    def _freeze_base(self) -> None:
        """Freeze the base weight and bias (HF PEFT freezes the wrapped layer too)."""
        self.weight.requires_grad_(False)
        if self.bias is not None:
            self.bias.requires_grad_(False)

    def reset_base_parameters(self) -> None:
        """nn.Linear's init of the base weight/bias (kaiming-uniform(a=sqrt(5)), bias U(+-1/sqrt(in)))."""
        with torch.no_grad():
            w = self.weight_nk
            nn.init.kaiming_uniform_(w, a=math.sqrt(5))
            if self.bias is not None:
                bound = 1.0 / math.sqrt(self.in_features)
                nn.init.uniform_(self.bias, -bound, bound)

    @property
    def weight_nk(self) -> torch.Tensor:
        """The base weight as (out_features, in_features) (a transposed view for a Conv1D base)."""
        return self.weight.t() if self.fan_in_fan_out else self.weight

    @property
    def merged(self) -> bool:
        """True while the adapter is merged into ``weight`` (the forward is then a plain linear layer)."""
        return self._merged

    def _base_forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.linear(x, self.weight_nk, self.bias)

    def _check_merge(self) -> None:
        if self._merged:
            raise ValueError(f"{type(self).__name__} is already merged; call unmerge() before merging again")

    def _check_unmerge(self) -> None:
        if not self._merged:
            raise ValueError(f"{type(self).__name__} is not merged, so there is nothing to unmerge")

    def _add_to_weight(self, delta_nk: torch.Tensor, sign: float) -> None:
        """weight += sign * delta (delta given as (out, in)), computed in >= fp32 and rounded once, in place."""
        with torch.no_grad():
            d = delta_nk.t() if self.fan_in_fan_out else delta_nk
            self.weight.copy_(add_delta(self.weight, d, sign))

    def to_linear(self) -> nn.Linear:
        """A plain ``nn.Linear`` holding the merged weight (a copy; this module is left unchanged).

        Always an nn.Linear with weight (out_features, in_features), also for a wrapped Conv1D.
        """
        with torch.no_grad():
            w = self.merged_weight_nk()
            b = self._merged_bias()
            lin = nn.Linear(self.in_features, self.out_features, bias=b is not None, device=w.device, dtype=w.dtype)
            lin.weight.copy_(w)
            if b is not None:
                lin.bias.copy_(b)
        return lin

    merged_linear = to_linear

    def _merged_bias(self) -> Optional[torch.Tensor]:
        return None if self.bias is None else self.bias.detach().clone()

    def merged_weight_nk(self) -> torch.Tensor:  # pragma: no cover - overridden
        raise NotImplementedError

    def _extra_base_repr(self) -> str:
        s = f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"
        if self.fan_in_fan_out:
            s += ", fan_in_fan_out=True"
        return s


class DeltaAdapterBase(AdapterBase):
    """Base of the additive low-rank adapters (LoRA, AdaLoRA): merging adds ``delta_weight()`` to the weight.

    Subclasses define ``delta_weight() -> (out_features, in_features)`` in at least fp32, without gradient.
    """

    def delta_weight(self) -> torch.Tensor:  # pragma: no cover - overridden
        raise NotImplementedError

    def merge(self) -> None:
        """Add ``delta_weight()`` into ``weight`` in place (in fp32 for fp16/bf16 weights, rounded once).

        Raises ValueError if already merged.  The forward is then a plain linear layer.
        """
        self._check_merge()
        self._add_to_weight(self.delta_weight(), 1.0)
        self._merged = True

    def unmerge(self) -> None:
        """Subtract the update merged by ``merge()`` (equal to the original weight up to rounding).

        Raises ValueError if not merged.
        """
        self._check_unmerge()
        self._add_to_weight(self.delta_weight(), -1.0)
        self._merged = False

    def merged_weight_nk(self) -> torch.Tensor:
        """The merged weight as (out_features, in_features), in the base dtype (a new tensor)."""
        with torch.no_grad():
            w = self.weight_nk
            if self._merged:
                return w.detach().clone()
            return add_delta(w, self.delta_weight())
