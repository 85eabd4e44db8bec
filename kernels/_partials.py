"""The last step of the skinny kernels' split reductions: partial sums summed and cast in one launch.

The skinny kernels split a reduction over M (or K) across programs and write fp32 partial sums to small buffers
(deterministic: no atomics, no zero-fill).  Where a later kernel reads the result it sums the partials as it loads
them (``sum_parts``); what is left - the parameters' gradients (LoRA's dB, dA, dE, dbias; IA3's dl, dbias) - is summed here, every
buffer of one backward in one launch, and cast to its parameter's dtype, instead of a ``sum`` and a cast per buffer.
"""

from __future__ import annotations

import dataclasses

import torch
import triton
import triton.language as tl

from ._target import cdiv, launch_ok

__all__ = ["sum_partials", "plan_partials", "sum_partials_tile", "sum_parts", "TILE", "SEGMENTS"]


@triton.jit
def sum_parts(ptr, n_parts, M, LD, offs_m, offs_r, mask, BLOCK_M: tl.constexpr, R_PAD: tl.constexpr):
    """Σ_p ptr[p, m, r] over the `n_parts` partial sums of an (n_parts, M, LD) fp32 buffer (contiguous; `ptr` may
    point at a column offset, e.g. one sibling's columns of a shared buffer: rows LD apart, parts M·LD apart), in
    order p = 0, 1, ... (deterministic): the consumer of a split reduction sums it as it loads it (the partials are
    a few MB, L2-resident) instead of a separate launch summing them."""
    acc = tl.zeros((BLOCK_M, R_PAD), dtype=tl.float32)
    rows = offs_m.to(tl.int64)[:, None] * LD + offs_r[None, :]
    for _ in range(n_parts):
        acc += tl.load(ptr + rows, mask=mask, other=0.0)
        ptr += M * LD  # 64-bit pointer arithmetic: no overflow of p·M·LD
    return acc


@triton.jit
def _sum_tile(part_ptr, out_ptr, P, L, tile, BLOCK: tl.constexpr):
    """out[l] = Σ_{p < P} part[p, l] (fp32, in order p = 0, 1, ...) cast to out's dtype, for one tile of l."""
    offs = tile.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < L
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for _ in range(P):
        acc += tl.load(part_ptr + offs, mask=mask, other=0.0)
        part_ptr += L  # 64-bit pointer arithmetic: no overflow of p·L
    tl.store(out_ptr + offs, acc.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def sum_partials_tile(p0, o0, P0, L0, p1, o1, P1, L1, p2, o2, P2, L2, p3, o3, P3, L3, t1, t2, t3, tile,
                      BLOCK: tl.constexpr):
    """Tile `tile` of up to four reductions: segment i is a contiguous (P_i, L_i) fp32 buffer summed over P_i
    into o_i (L_i elements).  Tiles [0, t1) belong to segment 0, [t1, t2) to 1, [t2, t3) to 2, [t3, ...) to 3 (a
    tile past the last segment's end does nothing).  Shared by ``_sum_partials_kernel`` and the kernels that run
    the reduction's finish in spare programs of their own grid (``kernels.ia3._ia3_scale_w_kernel``)."""
    if tile < t1:
        _sum_tile(p0, o0, P0, L0, tile, BLOCK)
    elif tile < t2:
        _sum_tile(p1, o1, P1, L1, tile - t1, BLOCK)
    elif tile < t3:
        _sum_tile(p2, o2, P2, L2, tile - t2, BLOCK)
    else:
        _sum_tile(p3, o3, P3, L3, tile - t3, BLOCK)


@triton.jit
def _sum_partials_kernel(p0, o0, P0, L0, p1, o1, P1, L1, p2, o2, P2, L2, p3, o3, P3, L3, t1, t2, t3,
                         BLOCK: tl.constexpr):
    """One program per tile of ``sum_partials_tile``."""
    sum_partials_tile(p0, o0, P0, L0, p1, o1, P1, L1, p2, o2, P2, L2, p3, o3, P3, L3, t1, t2, t3,
                      tl.program_id(0), BLOCK)


# Elements of a result one program sums: a 1024-wide fp32 tile (4 KB per partial, coalesced).  The buffers are at
# most a few MB at production shapes, so the grid is a few hundred programs (chosen by arithmetic, not timed).
TILE = 1024
SEGMENTS = 4  # buffers needing work that one launch (or one plan) finishes


@dataclasses.dataclass
class PartialsPlan:
    """What finishing a set of partial buffers takes: `outs` (the results, one per job), `args` (the 19 launch
    arguments of ``sum_partials_tile`` before the tile index), `tiles` (programs needed; 0: nothing to launch) and
    the traffic for the cost model."""
    outs: list
    args: list
    tiles: int
    bytes_read: int
    bytes_written: int
    flops: int


def plan_partials(jobs: list[tuple[torch.Tensor, torch.dtype]], like: torch.Tensor) -> PartialsPlan:
    """Allocate the results of `jobs` (see ``sum_partials``) and lay out the tiles of the ones needing work."""
    outs: list[torch.Tensor] = []
    work: list[tuple[torch.Tensor, torch.Tensor]] = []
    for part, dtype in jobs:
        if part.shape[0] == 1 and dtype == torch.float32:
            # select, not part[0]: indexing asks for a CUDA device guard, which fake CUDA tensors (the cost model) lack
            outs.append(part.select(0, 0))
            continue
        out = torch.empty(part.shape[1:], device=part.device, dtype=dtype)
        outs.append(out)
        work.append((part, out))
    if len(work) > SEGMENTS:
        raise ValueError(f"sum_partials takes at most {SEGMENTS} buffers needing work, got {len(work)}")
    if not work:  # every result a view of its single partial: nothing to launch (small shapes), no arguments to lay out
        return PartialsPlan(outs, [like, like, 0, 0] * SEGMENTS + [0] * (SEGMENTS - 1), 0, 0, 0, 0)
    args: list = []
    bounds: list[int] = []
    tiles = 0
    for i in range(SEGMENTS):
        if i < len(work):
            part, out = work[i]
            length = out.numel()
            args += [part, out, part.shape[0], length]
        else:  # an empty segment: any valid pointers, no rows, no tiles
            length = 0
            args += [like, like, 0, 0]
        if i > 0:
            bounds.append(tiles)
        tiles += cdiv(length, TILE)
    return PartialsPlan(outs, args + bounds, tiles, sum(p.numel() * 4 for p, _ in work),
                        sum(o.numel() * o.element_size() for _, o in work), sum(p.numel() for p, _ in work))


def sum_partials(jobs: list[tuple[torch.Tensor, torch.dtype]], like: torch.Tensor) -> list[torch.Tensor]:
    """Σ over dim 0 of each contiguous fp32 partial buffer, cast to its dtype.

    Args:
        jobs: [(part, dtype)]: part (P, *shape) fp32 contiguous, at most four needing work.
        like: a tensor on the launch device (decides fake-tensor skipping and the cost model's report).
    Returns:
        one tensor of shape part.shape[1:] per job: a view of part[0] when P = 1 and dtype is fp32 (no work),
        else a new tensor in `dtype`, all of those filled by one launch.
    """
    plan = plan_partials(jobs, like)
    if plan.tiles and launch_ok("sum_partials", like, bytes_read=plan.bytes_read,
                                bytes_written=plan.bytes_written, flops=plan.flops):
        _sum_partials_kernel[(plan.tiles,)](*plan.args, BLOCK=TILE)
    return plan.outs
