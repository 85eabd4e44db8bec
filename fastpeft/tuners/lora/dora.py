"""DoRA (``use_dora=True``): weight-decomposed LoRA with HF PEFT 0.21.2's parameters, math and file keys.

Per adapter the layer holds a magnitude ``m`` (``lora_magnitude_vector[name].weight``: shape (out,) for Linear /
Conv1D bases, (1, out, 1, ...) for a conv, as in PEFT; saved as ``...lora_magnitude_vector`` without ``.weight``).
The adapted weight is ``W' = (m / n) · (W + s·B·A)`` with ``n = ‖W + s·B·A‖`` per output row, and ``n`` is treated
as a constant (detached), as the DoRA paper (section 4.3) and PEFT do.  The forward adds to the base output::

    k = m / n                                     # (1, out)
    base = result - bias             (eval, or no dropout: reuse the base output)
         = W · dropout(x)            (train with dropout: one extra matmul, like PEFT)
    result + (k - 1) · base + k · s · B(A(dropout(x)))

The row norm is computed without materialising ``W + s·B·A``:
``n² = ‖W‖² + 2s·rowsum(B ⊙ (W Aᵀ)) + s²·rowsum((B·AAᵀ) ⊙ B)``, with ``‖W‖²`` cached per layer (W is frozen;
the cache is keyed on the weight's storage, version and shape).  Where that sum cancels (n² much smaller than the
terms that make it up, i.e. ``s·B·A ≈ -W`` on a row) the rows concerned are recomputed directly, so the result keeps
the accuracy of the direct norm (on CPU every such row; on an accelerator and under torch.compile, without a host
sync, the ``DORA_SYNC_FREE_FALLBACK_ROWS`` worst rows of the layer).  Merge uses PEFT's direct formula (the norm of the unmerged weight, cached for the
unmerge).
"""

from __future__ import annotations


import torch
import torch.nn as nn
import torch.nn.functional as F

from ...functional import dora_linear
from ...ops.dora import (DORA_CANCELLATION_LIMIT, DORA_SYNC_FREE_FALLBACK_ROWS, dora_norm_ref, dora_row_norm,
                         weight_row_sq)
from ...utils.other import linear_weight_oi, transpose

__all__ = ["DoraLinearLayer", "dora_row_norm", "dora_init", "dora_forward", "dora_fused_forward", "dora_merged_weight",
           "dora_unmerged_weight", "DORA_CANCELLATION_LIMIT", "DORA_SYNC_FREE_FALLBACK_ROWS"]

class DoraLinearLayer(nn.Module):
    """Holds the DoRA magnitude of one adapter as ``weight`` (PEFT's ``DoraLinearLayer`` parameter name)."""

    def __init__(self, fan_in_fan_out: bool) -> None:
        super().__init__()
        self.fan_in_fan_out = fan_in_fan_out

    def __repr__(self) -> str:
        return "lora.dora." + super().__repr__()


def _flat_oi(layer) -> torch.Tensor:
    """The base weight as (out, in·prod(kernel)): the transposed view for Conv1D, a reshape for a conv."""
    w = layer.base_layer.weight
    if w.dim() > 2:
        return w.reshape(w.shape[0], -1)
    return transpose(w, layer.fan_in_fan_out)


def _weight_sq_rows(layer, w_oi: torch.Tensor) -> torch.Tensor:
    """‖W‖² per output row in fp32 (>=), cached on the layer until the base weight changes."""
    w = layer.base_layer.weight
    key = (w.data_ptr(), w._version, tuple(w.shape), w.dtype, w.device)
    cache = layer.__dict__.setdefault("_dora_wsq", {})
    hit = cache.get("v")
    if hit is not None and hit[0] == key:
        return hit[1]
    sq = weight_row_sq(w_oi, torch.promote_types(w_oi.dtype, torch.float32))
    cache["v"] = (key, sq)
    return sq


def _lora_weight_oi(layer, adapter_name: str) -> torch.Tensor:
    """``B @ A`` as (out, in·k·k) in the adapter dtype (PEFT's ``lora_B @ lora_A`` / conv reshape)."""
    A = layer.lora_A[adapter_name].weight
    B = layer.lora_B[adapter_name].weight
    r = A.shape[0]
    return B.reshape(-1, r) @ A.reshape(r, -1)


def _direct_norm(w: torch.Tensor, lora_weight: torch.Tensor, scaling: float, fan_in_fan_out: bool) -> torch.Tensor:
    """PEFT's ``get_weight_norm``: the norm of the materialised ``W + s·ΔW`` (Linear: (out,), conv:
    (1, out, 1, ...))."""
    if w.dim() > 2:
        tot = w + scaling * lora_weight.reshape(w.shape)
        return tot.norm(p=2, dim=tuple(range(1, tot.dim())), keepdim=True).transpose(1, 0)
    tot = transpose(w, fan_in_fan_out) + scaling * lora_weight
    return torch.linalg.norm(tot, dim=1).to(tot.dtype)


def dora_init(layer, adapter_name: str) -> None:
    """Create ``lora_magnitude_vector[adapter_name]`` with ``m = ‖W + s·B·A‖`` (PEFT's init: direct, once)."""
    A = layer.lora_A[adapter_name].weight
    B = layer.lora_B[adapter_name].weight
    w = layer.base_layer.weight
    half = A.dtype == torch.float16  # PEFT computes B@A in fp32 for fp16 adapters, then rounds
    with torch.no_grad():
        r = A.shape[0]
        lw = (B.float().reshape(-1, r) @ A.float().reshape(r, -1)).half() if half else \
            B.reshape(-1, r) @ A.reshape(r, -1)
        norm = _direct_norm(w.to(A.device), lw, layer.scaling[adapter_name], layer.fan_in_fan_out)
    mod = DoraLinearLayer(fan_in_fan_out=layer.fan_in_fan_out)
    mod.weight = nn.Parameter(norm, requires_grad=True)
    layer.lora_magnitude_vector[adapter_name] = mod


def _norm_for_forward(layer, adapter_name: str, dtype: torch.dtype) -> torch.Tensor:
    """n (out,) for the forward, in ``dtype``, detached."""
    w_oi = _flat_oi(layer)
    A = layer.lora_A[adapter_name].weight
    B = layer.lora_B[adapter_name].weight
    r = A.shape[0]
    w_sq = None if torch.compiler.is_compiling() else _weight_sq_rows(layer, w_oi)
    return dora_norm_ref(w_oi.to(dtype), A.detach().reshape(r, -1).to(dtype), B.detach().reshape(-1, r).to(dtype),
                         layer.scaling[adapter_name], w_sq).to(dtype)


def unmerged_base_weight(layer) -> torch.Tensor:
    """A copy of the base weight with every merged adapter of ``layer`` taken out again (last merged first)."""
    with torch.no_grad():
        w = layer.base_layer.weight.detach().clone()
        mags = layer.lora_magnitude_vector
        for name in reversed(layer.merged_adapters):
            if name in mags:
                w = dora_unmerged_weight(layer, name, w, pop=False)
            else:
                w = w - layer.get_delta_weight(name).to(w.dtype)
        return w


def dora_forward(layer, adapter_name: str, x: torch.Tensor, result: torch.Tensor) -> torch.Tensor:
    """``result`` (the base output incl. bias) plus the DoRA term of ``adapter_name`` (see the module docstring).

    x: (..., in) for Linear/Conv1D or (N, C, *spatial) for a conv, already in the adapter dtype.  Returns the new
    result.
    """
    lora_A = layer.lora_A[adapter_name]
    lora_B = layer.lora_B[adapter_name]
    dropout = layer.lora_dropout[adapter_name]
    scaling = layer.scaling[adapter_name]
    base = layer.base_layer
    w = base.weight
    conv = w.dim() > 2
    if isinstance(dropout, nn.Identity) or not layer.training:
        base_result = result
        if base.bias is not None:
            base_result = base_result - (base.bias.view((1, -1) + (1,) * (result.dim() - 2)) if conv else base.bias)
    else:
        x = dropout(x)
        if conv:
            conv_fn = (F.conv1d, F.conv2d, F.conv3d)[w.dim() - 3]
            base_result = conv_fn(x, w.to(x.dtype), None, base.stride, base.padding, base.dilation, base.groups)
        else:
            base_result = F.linear(x, transpose(w.to(x.dtype), layer.fan_in_fan_out))
    magnitude = layer.lora_magnitude_vector[adapter_name].weight
    n = _norm_for_forward(layer, adapter_name, x.dtype)
    if conv:
        k = magnitude / n.view((1, -1) + (1,) * (w.dim() - 2))
    else:
        k = (magnitude / n).view(1, -1)
    lora_result = lora_B(lora_A(x))
    return result + ((k - 1) * base_result + k * lora_result * scaling)


def dora_fused_forward(layer, adapter_name: str, x: torch.Tensor) -> torch.Tensor:
    """One active DoRA adapter and no active dropout: ``y = k ⊙ (W x + s·B A x) + b`` with ``k = m / n``.

    That equals PEFT's ``result + (k - 1)·(result - b) + k·s·B A x``, so the whole layer is one
    ``fastpeft.functional.dora_linear`` call: on the fused backends the LoRA kernels on k-scaled operands plus one
    column reduction for the magnitude's gradient, so DoRA costs what LoRA costs plus the row norm (O(out·in·r), once
    per step) and a pass over W each way.  Linear / Conv1D bases only.
    x: (..., in) in the base dtype -> (..., out) in x's dtype.
    """

    base = layer.base_layer
    A = layer.lora_A[adapter_name].weight
    B = layer.lora_B[adapter_name].weight
    m = layer.lora_magnitude_vector[adapter_name].weight
    w_sq = None if torch.compiler.is_compiling() else _weight_sq_rows(layer, linear_weight_oi(base))
    return dora_linear(x, linear_weight_oi(base), base.bias, A, B, m, layer.scaling[adapter_name], weight_sq=w_sq,
                       backend=None)


# -- merge ---------------------------------------------------------------------------------------------------------


def _factor(layer, adapter_name: str, weight_norm: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """``m / n`` shaped to broadcast over the base weight's own layout."""
    f = layer.lora_magnitude_vector[adapter_name].weight / weight_norm
    if w.dim() > 2:
        return f.transpose(1, 0)  # (1, out, 1, ...) -> (out, 1, 1, ...)
    return transpose(f.view(-1, 1), layer.fan_in_fan_out)


def dora_merged_weight(layer, adapter_name: str, current: torch.Tensor, unmerged: torch.Tensor) -> torch.Tensor:
    """``(m / n) · (current + ΔW)`` with n taken on ``unmerged`` (the base weight without any merged adapter), as
    PEFT; n is remembered on the layer for ``dora_unmerged_weight``.  Tensors in the base weight's layout."""
    with torch.no_grad():
        delta = layer.get_delta_weight(adapter_name)
        if unmerged.dim() > 2:
            norm = _direct_norm(unmerged, delta, 1.0, False)
        else:
            norm = _direct_norm(unmerged, transpose(delta, layer.fan_in_fan_out), 1.0, layer.fan_in_fan_out)
        norm = norm.detach()
        layer.__dict__.setdefault("_dora_merge_norm", {})[adapter_name] = norm
        new = _factor(layer, adapter_name, norm, current) * (current + delta)
        return new.to(current.dtype)


def dora_unmerged_weight(layer, adapter_name: str, current: torch.Tensor, pop: bool = True) -> torch.Tensor:
    """Inverse of ``dora_merged_weight``: ``current / (m / n) - ΔW`` with the n remembered at merge time."""
    with torch.no_grad():
        store = layer.__dict__.get("_dora_merge_norm", {})
        norm = store.pop(adapter_name) if pop else store[adapter_name]
        delta = layer.get_delta_weight(adapter_name)
        new = current / _factor(layer, adapter_name, norm, current) - delta
        return new.to(current.dtype)
