"""(IA)³ linear: the op's declaration - torch implementation, fake kernel, custom ops, autograd (laid out as
``fastpeft/ops/lora.py``).

The op, one name through every layer (W, b frozen; l trainable)::

    attention / output mode  (feedforward=False):  y = (x Wᵀ + b) ⊙ l        l: (N,)
    feed-forward / input mode (feedforward=True):  y = (x ⊙ l) Wᵀ + b        l: (K,)

as HF PEFT's ``ia3.Linear`` computes it (the bias is scaled too in output mode; in input mode x is scaled in l's
dtype, then cast back to x's dtype before the matmul).

Saved for backward: output mode saves the unscaled base output z = x Wᵀ + b (M×N, as PEFT's multiply does) so
that dl = Σ_m dy ⊙ z; input mode saves x (dl = Σ_m (dy W) ⊙ x).  The ``saved`` tensor the forward returns is z
in output mode and an empty tensor in input mode - except the triton ``cublas`` variant, which folds l into W and
returns an empty ``saved`` in output mode too: the op then keeps x, its output y and the bias, and passes them to
the backward (``y=``, ``bias=``).  When the base weight requires grad, x is kept as well and dW is computed (once,
by cuBLAS, for every backend): output mode dW = (dy ⊙ l)ᵀ x, input mode dW = dyᵀ (x ⊙ l).
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from .._meta import ia3_bwd_meta, ia3_fwd_meta  # noqa: F401  (public here too)
from ._registry import impl as _impl
from ._registry import needs_autograd
from ._chunks import fill_rows, spans


class _ScaleByVector(torch.autograd.Function):
    """``(t * l).to(out_dtype)`` with l broadcast over t's last dimension - HF PEFT's IA3 scaling, bit for bit,
    forward and backward, with fewer M x K temporaries in backward: dl from one product buffer, which with the
    (rebuilt) t is released before dt is formed in place in the copy of dy, where autograd's ``MulBackward0`` holds
    the fp32 copy of dY, t and both products at once (with an fp32 l on a 16-bit base, four fp32 copies of the
    layer's input or output at the peak, 1.2-1.6x the frozen model's activation memory at 4 x 256 tokens).  The sums
    are autograd's own (``sum_to_size``'s reduction).

    t: (..., D).  l: (D,).  bias: None or (D,), added after the product, before the cast (DoRA's ``k ⊙ z + b``:
    ``(t * l + bias).to(out_dtype)``).  Saves t and l (t is what the recompute rebuilds).  The forward writes the
    result rounded once into the output (no buffer of the product's dtype); a 16-bit t is cast in row chunks
    (``_chunks.spans``: a mixed-dtype ``mul`` copies its narrower operand whole)."""

    @staticmethod
    def forward(ctx, t, l, out_dtype, bias=None):
        ctx.save_for_backward(t, l)
        ctx.bias_dtype = bias.dtype if bias is not None else None
        return _ScaleByVector.compute(t, l, out_dtype, bias)

    @staticmethod
    def compute(t, l, out_dtype, bias=None):
        """The forward's values (also what the torch path calls when no gradient is needed: ``scale_by_vector``)."""
        y = torch.empty(t.shape, dtype=out_dtype, device=t.device)
        ct = torch.promote_types(t.dtype, l.dtype)
        if bias is not None:
            ct = torch.promote_types(ct, bias.dtype)
        if t.dtype == ct and bias is None:
            if torch.compiler.is_compiling():  # a fresh tensor, not written through out=: see _chunks.fill_rows
                r = torch.mul(t, l)
                return r if r.dtype == out_dtype else r.to(out_dtype)
            return torch.mul(t, l, out=y)
        t2 = t.reshape(-1, t.shape[-1])
        if bias is None:
            return fill_rows(y, lambda rows: t2[rows].to(ct).mul_(l), fine=True)
        # out of place first: when t already has dtype ct, .to(ct) is t itself
        return fill_rows(y, lambda rows: torch.mul(t2[rows].to(ct), l).add_(bias), fine=True)

    @staticmethod
    def backward(ctx, dy):
        t, l = ctx.saved_tensors
        t_dtype = t.dtype
        ct = torch.promote_types(t_dtype, l.dtype)
        dbias = None
        if ctx.bias_dtype is not None:
            ct = torch.promote_types(ct, ctx.bias_dtype)
            if ctx.needs_input_grad[3]:   # autograd's dy.to(ct).sum over the leading dimensions, by column chunks
                lead = tuple(range(dy.dim() - 1))
                dbias = dy.new_empty(dy.shape[-1], dtype=ct)
                for cols in spans(dy.shape[-1], fine=True):
                    dbias[cols] = dy[..., cols].to(ct).sum(lead) if lead else dy[..., cols].to(ct)
                dbias = dbias.to(ctx.bias_dtype)
        dl = None
        if ctx.needs_input_grad[1]:
            # autograd's grad_l = (dY.to(ct) * t).sum over the leading dimensions; for 16-bit operands in column
            # chunks (the sum runs down each column, which chunking columns does not reorder): a chunk's two ct
            # casts instead of two whole ones (an in-place mixed-dtype mul_ copies its 16-bit operand whole)
            lead = tuple(range(t.dim() - l.dim()))
            if t_dtype == ct and dy.dtype == ct:
                p = t * dy
                dl = (p.sum(lead, keepdim=True) if lead else p).view(l.shape).to(l.dtype)
                del p
            else:
                dl = l.new_empty(l.shape, dtype=ct)
                for cols in spans(t.shape[-1], fine=True):
                    # out of place: one of the two .to(ct) is a view of t or dy when it has dtype ct already
                    p = torch.mul(t[..., cols].to(ct), dy[..., cols].to(ct))
                    dl[cols] = (p.sum(lead, keepdim=True) if lead else p).view(-1)
                    del p   # before the next chunk's casts exist
                dl = dl.to(l.dtype)
        del t   # the rebuilt input is released before dt's buffer exists
        dt = None
        if ctx.needs_input_grad[0]:
            if dy.dtype == ct:
                dt = (dy * l).to(t_dtype)
            else:  # (dY.to(ct) * l).to(t.dtype) in row chunks, straight into dt
                dy2 = dy.reshape(-1, dy.shape[-1])
                dt = fill_rows(dy.new_empty(dy.shape, dtype=t_dtype), lambda rows: dy2[rows].to(ct).mul_(l),
                               fine=True)
        return dt, dl, None, dbias


def ia3_fwd_ref(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], ia3_l: torch.Tensor,
                feedforward: bool, upcast: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference forward.

    Args:
        x: (M, K).  weight: (N, K).  bias: (N,) or None.  ia3_l: (N,) when not `feedforward`, else (K,).
        feedforward: input-scaling mode.  upcast: compute in fp64 (ground truth).
    Returns:
        y: (M, N) in x's dtype (fp64 if `upcast`); saved: z = x Wᵀ + b (M, N) in output mode, (0,) in input mode.
    """
    if upcast:
        x, weight, ia3_l = x.double(), weight.double(), ia3_l.double()
        bias = bias.double() if bias is not None else None
    if feedforward:
        # PEFT's x.to(l.dtype) * l: the cast is exact (and left to the product) unless l is the narrower dtype
        t = x if torch.promote_types(x.dtype, ia3_l.dtype) == ia3_l.dtype else x.to(ia3_l.dtype)
        xs = scale_by_vector(t, ia3_l, x.dtype)
        return F.linear(xs, weight, bias), x.new_empty(0)
    z = F.linear(x, weight, bias)
    y = scale_by_vector(z, ia3_l, x.dtype)
    return y, z


def scale_by_vector(t: torch.Tensor, l: torch.Tensor, out_dtype: torch.dtype,
                    bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``(t * l + bias).to(out_dtype)`` (``_ScaleByVector``; t: (..., D), l and bias: (D,)): through the autograd
    Function when a gradient is to be built, else its compute directly - the same values without the Function's own
    Python on the host."""
    if needs_autograd(t, l, bias):
        return _ScaleByVector.apply(t, l, out_dtype, bias)
    return _ScaleByVector.compute(t, l, out_dtype, bias)


def ia3_bwd_ref(dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, ia3_l: torch.Tensor, saved: torch.Tensor,
                feedforward: bool, needs_dx: bool, has_bias: bool
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Reference backward.

    In output mode `x` is an empty placeholder (only z = `saved` is needed).
    Returns:
        dx (M, K) (empty if not `needs_dx`), dl shaped like ia3_l in its dtype, dbias (N,) (empty if not `has_bias`).
    """
    ldt = ia3_l.dtype
    if feedforward:
        g = dy @ weight.to(dy.dtype)  # d(x ⊙ l): (M, K)
        dl = (g.to(ldt) * x.to(ldt)).sum(0)
        dx = (g.to(ldt) * ia3_l).to(x.dtype) if needs_dx else x.new_empty(0)
        dbias = dy.sum(0).to(weight.dtype) if has_bias else dy.new_empty(0, dtype=weight.dtype)
        return dx, dl, dbias
    dl = (dy.to(ldt) * saved.to(ldt)).sum(0)
    dz = (dy.to(ldt) * ia3_l).to(dy.dtype)
    # x is not saved in output mode (an empty placeholder arrives); dx has dy's dtype, like y had x's.
    dx = dz @ weight.to(dz.dtype) if needs_dx else dy.new_empty(0)
    dbias = dz.sum(0).to(weight.dtype) if has_bias else dy.new_empty(0, dtype=weight.dtype)
    return dx, dl, dbias


def _wants_output(feedforward: bool, saved: torch.Tensor) -> bool:
    """Whether the forward asked the op to keep its output y for the backward (an empty 1-D `saved` in output
    mode; z is 2-D, even with M = 0)."""
    return not feedforward and saved.dim() == 1


def ia3_weight_grad(dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, ia3_l: torch.Tensor,
                    feedforward: bool) -> torch.Tensor:
    """dW (N, K) in weight's dtype: output mode (dy ⊙ l)ᵀ x, input mode dyᵀ (x ⊙ l) (with the forward's roundings);
    one cuBLAS GEMM.  dy: (M, N), x: (M, K)."""
    ldt = ia3_l.dtype
    if feedforward:
        xs = (x.to(ldt) * ia3_l).to(x.dtype)
        return torch.mm(dy.to(x.dtype).t(), xs).to(weight.dtype)
    dz = (dy.to(ldt) * ia3_l).to(x.dtype)
    return torch.mm(dz.t(), x).to(weight.dtype)


# ---------------------------------------------------------------------------------------------------------------
# Fake (meta) kernels: output shapes and dtypes with the shape contract checked; registered for the custom ops below
# and for the extension's ops (``fastpeft._cuda``).
# ---------------------------------------------------------------------------------------------------------------


@torch.library.custom_op("fastpeft::ia3_fwd", mutates_args=())
def ia3_fwd(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], ia3_l: torch.Tensor,
            feedforward: bool, backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Custom op: (y, saved) = IA3 forward on `backend`.  Shapes as in ``ia3_fwd_ref``."""
    y, saved = _impl("ia3_fwd", backend)(x, weight, bias, ia3_l, feedforward)
    return y, saved.contiguous()


# Backends whose forward folds l into W and keeps y instead of z in output mode (an empty ``saved``).
_KEEPS_OUTPUT = ("triton", "triton:cublas")


@ia3_fwd.register_fake
def _(x, weight, bias, ia3_l, feedforward, backend):
    return ia3_fwd_meta(x, weight, bias, ia3_l, feedforward, save_z=backend not in _KEEPS_OUTPUT)


@torch.library.custom_op("fastpeft::ia3_bwd", mutates_args=())
def ia3_bwd(dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, ia3_l: torch.Tensor, saved: torch.Tensor,
            feedforward: bool, needs_dx: bool, has_bias: bool, backend: str, y: Optional[torch.Tensor] = None,
            bias: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Custom op: (dx, dl, dbias) = IA3 backward on `backend`.  See ``ia3_bwd_ref``; `y`, `bias`: the forward's
    output and bias, passed when the forward returned an empty ``saved`` in output mode."""
    outs = _bwd_call(dy, x, weight, ia3_l, saved, feedforward, needs_dx, has_bias, backend, y, bias)
    return tuple(o.contiguous() for o in outs)


def _bwd_call(dy, x, weight, ia3_l, saved, feedforward, needs_dx, has_bias, backend, y=None, bias=None):
    fn = _impl("ia3_bwd", backend)
    if y is not None:
        return fn(dy, x, weight, ia3_l, saved, feedforward, needs_dx, has_bias, y=y, bias=bias)
    return fn(dy, x, weight, ia3_l, saved, feedforward, needs_dx, has_bias)


@ia3_bwd.register_fake
def _(dy, x, weight, ia3_l, saved, feedforward, needs_dx, has_bias, backend, y=None, bias=None):
    return ia3_bwd_meta(dy, x, weight, ia3_l, feedforward, needs_dx, has_bias)


def _ia3_save(ctx, inputs, y, saved):
    x, weight, bias, ia3_l, feedforward, backend = inputs
    keep_y = _wants_output(feedforward, saved)
    # Output mode needs z (or y, x and the bias), not x - unless the base weight trains (dW = dzᵀ x).
    keep_x = feedforward or keep_y or weight.requires_grad
    ctx.save_for_backward(x if keep_x else x.new_empty(0), weight, ia3_l, saved, y if keep_y else None,
                          bias if keep_y else None)
    ctx.feedforward, ctx.backend = feedforward, backend
    ctx.has_bias = bias is not None
    ctx.weight_grad = bool(weight.requires_grad)


def _ia3_grads(ctx, dy, bwd):
    x, weight, ia3_l, saved, y, bias = ctx.saved_tensors
    needs_dx = ctx.needs_input_grad[0]
    bias_grad = ctx.has_bias and ctx.needs_input_grad[2]
    dy = dy.contiguous()
    dx, dl, dbias = bwd(dy, x, weight, ia3_l, saved, ctx.feedforward, needs_dx, bias_grad, ctx.backend, y, bias)
    # The base weight's gradient only when it is trainable (HF PEFT's layer gives it then too).
    want_dw = ctx.needs_input_grad[1] and ctx.weight_grad
    dW = ia3_weight_grad(dy, x, weight, ia3_l, ctx.feedforward) if want_dw else None
    return dx if needs_dx else None, dW, dbias if bias_grad else None, dl, None, None


def _ia3_setup_context(ctx, inputs, output):
    _ia3_save(ctx, inputs, output[0], output[1])


def _ia3_backward(ctx, dy, _dsaved):
    return _ia3_grads(ctx, dy, ia3_bwd)


ia3_fwd.register_autograd(_ia3_backward, setup_context=_ia3_setup_context)


def _ia3_bwd_direct(*args):
    return _bwd_call(*args)


class IA3LinearFunction(torch.autograd.Function):
    """The eager autograd path of ``fastpeft::ia3_fwd`` (see ``fastpeft.ops.lora.LoRALinearFunction``: same
    implementations, called without the custom-op dispatcher's overhead).  Arguments as in ``ia3_fwd``; returns y
    only (what the backward needs is saved, not returned)."""

    @staticmethod
    def forward(ctx, x, weight, bias, ia3_l, feedforward, backend):
        y, saved = _impl("ia3_fwd", backend)(x, weight, bias, ia3_l, feedforward)
        _ia3_save(ctx, (x, weight, bias, ia3_l, feedforward, backend), y, saved.contiguous())
        return y

    @staticmethod
    def backward(ctx, dy):
        return _ia3_grads(ctx, dy, _ia3_bwd_direct)


def ia3_apply(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], ia3_l: torch.Tensor,
              feedforward: bool, backend: str) -> torch.Tensor:
    """Run the IA3 op with autograd: the custom op under ``torch.compile``, ``IA3LinearFunction`` in eager mode, the
    implementation itself when nothing needs a gradient (``needs_autograd``).  Returns y (M, N)."""
    if torch.compiler.is_compiling():
        return ia3_fwd(x, weight, bias, ia3_l, feedforward, backend)[0]
    if not needs_autograd(x, weight, bias, ia3_l):
        return _impl("ia3_fwd", backend)(x, weight, bias, ia3_l, feedforward)[0]
    return IA3LinearFunction.apply(x, weight, bias, ia3_l, feedforward, backend)
