"""AdaLoRA layers with HF PEFT's layout (``lora_A``/``lora_E``/``lora_B`` ParameterDicts + frozen ``ranknum``) and math.

``y = base(x) + (drop(x) (A ⊙ E)ᵀ Bᵀ) · alpha / (ranknum + 1e-5)`` with A (r, in), E (r, 1), B (out, r);
``ranknum`` stays at ``init_r`` even when ranks are masked or the layer is resized on load.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn

from ...functional import adalora_linear
from ...utils.adapter_init import init_adalora_triplet
from ...utils.adapter_math import adalora_delta, add_delta
from ...utils.other import in_out_features, is_conv1d, transpose
from ..tuners_utils import BaseTunerLayer
from .config import AdaLoraConfig

__all__ = ["AdaLoraLayer", "SVDLinear"]


class AdaLoraLayer(BaseTunerLayer):
    adapter_layer_names = ("lora_A", "lora_B", "lora_E")
    other_param_names = ("r", "lora_alpha", "scaling", "lora_dropout", "ranknum")

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__(base_layer)
        self.r: dict[str, int] = {}
        self.lora_alpha: dict[str, float] = {}
        self.scaling: dict[str, float] = {}
        self.lora_dropout = nn.ModuleDict({})
        # registration order = PEFT's parameter order (A, B, E, ranknum)
        self.lora_A = nn.ParameterDict({})
        self.lora_B = nn.ParameterDict({})
        self.lora_E = nn.ParameterDict({})
        self.ranknum = nn.ParameterDict({})
        self._ranknum_value: dict[str, float] = {}  # python mirror of ranknum (no .item() in forward)
        self.in_features, self.out_features = in_out_features(base_layer)
        self.fan_in_fan_out = is_conv1d(base_layer)

    def update_layer(self, adapter_name: str, r: int, lora_alpha: float, config: AdaLoraConfig,
                     ranknum: Optional[float] = None) -> None:
        """Create the adapter with rank r (0 allowed after masking); PEFT's init and RNG order."""
        if isinstance(r, bool) or not isinstance(r, int) or r < 0:
            raise ValueError(f"r must be a non-negative int, got {r!r}")
        self.r[adapter_name] = r
        self.lora_alpha[adapter_name] = lora_alpha
        p = float(config.lora_dropout)
        self.lora_dropout[adapter_name] = nn.Dropout(p=p) if p > 0.0 else nn.Identity()
        # same draws in the same order as PEFT: A, E, B, ranknum
        self.lora_A[adapter_name] = nn.Parameter(torch.randn(r, self.in_features))
        self.lora_E[adapter_name] = nn.Parameter(torch.randn(r, 1))
        self.lora_B[adapter_name] = nn.Parameter(torch.randn(self.out_features, r))
        rk = float(r) if ranknum is None else float(ranknum)
        rn = nn.Parameter(torch.randn(1), requires_grad=False)
        rn.data.fill_(rk)
        self.ranknum[adapter_name] = rn
        self._ranknum_value[adapter_name] = rk
        self.scaling[adapter_name] = lora_alpha if lora_alpha > 0 else float(r)
        if config.init_lora_weights:
            init_adalora_triplet(self.lora_A[adapter_name], self.lora_E[adapter_name], self.lora_B[adapter_name])
        w = self.base_layer.weight
        dtype = w.dtype if w.is_floating_point() else None
        for attr in ("lora_A", "lora_E", "lora_B", "ranknum"):
            par = getattr(self, attr)[adapter_name]
            par.data = par.data.to(device=w.device, dtype=dtype)

    def delete_adapter(self, adapter_name: str) -> None:
        super().delete_adapter(adapter_name)
        self._ranknum_value.pop(adapter_name, None)

    def _scale(self, a: str) -> float:
        return self.scaling[a] / (self._ranknum_value[a] + 1e-5)

    def get_delta_weight(self, a: str) -> torch.Tensor:
        A, E, B = self.lora_A[a], self.lora_E[a], self.lora_B[a]
        return transpose(B @ (A * E), self.fan_in_fan_out) * self.scaling[a] / (self.ranknum[a] + 1e-5)

    def _merge_delta(self, a: str) -> torch.Tensor:
        """The delta a merge adds, in at least fp32 (``get_delta_weight`` without rounding; no gradient)."""
        delta = adalora_delta(self.lora_A[a], self.lora_E[a], self.lora_B[a], 1.0)
        return transpose(delta, self.fan_in_fan_out) * self.scaling[a] / (self.ranknum[a].detach() + 1e-5)

    def _merge_one(self, a: str, safe_merge: bool) -> None:
        w = self.base_layer.weight
        self._write_base_weight(w, add_delta(w.data, self._merge_delta(a)), safe_merge, a)

    def _check_merge_finite(self, adapter_names: list[str]) -> None:
        """safe_merge's check of ``_merge_one``'s arithmetic, without writing (see BaseTunerLayer)."""
        if type(self)._merge_one is not AdaLoraLayer._merge_one:
            return
        w = self.base_layer.weight
        acc = w.data
        with torch.no_grad():
            for a in adapter_names:
                acc = add_delta(acc, self._merge_delta(a))
                if not torch.isfinite(acc).all():
                    raise ValueError(f"NaNs or infs detected in the merged weights; adapter {a!r} seems to be broken "
                                     "(the weights were not modified)")

    def _unmerge_one(self, a: str) -> None:
        w = self.base_layer.weight
        with torch.no_grad():
            w.data.copy_(add_delta(w.data, self._merge_delta(a), -1.0))


class SVDLinear(AdaLoraLayer):
    """AdaLoRA around ``nn.Linear`` / transformers ``Conv1D`` (HF PEFT's ``adalora.SVDLinear``).

    Input x: (..., in_features); output (..., out_features).
    """

    def __init__(self, base_layer: nn.Module, adapter_name: str, r: int, lora_alpha: float,
                 config: AdaLoraConfig) -> None:
        super().__init__(base_layer)
        self._active_adapter = [adapter_name]
        self.update_layer(adapter_name, r, lora_alpha, config)

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if self._base_only():
            return self.base_layer(x, *args, **kwargs)
        active = [a for a in self._present_active() if self.r.get(a, 0) > 0]
        if not active:
            return self.base_layer(x, *args, **kwargs)
        base = self._fused_base(x, args, kwargs) if len(active) == 1 else None
        if base is not None and not isinstance(base, str):
            a = active[0]
            drop = self.lora_dropout[a]
            p = drop.p if isinstance(drop, nn.Dropout) and drop.training else 0.0
            return adalora_linear(x, base[0], base[1], self.lora_A[a], self.lora_E[a], self.lora_B[a],
                                  self.scaling[a], self._ranknum_value[a], p, None, backend=None)
        result = self.base_layer(x, *args, **kwargs)
        for a in active:
            A, E, B = self.lora_A[a], self.lora_E[a], self.lora_B[a]
            xa = self._cast_input_dtype(x, A.dtype)
            result = result + (self.lora_dropout[a](xa) @ (A * E).T @ B.T) * self.scaling[a] / (self.ranknum[a] + 1e-5)
        return result

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, adapters={self.adapter_names()}"
