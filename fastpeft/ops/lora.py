"""LoRA (and AdaLoRA) linear: the op's declaration - torch implementation, fake kernel, custom ops, autograd.

The op, one name through every layer::

    y = x Wᵀ + b + scaling · ((drop(x) Aᵀ) ⊙ e) Bᵀ          x: (M, K), W: (N, K), A: (r, K), B: (N, r), e: (r,)

``e`` is AdaLoRA's singular-value vector ``lora_E`` (flattened); plain LoRA passes ``None`` (e = 1).
W and b are normally frozen; when either requires grad its gradient is computed (dW = dyᵀ x, db = Σ_m dy), only
then, on every backend (dW by one cuBLAS GEMM in the op's backward, shared by all backends).

Pieces, in this file unless named:
  * ``lora_fwd_ref`` / ``lora_bwd_ref``  - the torch implementation; the CPU path and the ground truth.
  * ``fastpeft.kernels.lora.lora_fwd_triton`` / ``lora_bwd_triton`` - Triton (same signature as the refs).
  * ``fastpeft._cuda.lora_fwd_cuda`` / ``lora_bwd_cuda`` - the C++/CUDA extension (same signature).
    (``fastpeft/ops/_registry.py`` finds these by name and says which arguments each takes.)
  * ``lora_fwd_meta`` / ``lora_bwd_meta`` - the fake kernels (shapes checked with ``torch._check``), registered for
    the custom ops and for the extension's ops.
  * custom ops ``fastpeft::lora_fwd`` / ``fastpeft::lora_bwd`` (autograd registered on ``lora_fwd``), so
    ``torch.compile`` traces through without graph breaks.
  * ``_lora_grads`` - the autograd formula, used by the custom op's registered autograd and by
    ``LoRALinearFunction``, the eager path ``lora_apply`` takes outside ``torch.compile`` (see its docstring for why
    it exists).
  * ``fastpeft.functional.lora_linear`` - validation, reshaping, autocast, then ``fastpeft._backend.select_backend``.

Saved for backward: x, S = drop(x)Aᵀ (M×r, fp32) and the seed - never a dropped copy of x or a mask.

Precision policy: the LoRA branch runs in the adapter dtype (``A.dtype``), as HF PEFT does (x is cast to the
adapter dtype before A); S is returned in fp32 (fp64 for fp64 adapters); the output has x's dtype.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from .._meta import lora_bwd_meta, lora_fwd_meta  # noqa: F401  (public here too)
from ._registry import impl as _impl
from ._registry import needs_autograd
from ._chunks import fill_rows, spans
from .dropout import dropout_keep_mask, dropout_scale, host_seed, seeded_dropout

# ---------------------------------------------------------------------------------------------------------------
# Reference (torch) implementation
# ---------------------------------------------------------------------------------------------------------------


def lora_fwd_ref(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], lora_A: torch.Tensor,
                 lora_E: Optional[torch.Tensor], lora_B: torch.Tensor, scaling: float, dropout_p: float,
                 seed: Optional[int], upcast: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """The torch forward: the torch backend (autograd builds its backward, or ``lora_bwd_ref`` does) and the
    ground truth of the others.  The sequence of ops is HF PEFT's LoRA layer's, so on CPU the result is bitwise
    PEFT's.

    Args:
        x: (M, K) (the torch backend also passes (..., K)).  weight: (N, K).  bias: (N,) or None.  lora_A: (r, K).
        lora_E: (r,) or None.  lora_B: (N, r).  scaling: the LoRA scale s.  dropout_p: drop probability of the
        LoRA branch input (x is dropped in its own dtype, then cast to the adapter dtype).  seed: mask seed of the
        shared stream (``fastpeft.ops.dropout``; x must be 2-D then), or None: the mask drawn by ``F.dropout`` from
        torch's RNG, as HF PEFT draws it (``lora_bwd_ref`` cannot regenerate such a mask: autograd must build the
        backward).
        upcast: compute everything in fp64 (or fp32 for low-precision inputs when False) - the ground truth.
    Returns:
        y: (M, N) in x's dtype (fp64 when `upcast`), and S = drop(x) Aᵀ: (M, r) in
        ``promote_types(A.dtype, fp32)`` (fp32 for fp32/fp16/bf16 adapters, fp64 for fp64 adapters or `upcast`).
    """
    out_dtype = x.dtype
    if upcast:
        x, weight, lora_A, lora_B = (t.double() for t in (x, weight, lora_A, lora_B))
        bias = bias.double() if bias is not None else None
        lora_E = lora_E.double() if lora_E is not None else None
        out_dtype = torch.float64
    adt = lora_A.dtype
    base = F.linear(x, weight, bias)
    # Dropout before the cast to the adapter dtype, as the fused kernels do (HF PEFT casts first: with fp32 adapters
    # on a 16-bit base its dropped copy, mask and cast are fp32 - 12 bytes per input element in a training forward
    # where this order holds 8; the dropped values differ from PEFT's by one 16-bit rounding of x / (1 - p)).
    if seed is None:
        xd = F.dropout(x, dropout_p, training=True) if dropout_p > 0.0 else x
    else:
        xd = seeded_dropout(x, dropout_p, seed)
    # Without a gradient to build (inference, torch.no_grad) the Functions' own Python is skipped: the same values
    # (their compute), ~15 µs less per call on the host (``python -m benchmarks.bench_host``, fastpeft-torch rows).
    track = needs_autograd(xd, lora_A, lora_E, lora_B, base)
    s = _Shrink.apply(xd, lora_A) if track else _Shrink.compute(xd, lora_A)
    del xd
    se = s * _cast(lora_E, adt) if lora_E is not None else s
    b_a = _cast(lora_B, adt)
    if adt == torch.promote_types(base.dtype, adt):
        y = (_ScaledDeltaAdd.apply(base, se, b_a, scaling, out_dtype) if track
             else _ScaledDeltaAdd.compute(base, se, b_a, scaling, out_dtype))
    else:  # 16-bit adapters on a wider base: PEFT's ops as they are
        delta = (se @ b_a.t()) * scaling
        y = _cast(_cast(base, torch.promote_types(base.dtype, delta.dtype)) + delta, out_dtype)
    # S keeps fp32 at least (fp64 adapters keep fp64, so their dB/dE do not lose precision).
    return y, _cast(s, torch.promote_types(s.dtype, torch.float32))


class _Shrink(torch.autograd.Function):
    """``S = x.to(A.dtype) Aᵀ`` - HF PEFT's ``lora_A(x.to(A.dtype))``, bit for bit, forward and backward (the GEMM
    calls autograd makes for the folded matmul, and the cast's backward), without PEFT's M x K temporaries: x is
    saved in its own dtype (what the recompute rebuilds), a cast input is cast in chunks (``_chunks.spans``), and dA is
    formed before dx, with the (rebuilt) input released in between.

    x: (..., K), any float dtype.  A: (r, K).  Returns S: (..., r) in A's dtype."""

    @staticmethod
    def forward(ctx, x, lora_A):
        ctx.save_for_backward(x, lora_A)
        return _Shrink.compute(x, lora_A)

    @staticmethod
    def compute(x, lora_A):
        """The forward's values (also what ``lora_fwd_ref`` calls when no gradient is needed)."""
        x2, at = x.reshape(-1, x.shape[-1]), lora_A.t()
        if x.dtype == lora_A.dtype:
            s = x2.mm(at)
        else:
            s = fill_rows(x2.new_empty(x2.shape[0], at.shape[1], dtype=lora_A.dtype),
                          lambda rows: x2[rows].to(lora_A.dtype).mm(at))
        return s.view(*x.shape[:-1], lora_A.shape[0])

    @staticmethod
    def backward(ctx, ds):
        x, a = ctx.saved_tensors
        ds2, x2 = ds.reshape(-1, ds.shape[-1]), x.reshape(-1, x.shape[-1])
        da = None
        if ctx.needs_input_grad[1]:
            # mm's backward for its column-major second operand Aᵀ: (dSᵀ x), transposed twice (torch's
            # mm_mat2_backward); a cast x in column chunks
            if x.dtype == a.dtype:
                da = ds2.t().mm(x2)
            else:
                da = a.new_empty(a.shape)
                for cols in spans(x2.shape[1]):
                    da[:, cols] = ds2.t().mm(x2[:, cols].to(a.dtype))
        x_shape, x_dtype = x.shape, x.dtype
        del x, x2
        if not ctx.needs_input_grad[0]:
            return None, da
        if x_dtype == a.dtype:
            return ds2.mm(a).view(x_shape), da
        # (dS A).to(x.dtype), the cast's backward, chunk by chunk into a tensor of x's shape: not a view, so autograd
        # can add the base branch's dx into it in place (a view would cost one more M x K buffer for the sum)
        return fill_rows(ds2.new_empty(x_shape, dtype=x_dtype), lambda rows: ds2[rows].mm(a)), da


class _ScaledDeltaAdd(torch.autograd.Function):
    """``y = (base + (se Bᵀ) · scaling).to(out_dtype)`` - the tail of HF PEFT's LoRA forward, bit for bit, forward
    and backward, without PEFT's M x N temporaries (forward: the product, its scaled copy, base's cast and the sum;
    backward: dY's cast, its scaled copy, dY cast back for the base branch): on a base of the adapter dtype one
    buffer each way, on a narrower base chunks of one (``_chunks.spans``).  IEEE sums and products are commutative,
    so the in-place versions give PEFT's values; dse and dB are the very GEMM calls autograd makes for ``se @ Bᵀ``.

    base: (..., N), any float dtype.  se: (..., r) and B: (N, r) in the adapter dtype, which is base's or wider.
    Saves se and B only."""

    @staticmethod
    def forward(ctx, base, se, lora_B, scaling, out_dtype):
        ctx.save_for_backward(se, lora_B)
        ctx.scaling, ctx.base_dtype = scaling, base.dtype
        return _ScaledDeltaAdd.compute(base, se, lora_B, scaling, out_dtype)

    @staticmethod
    def compute(base, se, lora_B, scaling, out_dtype):
        """The forward's values (also what ``lora_fwd_ref`` calls when no gradient is needed)."""
        bt = lora_B.t()
        if out_dtype == lora_B.dtype:
            if torch.compiler.is_compiling():  # no in-place op on the returned tensor: see _chunks.fill_rows
                return (se @ bt) * scaling + base
            return (se @ bt).mul_(scaling).add_(base)
        se2, base2 = se.reshape(-1, se.shape[-1]), base.reshape(-1, base.shape[-1])
        return fill_rows(base.new_empty(base.shape, dtype=out_dtype),
                         lambda rows: se2[rows].mm(bt).mul_(scaling).add_(base2[rows]))

    @staticmethod
    def backward(ctx, dy):
        se, b = ctx.saved_tensors
        adt, sc = b.dtype, ctx.scaling
        dy2, se2 = dy.reshape(-1, dy.shape[-1]), se.reshape(-1, se.shape[-1])
        d_se = d_b = None
        if dy.dtype == adt:
            g2 = dy2 * sc
            d_se = g2.mm(b) if ctx.needs_input_grad[1] else None
            # mm's backward for its column-major second operand Bᵀ: (gᵀ se), transposed twice (mm_mat2_backward)
            d_b = g2.t().mm(se2) if ctx.needs_input_grad[2] else None
            del g2
        else:  # g = dY.to(adt) · scaling, formed in row chunks for dse (sums over N) and column chunks for dB (over M)
            if ctx.needs_input_grad[1]:
                d_se = fill_rows(se2.new_empty(se2.shape), lambda rows: dy2[rows].to(adt).mul_(sc).mm(b))
            if ctx.needs_input_grad[2]:
                d_b = b.new_empty(b.shape)
                for cols in spans(dy2.shape[1]):
                    d_b[cols] = dy2[:, cols].to(adt).mul_(sc).t().mm(se2)
        d_base = _cast(dy, ctx.base_dtype) if ctx.needs_input_grad[0] else None
        return d_base, None if d_se is None else d_se.view(se.shape), d_b, None, None


def _cast(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``t.to(dtype)`` without the call when it would return ``t`` itself."""
    return t if t.dtype == dtype else t.to(dtype)


def lora_bwd_ref(dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, lora_A: torch.Tensor,
                 lora_E: Optional[torch.Tensor], lora_B: torch.Tensor, S: torch.Tensor, scaling: float,
                 dropout_p: float, seed: int, needs_dx: bool, has_bias: bool
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Reference backward.

    Args:
        dy: (M, N) gradient of y.  x, weight, lora_A, lora_E, lora_B, scaling, dropout_p, seed: as in the forward.
        S: (M, r) fp32, saved by the forward.  needs_dx: compute dx.  has_bias: compute dbias.
    Returns:
        dx (M, K) in x's dtype (empty (0,) if not `needs_dx`), dA (r, K), dE (r,) (empty if lora_E is None),
        dB (N, r) - in the adapter dtypes - and dbias (N,) in weight's dtype (empty if not `has_bias`).

    Math (with Se = S ⊙ e, dSe = s · dy B, dS = dSe ⊙ e):
        dB = s · dyᵀ Se        dE = Σ_m (dSe ⊙ S)        dA = dSᵀ drop(x)
        dx = dy W + mask ⊙ (dS A) · scale        (mask, scale: the ``fastpeft.ops.dropout`` stream)
    """
    adt = lora_A.dtype
    Sa = S.to(adt)
    dy_a = dy.to(adt)
    e = lora_E.to(adt) if lora_E is not None else None
    se = Sa * e if e is not None else Sa
    d_se = (dy_a @ lora_B.to(adt)) * scaling  # (M, r)
    dB = (dy_a.t() @ se) * scaling
    dS = d_se * e if e is not None else d_se
    dE = (d_se * Sa).sum(0) if e is not None else dy.new_empty(0, dtype=adt)
    xd = seeded_dropout(x, dropout_p, seed).to(adt)
    dA = dS.t() @ xd
    if needs_dx:
        lora_dx = dS @ lora_A  # (M, K) in adapter dtype
        if dropout_p != 0.0:
            keep = dropout_keep_mask(host_seed(seed), tuple(x.shape), dropout_p, x.device)
            lora_dx = torch.where(keep, lora_dx * dropout_scale(dropout_p), torch.zeros((), dtype=adt,
                                                                                          device=x.device))
        base_dx = dy @ weight.to(dy.dtype)
        dx = (base_dx.to(torch.promote_types(base_dx.dtype, adt)) + lora_dx).to(x.dtype)
    else:
        dx = x.new_empty(0)
    dbias = dy.sum(0).to(weight.dtype) if has_bias else dy.new_empty(0, dtype=weight.dtype)
    return dx, dA.to(lora_A.dtype), dE.to(lora_E.dtype) if lora_E is not None else dE, dB.to(lora_B.dtype), dbias


# ---------------------------------------------------------------------------------------------------------------
# Fake (meta) kernels: shapes and dtypes of the outputs, with the shape contract checked.  One per op direction; the
# custom ops below and the extension's ops (``fastpeft._cuda``) register these.
# ---------------------------------------------------------------------------------------------------------------


# ---------------------------------------------------------------------------------------------------------------
# Custom ops
# ---------------------------------------------------------------------------------------------------------------


@torch.library.custom_op("fastpeft::lora_fwd", mutates_args=())
def lora_fwd(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], lora_A: torch.Tensor,
             lora_E: Optional[torch.Tensor], lora_B: torch.Tensor, scaling: float, dropout_p: float, seed: int,
             backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Custom op: (y, S) = LoRA forward on `backend` (already resolved).  Shapes as in ``lora_fwd_ref``."""
    y, s = _impl("lora_fwd", backend)(x, weight, bias, lora_A, lora_E, lora_B, scaling, dropout_p, seed)
    return y, s


@lora_fwd.register_fake
def _(x, weight, bias, lora_A, lora_E, lora_B, scaling, dropout_p, seed, backend):
    return lora_fwd_meta(x, weight, bias, lora_A, lora_E, lora_B)


@torch.library.custom_op("fastpeft::lora_bwd", mutates_args=())
def lora_bwd(dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, lora_A: torch.Tensor,
             lora_E: Optional[torch.Tensor], lora_B: torch.Tensor, S: torch.Tensor, scaling: float, dropout_p: float,
             seed: int, needs_dx: bool, has_bias: bool, backend: str
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Custom op: (dx, dA, dE, dB, dbias) = LoRA backward on `backend`.  See ``lora_bwd_ref``."""
    outs = _impl("lora_bwd", backend)(dy, x, weight, lora_A, lora_E, lora_B, S, scaling, dropout_p, seed,
                                      needs_dx, has_bias)
    return tuple(o.contiguous() for o in outs)


@lora_bwd.register_fake
def _(dy, x, weight, lora_A, lora_E, lora_B, S, scaling, dropout_p, seed, needs_dx, has_bias, backend):
    return lora_bwd_meta(dy, x, weight, lora_A, lora_E, lora_B, S, needs_dx, has_bias)


def _lora_save(ctx, inputs, s):
    x, weight, bias, lora_A, lora_E, lora_B, scaling, dropout_p, seed, backend = inputs
    ctx.save_for_backward(x, weight, lora_A, lora_E, lora_B, s)
    ctx.scaling, ctx.dropout_p, ctx.seed, ctx.backend = scaling, dropout_p, seed, backend
    ctx.has_bias = bias is not None


def base_weight_grad(dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """dW = dyᵀ x (N, K) in weight's dtype, shaped like `weight` (a transposed view gets its gradient as a view of
    the same layout); one cuBLAS GEMM, the one ``nn.Linear`` makes.  dy: (M, N), x: (M, K)."""
    if weight.stride(0) == 1 and weight.dim() == 2 and weight.shape[1] > 1:
        return torch.mm(x.t(), dy.to(x.dtype)).to(weight.dtype).t()  # Conv1D's weight.t(): (K, N) storage
    return torch.mm(dy.to(x.dtype).t(), x).to(weight.dtype)


def _lora_grads(ctx, dy, bwd):
    x, weight, lora_A, lora_E, lora_B, s = ctx.saved_tensors
    needs_dx = ctx.needs_input_grad[0]
    bias_grad = ctx.has_bias and ctx.needs_input_grad[2]
    dy = dy.contiguous()
    dx, dA, dE, dB, dbias = bwd(dy, x, weight, lora_A, lora_E, lora_B, s, ctx.scaling, ctx.dropout_p,
                                ctx.seed, needs_dx, bias_grad, ctx.backend)
    # The base weight's gradient only when it is trainable (HF PEFT's layer gives it then too).
    dW = base_weight_grad(dy, x, weight) if ctx.needs_input_grad[1] else None
    return (dx if needs_dx else None, dW, dbias if bias_grad else None, dA,
            dE if lora_E is not None else None, dB, None, None, None, None)


def _lora_setup_context(ctx, inputs, output):
    _lora_save(ctx, inputs, output[1])


def _lora_backward(ctx, dy, _ds):
    return _lora_grads(ctx, dy, lora_bwd)


lora_fwd.register_autograd(_lora_backward, setup_context=_lora_setup_context)


def _lora_bwd_direct(*args):
    *rest, backend = args
    return _impl("lora_bwd", backend)(*rest)


class LoRALinearFunction(torch.autograd.Function):
    """The eager autograd path of ``fastpeft::lora_fwd``: the same implementations, saved tensors and autograd
    formula (``_lora_grads``), called directly instead of through the custom-op dispatcher, whose Python wrapping
    adds 0.12-0.16 ms to a training step: three times a 64x64 frozen layer's whole step, a third of a 512x512 one's at
    64 tokens (2-core CPU; ``python -m benchmarks --op dispatch``, benchmarks/results/cpu-dispatch).  Arguments as in
    ``lora_fwd``; returns y only (S is saved, not returned: a second output, even marked non-differentiable, costs
    autograd ~10 µs per call on the host - ``python -m benchmarks.bench_host``)."""

    @staticmethod
    def forward(ctx, x, weight, bias, lora_A, lora_E, lora_B, scaling, dropout_p, seed, backend):
        y, s = _impl("lora_fwd", backend)(x, weight, bias, lora_A, lora_E, lora_B, scaling, dropout_p, seed)
        _lora_save(ctx, (x, weight, bias, lora_A, lora_E, lora_B, scaling, dropout_p, seed, backend), s)
        return y

    @staticmethod
    def backward(ctx, dy):
        return _lora_grads(ctx, dy, _lora_bwd_direct)


def lora_apply(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], lora_A: torch.Tensor,
               lora_E: Optional[torch.Tensor], lora_B: torch.Tensor, scaling: float, dropout_p: float, seed: int,
               backend: str) -> torch.Tensor:
    """Run the LoRA op with autograd: the custom op under ``torch.compile`` (traceable, fake kernel), the
    ``LoRALinearFunction`` in eager mode (no dispatcher overhead), the implementation itself when nothing needs a
    gradient (``needs_autograd``).  Same arguments as ``lora_fwd``; returns its y (M, N)."""
    if torch.compiler.is_compiling():
        return lora_fwd(x, weight, bias, lora_A, lora_E, lora_B, scaling, dropout_p, seed, backend)[0]
    if not needs_autograd(x, weight, bias, lora_A, lora_E, lora_B):
        return _impl("lora_fwd", backend)(x, weight, bias, lora_A, lora_E, lora_B, scaling, dropout_p, seed)[0]
    return LoRALinearFunction.apply(x, weight, bias, lora_A, lora_E, lora_B, scaling, dropout_p, seed, backend)
