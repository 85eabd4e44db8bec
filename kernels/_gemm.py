"""The persistent GEMM kernel with its prologue / epilogue options, and its launcher ``gemm``: the ``fused``
variants of the LoRA and IA3 launchers run their base GEMM here."""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from ._configs import gemm_configs, m_bucket, prune_gemm_configs
from ._mask import mask_int_ops
from ._philox import dropout_keep, seed_arg
from ._target import cdiv, _PRUNE_TARGET, LaunchTarget, interpret_mode, launch_ok, launch_target, num_sms, span, use_tma
from ._tl import dot_prec, mma, pad_rank, scaled


@triton.jit
def tile_coords(tile_id, num_pid_m, num_pid_n, GROUP_M: tl.constexpr):
    """Grouped ("super-tile") order: GROUP_M row tiles walk the column tiles together so their A rows and B
    columns are reused from L2."""
    num_in_group = GROUP_M * num_pid_n
    group_id = tile_id // num_in_group
    first_m = group_id * GROUP_M
    group_size = tl.minimum(num_pid_m - first_m, GROUP_M)
    pid_m = first_m + ((tile_id % num_in_group) % group_size)
    pid_n = (tile_id % num_in_group) // group_size
    return pid_m, pid_n



# ---------------------------------------------------------------------------------------------------------------
# The GEMM kernel every op uses:  C[M, N] = prologue(A)[M, K] @ B[K, N]  + epilogue
# ---------------------------------------------------------------------------------------------------------------
#
#   prologue  (HAS_PRO):   A[:, k] <- (A[:, k] in pro's dtype * pro[k]) cast back to A's dtype    (IA3 input scale)
#   epilogue, in order, on the fp32 accumulator:
#     HAS_LORA:  += dropmask(m, n) * ((L[M, R] * lscale * rs[R]) @ Rm[R, N])
#                (the LoRA expand term; the dropout mask only on the dX side)
#     HAS_BIAS:  += bias[n]
#     WRITE_Z:   Z <- acc  (IA3's saved z = x Wᵀ + b)
#     HAS_DL:    part[pid_m, n] = Σ_m round(acc) * X2[m, n]                (IA3 input-mode dl, one row per M tile)
#     HAS_COL:   acc <- round(acc) * col[n]                              (IA3 output scale, input-mode dx scale)
#     STORE_C:   C <- acc
#
# The rank-r term sits after the K loop, so the main loop stays a plain pipelined GEMM (inside the loop it would be
# recomputed or kept live through every K step).  Persistent: NUM_SMS programs walk the tiles in grouped order.
# USE_TMA reads A and B through tensor descriptors (TMA on Hopper); B_KCONTIG says which of B's dims is unit-stride
# on that path (True: B is the transpose of a row-major (N, K) tensor, like W in the forward).


# The dropout seed changes every step: not specialised on (seed % 16), which would compile each variant twice.
@triton.jit(do_not_specialize=["seed"])
def _gemm_kernel(
    a_ptr, b_ptr, c_ptr, M, N, K,
    stride_am, stride_ak, stride_bk, stride_bn, stride_cm, stride_cn,
    pro_ptr,
    l_ptr, stride_lm, stride_lr, lscale, rs_ptr, rm_ptr, stride_rr, stride_rn, R,
    seed, p16, drop_scale,
    bias_ptr, col_ptr,
    z_ptr, stride_zm, stride_zn,
    x2_ptr, stride_x2m, stride_x2n, part_ptr,
    M_BUCKET,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    NUM_SMS: tl.constexpr, R_PAD: tl.constexpr,
    HAS_PRO: tl.constexpr, HAS_LORA: tl.constexpr, HAS_RS: tl.constexpr, HAS_DROPOUT: tl.constexpr,
    HAS_BIAS: tl.constexpr, WRITE_Z: tl.constexpr, HAS_DL: tl.constexpr, HAS_COL: tl.constexpr,
    STORE_C: tl.constexpr,
    PREC: tl.constexpr, LORA_PREC: tl.constexpr, USE_TMA: tl.constexpr, B_KCONTIG: tl.constexpr,
    EPI_SPLIT: tl.constexpr,
):
    start = tl.program_id(0)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    num_tiles = num_pid_m * num_pid_n
    k_tiles = tl.cdiv(K, BLOCK_K)

    if USE_TMA:
        a_desc = tl.make_tensor_descriptor(a_ptr, shape=[M, K], strides=[stride_am, 1],
                                           block_shape=[BLOCK_M, BLOCK_K])
        if B_KCONTIG:
            b_desc = tl.make_tensor_descriptor(b_ptr, shape=[N, K], strides=[stride_bn, 1],
                                               block_shape=[BLOCK_N, BLOCK_K])
        else:
            b_desc = tl.make_tensor_descriptor(b_ptr, shape=[K, N], strides=[stride_bk, 1],
                                               block_shape=[BLOCK_K, BLOCK_N])

    for tile_id in range(start, num_tiles, NUM_SMS):
        pid_m, pid_n = tile_coords(tile_id, num_pid_m, num_pid_n, GROUP_M)
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        mask_m = offs_m < M
        mask_n = offs_n < N
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        if USE_TMA:
            for ki in range(k_tiles):
                off_k = ki * BLOCK_K
                a = a_desc.load([pid_m * BLOCK_M, off_k])
                if B_KCONTIG:
                    b = b_desc.load([pid_n * BLOCK_N, off_k]).T
                else:
                    b = b_desc.load([off_k, pid_n * BLOCK_N])
                if HAS_PRO:
                    offs_k = off_k + tl.arange(0, BLOCK_K)
                    pro = tl.load(pro_ptr + offs_k, mask=offs_k < K, other=0.0)
                    a = scaled(a.to(pro.dtype), pro[None, :]).to(a.dtype)
                acc = mma(a, b, acc, PREC)
        else:
            rm64 = offs_m.to(tl.int64)
            rn64 = offs_n.to(tl.int64)
            for ki in range(k_tiles):
                offs_k = ki * BLOCK_K + tl.arange(0, BLOCK_K)
                mask_k = offs_k < K
                rk64 = offs_k.to(tl.int64)
                a = tl.load(a_ptr + rm64[:, None] * stride_am + rk64[None, :] * stride_ak,
                            mask=mask_m[:, None] & mask_k[None, :], other=0.0)
                b = tl.load(b_ptr + rk64[:, None] * stride_bk + rn64[None, :] * stride_bn,
                            mask=mask_k[:, None] & mask_n[None, :], other=0.0)
                if HAS_PRO:
                    pro = tl.load(pro_ptr + offs_k, mask=mask_k, other=0.0)
                    a = scaled(a.to(pro.dtype), pro[None, :]).to(a.dtype)
                acc = mma(a, b, acc, PREC)

        # ---- epilogue, on EPI_SPLIT column sub-tiles (fewer live registers: the rank-r product and the Philox
        # state of the dropout mask are per element) ----
        if EPI_SPLIT == 1:
            _epilogue(acc, pid_m, offs_m, pid_n * BLOCK_N, M, N, c_ptr, stride_cm, stride_cn,
                      l_ptr, stride_lm, stride_lr, lscale, rs_ptr, rm_ptr, stride_rr, stride_rn, R,
                      seed, p16, drop_scale, bias_ptr, col_ptr, z_ptr, stride_zm, stride_zn,
                      x2_ptr, stride_x2m, stride_x2n, part_ptr,
                      BLOCK_N, R_PAD, HAS_LORA, HAS_RS, HAS_DROPOUT, HAS_BIAS, WRITE_Z, HAS_DL, HAS_COL,
                      STORE_C, LORA_PREC)
        elif EPI_SPLIT == 2:
            a0, a1 = _halves(acc, BLOCK_M, BLOCK_N)
            _epilogue(a0, pid_m, offs_m, pid_n * BLOCK_N, M, N, c_ptr, stride_cm, stride_cn,
                      l_ptr, stride_lm, stride_lr, lscale, rs_ptr, rm_ptr, stride_rr, stride_rn, R,
                      seed, p16, drop_scale, bias_ptr, col_ptr, z_ptr, stride_zm, stride_zn,
                      x2_ptr, stride_x2m, stride_x2n, part_ptr,
                      BLOCK_N // 2, R_PAD, HAS_LORA, HAS_RS, HAS_DROPOUT, HAS_BIAS, WRITE_Z, HAS_DL, HAS_COL,
                      STORE_C, LORA_PREC)
            _epilogue(a1, pid_m, offs_m, pid_n * BLOCK_N + BLOCK_N // 2, M, N, c_ptr, stride_cm, stride_cn,
                      l_ptr, stride_lm, stride_lr, lscale, rs_ptr, rm_ptr, stride_rr, stride_rn, R,
                      seed, p16, drop_scale, bias_ptr, col_ptr, z_ptr, stride_zm, stride_zn,
                      x2_ptr, stride_x2m, stride_x2n, part_ptr,
                      BLOCK_N // 2, R_PAD, HAS_LORA, HAS_RS, HAS_DROPOUT, HAS_BIAS, WRITE_Z, HAS_DL, HAS_COL,
                      STORE_C, LORA_PREC)
        else:
            tl.static_assert(EPI_SPLIT == 4, "EPI_SPLIT must be 1, 2 or 4")
            h0, h1 = _halves(acc, BLOCK_M, BLOCK_N)
            a0, a1 = _halves(h0, BLOCK_M, BLOCK_N // 2)
            a2, a3 = _halves(h1, BLOCK_M, BLOCK_N // 2)
            Q: tl.constexpr = BLOCK_N // 4
            _epilogue(a0, pid_m, offs_m, pid_n * BLOCK_N, M, N, c_ptr, stride_cm, stride_cn,
                      l_ptr, stride_lm, stride_lr, lscale, rs_ptr, rm_ptr, stride_rr, stride_rn, R,
                      seed, p16, drop_scale, bias_ptr, col_ptr, z_ptr, stride_zm, stride_zn,
                      x2_ptr, stride_x2m, stride_x2n, part_ptr,
                      Q, R_PAD, HAS_LORA, HAS_RS, HAS_DROPOUT, HAS_BIAS, WRITE_Z, HAS_DL, HAS_COL, STORE_C, LORA_PREC)
            _epilogue(a1, pid_m, offs_m, pid_n * BLOCK_N + Q, M, N, c_ptr, stride_cm, stride_cn,
                      l_ptr, stride_lm, stride_lr, lscale, rs_ptr, rm_ptr, stride_rr, stride_rn, R,
                      seed, p16, drop_scale, bias_ptr, col_ptr, z_ptr, stride_zm, stride_zn,
                      x2_ptr, stride_x2m, stride_x2n, part_ptr,
                      Q, R_PAD, HAS_LORA, HAS_RS, HAS_DROPOUT, HAS_BIAS, WRITE_Z, HAS_DL, HAS_COL, STORE_C, LORA_PREC)
            _epilogue(a2, pid_m, offs_m, pid_n * BLOCK_N + 2 * Q, M, N, c_ptr, stride_cm, stride_cn,
                      l_ptr, stride_lm, stride_lr, lscale, rs_ptr, rm_ptr, stride_rr, stride_rn, R,
                      seed, p16, drop_scale, bias_ptr, col_ptr, z_ptr, stride_zm, stride_zn,
                      x2_ptr, stride_x2m, stride_x2n, part_ptr,
                      Q, R_PAD, HAS_LORA, HAS_RS, HAS_DROPOUT, HAS_BIAS, WRITE_Z, HAS_DL, HAS_COL, STORE_C, LORA_PREC)
            _epilogue(a3, pid_m, offs_m, pid_n * BLOCK_N + 3 * Q, M, N, c_ptr, stride_cm, stride_cn,
                      l_ptr, stride_lm, stride_lr, lscale, rs_ptr, rm_ptr, stride_rr, stride_rn, R,
                      seed, p16, drop_scale, bias_ptr, col_ptr, z_ptr, stride_zm, stride_zn,
                      x2_ptr, stride_x2m, stride_x2n, part_ptr,
                      Q, R_PAD, HAS_LORA, HAS_RS, HAS_DROPOUT, HAS_BIAS, WRITE_Z, HAS_DL, HAS_COL, STORE_C, LORA_PREC)


@triton.jit
def _halves(x, BM: tl.constexpr, BN: tl.constexpr):
    """Split a (BM, BN) register tile into its left and right (BM, BN/2) halves."""
    x = tl.reshape(x, (BM, 2, BN // 2))
    x = tl.permute(x, (0, 2, 1))
    return tl.split(x)


@triton.jit
def _epilogue(acc, pid_m, offs_m, n0, M, N, c_ptr, stride_cm, stride_cn,
              l_ptr, stride_lm, stride_lr, lscale, rs_ptr, rm_ptr, stride_rr, stride_rn, R,
              seed, p16, drop_scale, bias_ptr, col_ptr, z_ptr, stride_zm, stride_zn,
              x2_ptr, stride_x2m, stride_x2n, part_ptr,
              WIDTH: tl.constexpr, R_PAD: tl.constexpr,
              HAS_LORA: tl.constexpr, HAS_RS: tl.constexpr, HAS_DROPOUT: tl.constexpr, HAS_BIAS: tl.constexpr,
              WRITE_Z: tl.constexpr, HAS_DL: tl.constexpr, HAS_COL: tl.constexpr, STORE_C: tl.constexpr,
              LORA_PREC: tl.constexpr):
    """The epilogue of the (rows offs_m) x (columns n0 .. n0 + WIDTH) part of a tile; `acc` is fp32 (BM, WIDTH)."""
    c_dtype = c_ptr.dtype.element_ty
    offs_n = n0 + tl.arange(0, WIDTH)
    mask_m = offs_m < M
    mask_n = offs_n < N
    rm64 = offs_m.to(tl.int64)
    rn64 = offs_n.to(tl.int64)
    mask_mn = mask_m[:, None] & mask_n[None, :]
    if HAS_LORA:
        offs_r = tl.arange(0, R_PAD)
        mask_r = offs_r < R
        lt = tl.load(l_ptr + rm64[:, None] * stride_lm + offs_r[None, :] * stride_lr,
                     mask=mask_m[:, None] & mask_r[None, :], other=0.0).to(tl.float32) * lscale
        if HAS_RS:
            rs = tl.load(rs_ptr + offs_r, mask=mask_r, other=0.0).to(tl.float32)
            lt = lt * rs[None, :]
        rt = tl.load(rm_ptr + offs_r[:, None] * stride_rr + rn64[None, :] * stride_rn,
                     mask=mask_r[:, None] & mask_n[None, :], other=0.0)
        if HAS_DROPOUT:
            # the mask applies to the rank-r term only, so it needs its own product (scale folded into L first)
            lora = mma((lt * drop_scale).to(rt.dtype), rt, tl.zeros(acc.shape, dtype=tl.float32), LORA_PREC)
            keep = dropout_keep(seed, offs_m, n0, p16, WIDTH)
            acc += tl.where(keep, lora, 0.0)
        else:
            acc = mma(lt.to(rt.dtype), rt, acc, LORA_PREC)
    if HAS_BIAS:
        bias = tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0)
        acc += bias.to(tl.float32)[None, :]
    if WRITE_Z:
        tl.store(z_ptr + rm64[:, None] * stride_zm + rn64[None, :] * stride_zn,
                 acc.to(z_ptr.dtype.element_ty), mask=mask_mn)
    if HAS_DL:
        x2 = tl.load(x2_ptr + rm64[:, None] * stride_x2m + rn64[None, :] * stride_x2n, mask=mask_mn, other=0.0)
        g = acc.to(c_dtype).to(tl.float32)
        dl_part = tl.sum(g * x2.to(tl.float32), axis=0)
        tl.store(part_ptr + pid_m.to(tl.int64) * N + offs_n, dl_part, mask=mask_n)
    if HAS_COL:
        col = tl.load(col_ptr + offs_n, mask=mask_n, other=0.0)
        acc = scaled(acc.to(c_dtype), col[None, :]).to(tl.float32)
    if STORE_C:
        tl.store(c_ptr + rm64[:, None] * stride_cm + rn64[None, :] * stride_cn, acc.to(c_dtype), mask=mask_mn)


def _epi_split(args) -> int:
    """Column sub-tiles of the epilogue.  The dropout mask (one Philox call per 8 columns, its 16-bit lanes
    interleaved back into (BM, width)) and the dropout term's second (BM, width) product need registers, so the dropout epilogue works on 32-column pieces; any other rank-r / reduction
    epilogue on 64-column pieces; a plain epilogue on the whole tile.  The interpreter uses 16-column pieces so
    the tests run the split path.  The widths come from register arithmetic (see docs/STATUS.md for what is
    measured)."""
    bn = args["BLOCK_N"]
    if interpret_mode():
        width = 16
    elif args["HAS_DROPOUT"]:
        width = 32
    elif args["HAS_LORA"] or args["HAS_DL"] or args["WRITE_Z"]:
        width = 64
    else:
        width = bn
    return max(1, min(4, bn // max(16, width)))


_gemm_autotuned = triton.autotune(
    configs=gemm_configs(),
    key=["M_BUCKET", "N", "K", "HAS_PRO", "HAS_LORA", "HAS_DROPOUT", "HAS_DL", "USE_TMA", "B_KCONTIG"],
    prune_configs_by={"early_config_prune": prune_gemm_configs},
    # The dl partial rows a config writes depend on its BLOCK_M: zero them before each benchmarked config.
    reset_to_zero=["part_ptr"],
)(triton.heuristics({"EPI_SPLIT": _epi_split})(_gemm_kernel))


def _ensure_allocator() -> None:
    """Give Triton a global-memory allocator for the kernel's device-side TMA descriptors (``tl.make_tensor_descriptor``
    needs a workspace at launch): torch's caching allocator, unless the user set one.  Without it the first GPU run
    (H100, triton 3.6) failed every fused-variant launch with "Kernel requires a runtime memory allocation, but no
    allocator was set"; the interpreter needs none."""
    try:
        from triton.runtime import _allocation
    except ImportError:  # a triton without the hook needs no allocator
        return
    current = _allocation._allocator.get()
    if isinstance(current, _allocation.NullAllocator):
        triton.set_allocator(_torch_alloc)


def _torch_alloc(size: int, alignment: int, stream) -> torch.Tensor:  # noqa: ARG001 - torch aligns to 512 bytes
    return torch.empty(size, dtype=torch.int8, device="cuda")


def _dummy(device: torch.device) -> torch.Tensor:
    return torch.empty(1, device=device, dtype=torch.float32)


def gemm(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor | None, *, prec: str,
         pro: torch.Tensor | None = None,
         lora: tuple | None = None,
         bias: torch.Tensor | None = None, col: torch.Tensor | None = None,
         z: torch.Tensor | None = None, dl_x: torch.Tensor | None = None,
         target: Optional[LaunchTarget] = None) -> torch.Tensor | None:
    """Launch the GEMM kernel: ``out[M, N] = prologue(a)[M, K] @ b[K, N] + epilogue`` (see the comment above).

    Args:
        a: (M, K), any strides.  b: (K, N), any strides (e.g. ``W.t()``).  out: (M, N) or None (then nothing is
            stored; used when only the dl reduction is wanted - pass `dl_x` and a dtype-carrying `z`-less call).
        prec: dot precision of the main loop ("ieee" or "default", see ``base_precision``).
        pro: (K,) prologue scale.
        lora: ``(L (M, R), lscale, rs (R,) | None, Rm (R, N), lora_prec, p16, seed, drop_scale)``: the epilogue
            adds ``mask ⊙ ((L · lscale · rs · drop_scale) @ Rm)``, the mask and drop_scale only when the int
            threshold p16 > 0 (``p16, drop_scale = _mask.dropout_threshold(p)``).
        bias, col: (N,).  z: (M, N) output of the unscaled accumulator (+ bias).
        dl_x: (M, N) tensor whose product with the rounded accumulator is summed over M.
        target: the launch target (``_target.LaunchTarget``; None: `a`'s device).
    Returns:
        The (cdiv(M, BLOCK_M), N) fp32 dl partial sums when `dl_x` is given (sum them over dim 0), else None.
    """
    m, k = a.shape
    n = b.shape[1]
    dev = a.device
    d = _dummy(dev)
    c = out if out is not None else torch.empty((1, 1), device=dev, dtype=a.dtype)
    has_lora = lora is not None
    if has_lora:
        L, lscale, rs, Rm, lora_prec, p16, seed, drop_scale = lora
        r = L.shape[1]
    else:
        L, lscale, rs, Rm, lora_prec, p16, seed, drop_scale, r = (d.view(1, 1), 1.0, None, d.view(1, 1), "default",
                                                                  0, 0, 1.0, 1)
    # TMA view of B: row-major (N, K) when b is the transpose of such a tensor, row-major (K, N) otherwise.
    if b.stride(0) == 1 and b.dim() == 2:
        b_rowmajor, b_kcontig = b.t(), True
    elif b.stride(1) == 1:
        b_rowmajor, b_kcontig = b, False
    else:
        b_rowmajor, b_kcontig = None, False
    tgt = launch_target(dev, target)
    tma = use_tma(a, b_rowmajor, tgt)
    nsm = num_sms(tgt)
    part = None
    if dl_x is not None:
        # One partial row per M tile: BLOCK_M is only known once a config is picked, so size for the smallest
        # BLOCK_M a config kept for this M has; rows a larger tile leaves unwritten stay zero.
        min_bm = min(cfg.kwargs["BLOCK_M"] for cfg in prune_gemm_configs(gemm_configs(), {"M": m, "a_ptr": a},
                                                                              target=tgt))
        part = torch.zeros((cdiv(m, min_bm), n), device=dev, dtype=torch.float32)

    def grid(meta):
        tiles = cdiv(m, meta["BLOCK_M"]) * cdiv(n, meta["BLOCK_N"])
        return (max(1, min(nsm, tiles)),)

    args = (
        a, b, c, m, n, k,
        a.stride(0), a.stride(1), b.stride(0), b.stride(1), c.stride(0), c.stride(1),
        pro if pro is not None else d,
        L, L.stride(0), L.stride(1), float(lscale), rs if rs is not None else d, Rm, Rm.stride(0), Rm.stride(1), r,
        seed_arg(seed), int(p16), float(drop_scale),
        bias if bias is not None else d, col if col is not None else d,
        z if z is not None else c, (z.stride(0) if z is not None else 0), (z.stride(1) if z is not None else 0),
        dl_x if dl_x is not None else c, (dl_x.stride(0) if dl_x is not None else 0),
        (dl_x.stride(1) if dl_x is not None else 0), part if part is not None else d,
        m_bucket(m),
    )
    kwargs = dict(
        NUM_SMS=nsm, R_PAD=pad_rank(r),
        HAS_PRO=pro is not None, HAS_LORA=has_lora, HAS_RS=rs is not None, HAS_DROPOUT=has_lora and p16 > 0,
        HAS_BIAS=bias is not None, WRITE_Z=z is not None, HAS_DL=dl_x is not None, HAS_COL=col is not None,
        STORE_C=out is not None,
        PREC=dot_prec(prec, a.dtype), LORA_PREC=dot_prec(lora_prec, Rm.dtype), B_KCONTIG=b_kcontig,
    )
    # The pro/epilogue operands' traffic counts too: z written beside C (IA3 output mode) and dl_x read (input
    # mode's dl) are each a full (M, N) pass.
    extra_read = sum(span(t) for t in (pro, bias, col, dl_x, rs) if t is not None)
    if has_lora:
        extra_read += span(L) + span(Rm)
    extra_written = (span(z) if z is not None else 0) + (span(part) if part is not None else 0)
    if not launch_ok("triton_gemm", a, bytes_read=(m * k + k * n) * a.element_size() + extra_read,
                     bytes_written=(m * n * c.element_size() if out is not None else 0) + extra_written,
                     flops=2 * m * n * k + (2 * m * n * r if has_lora else 0),
                     int_ops=mask_int_ops(m * n) if has_lora and p16 > 0 else 0):
        return part
    # A failing TMA launch raises (FASTPEFT_TRITON_TMA=0 selects the pointer path): nothing below select_backend
    # changes the path a launch takes behind the caller's back.
    if tma:
        _ensure_allocator()
    token = _PRUNE_TARGET.set(tgt)
    try:
        _gemm_autotuned[grid](*args, USE_TMA=tma, **kwargs)
    finally:
        _PRUNE_TARGET.reset(token)
    return part
