"""The torch path's chunked casts: a 16-bit activation's fp32 copy formed a chunk at a time (``spans``)."""

from __future__ import annotations

from typing import Callable

import torch

# `spans` cuts a dimension into at most 8 chunks of at least _SPAN_MIN, each starting at a multiple of _SPAN_ALIGN.
# Chunking a GEMM's output rows or columns leaves every element's sum as it is (the bit-for-bit PEFT tests hold), so
# long as no chunk turns into another kernel: CPU BLAS runs a 1-row (or, for r = 1, a 1-column) GEMM as a GEMV that
# sums in another order, and blocks rows in groups whose boundaries an unaligned chunk start would move (both seen
# on this machine's torch build; aligned chunks of >= 256 match the full call at every size tried).  A chunk's
# temporary is then at most 1/2 (n < 768) down to 1/8 (n >= 2048) of the full M x K or M x N cast.  Not timed.
_SPAN_MIN = 256
_SPAN_ALIGN = 64
# Chunks that feed only elementwise ops, or sums down columns cut by column, keep their bits at any cut (each
# element's, or each column's, operations are the same; tested against autograd for widths 64-320 and 1-4096 rows), so
# `fine=True` cuts finer: up to 32 chunks of >= 64.  That makes the fp32 temporaries of a 16-bit tensor 1/16-1/32 of
# its cast instead of 1/8 (BERT's IA3 backward: 2.5 MiB of column casts at the step's peak -> 0.5 MiB).
_FINE_PARTS, _FINE_MIN = 32, 64


def spans(n: int, fine: bool = False) -> list:
    """Slices covering ``range(n)`` (see the constants above); one slice when n < 2 * the minimum chunk."""
    parts, least = (_FINE_PARTS, _FINE_MIN) if fine else (8, _SPAN_MIN)
    chunks = min(parts, n // least)
    if chunks <= 1:
        return [slice(0, n)]
    step = -(-(-(-n // chunks)) // _SPAN_ALIGN) * _SPAN_ALIGN
    return [slice(i, min(n, i + step)) for i in range(0, n, step)]


def fill_rows(out: torch.Tensor, fn: Callable[[slice], torch.Tensor], fine: bool = False) -> torch.Tensor:
    """``out`` (..., D) viewed as (M, D), written chunk by chunk: rows ``s`` get ``fn(s)`` ((len, D), any dtype: cast on
    assignment) for each ``s`` of ``spans(M, fine)`` (``fine`` only where ``fn`` is elementwise).  Returns out - or,
    while torch.compile traces, a new tensor of out's shape and dtype (below): callers use the returned tensor."""
    out2 = out.view(-1, out.shape[-1])
    if torch.compiler.is_compiling():
        # Traced by torch.compile (inside an autograd.Function's forward or backward): the whole result in one piece,
        # as a fresh tensor (`fn` may end in mul_ / add_, or in a .to() of the same dtype: copy=True).  Dynamo in
        # torch 2.11 silently gives zero gradients through an autograd.Function whose returned tensor is the very
        # object an earlier op returned (an in-place op, out=, a no-op .to()) - found running the test suite under
        # torch 2.11, the GPU machine's version; 2.13 is right - and under the compiler the chunking buys nothing:
        # inductor plans the buffers and drops the copy.
        return fn(slice(0, out2.shape[0])).to(out.dtype, copy=True).reshape(out.shape)
    for rows in spans(out2.shape[0], fine):
        out2[rows] = fn(rows)
    return out
