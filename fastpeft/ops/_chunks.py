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


def spans(n: int) -> list:
    """Slices covering ``range(n)`` (see the constants above); one slice when n < 2 * _SPAN_MIN."""
    chunks = min(8, n // _SPAN_MIN)
    if chunks <= 1:
        return [slice(0, n)]
    step = -(-(-(-n // chunks)) // _SPAN_ALIGN) * _SPAN_ALIGN
    return [slice(i, min(n, i + step)) for i in range(0, n, step)]


def fill_rows(out: torch.Tensor, fn: Callable[[slice], torch.Tensor]) -> torch.Tensor:
    """``out`` (..., D) viewed as (M, D), written chunk by chunk: rows ``s`` get ``fn(s)`` ((len, D), any dtype: cast on
    assignment) for each ``s`` of ``spans(M)``.  Returns out."""
    out2 = out.view(-1, out.shape[-1])
    for rows in spans(out2.shape[0]):
        out2[rows] = fn(rows)
    return out
