"""LoRA layers with HF PEFT's module layout (``lora_A``/``lora_B`` ModuleDicts of nn.Linear) and math.

``y = base(x) + Σ_active scaling[a] · B_a(A_a(dropout_a(x)))``, scaling = alpha/r (alpha/√r with rsLoRA), summed
over the active adapters, cast back to the base output's dtype.  With exactly one active adapter the layer calls
``fastpeft.functional.lora_linear`` (the fused kernels on GPU; on CPU, unseeded dropout draws its mask exactly like
``F.dropout``, so a fastpeft model reproduces PEFT's training step under the same RNG state).
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn as nn

from ...functional import lora_linear
from ...utils.adapter_math import add_delta, lora_delta
from ...utils.fused import is_sharded
from ...utils.other import in_out_features, is_conv1d, transpose
from ..tuners_utils import BaseTunerLayer
from .config import LoraConfig
from .dora import (dora_forward, dora_fused_forward, dora_init, dora_merged_weight, dora_unmerged_weight,
                   unmerged_base_weight)
from .init import init_lora_adapter
from .siblings import shared_forward

__all__ = ["LoraLayer", "Linear"]

class LoraLayer(BaseTunerLayer):
    """Per-adapter LoRA state of one wrapped layer (HF PEFT attribute names)."""

    adapter_layer_names = ("lora_A", "lora_B", "lora_magnitude_vector")
    other_param_names = ("r", "lora_alpha", "scaling", "lora_dropout", "lora_bias")

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__(base_layer)
        self._init_lora_state()
        self.in_features, self.out_features = in_out_features(base_layer)
        self.fan_in_fan_out = is_conv1d(base_layer)

    def _init_lora_state(self) -> None:
        """The per-adapter containers every LoRA layer has (PEFT's LoraLayer attributes)."""
        self.r: dict[str, int] = {}
        self.lora_alpha: dict[str, float] = {}
        self.scaling: dict[str, float] = {}
        self.lora_bias: dict[str, bool] = {}
        self.lora_dropout = nn.ModuleDict({})
        self.lora_A = nn.ModuleDict({})
        self.lora_B = nn.ModuleDict({})
        self.lora_magnitude_vector = nn.ModuleDict({})  # DoRA adapters only (fastpeft.tuners.lora.dora)

    def _set_adapter_hparams(self, adapter_name: str, r: int, lora_alpha: float, config: LoraConfig) -> None:
        """Validate ``r`` and record r, alpha, scaling (alpha/r, alpha/√r with rsLoRA) and the dropout module."""
        if isinstance(r, bool) or not isinstance(r, int) or r <= 0:
            raise ValueError(f"r must be a positive int, got {r!r}")
        self.r[adapter_name] = r
        self.lora_alpha[adapter_name] = lora_alpha
        self.scaling[adapter_name] = lora_alpha / math.sqrt(r) if config.use_rslora else lora_alpha / r
        p = float(config.lora_dropout)
        self.lora_dropout[adapter_name] = nn.Dropout(p=p) if p > 0.0 else nn.Identity()

    def update_layer(self, adapter_name: str, r: int, lora_alpha: float, config: LoraConfig) -> None:
        """Create adapter ``adapter_name``: A (r, in), B (out, r), dropout, scaling; PEFT's init and RNG order."""
        self._set_adapter_hparams(adapter_name, r, lora_alpha, config)
        # nn.Linear construction draws from the RNG exactly as PEFT's does (same modules, same order), so a model built
        # under the same seed gets the same initial A (and B when init_lora_weights=False).
        self.lora_A[adapter_name], self.lora_B[adapter_name] = self._make_lora_modules(r, bool(config.lora_bias))
        self.lora_bias[adapter_name] = bool(config.lora_bias)
        init_lora_adapter(self, adapter_name, config.init_lora_weights)  # may rewrite W (PiSSA/OLoRA)
        w = self.base_layer.weight
        dtype = w.dtype if w.is_floating_point() else None
        self.lora_A[adapter_name].to(device=w.device, dtype=dtype)
        self.lora_B[adapter_name].to(device=w.device, dtype=dtype)
        if config.use_dora:
            dora_init(self, adapter_name)

    def _make_lora_modules(self, r: int, lora_bias: bool) -> tuple[nn.Module, nn.Module]:
        """The (lora_A, lora_B) modules of a new adapter, constructed in PEFT's order (same RNG draws)."""
        return nn.Linear(self.in_features, r, bias=False), nn.Linear(r, self.out_features, bias=lora_bias)

    def get_delta_weight(self, adapter_name: str) -> torch.Tensor:
        """``transpose(B @ A, fan_in_fan_out) * scaling`` in the base weight's layout (fp32 math for half on CPU)."""
        B = self.lora_B[adapter_name].weight
        delta = lora_delta(self.lora_A[adapter_name].weight, B, self.scaling[adapter_name])
        return transpose(delta, self.fan_in_fan_out).to(B.dtype)

    def _bias_delta(self, adapter_name: str) -> Optional[torch.Tensor]:
        """``lora_B.bias * scaling`` for lora_bias adapters (None otherwise); needs a base bias to merge into."""
        if not self.lora_bias.get(adapter_name, False):
            return None
        if getattr(self.base_layer, "bias", None) is None:
            raise ValueError(f"cannot merge adapter {adapter_name!r} with lora_bias=True: the base layer has no bias")
        return self.lora_B[adapter_name].bias * self.scaling[adapter_name]

    def _merge_one(self, adapter_name: str, safe_merge: bool) -> None:
        w = self.base_layer.weight
        self.__dict__.pop("_dora_wsq", None)  # DoRA's cached ||W||^2 (writes through .data keep W's version)
        if adapter_name in self.lora_magnitude_vector:
            new = dora_merged_weight(self, adapter_name, w.data, unmerged_base_weight(self))
            self._write_base_weight(w, new, safe_merge, adapter_name)
            return
        bias_delta = self._bias_delta(adapter_name)
        delta = self.get_delta_weight(adapter_name)
        if safe_merge:
            b = self.base_layer.bias
            if bias_delta is not None and not torch.isfinite(add_delta(b.data, bias_delta)).all():
                raise ValueError(f"NaNs or infs detected in the merged bias; adapter {adapter_name!r} seems to be "
                                 "broken (the weights were not modified)")
        self._write_base_weight(w, add_delta(w.data, delta), safe_merge, adapter_name)
        if bias_delta is not None:
            b = self.base_layer.bias
            b.data.copy_(add_delta(b.data, bias_delta))

    def _check_merge_finite(self, adapter_names: list[str]) -> None:
        """safe_merge's check of ``_merge_one``'s arithmetic, without writing (see BaseTunerLayer)."""
        if type(self)._merge_one is not LoraLayer._merge_one:
            return
        w, b = self.base_layer.weight, getattr(self.base_layer, "bias", None)
        acc_w, acc_b = w.data, (b.data if b is not None else None)
        with torch.no_grad():
            for a in adapter_names:
                bias_delta = self._bias_delta(a)
                acc_w = add_delta(acc_w, self.get_delta_weight(a))
                if bias_delta is not None:
                    acc_b = add_delta(acc_b, bias_delta)
                if not torch.isfinite(acc_w).all() or (bias_delta is not None and not torch.isfinite(acc_b).all()):
                    raise ValueError(f"NaNs or infs detected in the merged weights; adapter {a!r} seems to be broken "
                                     "(the weights were not modified)")

    def _unmerge_one(self, adapter_name: str) -> None:
        w = self.base_layer.weight
        self.__dict__.pop("_dora_wsq", None)
        if adapter_name in self.lora_magnitude_vector:
            with torch.no_grad():
                w.data.copy_(dora_unmerged_weight(self, adapter_name, w.data))
            return
        with torch.no_grad():
            w.data.copy_(add_delta(w.data, self.get_delta_weight(adapter_name), -1.0))
            if self.lora_bias.get(adapter_name, False):
                b = self.base_layer.bias
                b.data.copy_(add_delta(b.data, self.lora_B[adapter_name].bias * self.scaling[adapter_name], -1.0))


class Linear(LoraLayer):
    """LoRA around an ``nn.Linear`` or transformers ``Conv1D`` (``fan_in_fan_out``), HF PEFT's ``lora.Linear``.

    Input x: (..., in_features); output (..., out_features) in the base output's dtype.
    """

    def __init__(self, base_layer: nn.Module, adapter_name: str, r: int, lora_alpha: float,
                 config: LoraConfig) -> None:
        super().__init__(base_layer)
        self._active_adapter = [adapter_name]
        self.update_layer(adapter_name, r, lora_alpha, config)

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if self._base_only():
            return self.base_layer(x, *args, **kwargs)
        if self._batch_adapter_names is not None:
            return self._mixed_batch_forward(x, self._batch_adapter_names, *args, **kwargs)
        active = self._present_active()
        if not active:
            return self.base_layer(x, *args, **kwargs)
        ops = self._fused_operands(active, x, args, kwargs)
        if ops is not None:
            a, weight, bias, A, B, scaling, p = ops
            if a in self.lora_magnitude_vector:
                # DoRA without active dropout is one LoRA call plus a column scale; with dropout it needs W·drop(x)
                # too (PEFT's extra matmul), which the loop below does
                if p == 0.0:
                    return dora_fused_forward(self, a, x)
            else:
                if p == 0.0:
                    # q/k/v, gate/up: siblings called with this same x share one shrink (``siblings.py``)
                    y = shared_forward(self, x, _shared_spec)
                    if y is not None:
                        return y
                return lora_linear(x, weight, bias, A, B, scaling, p, None, backend=None)
        # several adapters: PEFT's loop (outputs summed)
        result = self.base_layer(x, *args, **kwargs)
        out_dtype = result.dtype
        for a in active:
            A = self.lora_A[a]
            xa = self._cast_input_dtype(x, A.weight.dtype)
            if a in self.lora_magnitude_vector:
                result = dora_forward(self, a, xa, result)
            else:
                result = result + self.lora_B[a](A(self.lora_dropout[a](xa))) * self.scaling[a]
        return result.to(out_dtype)

    def _fused_operands(self, active: list[str], x: torch.Tensor, args: tuple, kwargs: dict) -> Optional[tuple]:
        """``(adapter, weight (N, K), bias, lora_A (r, K), lora_B (N, r), scaling, dropout p)`` when this call can
        take the fused op (or DoRA's fused path) - one active adapter without ``lora_bias``, a base the op can stand
        in for - else None.  Each module attribute is fetched once (this runs in every forward; host time decides
        small layers)."""
        if len(active) != 1:
            return None
        a = active[0]
        A = self.lora_A[a].weight
        # A DTensor lora_A: FSDP2 sharded the lora_A/lora_B leaves on their own (HF PEFT's fsdp_auto_wrap_policy), so
        # their weights are gathered only when those modules are called - PEFT's loop calls them.
        if self.lora_bias[a] or is_sharded(A):
            return None
        base = self._fused_base(x, args, kwargs)
        if isinstance(base, str):
            return None
        drop = self.lora_dropout[a]
        p = drop.p if isinstance(drop, nn.Dropout) and drop.training else 0.0
        return a, base[0], base[1], A, self.lora_B[a].weight, self.scaling[a], p

    def _shared_spec(self, x: torch.Tensor) -> Optional[tuple]:
        """``(weight (N, K), bias, lora_A (r, K), lora_B (N, r), scaling)`` when this layer can join a sibling group
        for input x (one plain LoRA adapter, no active dropout, fused-capable), else None."""
        if self._base_only() or self._batch_adapter_names is not None:
            return None
        ops = self._fused_operands(self._present_active(), x, (), {})
        if ops is None or ops[0] in self.lora_magnitude_vector or ops[-1] > 0.0:
            return None
        return ops[1:6]

    def _mixed_batch_forward(self, x: torch.Tensor, names: list[str], *args, **kwargs) -> torch.Tensor:
        """Row i uses adapter names[i] ("__base__" or an adapter this layer lacks: base only); PEFT's math."""
        if len(names) != len(x):
            raise ValueError(f"adapter_names has {len(names)} entries but the batch has {len(x)} rows")
        result = self.base_layer(x, *args, **kwargs)
        out_dtype = result.dtype
        for a in dict.fromkeys(names):
            if a == "__base__" or a not in self.lora_A:
                continue
            idx = [i for i, n in enumerate(names) if n == a]
            A = self.lora_A[a]
            sub = self._cast_input_dtype(x[idx], A.weight.dtype)
            if a in self.lora_magnitude_vector:  # (PEFT refuses adapter_names with DoRA; rows as if run alone)
                result[idx] = dora_forward(self, a, sub, result[idx]).to(out_dtype)
                continue
            delta = self.lora_B[a](A(self.lora_dropout[a](sub))) * self.scaling[a]
            result[idx] += delta.to(out_dtype)
        return result

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, adapters={self.adapter_names()}"


def _shared_spec(module, x: torch.Tensor) -> Optional[tuple]:
    """``Linear._shared_spec`` for a sibling-group member (None for any other module type)."""
    return module._shared_spec(x) if type(module) is Linear else None
