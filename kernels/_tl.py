"""Dot precision and small ``tl`` helpers shared by every Triton kernel of fastpeft."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._target import interpret_mode


# Precisions below: "ieee" (exact fp32 products, allowed on every backend) or "default" (no input_precision passed:
# tf32 for fp32 operands on NVIDIA, ieee on AMD; ignored for 16-bit operands).  Never the literal "tf32", which
# Triton's AMD backend rejects on most chips.


def base_precision(dtype: torch.dtype) -> str:
    """Dot precision of the base GEMM.  fp32 follows torch's own matmul setting (ieee unless the user allowed
    tf32), so the Triton backend is as accurate as the torch backend it replaces."""
    if dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32:
        return "ieee"
    return "default"


def lora_epilogue_precision(x_dtype: torch.dtype, adapter_dtype: torch.dtype) -> str:
    """Dot precision of the rank-r term added in a GEMM epilogue.  With an fp32 base and fp32 adapters the term
    keeps the base's precision; with fp32 adapters on a 16-bit base it is added to an output rounded to 16 bits, so
    tf32 (2**-11 relative) is below that rounding; with 16-bit adapters the setting is ignored."""
    if adapter_dtype == torch.float32 and x_dtype == torch.float32:
        return base_precision(torch.float32)
    return "default"


def skinny_precision(adapter_dtype: torch.dtype, act_dtype: torch.dtype | None = None) -> str:
    """Dot precision of the rank-r kernels (S, dS/dB, dA), whose products pair an activation tile (x or dY) with an
    adapter-side one (A, B, S, dS).  They produce the adapter's gradients, so fp32 adapters get products exact in
    fp32, like torch's fp32 matmul: with a bf16 activation through the tensor cores (`SPLIT3`: the fp32 operand
    split into three bf16 pieces, each product with a bf16 value exact in fp32), otherwise ieee fp32 on the CUDA
    cores (an fp16 activation cannot pair with bf16 pieces; fp32 activations have no tensor-core form that exact).
    With tf32 allowed, or 16-bit adapters: "default"."""
    if adapter_dtype != torch.float32 or torch.backends.cuda.matmul.allow_tf32:
        return "default"
    return SPLIT3 if act_dtype == torch.bfloat16 else "ieee"


# A bf16 activation times an fp32 operand on the tensor cores: the fp32 operand is split into hi + mid + lo, three
# bf16 values whose sum is exactly it (bf16 has fp32's exponent range; 3 x 8 significand bits cover fp32's 24), and
# the three products are accumulated in fp32 - each one exact, like ieee fp32's, only summed in another order.  On
# Hopper the ieee form runs on the CUDA cores (67 TFLOP/s fp32 on an H200, NVIDIA's datasheet) where these kernels'
# 2-4 flops per byte would make them compute-bound; three bf16 MMAs keep them memory-bound.
SPLIT3 = "bf16x3"


def dot_flops(prec: str, flops: int) -> tuple[int, int]:
    """(tensor-core flops, CUDA-core fp32 flops) of a dot of `flops` at precision `prec`, for the cost model:
    ieee fp32 runs on the CUDA cores, `SPLIT3` makes three tensor-core products."""
    if prec == "ieee":
        return 0, flops
    if prec == SPLIT3:
        return 3 * flops, 0
    return flops, 0


# Triton's interpreter computes bf16 tl.dot wrongly (garbage; fp16 and fp32 are fine): in the interpreter, dots
# with a bf16 operand upcast both operands to fp32 (exact) and multiply in ieee fp32 - the products a GPU's bf16
# MMA makes, accumulated in fp32 - so the CPU tests cover the bf16 kernels too.  Never used on a GPU.
UPCAST_PREC = "upcast_f32"


def dot_prec(prec: str, *dtypes: torch.dtype) -> str:
    """`prec`, or the interpreter's bf16 workaround when a dot operand may be bf16: `UPCAST_PREC`, or for `SPLIT3`
    its pieces' products upcast (`SPLIT3_UPCAST`: the same exact products, so the CPU tests run the split itself)."""
    if interpret_mode() and (torch.bfloat16 in dtypes or prec == SPLIT3):
        return SPLIT3_UPCAST if prec == SPLIT3 else UPCAST_PREC
    return prec


SPLIT3_UPCAST = "bf16x3_upcast_f32"


@triton.jit
def split3(v):
    """fp32 `v` as three bf16 tiles (hi, mid, lo) with hi + mid + lo == v exactly (each remainder is exact in fp32
    and has at most the significand bits the next piece keeps)."""
    hi = v.to(tl.bfloat16)
    rest = v - hi.to(tl.float32)
    mid = rest.to(tl.bfloat16)
    lo = (rest - mid.to(tl.float32)).to(tl.bfloat16)
    return hi, mid, lo


@triton.jit
def _dot16(a, b, acc, UPCAST: tl.constexpr):
    if UPCAST:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    else:
        return tl.dot(a, b, acc)


@triton.jit
def adapter_operand(v, dtype, PREC: tl.constexpr):
    """An activation tile as a dot operand next to an adapter-side one: cast to the adapter `dtype` (as the
    reference casts x before its adapter matmul), or kept as it is (bf16) for a `SPLIT3` product."""
    if PREC == "bf16x3" or PREC == "bf16x3_upcast_f32":
        return v
    else:
        return v.to(dtype)


@triton.jit
def mma(a, b, acc, PREC: tl.constexpr):
    """acc + a @ b in fp32 with input precision PREC (see `dot_prec`).  For `SPLIT3` one operand is bf16 and the
    other fp32: the fp32 one is split (`split3`) and the three exact products are added smallest first."""
    if PREC == "upcast_f32":
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    elif PREC == "bf16x3" or PREC == "bf16x3_upcast_f32":
        if a.dtype == tl.float32:
            hi, mid, lo = split3(a)
            acc = _dot16(lo, b, acc, PREC == "bf16x3_upcast_f32")
            acc = _dot16(mid, b, acc, PREC == "bf16x3_upcast_f32")
            return _dot16(hi, b, acc, PREC == "bf16x3_upcast_f32")
        else:
            hi, mid, lo = split3(b.to(tl.float32))
            acc = _dot16(a, lo, acc, PREC == "bf16x3_upcast_f32")
            acc = _dot16(a, mid, acc, PREC == "bf16x3_upcast_f32")
            return _dot16(a, hi, acc, PREC == "bf16x3_upcast_f32")
    elif PREC == "default":
        return tl.dot(a, b, acc)
    else:
        return tl.dot(a, b, acc, input_precision=PREC)


@triton.jit
def scaled(v, s):
    """v * s with torch's result dtype (v's when the dtypes match, else fp32 - for fp16/bf16/fp32 operands),
    formed as one fp32 product rounded once: the same value a 16-bit multiply gives, and correct in the interpreter,
    whose bf16 elementwise arithmetic is broken like its bf16 dot."""
    prod = v.to(tl.float32) * s.to(tl.float32)
    if v.dtype == s.dtype:
        return prod.to(v.dtype)
    else:
        return prod


def pad_rank(r: int) -> int:
    """tl.dot needs every dimension >= 16 and power-of-two blocks: pad r to max(16, next power of two).  Plain
    integer arithmetic: ``triton.next_power_of_2`` is a constexpr function, slow to call from the host."""
    return max(16, 1 << max(int(r) - 1, 0).bit_length())
