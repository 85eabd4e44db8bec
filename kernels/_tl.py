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


def skinny_precision(adapter_dtype: torch.dtype) -> str:
    """Dot precision of the rank-r kernels (S, dS/dB, dA).  They produce the adapter's gradients, so fp32
    adapters get ieee fp32 (like torch's fp32 matmul); these kernels are memory-bound, so the cost is small."""
    return "ieee" if adapter_dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32 else "default"


# Triton's interpreter computes bf16 tl.dot wrongly (garbage; fp16 and fp32 are fine): in the interpreter, dots
# with a bf16 operand upcast both operands to fp32 (exact) and multiply in ieee fp32 - the products a GPU's bf16
# MMA makes, accumulated in fp32 - so the CPU tests cover the bf16 kernels too.  Never used on a GPU.
UPCAST_PREC = "upcast_f32"


def dot_prec(prec: str, *dtypes: torch.dtype) -> str:
    """`prec`, or the interpreter's bf16 workaround (`UPCAST_PREC`) when a dot operand may be bf16."""
    if interpret_mode() and torch.bfloat16 in dtypes:
        return UPCAST_PREC
    return prec


@triton.jit
def mma(a, b, acc, PREC: tl.constexpr):
    """acc + a @ b in fp32 with input precision PREC (see `dot_prec`)."""
    if PREC == "upcast_f32":
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
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
    """tl.dot needs every dimension >= 16 and power-of-two blocks: pad r to max(16, next power of two)."""
    return max(16, triton.next_power_of_2(int(r)))
