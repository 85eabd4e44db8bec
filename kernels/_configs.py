"""Autotune configurations of the GEMM kernel (pointer and TMA paths share them) and their pruning.

Why each configuration is in the list is said beside it; what has been measured of them is in ``docs/STATUS.md``.
"""

from __future__ import annotations

from typing import Optional

import triton

from ._target import LaunchTarget, _PRUNE_TARGET, autotune_enabled, capturing, interpret_mode, smem_limit


def _cfg(bm, bn, bk, gm, stages, warps):
    return triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": gm},
                         num_stages=stages, num_warps=warps)


def gemm_configs(interpreter: Optional[bool] = None) -> list:
    """The GEMM kernel's configurations: the interpreter's one (``interpreter``; default: ``TRITON_INTERPRET``) or
    the GPU list.  Why each is here is said beside it."""
    if interpret_mode() if interpreter is None else interpreter:
        # Interpreter: one small tile, so tests exercise several tiles, K iterations and masked tails.
        # (BLOCK_N = 64 so the epilogue's 4-way column split runs, see _epi_split.)
        return [_cfg(16, 64, 16, 2, 1, 4)]
    return [
        # Hopper large-M: the 128x256x64 wgmma tile with 3 stages and 8 warps is what Triton's persistent
        # TMA tutorials report near cuBLAS for K >= 2048.
        _cfg(128, 256, 64, 8, 3, 8),
        # Same depth, narrower N: more tiles (M=2048, N=4096 gives 512 instead of 256), better wave quantisation
        # over 132 SMs; 4 stages fit in shared memory at this size.
        _cfg(128, 128, 64, 8, 4, 8),
        # 4 warps on 128x128: fewer registers per tile for the epilogue's rank-r dot and dropout Philox.
        _cfg(128, 128, 64, 8, 4, 4),
        # Mid M (hundreds of rows): 64-row tiles double the tile count.
        _cfg(64, 128, 64, 8, 4, 4),
        # Decode (M <= 16-64): the GEMM is a weight stream; narrow N tiles and deep K give >= 1 tile per SM at
        # N=4096 and keep several weight loads in flight.
        _cfg(16, 64, 128, 1, 4, 4),
        _cfg(32, 32, 128, 1, 5, 4),
        # Only when nothing above fits the device's shared memory (see prune_gemm_configs).
        _cfg(*_PORTABLE_CFG),
    ]


# Portable fallback: 64x64x32 with 2 stages is 16 KB of 16-bit operands (32 KB fp32), below every CUDA GPU's shared
# memory per block (48 KB without opt-in).  Kept only when no other configuration fits the device (e.g. fp32 on a
# 99 KB-per-block consumer GPU, where the tiles above need 192-262 KB): slow there, but it runs.
_PORTABLE_CFG = (64, 64, 32, 8, 2, 4)


def _smem_estimate(c, es: int) -> int:
    """Shared memory of a configuration's pipelined A and B tiles (bytes): what Triton allocates for this kernel
    (the sm_90 compile check, .ci/compile_triton.py, reports exactly this for the pointer path, +32 B with TMA)."""
    bm, bn, bk = c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.kwargs["BLOCK_K"]
    return c.num_stages * (bm * bk + bk * bn) * es


def prune_gemm_configs(configs, named_args, target: Optional[LaunchTarget] = None, **kwargs):
    """Drop configurations that cannot win for this M (so autotuning stays short) or whose pipelined stages do not
    fit in the target's shared memory (fp32 operands double the bytes).  The portable configuration is kept only
    when nothing else fits.  `target`: the launch target (None: the one of the GEMM launch in progress, which is
    how Triton's autotuner calls this hook; None there too: the interpreter)."""
    m = named_args["M"]
    a = named_args["a_ptr"]
    es = a.element_size()
    limit = smem_limit(target if target is not None else _PRUNE_TARGET.get())
    keep, portable = [], []
    for c in configs:
        bm, bn, bk = c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.kwargs["BLOCK_K"]
        if (bm, bn, bk, c.kwargs["GROUP_M"], c.num_stages, c.num_warps) == _PORTABLE_CFG:
            portable.append(c)
            continue
        if m <= 64 and bm > 64:
            continue
        if m > 256 and bm < 64:
            continue
        if _smem_estimate(c, es) > limit:
            continue
        keep.append(c)
    if keep:
        # No timing inside a CUDA graph capture (the benchmark launches would be captured too).
        return keep if autotune_enabled() and not capturing() else keep[:1]
    return portable or [min(configs, key=lambda c: _smem_estimate(c, es))]


def m_bucket(m: int) -> int:
    """Autotune key for M: powers of two, so a training run (fixed M) tunes once and decoding lengths share."""
    return triton.next_power_of_2(max(1, int(m)))
