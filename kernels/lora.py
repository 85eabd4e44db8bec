"""Triton kernels of the LoRA / AdaLoRA linear op (``fastpeft::lora_fwd`` / ``fastpeft::lora_bwd``).

    y = x Wᵀ + b + s · ((drop(x) Aᵀ) ⊙ e) Bᵀ        x: (M, K)  W: (N, K)  A: (r, K)  B: (N, r)  e: (r,) or none

Two variants (``fastpeft._backend.select_backend`` names them: ``"triton"`` = ``"triton:cublas"``, ``"triton:fused"``):

``cublas`` (the default): the base GEMMs are the very cuBLAS calls the frozen layer makes (``F.linear``,
``torch.mm``), so the base part can be no slower than the layer itself; the LoRA extras are skinny Triton kernels
with a fixed pass budget (the dropout mask is regenerated from (seed, m, k) wherever needed, never stored):
  forward   ``F.linear``             y = x Wᵀ + b                                  (cuBLAS)
            ``_lora_shrink_expand_kernel``  one launch: S = drop(x) Aᵀ (M, r) fp32 for a block of rows (one pass
                                     over x; stored for backward), then y += s · (S ⊙ e) Bᵀ over those rows
                                     (one read + write of y, cuBLAS beta=1 traffic).  Rows carry the
                                     parallelism (the N range is split, x re-read, only where M < 16·SMs).
                                     At M <= TWO_LAUNCH_MAX_ROWS (decode): ``_lora_shrink_kernel`` (split-K)
                                     then ``_lora_expand_kernel`` instead.
  backward  ``_lora_dy_kernel``      one pass over dY: dSe = s · dY B, dB = s · dYᵀ (S ⊙ e), dbias = Σ_m dY
            ``torch.mm``             dX = dY W                                     (cuBLAS)
            ``_lora_da_kernel``      one pass over x and dX together: dA = dSᵀ drop(x) (dS = dSe ⊙ e summed on
                                     load; dE's partials) and dX += mask ⊙ (dS A) · drop_scale (one read + write
                                     of dX), the mask regenerated once for both
            ``_sum_partials_kernel`` dB, dA, dbias, dE: their split partials summed and cast, one launch
``fused``: the same skinny kernels around the Triton GEMM of ``_gemm`` with the rank-r term in its epilogue
(y and dX written once, no extra pass, but a Triton GEMM instead of cuBLAS's); chosen only explicitly or by a
measured entry of the dispatch table.

Split reductions write partial sums to small fp32 buffers (a few MB at M = 8192), summed in a fixed order by the
kernel that consumes them (S by a sibling group's expands, dSe by the dA pass) or by ``_partials.sum_partials``
(the parameters' gradients, all in one launch): deterministic, no atomics, no zero-fill (4 Triton + 2 cuBLAS
launches per training step).

Launchers ``lora_fwd_triton`` / ``lora_bwd_triton`` have the signatures and return conventions of
``fastpeft.ops.lora.lora_fwd_ref`` / ``lora_bwd_ref`` (plus ``variant=``).  They take what the registry's
``supports`` predicate (``fastpeft/ops/_registry.py``) admits - fp16/bf16/fp32 operands, K >= 1, N >= 1 - and nothing
else (``fastpeft._backend.select_backend`` never sends them anything else); M = 0 returns empty results without a
launch.
Every launch is reported to ``fastpeft._cost`` when the cost model records, and skipped for fake / meta tensors.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from ._gemm import gemm
from ._mask import MASK_INT_OPS_PER_ELEMENT, MASK_INT_OPS_X_AND_DX, dropout_threshold, mask_int_ops
from ._partials import sum_partials, sum_parts
from ._philox import dropout_keep, seed_arg
from ._target import (cdiv, LaunchTarget, Plan, check_variant, da_blocks, launch_ok, launch_plan, launch_target,
                      on_input_device, shrink_expand_blocks, skinny_blocks, split_count, target_programs)
from ._tl import (adapter_operand, base_precision, dot_flops, dot_prec, lora_epilogue_precision, mma, pad_rank,
                  skinny_precision)

__all__ = ["lora_fwd_triton", "lora_bwd_triton", "TWO_LAUNCH_MAX_ROWS"]

# Up to this many rows the cublas forward runs the split-K shrink and then the expand (two launches) instead of
# the single shrink-expand launch.  Measured in the first GPU run (H100, triton 3.6, benchmarks/results/
# h100-2026-12-06/decode.csv), forward under a CUDA graph at M = 1 and 16: the single launch 3.1-3.8x the frozen
# layer (each program walks all of K serially), shrink + expand 1.2-1.44x.  Larger M keeps the single launch (not
# measured against it there).
TWO_LAUNCH_MAX_ROWS = 16


# ---------------------------------------------------------------------------------------------------------------
# kernels
# ---------------------------------------------------------------------------------------------------------------

# _TC_NOTE: the long reductions of the rank-r kernels (S over K, dB and dA over M) add each block's product to
# their fp32 accumulator with a CUDA-core add instead of passing the accumulator into the dot.  In the first GPU run
# (H100, bf16 activations, fp32 adapters, M = 8192; benchmarks/results/h100-2026-12-06/correctness.csv) dB, dA and
# dE accumulated inside the tensor cores were 4-43x torch's own error, over the accuracy rule; the tensor cores'
# accumulation then only spans one block (64-256 products).  Not yet re-measured on a GPU.


@triton.jit
def _shrink_rows(x_ptr, a_ptr, offs_m, offs_r, mask_m, mask_r, kb0, kb1, K, stride_xm, stride_xk, stride_ar,
                 stride_ak, seed, p16, drop_scale,
                 BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, R_PAD: tl.constexpr, HAS_DROPOUT: tl.constexpr,
                 PREC: tl.constexpr):
    """Σ_{k in K blocks kb0..kb1} drop(x)[m, k] A[r, k] for the rows offs_m: (BLOCK_M, R_PAD) fp32.  The shrink's K
    loop, shared by ``_lora_shrink_kernel`` (one K split) and ``_lora_shrink_expand_kernel`` (all of K)."""
    tl.static_assert(BLOCK_K % 8 == 0, "BLOCK_K must be a multiple of the dropout mask's Philox group (8)")
    rm64 = offs_m.to(tl.int64)
    a_dtype = a_ptr.dtype.element_ty
    acc = tl.zeros((BLOCK_M, R_PAD), dtype=tl.float32)
    for kb in range(kb0, kb1):
        offs_k = kb * BLOCK_K + tl.arange(0, BLOCK_K)
        mask_k = offs_k < K
        rk64 = offs_k.to(tl.int64)
        x = tl.load(x_ptr + rm64[:, None] * stride_xm + rk64[None, :] * stride_xk,
                    mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        if HAS_DROPOUT:
            keep = dropout_keep(seed, offs_m, kb * BLOCK_K, p16, BLOCK_K)
            # x * scale rounded to x's dtype, as the reference computes drop(x) before the adapter cast
            x = tl.where(keep, (x.to(tl.float32) * drop_scale).to(x.dtype), 0.0)
        at = tl.load(a_ptr + offs_r[None, :] * stride_ar + rk64[:, None] * stride_ak,
                     mask=mask_r[None, :] & mask_k[:, None], other=0.0)
        # each block's product summed outside the tensor cores (see _TC_NOTE)
        acc += mma(adapter_operand(x, a_dtype, PREC), at, tl.zeros((BLOCK_M, R_PAD), dtype=tl.float32), PREC)
    return acc


# The dropout seed changes every step: not specialised on (seed % 16), which would compile each variant twice.
@triton.jit(do_not_specialize=["seed"])
def _lora_shrink_kernel(x_ptr, a_ptr, part_ptr, M, K, R,
                        stride_xm, stride_xk, stride_ar, stride_ak,
                        kb_per_split, seed, p16, drop_scale,
                        BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, R_PAD: tl.constexpr,
                        HAS_DROPOUT: tl.constexpr, PREC: tl.constexpr):
    """part[split, m, r] = Σ_{k in split} drop(x)[m, k] A[r, k]; grid (M blocks, K splits)."""
    pid_m = tl.program_id(0)
    pid_s = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_r = tl.arange(0, R_PAD)
    mask_m = offs_m < M
    mask_r = offs_r < R
    rm64 = offs_m.to(tl.int64)
    kb0 = pid_s * kb_per_split
    kb1 = tl.minimum(kb0 + kb_per_split, tl.cdiv(K, BLOCK_K))
    acc = _shrink_rows(x_ptr, a_ptr, offs_m, offs_r, mask_m, mask_r, kb0, kb1, K, stride_xm, stride_xk,
                       stride_ar, stride_ak, seed, p16, drop_scale, BLOCK_M, BLOCK_K, R_PAD, HAS_DROPOUT, PREC)
    out = part_ptr + pid_s.to(tl.int64) * M * R + rm64[:, None] * R + offs_r[None, :]
    tl.store(out, acc, mask=mask_m[:, None] & mask_r[None, :])


@triton.jit
def _lora_dy_kernel(dy_ptr, b_ptr, s_ptr, e_ptr, dse_part_ptr, db_part_ptr, dbias_part_ptr, u_ptr, du_part_ptr,
                    M, N, R, scaling, dse_ld,
                    stride_dym, stride_dyn, stride_bn, stride_br, stride_sm, stride_sr, stride_um, stride_un,
                    mb_per_split, nb_per_split,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, R_PAD: tl.constexpr,
                    HAS_E: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_U: tl.constexpr, PREC: tl.constexpr):
    """One pass over dY.  Program (M chunk i, N chunk j) reads its dY block once and writes
         dse_part[j, m, r]  = s · Σ_{n in chunk j} dY[m, n] B[n, r]           (m in chunk i)
         db_part[i, n, r]   = s · Σ_{m in chunk i} dY[m, n] (S ⊙ e)[m, r]     (n in chunk j)
         dbias_part[i, n]   = Σ_{m in chunk i} dY[m, n]
         du_part[i, n]      = Σ_{m in chunk i} dY[m, n] · u[m, n]             (HAS_U: DoRA's dm, fp32 products)
    dB, dbias and du accumulate in registers over the inner M loop; dSe accumulates across the outer N loop in the
    program's own rows of dse_part (L2-resident; a barrier orders each pass's stores before the next pass's loads).
    Partial buffers are (chunks x M x r) and (chunks x N x r): a few MB where dY is hundreds.  dse_part's rows are
    `dse_ld` apart (r, or a sibling group's total rank: its columns of a shared buffer); a program whose N chunk is
    empty (a group's chunk count, set by its narrowest member) stores zeros in its dse_part rows."""
    pid_mc = tl.program_id(0)
    pid_nc = tl.program_id(1)
    offs_r = tl.arange(0, R_PAD)
    mask_r = offs_r < R
    b_dtype = b_ptr.dtype.element_ty
    if HAS_E:
        e = tl.load(e_ptr + offs_r, mask=mask_r, other=0.0).to(tl.float32)
    mb0 = pid_mc * mb_per_split
    mb1 = tl.minimum(mb0 + mb_per_split, tl.cdiv(M, BLOCK_M))
    nb0 = pid_nc * nb_per_split
    nb1 = tl.minimum(nb0 + nb_per_split, tl.cdiv(N, BLOCK_N))
    for nb in range(nb0, nb1):
        offs_n = nb * BLOCK_N + tl.arange(0, BLOCK_N)
        mask_n = offs_n < N
        rn64 = offs_n.to(tl.int64)
        bt = tl.load(b_ptr + rn64[:, None] * stride_bn + offs_r[None, :] * stride_br,
                     mask=mask_n[:, None] & mask_r[None, :], other=0.0)
        acc_b = tl.zeros((BLOCK_N, R_PAD), dtype=tl.float32)
        acc_bias = tl.zeros((BLOCK_N,), dtype=tl.float32)
        acc_u = tl.zeros((BLOCK_N,), dtype=tl.float32)
        for mb in range(mb0, mb1):
            offs_m = mb * BLOCK_M + tl.arange(0, BLOCK_M)
            mask_m = offs_m < M
            rm64 = offs_m.to(tl.int64)
            dy = tl.load(dy_ptr + rm64[:, None] * stride_dym + rn64[None, :] * stride_dyn,
                         mask=mask_m[:, None] & mask_n[None, :], other=0.0)
            # Se = s · S ⊙ e, in the adapter dtype (the reference's dtype for the dB product)
            se = tl.load(s_ptr + rm64[:, None] * stride_sm + offs_r[None, :] * stride_sr,
                         mask=mask_m[:, None] & mask_r[None, :], other=0.0)
            if HAS_E:
                se = se * e[None, :]
            se = (se * scaling).to(b_dtype)
            dya = adapter_operand(dy, b_dtype, PREC)
            acc_b += mma(tl.trans(dya), se, tl.zeros((BLOCK_N, R_PAD), dtype=tl.float32), PREC)  # (_TC_NOTE)
            dse = mma(dya, bt, tl.zeros((BLOCK_M, R_PAD), dtype=tl.float32), PREC) * scaling
            mask_mr = mask_m[:, None] & mask_r[None, :]
            dse_ptrs = dse_part_ptr + pid_nc.to(tl.int64) * M * dse_ld + rm64[:, None] * dse_ld + offs_r[None, :]
            not_first = (tl.zeros((BLOCK_M, R_PAD), dtype=tl.int32) + nb) > nb0  # the first N block only stores
            dse += tl.load(dse_ptrs, mask=mask_mr & not_first, other=0.0)
            tl.store(dse_ptrs, dse, mask=mask_mr)
            if HAS_BIAS:
                acc_bias += tl.sum(dy.to(tl.float32), axis=0)
            if HAS_U:
                uv = tl.load(u_ptr + rm64[:, None] * stride_um + rn64[None, :] * stride_un,
                             mask=mask_m[:, None] & mask_n[None, :], other=0.0)
                acc_u += tl.sum(dy.to(tl.float32) * uv.to(tl.float32), axis=0)
        tl.store(db_part_ptr + pid_mc.to(tl.int64) * N * R + rn64[:, None] * R + offs_r[None, :], acc_b,
                 mask=mask_n[:, None] & mask_r[None, :])
        if HAS_BIAS:
            tl.store(dbias_part_ptr + pid_mc.to(tl.int64) * N + rn64, acc_bias, mask=mask_n)
        if HAS_U:
            tl.store(du_part_ptr + pid_mc.to(tl.int64) * N + rn64, acc_u, mask=mask_n)
        # the next N block re-reads this program's dse_part rows, possibly in other threads of the CTA
        tl.debug_barrier()
    if nb0 >= nb1:
        for mb in range(mb0, mb1):
            offs_m = mb * BLOCK_M + tl.arange(0, BLOCK_M)
            tl.store(dse_part_ptr + pid_nc.to(tl.int64) * M * dse_ld + offs_m.to(tl.int64)[:, None] * dse_ld
                     + offs_r[None, :], tl.zeros((BLOCK_M, R_PAD), dtype=tl.float32),
                     mask=(offs_m < M)[:, None] & mask_r[None, :])


# The dropout seed changes every step: not specialised on (seed % 16), which would compile each variant twice.
@triton.jit(do_not_specialize=["seed"])
def _lora_da_kernel(x_ptr, dse_ptr, e_ptr, s_ptr, part_ptr, de_part_ptr, dse_sum_ptr, dx_ptr, a_ptr, M, K, R,
                    n_dse_parts, stride_xm, stride_xk, stride_sm, stride_sr, stride_dxm, stride_dxk, stride_ar,
                    stride_ak, mb_per_split, seed, p16, drop_scale,
                    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, R_PAD: tl.constexpr,
                    HAS_DROPOUT: tl.constexpr, HAS_E: tl.constexpr, STORE_SUM: tl.constexpr, WITH_DX: tl.constexpr,
                    PREC: tl.constexpr, PREC_X: tl.constexpr, A_DTYPE: tl.constexpr):
    """part[split, r, k] = Σ_{m in split} dS[m, r] drop(x)[m, k]; grid (K blocks, M splits).

    dS = dSe ⊙ e is formed on load: dSe arrives as the dY pass's `n_dse_parts` partial sums (n_dse_parts, M, R)
    fp32, summed here.  With e (AdaLoRA) the programs of the first K block also write
    de_part[split, r] = Σ_{m in split} dSe[m, r] S[m, r] (dE's partials; S: (M, R) fp32).  With STORE_SUM they
    also write the summed dSe to dse_sum (M, R) fp32 (for a separate dX step).  With WITH_DX each program also adds
    the rank-r term into its tiles of dX (M, K), which already holds dY W:
         dX[m, k] += keep(m, k) · drop_scale · Σ_r dS[m, r] A[r, k]
    - the tiles it reads x for, with the same mask: x and dX in one pass, the mask regenerated once (the product
    formed as ``_lora_expand_kernel`` forms it, in A's dtype with fp32 accumulation, added and rounded once)."""
    tl.static_assert(BLOCK_K % 8 == 0, "BLOCK_K must be a multiple of the dropout mask's Philox group (8)")
    pid_k = tl.program_id(0)
    pid_s = tl.program_id(1)
    offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    offs_r = tl.arange(0, R_PAD)
    mask_k = offs_k < K
    mask_r = offs_r < R
    rk64 = offs_k.to(tl.int64)
    acc = tl.zeros((R_PAD, BLOCK_K), dtype=tl.float32)
    if HAS_E:
        e = tl.load(e_ptr + offs_r, mask=mask_r, other=0.0).to(tl.float32)
        acc_de = tl.zeros((R_PAD,), dtype=tl.float32)
    if WITH_DX:
        at = tl.load(a_ptr + offs_r[:, None] * stride_ar + rk64[None, :] * stride_ak,
                     mask=mask_r[:, None] & mask_k[None, :], other=0.0)
    mb0 = pid_s * mb_per_split
    mb1 = tl.minimum(mb0 + mb_per_split, tl.cdiv(M, BLOCK_M))
    for mb in range(mb0, mb1):
        offs_m = mb * BLOCK_M + tl.arange(0, BLOCK_M)
        mask_m = offs_m < M
        rm64 = offs_m.to(tl.int64)
        x = tl.load(x_ptr + rm64[:, None] * stride_xm + rk64[None, :] * stride_xk,
                    mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        if HAS_DROPOUT:
            keep = dropout_keep(seed, offs_m, pid_k * BLOCK_K, p16, BLOCK_K)
            x = tl.where(keep, (x.to(tl.float32) * drop_scale).to(x.dtype), 0.0)
        mask_mr = mask_m[:, None] & mask_r[None, :]
        ds = sum_parts(dse_ptr, n_dse_parts, M, R, offs_m, offs_r, mask_mr, BLOCK_M, R_PAD)
        if STORE_SUM:
            if pid_k == 0:
                tl.store(dse_sum_ptr + rm64[:, None] * R + offs_r[None, :], ds, mask=mask_mr)
        if HAS_E:
            if pid_k == 0:
                sv = tl.load(s_ptr + rm64[:, None] * stride_sm + offs_r[None, :] * stride_sr, mask=mask_mr,
                             other=0.0)
                acc_de += tl.sum(ds * sv, axis=0)
            ds = ds * e[None, :]
        acc += mma(tl.trans(ds.to(A_DTYPE)), adapter_operand(x, A_DTYPE, PREC),
                   tl.zeros((R_PAD, BLOCK_K), dtype=tl.float32), PREC)  # (_TC_NOTE)
        if WITH_DX:
            lt = ds
            if HAS_DROPOUT:
                lt = lt * drop_scale
            t = mma(lt.to(at.dtype), at, tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32), PREC_X)
            dx_ptrs = dx_ptr + rm64[:, None] * stride_dxm + rk64[None, :] * stride_dxk
            mask_mk = mask_m[:, None] & mask_k[None, :]
            o = tl.load(dx_ptrs, mask=mask_mk, other=0.0)
            new = (o.to(tl.float32) + t).to(dx_ptr.dtype.element_ty)
            if HAS_DROPOUT:
                # a dropped element keeps dY W, selected after the sum (in the SASS one instruction per element
                # fewer than masking the product first)
                new = tl.where(keep, new, o)
            tl.store(dx_ptrs, new, mask=mask_mk)
    out = part_ptr + pid_s.to(tl.int64) * R * K + offs_r[:, None].to(tl.int64) * K + rk64[None, :]
    tl.store(out, acc, mask=mask_r[:, None] & mask_k[None, :])
    if HAS_E:
        if pid_k == 0:
            tl.store(de_part_ptr + pid_s * R + offs_r, acc_de, mask=mask_r)


@triton.jit
def _lora_expand_kernel(out_ptr, l_ptr, e_ptr, r_ptr, sum_ptr, M, N, R, l_ld, n_parts, scale,
                        stride_om, stride_on, stride_rr, stride_rn,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, R_PAD: tl.constexpr,
                        HAS_E: tl.constexpr, STORE_SUM: tl.constexpr, PREC: tl.constexpr):
    """out[m, n] += scale · Σ_r L[m, r] e[r] Rm[r, n]; grid (M blocks, N blocks).

    L arrives as `n_parts` partial sums (n_parts, M, ·) fp32 (a split reduction's output), summed on load, rows
    `l_ld` apart (R, or a sibling group's total rank when L is one member's columns of S).  One read and one write
    of `out` (coalesced along n), L's partials and Rm (r, N) from L2.  The rank-r product runs in Rm's dtype with
    fp32 accumulation and is added to the fp32 value of `out`, rounded once.  STORE_SUM: the programs of the first
    N block also store L summed (M, R) fp32 at `sum_ptr` (the decode forward's S, without a launch of its own)."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_r = tl.arange(0, R_PAD)
    mask_m = offs_m < M
    mask_n = offs_n < N
    mask_r = offs_r < R
    rm64 = offs_m.to(tl.int64)
    rn64 = offs_n.to(tl.int64)
    mask_l = mask_m[:, None] & mask_r[None, :]
    lt = sum_parts(l_ptr, n_parts, M, l_ld, offs_m, offs_r, mask_l, BLOCK_M, R_PAD)
    if STORE_SUM:
        if pid_n == 0:
            tl.store(sum_ptr + rm64[:, None] * R + offs_r[None, :], lt, mask=mask_l)
    lt = lt * scale
    if HAS_E:
        e = tl.load(e_ptr + offs_r, mask=mask_r, other=0.0).to(tl.float32)
        lt = lt * e[None, :]
    rt = tl.load(r_ptr + offs_r[:, None] * stride_rr + rn64[None, :] * stride_rn,
                 mask=mask_r[:, None] & mask_n[None, :], other=0.0)
    t = mma(lt.to(rt.dtype), rt, tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32), PREC)
    ptrs = out_ptr + rm64[:, None] * stride_om + rn64[None, :] * stride_on
    mask = mask_m[:, None] & mask_n[None, :]
    o = tl.load(ptrs, mask=mask, other=0.0)
    tl.store(ptrs, (o.to(tl.float32) + t).to(out_ptr.dtype.element_ty), mask=mask)


# The dropout seed changes every step: not specialised on (seed % 16), which would compile each variant twice.
@triton.jit(do_not_specialize=["seed"])
def _lora_shrink_expand_kernel(x_ptr, a_ptr, e_ptr, r_ptr, y_ptr, s_ptr, M, N, K, R, R_EXP, scale,
                               stride_xm, stride_xk, stride_ar, stride_ak, stride_rr, stride_rn,
                               stride_ym, stride_yn, nb_per_split, seed, p16, drop_scale,
                               BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr,
                               R_PAD: tl.constexpr, HAS_E: tl.constexpr, HAS_DROPOUT: tl.constexpr,
                               PREC_S: tl.constexpr, PREC_Y: tl.constexpr):
    """The forward's rank-r work in one launch after the GEMM; grid (N splits, M blocks).  Program (j, i):
         S[rows] = drop(x)[rows] Aᵀ over all of K (the shrink; stored to s (M, R) fp32 by split 0),
         y[rows, n] += scale · (S ⊙ e)[rows, :R_EXP] Rm[:, n]   for the N blocks of split j (the expand;
                                                                 Rm = Bᵀ (R_EXP, N), R_EXP <= R).
    R_EXP < R: a sibling group's first member, whose S columns lead the group's stacked A (R rows).  Each sum runs
    in the order of the two-launch path with one K split (``_lora_shrink_kernel`` then ``_lora_expand_kernel``):
    the same S, and the same y from it."""
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_r = tl.arange(0, R_PAD)
    mask_m = offs_m < M
    mask_r = offs_r < R
    rm64 = offs_m.to(tl.int64)
    acc = _shrink_rows(x_ptr, a_ptr, offs_m, offs_r, mask_m, mask_r, 0, tl.cdiv(K, BLOCK_K), K, stride_xm,
                       stride_xk, stride_ar, stride_ak, seed, p16, drop_scale, BLOCK_M, BLOCK_K, R_PAD, HAS_DROPOUT,
                       PREC_S)
    mask_mr = mask_m[:, None] & mask_r[None, :]
    if pid_n == 0:
        tl.store(s_ptr + rm64[:, None] * R + offs_r[None, :], acc, mask=mask_mr)
    mask_x = offs_r < R_EXP
    lt = tl.where(mask_x[None, :], acc * scale, 0.0)
    if HAS_E:
        e = tl.load(e_ptr + offs_r, mask=mask_x, other=0.0).to(tl.float32)
        lt = lt * e[None, :]
    r_dtype = r_ptr.dtype.element_ty
    lt = lt.to(r_dtype)
    nb0 = pid_n * nb_per_split
    nb1 = tl.minimum(nb0 + nb_per_split, tl.cdiv(N, BLOCK_N))
    for nb in range(nb0, nb1):
        offs_n = nb * BLOCK_N + tl.arange(0, BLOCK_N)
        mask_n = offs_n < N
        rn64 = offs_n.to(tl.int64)
        rt = tl.load(r_ptr + offs_r[:, None] * stride_rr + rn64[None, :] * stride_rn,
                     mask=mask_x[:, None] & mask_n[None, :], other=0.0)
        t = mma(lt, rt, tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32), PREC_Y)
        ptrs = y_ptr + rm64[:, None] * stride_ym + rn64[None, :] * stride_yn
        mask = mask_m[:, None] & mask_n[None, :]
        o = tl.load(ptrs, mask=mask, other=0.0)
        tl.store(ptrs, (o.to(tl.float32) + t).to(y_ptr.dtype.element_ty), mask=mask)


# ---------------------------------------------------------------------------------------------------------------
# launchers
# ---------------------------------------------------------------------------------------------------------------

_TL_DTYPE = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float32: tl.float32}


def _reduce(part: torch.Tensor) -> torch.Tensor:
    """Sum partial results over dim 0 (a view when there is one partial)."""
    # select, not part[0]: indexing asks for a CUDA device guard, which fake CUDA tensors (the cost model) lack
    return part.select(0, 0) if part.shape[0] == 1 else part.sum(0)


def shrink(x: torch.Tensor, lora_A: torch.Tensor, dropout_p: float, seed: int, tgt: Optional[LaunchTarget],
           partials: bool = False) -> torch.Tensor:
    """S = drop(x) Aᵀ: (M, r) fp32.  One pass over x (M·K reads), A from L2; writes splits·M·r fp32 partials.
    `partials`: return the (splits, M, r) partial sums unsummed (for a consumer kernel that sums them itself)."""
    m, k = x.shape
    r = lora_A.shape[0]
    pl = _shrink_plan(m, k, r, x.dtype, lora_A.dtype, dropout_p, tgt)
    part = torch.empty((pl.splits, m, r), device=x.device, dtype=torch.float32)
    if launch_ok("lora_shrink", x, **pl.report):
        _lora_shrink_kernel[pl.grid](
            x, lora_A, part, m, k, r, x.stride(0), x.stride(1), lora_A.stride(0), lora_A.stride(1),
            pl.kb_per, seed_arg(seed), pl.p16, pl.drop_scale, **pl.meta)
    return part if partials else _reduce(part)


@launch_plan
def _shrink_plan(m: int, k: int, r: int, x_dt: torch.dtype, a_dt: torch.dtype, dropout_p: float,
                 tgt: Optional[LaunchTarget]) -> Plan:
    bm, bk, warps = skinny_blocks(tgt, dropout_p > 0.0)
    m_blocks, k_blocks = cdiv(m, bm), cdiv(k, bk)
    splits = split_count(m_blocks, k_blocks, target_programs(tgt))
    kb_per = cdiv(k_blocks, splits)
    splits = cdiv(k_blocks, kb_per)
    p16, drop_scale = dropout_threshold(dropout_p)
    prec = skinny_precision(a_dt, x_dt)
    tc_flops, fma_flops = dot_flops(prec, 2 * m * k * r)
    return Plan(grid=(m_blocks, splits), splits=splits, kb_per=kb_per, p16=p16, drop_scale=drop_scale,
                report=dict(bytes_read=m * k * x_dt.itemsize + r * k * a_dt.itemsize,
                            bytes_written=splits * m * r * 4, flops=tc_flops, fma_flops=fma_flops,
                            int_ops=mask_int_ops(m * k, (bm, bk, warps)) if p16 > 0 else 0),
                meta=dict(BLOCK_M=bm, BLOCK_K=bk, R_PAD=pad_rank(r), HAS_DROPOUT=p16 > 0,
                          PREC=dot_prec(prec, a_dt), num_warps=warps))


def _expand(out: torch.Tensor, L_parts: torch.Tensor, scale: float, e: Optional[torch.Tensor], Rm: torch.Tensor,
            tgt: Optional[LaunchTarget], sum_out: Optional[torch.Tensor] = None) -> None:
    """out (M, N) += scale · (L ⊙ e) Rm in place, L = Σ_p L_parts[p]: the decode forward's second launch, and a
    sibling group's other members' forward (each its columns of the group's S).

    L_parts: (P, M, r) fp32 partial sums (P = 1: L itself), contiguous or r columns of a contiguous (P, M, R)
    buffer (a sibling group's); Rm: (r, N), any strides.  `sum_out`: a contiguous (M, r) fp32 tensor that
    receives L (the sum of the partials) as well.  One read + one write of out (2·M·N elements), L's partials and
    Rm once."""
    m, n = out.shape
    parts, r = L_parts.shape[0], L_parts.shape[2]
    l_ld = L_parts.stride(1) if m > 0 else r
    assert L_parts.stride(2) == 1 and (parts == 1 or L_parts.stride(0) == m * l_ld), "L_parts: (P, M, ld) layout"
    store_sum = sum_out is not None
    assert not store_sum or (sum_out.is_contiguous() and tuple(sum_out.shape) == (m, r)), "sum_out: (M, r)"
    pl = _expand_plan(m, n, r, parts, out.dtype, Rm.dtype, e is not None, store_sum, tgt)
    if launch_ok("lora_expand", out, **pl.report):
        _lora_expand_kernel[pl.grid](
            out, L_parts, e if e is not None else L_parts, Rm, sum_out if store_sum else L_parts, m, n, r, l_ld,
            parts, float(scale), out.stride(0), out.stride(1), Rm.stride(0), Rm.stride(1), **pl.meta)


@launch_plan
def _expand_plan(m: int, n: int, r: int, parts: int, out_dt: torch.dtype, rm_dt: torch.dtype, has_e: bool,
                 store_sum: bool, tgt: Optional[LaunchTarget]) -> Plan:
    bm, bn, warps = skinny_blocks(tgt)
    prec = lora_epilogue_precision(out_dt, rm_dt)
    tc_flops, fma_flops = dot_flops(prec, 2 * m * n * r)
    return Plan(grid=(cdiv(m, bm), cdiv(n, bn)),
                report=dict(bytes_read=m * n * out_dt.itemsize + parts * m * r * 4 + r * n * rm_dt.itemsize,
                            bytes_written=m * n * out_dt.itemsize + (m * r * 4 if store_sum else 0),
                            flops=tc_flops, fma_flops=fma_flops),
                meta=dict(BLOCK_M=bm, BLOCK_N=bn, R_PAD=pad_rank(r), HAS_E=has_e, STORE_SUM=store_sum,
                          PREC=dot_prec(prec, rm_dt), num_warps=warps))


def shrink_expand(y: torch.Tensor, x: torch.Tensor, lora_A: torch.Tensor, lora_E: Optional[torch.Tensor],
                  lora_B: torch.Tensor, scaling: float, dropout_p: float, seed: int, tgt: Optional[LaunchTarget]
                  ) -> torch.Tensor:
    """y (M, N) += s · ((drop(x) Aᵀ) ⊙ e)[:, :r_B] Bᵀ in place, in one launch; returns S = drop(x) Aᵀ: (M, r)
    fp32.
    x: (M, K); lora_A: (r, K); lora_E: (r,) or None; lora_B: (N, r_B) with r_B <= r (r_B < r: the first member
    of a sibling group, whose columns of S lead the stacked A); any strides.  Reads x once per N split
    (``shrink_expand_blocks``), y once, writes y and S."""
    m, k = x.shape
    n = y.shape[1]
    r = lora_A.shape[0]
    r_b = lora_B.shape[1]
    assert r_b <= r, "lora_B: at most lora_A's rank"
    s = torch.empty((m, r), device=x.device, dtype=torch.float32)
    pl = _shrink_expand_plan(m, n, k, r, r_b, x.dtype, lora_A.dtype, y.dtype, lora_B.dtype, dropout_p,
                             lora_E is not None, tgt)
    rm = lora_B.t()
    if launch_ok("lora_shrink_expand", x, **pl.report):
        _lora_shrink_expand_kernel[pl.grid](
            x, lora_A, lora_E if lora_E is not None else s, rm, y, s, m, n, k, r, r_b, float(scaling),
            x.stride(0), x.stride(1), lora_A.stride(0), lora_A.stride(1), rm.stride(0), rm.stride(1),
            y.stride(0), y.stride(1), pl.nb_per, seed_arg(seed), pl.p16, pl.drop_scale, **pl.meta)
    return s


@launch_plan
def _shrink_expand_plan(m: int, n: int, k: int, r: int, r_b: int, x_dt: torch.dtype, a_dt: torch.dtype,
                        y_dt: torch.dtype, b_dt: torch.dtype, dropout_p: float, has_e: bool,
                        tgt: Optional[LaunchTarget]) -> Plan:
    bm, bk, bn, warps, splits = shrink_expand_blocks(tgt, m, n, dropout_p > 0.0)
    p16, drop_scale = dropout_threshold(dropout_p)
    prec_s = skinny_precision(a_dt, x_dt)
    prec_y = lora_epilogue_precision(y_dt, b_dt)
    tc_s, fma_s = dot_flops(prec_s, 2 * m * k * r)
    tc_y, fma_y = dot_flops(prec_y, 2 * m * n * r_b)
    return Plan(grid=(splits, cdiv(m, bm)), nb_per=cdiv(cdiv(n, bn), splits), p16=p16, drop_scale=drop_scale,
                report=dict(bytes_read=splits * m * k * x_dt.itemsize + r * k * a_dt.itemsize
                            + m * n * y_dt.itemsize + r_b * n * b_dt.itemsize,
                            bytes_written=m * n * y_dt.itemsize + m * r * 4,
                            flops=tc_s + tc_y, fma_flops=fma_s + fma_y,
                            int_ops=mask_int_ops(splits * m * k, (bm, bk, warps)) if p16 > 0 else 0),
                meta=dict(BLOCK_M=bm, BLOCK_K=bk, BLOCK_N=bn, R_PAD=pad_rank(r), HAS_E=has_e,
                          HAS_DROPOUT=p16 > 0, PREC_S=dot_prec(prec_s, a_dt), PREC_Y=dot_prec(prec_y, b_dt),
                          num_warps=warps))


@on_input_device
def lora_fwd_triton(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], lora_A: torch.Tensor,
                    lora_E: Optional[torch.Tensor], lora_B: torch.Tensor, scaling: float, dropout_p: float,
                    seed: int, variant: Optional[str] = None, target: Optional[LaunchTarget] = None
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton LoRA forward; the contract of ``fastpeft.ops.lora.lora_fwd_ref``.

    Passes (cublas variant): cuBLAS ``F.linear`` (the frozen layer's own GEMM), then one launch that reads x once
    (M·K), writes S (M·r fp32) and reads and writes y once (2·M·N).  Fused variant: shrink, then one Triton GEMM
    whose epilogue adds the rank-r term (y written once).

    Args:
        x: (M, K), fp16/bf16/fp32 (any strides).  weight: (N, K), any strides (e.g. Conv1D's ``weight.t()``).
        bias: (N,) or None.  lora_A: (r, K).  lora_E: (r,) or None.  lora_B: (N, r) - adapters may be fp32 on a
        16-bit base.  scaling: s.  dropout_p: in [0, 1).  seed: mask seed (``fastpeft.ops.dropout`` stream).
        variant: ``"cublas"`` (default) or ``"fused"``.  target: the launch target (None: x's device).
    Returns:
        y: (M, N) in x's dtype; S = drop(x) Aᵀ: (M, r) fp32.
    """
    variant = check_variant(variant)
    m, k = x.shape
    n = weight.shape[0]
    r = lora_A.shape[0]
    if m == 0:
        return x.new_empty((0, n)), x.new_empty((0, r), dtype=torch.float32)
    tgt = launch_target(x.device, target)
    if variant == "cublas":
        y = F.linear(x, weight, bias)
        if m <= TWO_LAUNCH_MAX_ROWS:
            # decode: the split-K shrink runs K in parallel where the single launch walks it serially per program;
            # the expand sums its partials and stores S (two launches, no torch op between them)
            part = shrink(x, lora_A, dropout_p, seed, tgt, partials=True)
            several = part.shape[0] > 1
            s = torch.empty((m, r), device=x.device, dtype=torch.float32) if several else part.select(0, 0)
            _expand(y, part, float(scaling), lora_E, lora_B.t(), tgt, sum_out=s if several else None)
            return y, s
        return y, shrink_expand(y, x, lora_A, lora_E, lora_B, float(scaling), dropout_p, seed, tgt)
    s = shrink(x, lora_A, dropout_p, seed, tgt)
    y = torch.empty((m, n), device=x.device, dtype=x.dtype)
    gemm(x, weight.t(), y, prec=base_precision(x.dtype),
         lora=(s, float(scaling), lora_E, lora_B.t(), lora_epilogue_precision(x.dtype, lora_A.dtype), 0, 0, 1.0),
         bias=bias, target=tgt)
    return y, s


@launch_plan
def dy_split(m: int, n: int, tgt: Optional[LaunchTarget]) -> tuple[int, int, int]:
    """The dY pass's grid over an (m, n) dY: (M chunks, M blocks per chunk, N chunks).  The chunk counts balance the
    two partial buffers (m_chunks · N ≈ n_chunks · M) at about one program per SM slot."""
    bm, bn, _ = skinny_blocks(tgt)
    programs = target_programs(tgt)
    m_blocks, n_blocks = cdiv(m, bm), cdiv(n, bn)
    m_chunks = max(1, min(m_blocks, round(math.sqrt(programs * m / n))))
    mb_per = cdiv(m_blocks, m_chunks)
    m_chunks = cdiv(m_blocks, mb_per)
    n_chunks = split_count(m_chunks, n_blocks, programs)
    nb_per = cdiv(n_blocks, n_chunks)
    return m_chunks, mb_per, cdiv(n_blocks, nb_per)


def _dy_pass(dy: torch.Tensor, lora_B: torch.Tensor, S: torch.Tensor, lora_E: Optional[torch.Tensor],
             scaling: float, has_bias: bool, tgt: Optional[LaunchTarget], dse_out: Optional[torch.Tensor] = None,
             u: Optional[torch.Tensor] = None
             ) -> tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor], Optional[torch.Tensor]]:
    """One pass over dY (M·N reads) giving, as unsummed partials (consumers sum them), dSe = s · dY B
    (n_chunks, M, r) fp32, dB = s · dYᵀ (S ⊙ e) (m_chunks, N, r) fp32, dbias = Σ_m dY (m_chunks, N) fp32
    (None without bias) and, with `u` (M, N), Σ_m dY ⊙ u (m_chunks, N) fp32 (else None; u read once more).
    `dse_out`: write dSe there instead - r columns of a contiguous (P, M, R) buffer shared by a sibling group, whose
    P (at most this layer's N block count) sets n_chunks; returned as given."""
    m, n = dy.shape
    r = lora_B.shape[1]
    dev = dy.device
    has_u = u is not None
    m_chunks, mb_per, n_chunks = dy_split(m, n, tgt)
    if dse_out is None:
        dse_part = torch.empty((n_chunks, m, r), device=dev, dtype=torch.float32)
    else:  # the group's chunk count; a chunk past this layer's last N block is stored as zeros by its programs
        dse_part, n_chunks = dse_out, dse_out.shape[0]
        assert dse_part.stride(2) == 1 and dse_part.stride(0) == m * dse_part.stride(1), "dse_out: (P, M, ld)"
    pl = _dy_plan(m, n, r, n_chunks, dy.dtype, lora_B.dtype, has_bias, lora_E is not None,
                  u.dtype if has_u else None, tgt)
    db_part = torch.empty((m_chunks, n, r), device=dev, dtype=torch.float32)
    # without a bias the kernel never touches its dbias pointer: db_part stands in (no allocation)
    dbias_part = torch.empty((m_chunks, n), device=dev, dtype=torch.float32) if has_bias else db_part
    du_part = torch.empty((m_chunks, n), device=dev, dtype=torch.float32) if has_u else None
    if launch_ok("lora_dy", dy, **pl.report):
        _lora_dy_kernel[(m_chunks, n_chunks)](
            dy, lora_B, S, lora_E if lora_E is not None else S, dse_part, db_part, dbias_part,
            u if has_u else dy, du_part if has_u else dbias_part,
            m, n, r, float(scaling), dse_part.stride(1),
            dy.stride(0), dy.stride(1), lora_B.stride(0), lora_B.stride(1), S.stride(0), S.stride(1),
            (u.stride(0) if has_u else 0), (u.stride(1) if has_u else 0),
            mb_per, pl.nb_per, **pl.meta)
    return dse_part, db_part, (dbias_part if has_bias else None), du_part


@launch_plan
def _dy_plan(m: int, n: int, r: int, n_chunks: int, dy_dt: torch.dtype, b_dt: torch.dtype, has_bias: bool,
             has_e: bool, u_dt: Optional[torch.dtype], tgt: Optional[LaunchTarget]) -> Plan:
    bm, bn, warps = skinny_blocks(tgt)
    m_chunks = dy_split(m, n, tgt)[0]
    nb_per = cdiv(cdiv(n, bn), n_chunks)
    has_u = u_dt is not None
    prec = skinny_precision(b_dt, dy_dt)
    tc_flops, fma_flops = dot_flops(prec, 4 * m * n * r)
    return Plan(nb_per=nb_per,
                report=dict(bytes_read=m * n * dy_dt.itemsize + n_chunks * m * r * (4 + 4) * (nb_per - 1)
                            + n * r * b_dt.itemsize + m * r * 4 + (m * n * u_dt.itemsize if has_u else 0),
                            bytes_written=n_chunks * m * r * 4 * nb_per
                            + m_chunks * n * (r + int(has_bias) + int(has_u)) * 4,
                            flops=tc_flops + (2 * m * n if has_u else 0), fma_flops=fma_flops),
                meta=dict(BLOCK_M=bm, BLOCK_N=bn, R_PAD=pad_rank(r), HAS_E=has_e, HAS_BIAS=has_bias, HAS_U=has_u,
                          PREC=dot_prec(prec, b_dt), num_warps=warps))


def _da_pass(x: torch.Tensor, dse_part: torch.Tensor, lora_E: Optional[torch.Tensor], S: torch.Tensor,
             adt: torch.dtype, dropout_p: float, seed: int, tgt: Optional[LaunchTarget],
             want_sum: bool = False, dx: Optional[torch.Tensor] = None, lora_A: Optional[torch.Tensor] = None
             ) -> tuple[torch.Tensor, Optional[torch.Tensor], Optional[torch.Tensor]]:
    """One pass over x (M·K reads; the mask regenerated): dA = dSᵀ drop(x) with dS = (Σ_p dse_part[p]) ⊙ e.
    Returns dA's partials (splits, r, K) fp32; with e, dE's (splits, r) fp32 (dE = Σ_m dSe ⊙ S), else None; with
    `want_sum`, Σ_p dse_part[p] as a contiguous (M, r) fp32 tensor (for a separate dX step: stored by this pass
    when there are several partials, dse_part[0] itself when one), else None.
    `dx` (M, K) holding dY W, with `lora_A` (r, K): the same pass also adds mask ⊙ (dS A) · drop_scale into dx
    in place (one read + write of dX beside the read of x, the mask regenerated once for both)."""
    m, k = x.shape
    parts, r = dse_part.shape[0], dse_part.shape[2]
    dev = x.device
    dse_sum = None
    if want_sum:
        dse_sum = dse_part.select(0, 0) if parts == 1 else torch.empty((m, r), device=dev, dtype=torch.float32)
    store_sum = want_sum and parts > 1
    with_dx = dx is not None
    has_e = lora_E is not None
    pl = _da_plan(m, k, r, parts, x.dtype, adt, dropout_p, has_e, store_sum, dx.dtype if with_dx else None,
                  lora_A.dtype if with_dx else None, tgt)
    da_part = torch.empty((pl.msplits, r, k), device=dev, dtype=torch.float32)
    de_part = torch.empty((pl.msplits, r), device=dev, dtype=torch.float32) if has_e else None
    if launch_ok("lora_da_dx" if with_dx else "lora_da", x, **pl.report):
        _lora_da_kernel[pl.grid](
            x, dse_part, lora_E if has_e else dse_part, S, da_part, de_part if has_e else da_part,
            dse_sum if store_sum else dse_part, dx if with_dx else x, lora_A if with_dx else x,
            m, k, r, parts, x.stride(0), x.stride(1), S.stride(0), S.stride(1),
            dx.stride(0) if with_dx else 0, dx.stride(1) if with_dx else 0,
            lora_A.stride(0) if with_dx else 0, lora_A.stride(1) if with_dx else 0,
            pl.mb_per, seed_arg(seed), pl.p16, pl.drop_scale, **pl.meta)
    return da_part, de_part, dse_sum


@launch_plan
def _da_plan(m: int, k: int, r: int, parts: int, x_dt: torch.dtype, adt: torch.dtype, dropout_p: float,
             has_e: bool, store_sum: bool, dx_dt: Optional[torch.dtype], a_dt: Optional[torch.dtype],
             tgt: Optional[LaunchTarget]) -> Plan:
    with_dx = dx_dt is not None
    bm, bk, warps = da_blocks(tgt, dropout_p > 0.0, with_dx)
    m_blocks, k_blocks = cdiv(m, bm), cdiv(k, bk)
    msplits = split_count(k_blocks, m_blocks, target_programs(tgt))
    mb_per = cdiv(m_blocks, msplits)
    msplits = cdiv(m_blocks, mb_per)
    p16, drop_scale = dropout_threshold(dropout_p)
    prec = skinny_precision(adt, x_dt)
    tc_flops, fma_flops = dot_flops(prec, 2 * m * k * r)
    prec_x = lora_epilogue_precision(dx_dt, a_dt) if with_dx else prec
    if with_dx:
        tc_x, fma_x = dot_flops(prec_x, 2 * m * k * r)
        tc_flops, fma_flops = tc_flops + tc_x, fma_flops + fma_x
    dx_bytes = m * k * dx_dt.itemsize if with_dx else 0
    return Plan(grid=(k_blocks, msplits), msplits=msplits, mb_per=mb_per, p16=p16, drop_scale=drop_scale,
                report=dict(bytes_read=m * k * x_dt.itemsize + parts * m * r * 4 + (m * r * 4 if has_e else 0)
                            + dx_bytes + (r * k * a_dt.itemsize if with_dx else 0),
                            bytes_written=msplits * r * k * 4 + (m * r * 4 if store_sum else 0) + dx_bytes,
                            flops=tc_flops, fma_flops=fma_flops,
                            int_ops=mask_int_ops(m * k, (bm, bk, warps),
                                                 MASK_INT_OPS_X_AND_DX if with_dx else MASK_INT_OPS_PER_ELEMENT)
                            if p16 > 0 else 0),
                meta=dict(BLOCK_M=bm, BLOCK_K=bk, R_PAD=pad_rank(r), HAS_DROPOUT=p16 > 0, HAS_E=has_e,
                          STORE_SUM=store_sum, WITH_DX=with_dx,
                          PREC=dot_prec(prec, adt), PREC_X=dot_prec(prec_x, a_dt if with_dx else adt),
                          A_DTYPE=_TL_DTYPE[adt], num_warps=warps))


@on_input_device
def lora_bwd_triton(dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, lora_A: torch.Tensor,
                    lora_E: Optional[torch.Tensor], lora_B: torch.Tensor, S: torch.Tensor, scaling: float,
                    dropout_p: float, seed: int, needs_dx: bool, has_bias: bool, variant: Optional[str] = None,
                    target: Optional[LaunchTarget] = None, dy_u: Optional[torch.Tensor] = None) -> tuple:
    """Triton LoRA backward; the contract of ``fastpeft.ops.lora.lora_bwd_ref``.

    Passes: one over dY (dSe, dB, dbias together), one over x (dA, mask regenerated); with `needs_dx` the cublas
    variant runs ``torch.mm`` (dX = dY W, cuBLAS) and expand (one read + write of dX adding mask ⊙ dS A · scale),
    the fused variant one Triton GEMM with that term in its epilogue.

    Args:
        dy: (M, N).  x: (M, K) as saved.  weight, lora_A, lora_E, lora_B, scaling, dropout_p, seed: as forward.
        S: (M, r) fp32 from the forward.  needs_dx: compute dx.  has_bias: compute dbias.
        variant: ``"cublas"`` (default) or ``"fused"``.  target: the launch target (None: dy's device).
        dy_u: (M, N) or None.  Given (DoRA's output u), the pass over dY also forms Σ_m dY ⊙ u (DoRA's dm before
            its division) and a sixth output returns it as unsummed partials (P, N) fp32 - no pass of its own.
    Returns:
        dx (M, K) x's dtype or empty (0,); dA (r, K); dE (r,) or empty (0,); dB (N, r); dbias (N,) or empty
        [; the Σ_m dY ⊙ u partials (P, N) fp32, with `dy_u`].
    """
    variant = check_variant(variant)
    m, k = x.shape
    n = weight.shape[0]
    adt = lora_A.dtype
    dev = dy.device
    if m == 0:
        outs = (x.new_empty((0, k)) if needs_dx else x.new_empty(0), torch.zeros_like(lora_A),
                torch.zeros_like(lora_E) if lora_E is not None else dy.new_empty(0, dtype=adt),
                torch.zeros_like(lora_B),
                torch.zeros(n, device=dev, dtype=weight.dtype) if has_bias else dy.new_empty(0, dtype=weight.dtype))
        return outs if dy_u is None else outs + (torch.zeros((1, n), device=dev, dtype=torch.float32),)
    tgt = launch_target(dev, target)
    # dSe, dB, dbias stay as the dY pass's partial sums: the dA pass sums dSe as it loads it, and one launch sums
    # the rest (dB, dbias, dA, dE) into their dtypes.
    dse_part, db_part, dbias_part, du_part = _dy_pass(dy, lora_B, S, lora_E, scaling, has_bias, tgt,
                                                      u=dy_u)  # dSe includes s
    if needs_dx and variant == "cublas":
        # dX = dY W by cuBLAS first; then one pass over x and dX together forms dA and adds the rank-r term to dX
        # (the dropout mask regenerated once for both)
        dx = torch.mm(dy, weight)
        da_part, de_part, _ = _da_pass(x, dse_part, lora_E, S, adt, dropout_p, seed, tgt, dx=dx, lora_A=lora_A)
    else:
        # the fused variant's GEMM epilogue reads dSe summed: the dA pass stores it
        da_part, de_part, dse_sum = _da_pass(x, dse_part, lora_E, S, adt, dropout_p, seed, tgt, want_sum=needs_dx)
    jobs = [(db_part, lora_B.dtype), (da_part, adt)]
    if has_bias:
        jobs.append((dbias_part, weight.dtype))
    if lora_E is not None:
        jobs.append((de_part, lora_E.dtype))
    if needs_dx and variant == "cublas":
        outs = sum_partials(jobs, dy)
    elif needs_dx:
        dS = dse_sum
        if lora_E is not None:
            dS = dS * lora_E.float()
        p16, drop_scale = dropout_threshold(dropout_p)
        dx = torch.empty((m, k), device=dev, dtype=x.dtype)
        gemm(dy, weight, dx, prec=base_precision(dy.dtype),
             lora=(dS, 1.0, None, lora_A, lora_epilogue_precision(x.dtype, adt), p16, seed_arg(seed), drop_scale),
             target=tgt)
        outs = sum_partials(jobs, dy)
    else:
        dx = x.new_empty(0)
        outs = sum_partials(jobs, dy)
    dB, dA = outs[0], outs[1]
    dbias = outs[2] if has_bias else dy.new_empty(0, dtype=weight.dtype)
    dE = outs[-1] if lora_E is not None else dy.new_empty(0, dtype=adt)
    return (dx, dA, dE, dB, dbias) if dy_u is None else (dx, dA, dE, dB, dbias, du_part)
