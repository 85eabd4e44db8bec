"""Functional entry points of the weight-side methods: ``lora_linear``, ``adalora_linear``, ``dora_linear``,
``ia3_linear``.

The modules (``fastpeft.LoRALinear`` ...) and the model API's tuner layers call these.  Each validates its
arguments (clear ``ValueError``/``TypeError`` naming the argument), flattens leading dimensions, applies autocast,
has ``fastpeft._backend.select_backend`` pick the backend, and calls the op of ``fastpeft.ops`` (whose autograd
formula is registered there) or, on the torch backend without a dropout seed, the op's torch implementation with
autograd building the backward.
"""

from __future__ import annotations

import contextlib
import math
import os
from typing import Optional

import torch

from ._backend import select_backend
from .ops import dora as _dora
from .ops import ia3 as _ia3
from .ops import lora as _lora
from .ops._rebuild import rebuild_with as _rebuild_with

__all__ = ["lora_linear", "adalora_linear", "dora_linear", "ia3_linear", "draw_seed", "set_adapter_autocast"]

# How the LoRA/AdaLoRA branch runs under torch.autocast: "peft" (default) casts its operands to the autocast dtype,
# as HF PEFT's nn.Linear adapter calls are cast, so bf16 training matches PEFT to rounding; "keep" runs it in the
# adapter's own dtype (fp32 adapters: a more accurate branch, losses differ from PEFT's by bf16 rounding).
_ADAPTER_AUTOCAST = os.environ.get("FASTPEFT_ADAPTER_AUTOCAST", "peft").strip().lower()


def set_adapter_autocast(mode: str) -> str:
    """Choose how the LoRA/AdaLoRA branch runs under ``torch.autocast``; returns the previous mode.

    ``"peft"`` (default, also ``FASTPEFT_ADAPTER_AUTOCAST``): lora_A/lora_E/lora_B are cast to the autocast dtype,
    as HF PEFT's layers are.  ``"keep"``: the branch runs in the adapter weights' dtype (fp32 with PEFT's default
    ``autocast_adapter_dtype=True``): more accurate, but bf16 losses then differ from PEFT's by bf16 rounding.
    """
    global _ADAPTER_AUTOCAST
    if mode not in ("peft", "keep"):
        raise ValueError(f"mode must be 'peft' or 'keep', got {mode!r}")
    prev, _ADAPTER_AUTOCAST = _ADAPTER_AUTOCAST, mode
    return prev


# ---------------------------------------------------------------------------------------------------------------
# validation helpers
# ---------------------------------------------------------------------------------------------------------------


def _check_tensor(name: str, t, ndim: Optional[int] = None, optional: bool = False) -> None:
    if t is None and optional:
        return
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if not t.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {t.dtype}")
    if ndim is not None and t.dim() != ndim:
        raise ValueError(f"{name} must be {ndim}-D, got shape {tuple(t.shape)}")


def _check_same_device(x: torch.Tensor, **tensors) -> None:
    for name, t in tensors.items():
        if t is not None and t.device != x.device:
            raise ValueError(f"{name} is on {t.device} but x is on {x.device}")


def _check_float(name: str, v) -> float:
    if isinstance(v, torch.Tensor):
        if v.numel() != 1:
            raise ValueError(f"{name} must be a scalar, got a tensor of shape {tuple(v.shape)}")
        v = v.item()
    if isinstance(v, (torch.SymFloat, torch.SymInt)) or torch.compiler.is_compiling():
        # Under torch.compile a Python float may arrive symbolic (after a recompile with another value), and
        # math.isfinite on it would break the graph; eager calls of the same code check it.
        return v
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise TypeError(f"{name} must be a float, got {type(v).__name__}")
    v = float(v)
    if not math.isfinite(v):
        raise ValueError(f"{name} must be finite, got {v}")
    return v


def _check_dropout(p) -> float:
    p = _check_float("dropout_p", p)
    if not 0.0 <= p < 1.0:
        raise ValueError(f"dropout_p must be in [0, 1), got {p}")
    return p


def draw_seed(generator: Optional[torch.Generator] = None, device: Optional[torch.device] = None):
    """Draw a dropout seed in [0, 2**62) (``torch.manual_seed`` fixes the sequence).

    Without `device`: a host int from torch's default CPU generator (or `generator`).  With `device`: a 1-element
    int64 tensor drawn ON that device by its default generator - a device-side seed: on CUDA, torch's Philox state
    (seed, offset) advances per draw also inside a captured CUDA graph, so every replay draws a fresh seed (a host
    int would be baked into the graph and replay the same mask).  The Triton kernels read it on the device.
    """
    if device is not None:
        return torch.randint(0, 2 ** 62, (1,), generator=generator, dtype=torch.int64, device=device)
    return int(torch.randint(0, 2 ** 62, (), generator=generator, dtype=torch.int64))


def _check_seed(seed) -> int:
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"seed must be an int or None, got {type(seed).__name__}")
    if not 0 <= seed < 2 ** 63:
        raise ValueError(f"seed must be in [0, 2**63), got {seed}")
    return seed


def _autocast(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]):
    """Cast the base operands as autocast would cast an nn.Linear; the adapter keeps its own dtype.

    Returns (x, weight, bias, ctx): run the op inside ``ctx``, which disables autocast while the op runs (otherwise
    autocast would re-cast the adapter branch's matmuls inside the torch implementation, and the torch backend would
    disagree with the fused ones, which keep the adapter dtype).
    """
    dev = x.device.type
    if dev in ("cpu", "cuda") and torch.is_autocast_enabled(dev):
        dt = torch.get_autocast_dtype(dev)
        x, weight = x.to(dt), weight.to(dt)
        bias = bias.to(dt) if bias is not None else None
        return x, weight, bias, torch.autocast(dev, enabled=False)
    return x, weight, bias, contextlib.nullcontext()


def _validate_base_types(x, weight, bias):
    # Before autocast, which calls tensor methods.
    _check_tensor("x", x)
    _check_tensor("weight", weight, 2)
    _check_tensor("bias", bias, 1, optional=True)


def _validate_base(x, weight, bias):
    if x.dim() < 1:
        raise ValueError(f"x must have at least 1 dimension (..., in_features), got shape {tuple(x.shape)}")
    n, k = weight.shape
    if x.shape[-1] != k:
        raise ValueError(f"x has {x.shape[-1]} input features but weight has shape {tuple(weight.shape)} "
                         f"(out_features, in_features) = (., {k})")
    if bias is not None and bias.shape[0] != n:
        raise ValueError(f"bias has shape {tuple(bias.shape)} but weight has {n} output features")
    if weight.dtype != x.dtype:
        raise ValueError(f"x has dtype {x.dtype} but weight has dtype {weight.dtype}; cast one of them "
                         "(or run under torch.autocast)")
    if bias is not None and bias.dtype != weight.dtype:
        raise ValueError(f"bias has dtype {bias.dtype} but weight has dtype {weight.dtype}")
    return n, k


# ---------------------------------------------------------------------------------------------------------------
# LoRA / AdaLoRA
# ---------------------------------------------------------------------------------------------------------------


def _adapter_autocast(x, lora_A, lora_E, lora_B):
    """HF PEFT's casting under autocast: the adapter matmuls run in the autocast dtype (see set_adapter_autocast).
    Called before ``_autocast``'s context is entered, so autocast is still on exactly when ``_autocast`` cast x (asked
    of torch, not of the context object: dynamo in torch 2.11 cannot trace ``isinstance`` on a context manager)."""
    dev = x.device.type
    if dev in ("cpu", "cuda") and torch.is_autocast_enabled(dev) and _ADAPTER_AUTOCAST != "keep" \
            and isinstance(lora_A, torch.Tensor) and lora_A.dtype != x.dtype and lora_A.is_floating_point():
        lora_A = lora_A.to(x.dtype)
        lora_B = lora_B.to(x.dtype) if isinstance(lora_B, torch.Tensor) else lora_B
        lora_E = lora_E.to(x.dtype) if isinstance(lora_E, torch.Tensor) else lora_E
    return lora_A, lora_E, lora_B


def _lora_impl(x, weight, bias, lora_A, lora_E, lora_B, scaling, dropout_p, seed, backend):
    _validate_base_types(x, weight, bias)
    x, weight, bias, ctx = _autocast(x, weight, bias)
    lora_A, lora_E, lora_B = _adapter_autocast(x, lora_A, lora_E, lora_B)
    with ctx:
        return _lora_checked(x, weight, bias, lora_A, lora_E, lora_B, scaling, dropout_p, seed, backend)


def _check_lora_operands(x, weight, bias, lora_A, lora_E, lora_B):
    """Shape / dtype / device checks of the LoRA operands; returns (N, K, r)."""
    n, k = _validate_base(x, weight, bias)
    _check_tensor("lora_A", lora_A, 2)
    _check_tensor("lora_B", lora_B, 2)
    r = lora_A.shape[0]
    if r < 1:
        raise ValueError(f"lora_A must have at least one row (r >= 1), got shape {tuple(lora_A.shape)}")
    if lora_A.shape[1] != k:
        raise ValueError(f"lora_A must have shape (r, in_features) = (r, {k}), got {tuple(lora_A.shape)}")
    if tuple(lora_B.shape) != (n, r):
        raise ValueError(f"lora_B must have shape (out_features, r) = ({n}, {r}), got {tuple(lora_B.shape)}")
    if lora_B.dtype != lora_A.dtype:
        raise ValueError(f"lora_A has dtype {lora_A.dtype} but lora_B has dtype {lora_B.dtype}")
    if lora_E is not None:
        _check_tensor("lora_E", lora_E)
        if lora_E.numel() != r:
            raise ValueError(f"lora_E must have r = {r} elements ((r, 1) or (r,)), got shape {tuple(lora_E.shape)}")
        if lora_E.dtype != lora_A.dtype:
            raise ValueError(f"lora_E has dtype {lora_E.dtype} but lora_A has dtype {lora_A.dtype}")
    _check_same_device(x, weight=weight, bias=bias, lora_A=lora_A, lora_B=lora_B, lora_E=lora_E)
    return n, k, r


def _lora_checked(x, weight, bias, lora_A, lora_E, lora_B, scaling, dropout_p, seed, backend):
    n, k, r = _check_lora_operands(x, weight, bias, lora_A, lora_E, lora_B)
    scaling = _check_float("scaling", scaling)
    dropout_p = _check_dropout(dropout_p)

    lead = x.shape[:-1]
    x2 = x.reshape(-1, k).contiguous()
    e = lora_E.reshape(r) if lora_E is not None else None
    chosen = select_backend("lora", x, backend, dispatch_args=(x2, weight, bias, lora_A, e, lora_B))
    if chosen == "torch" and (dropout_p == 0.0 or seed is None):
        # The torch implementation with autograd building the backward: HF PEFT's own sequence of ops (so a
        # fastpeft model reproduces a PEFT step bit for bit on CPU, and inductor fuses it under torch.compile);
        # unseeded dropout draws its mask like PEFT (F.dropout, torch's RNG).  Seeded dropout goes through the op,
        # whose backward regenerates the mask instead of keeping it.
        return _lora.lora_fwd_ref(x, weight, bias, lora_A, e, lora_B, scaling, dropout_p, None)[0]
    # Fused backends, and seeded dropout on the torch backend (the op regenerates the mask in backward; under
    # torch.compile the custom op keeps the integer Philox rounds out of the traced graph).
    if dropout_p == 0.0:
        seed = 0
    elif seed is None:
        # The triton kernels take a device-side seed (graph-capture safe); the custom op (torch.compile), the
        # extension and the reference take host ints.
        on_device = chosen.startswith("triton") and not torch.compiler.is_compiling()
        seed = draw_seed(device=x.device) if on_device else draw_seed()
    else:
        seed = _check_seed(seed)
    y = _lora.lora_apply(x2, weight, bias, lora_A, e, lora_B, scaling, dropout_p, seed, chosen)
    return y.reshape(*lead, n)


def lora_linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], lora_A: torch.Tensor,
                lora_B: torch.Tensor, scaling: float, dropout_p: float = 0.0, seed: Optional[int] = None, *,
                backend: Optional[str] = None) -> torch.Tensor:
    """LoRA linear layer: ``y = x Wᵀ + b + scaling · (drop(x) Aᵀ) Bᵀ`` (dropout on the LoRA branch only).

    Args:
        x: (..., in_features), any float dtype; the leading dimensions are flattened (a non-contiguous x is copied).
        weight: (out_features, in_features), the frozen base weight; same dtype as x (after autocast).
        bias: (out_features,) or None; frozen unless it requires grad.
        lora_A: (r, in_features), r >= 1.  lora_B: (out_features, r).  Same dtype as each other; may differ from x
            (e.g. fp32 adapters on a bf16 base, HF PEFT's default) - the LoRA branch then runs in the adapter dtype.
        scaling: the scale s (``lora_alpha / r``, or ``lora_alpha / sqrt(r)`` with rsLoRA).
        dropout_p: drop probability of the LoRA branch input, in [0, 1).  Pass 0 in eval mode.
        seed: dropout seed.  With a seed the mask comes from the counter-based stream of
            ``fastpeft.ops.dropout`` (identical on every backend; regenerated in backward, never stored).  Without one,
            the torch backend draws the mask like ``F.dropout`` (matching HF PEFT under the same RNG state) and the
            fused backends draw a seed from torch's default generator.
        backend: None (``FASTPEFT_BACKEND``, default auto), ``"auto"``, ``"torch"``, ``"triton"`` (the frozen
            layer's cuBLAS GEMMs plus skinny Triton kernels), ``"triton:fused"`` (one Triton GEMM with the adapter
            in its epilogue) or ``"cuda"``.  Auto runs triton on CUDA tensors when it is available (or what the
            dispatch table measured fastest for the shape) and torch otherwise; an explicit backend that cannot run
            raises ``RuntimeError`` saying why.
    Returns:
        (..., out_features) in x's dtype.
    Gradients flow to x, lora_A, lora_B, and to bias and weight when they require grad (dW = dyᵀ x, computed only
    then), on every backend.
    """
    return _lora_impl(x, weight, bias, lora_A, None, lora_B, scaling, dropout_p, seed, backend)


def dora_linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], lora_A: torch.Tensor,
                lora_B: torch.Tensor, magnitude: torch.Tensor, scaling: float, *,
                weight_sq: Optional[torch.Tensor] = None, backend: Optional[str] = None) -> torch.Tensor:
    """DoRA linear layer (no dropout): ``y = (m / n) ⊙ (x Wᵀ + scaling · (x Aᵀ) Bᵀ) + b``, n = ‖W + scaling·B·A‖.

    n is taken per output row and treated as a constant (detached), as HF PEFT and the DoRA paper do; it is computed
    without forming W + s·B·A (``fastpeft.ops.dora.dora_row_norm``).  On the fused backends k = m / n is folded into
    the operands (``fastpeft.ops.dora``: the LoRA op on k ⊙ W and k ⊙ B, then one column reduction for dk), so the
    layer costs what ``lora_linear`` costs plus three passes over W (norm, and k ⊙ W each way) and one over (dY, y);
    the torch backend (and fp16 outputs, torch.compile, a trainable base weight) computes
    ``k ⊙ lora_linear(...) + b`` with autograd.

    Args:
        x: (..., in_features).  weight: (out_features, in_features), frozen.  bias: (out_features,) or None.
        lora_A: (r, in_features).  lora_B: (out_features, r).  magnitude: (out_features,), DoRA's m.
        scaling: the LoRA scale s.
        weight_sq: optional ‖W‖² per row (out_features,), computed in fp32 (fp64 for fp64 operands) - a cache the
            caller keeps while W does not change.
        backend: as in ``lora_linear``.
    Returns:
        (..., out_features) in x's dtype.
    """
    _validate_base_types(x, weight, bias)
    _check_tensor("magnitude", magnitude, 1)
    _check_tensor("weight_sq", weight_sq, 1, optional=True)
    raw_w, raw_a, raw_b = weight, lora_A, lora_B
    x, weight, bias, ctx = _autocast(x, weight, bias)
    lora_A, _, lora_B = _adapter_autocast(x, lora_A, None, lora_B)
    with ctx:
        n, k, _ = _check_lora_operands(x, weight, bias, lora_A, None, lora_B)
        for name, t in (("magnitude", magnitude), ("weight_sq", weight_sq)):
            if t is not None and t.shape[0] != n:
                raise ValueError(f"{name} must have shape (out_features,) = ({n},), got {tuple(t.shape)}")
        _check_same_device(x, magnitude=magnitude, weight_sq=weight_sq)
        scaling = _check_float("scaling", scaling)
        x2 = x.reshape(-1, k).contiguous()
        chosen = select_backend("lora", x, backend, dispatch_args=(x2, weight, None, lora_A, None, lora_B))
        compiling = torch.compiler.is_compiling()
        fused = not (chosen == "torch" or x.dtype == torch.float16 or weight.requires_grad or compiling)
        if not fused:
            norm = _dora.dora_norm_ref(raw_w, raw_a.detach(), raw_b.detach(), scaling, weight_sq)
            z = _lora_checked(x, weight, None, lora_A, None, lora_B, scaling, 0.0, None, chosen)
            if not torch.is_autocast_enabled(x.device.type):
                # z (M x N) is kept for the magnitude's gradient; the opt-in GEMM recompute may rebuild it from x
                _rebuild_with(z, lambda xx: _lora_checked(xx, weight, None, lora_A, None, lora_B, scaling, 0.0, None,
                                                          chosen))
            kvec = magnitude / norm.to(raw_a.dtype)
            # (k * z + b).to(z.dtype) bit for bit, its fp32 copies of the 16-bit M x N z formed in chunks
            return _ia3.scale_by_vector(z, kvec, z.dtype, bias)
        def mark(u):   # u (M x N), kept for dm: the opt-in GEMM recompute may rebuild it from x
            _rebuild_with(u, lambda xx: _dora.dora_fwd(
                xx.reshape(-1, k).contiguous(), weight, bias, lora_A, lora_B, magnitude, weight_sq, scaling,
                chosen)[1][0])
        y = _dora.dora_apply(x2, weight, bias, lora_A, lora_B, magnitude, weight_sq, scaling, chosen,
                             None if torch.is_autocast_enabled(x.device.type) else mark)
        return y.reshape(*x.shape[:-1], n)


def adalora_linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], lora_A: torch.Tensor,
                   lora_E: torch.Tensor, lora_B: torch.Tensor, scaling: float, ranknum: float,
                   dropout_p: float = 0.0, seed: Optional[int] = None, *, backend: Optional[str] = None
                   ) -> torch.Tensor:
    """AdaLoRA (SVD-form) linear: ``y = x Wᵀ + b + (drop(x) (A ⊙ E)ᵀ) Bᵀ · scaling / (ranknum + 1e-5)``.

    Args:
        x: (..., in_features).  weight: (out_features, in_features).  bias: (out_features,) or None.
        lora_A: (r, in_features).  lora_E: (r, 1) or (r,), the singular values.  lora_B: (out_features, r).
        scaling: ``lora_alpha`` (HF PEFT's AdaLoRA scaling).  ranknum: the initial rank (a float; PEFT keeps it at
            ``init_r`` even when ranks are masked).
        dropout_p, seed, backend: as in ``lora_linear``.
    Returns:
        (..., out_features) in x's dtype.  Gradients flow to x, lora_A, lora_E, lora_B (and bias if trainable).
    """
    ranknum = _check_float("ranknum", ranknum)
    if isinstance(ranknum, (int, float)) and not ranknum > 0:  # the scale divides by ranknum + 1e-5
        raise ValueError(f"ranknum must be > 0 (AdaLoRA's initial rank, a float), got {ranknum}")
    scale = _check_float("scaling", scaling) / (ranknum + 1e-5)
    _check_tensor("lora_E", lora_E)
    return _lora_impl(x, weight, bias, lora_A, lora_E, lora_B, scale, dropout_p, seed, backend)


# ---------------------------------------------------------------------------------------------------------------
# IA3
# ---------------------------------------------------------------------------------------------------------------


def ia3_linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], ia3_l: torch.Tensor,
               feedforward: bool = False, *, backend: Optional[str] = None) -> torch.Tensor:
    """(IA)³ linear layer.

    ``feedforward=False`` (attention modules): ``y = (x Wᵀ + b) ⊙ l``, l has out_features elements.
    ``feedforward=True`` (feed-forward modules): ``y = (x ⊙ l) Wᵀ + b``, l has in_features elements.

    Args:
        x: (..., in_features).  weight: (out_features, in_features), frozen.  bias: (out_features,) or None.
        ia3_l: the learned vector, any shape with the right number of elements (HF PEFT stores (out, 1) and (1, in)).
        feedforward: which mode (see above).
        backend: as in ``lora_linear``.
    Returns:
        (..., out_features) in x's dtype.  Gradients flow to x, ia3_l, and to bias and weight when they require
        grad (output mode dW = (dy ⊙ l)ᵀ x, input mode dyᵀ (x ⊙ l); computed only then), on every backend.
    """
    _validate_base_types(x, weight, bias)
    x, weight, bias, ctx = _autocast(x, weight, bias)
    n, k = _validate_base(x, weight, bias)
    _check_tensor("ia3_l", ia3_l)
    if not isinstance(feedforward, bool):
        raise TypeError(f"feedforward must be a bool, got {type(feedforward).__name__}")
    want = k if feedforward else n
    if ia3_l.numel() != want:
        mode = "in_features (feedforward)" if feedforward else "out_features"
        raise ValueError(f"ia3_l must have {mode} = {want} elements, got shape {tuple(ia3_l.shape)}")
    _check_same_device(x, weight=weight, bias=bias, ia3_l=ia3_l)
    lead = x.shape[:-1]
    x2 = x.reshape(-1, k).contiguous()
    chosen = select_backend("ia3", x, backend, dispatch_args=(x2, weight, bias, ia3_l.reshape(want), feedforward))
    if chosen == "torch":
        # The torch implementation, HF PEFT's own ops, with autograd building the backward (as fast as PEFT on
        # CPU); the explicit backward of fastpeft.ops.ia3 is the ground truth of the fused backends.
        with ctx:
            return _ia3.ia3_fwd_ref(x, weight, bias, ia3_l.reshape(want), feedforward)[0]
    with ctx:
        y = _ia3.ia3_apply(x2, weight, bias, ia3_l.reshape(want), feedforward, chosen)
    return y.reshape(*lead, n)
