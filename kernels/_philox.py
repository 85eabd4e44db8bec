"""The seeded dropout stream in Triton: the keep-mask of ``fastpeft.ops.dropout`` regenerated inside a kernel.

The stream's definition (counters, 16-bit lanes, threshold) is written out in ``fastpeft/ops/dropout.py``; the
threshold ``p16`` comes from ``_mask.dropout_threshold``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


def seed_arg(seed):
    """A kernel's `seed` argument: a host int (specialised as a scalar), or a 1-element int64 tensor on the device
    (read by the kernel: a seed drawn on the GPU, so a replayed CUDA graph uses the seed drawn in that replay)."""
    return seed if isinstance(seed, torch.Tensor) else int(seed)


@triton.jit
def load_seed(seed):
    """The seed value: `seed` itself, or the int64 it points to (a device-side seed, see ``seed_arg``)."""
    if seed.dtype.is_ptr():
        return tl.load(seed)
    else:
        return seed


@triton.jit
def philox4x32_10(k0, k1, c0, c1, c2, c3):
    """Philox-4x32-10 of counter (c0, c1, c2, c3) under key (k0, k1) (uint32 tensors / scalars): the values of
    ``tl.philox`` (Random123's constants and round), with each round's two 32 x 32 -> 64-bit products formed as one
    64-bit multiply - one wide multiply-add each on the GPU (sm_90 SASS: ``IMAD.WIDE.U32``) where ``tl.philox``'s
    ``umulhi`` and low product cost two."""
    for _ in tl.static_range(10):
        p0 = c0.to(tl.uint64) * 0xD2511F53
        p2 = c2.to(tl.uint64) * 0xCD9E8D57
        c0 = (p2 >> 32).to(tl.uint32) ^ c1 ^ k0
        c2 = (p0 >> 32).to(tl.uint32) ^ c3 ^ k1
        c1 = p2.to(tl.uint32)
        c3 = p0.to(tl.uint32)
        k0 = tl.add(k0, 0x9E3779B9, sanitize_overflow=False)
        k1 = tl.add(k1, 0xBB67AE85, sanitize_overflow=False)
    return c0, c1, c2, c3


@triton.jit
def dropout_keep(seed, offs_m, k_start, p16, BLOCK_K: tl.constexpr):
    """Keep-mask of the shared dropout stream (``fastpeft.ops.dropout``) for rows ``offs_m`` (BM,) and the BLOCK_K
    columns ``k_start .. k_start + BLOCK_K`` (k_start a multiple of 8): one ``tl.philox`` call per 8 columns of a row,
    on counter (k >> 3, m & 0xffffffff, m >> 32, 0); element k takes 16-bit half (k & 1) of word (k & 7) >> 1 and is
    kept when that value is >= p16 (the int threshold of ``dropout_threshold``).  Returns (BM, BLOCK_K) bool."""
    tl.static_assert(BLOCK_K % 8 == 0, "dropout column blocks must be whole groups of 8")
    seed = load_seed(seed)
    G: tl.constexpr = BLOCK_K // 8
    m64 = offs_m.to(tl.int64)
    zero = tl.zeros((offs_m.shape[0], G), dtype=tl.uint32)
    g = (k_start // 8 + tl.arange(0, G)).to(tl.int64)
    c0 = zero + (g & 0xFFFFFFFF).to(tl.uint32)[None, :]
    c1 = zero + (m64 & 0xFFFFFFFF).to(tl.uint32)[:, None]
    c2 = zero + (m64 >> 32).to(tl.uint32)[:, None]
    s64 = seed.to(tl.uint64)
    r0, r1, r2, r3 = philox4x32_10((s64 & 0xFFFFFFFF).to(tl.uint32), ((s64 >> 32) & 0xFFFFFFFF).to(tl.uint32),
                                   c0, c1, c2, zero)
    # The 8 16-bit lanes e0 .. e7 (e_j = half j & 1 of word j >> 1) back in k order.  tl.join(a, b) stacks on a NEW
    # LAST axis, so three nested joins give (BM, G, b0, b1, b2) with b0 from the innermost join and b2 from the
    # outermost, and the row-major reshape puts it at j = 4*b0 + 2*b1 + b2: the innermost joins must pair (e_j,
    # e_{j+4}), the middle ones (j, j+2), the outer one (j, j+1).  (The "obvious" nesting join(join(e0, e1), ..)
    # would give the bit-reversed order e0 e4 e2 e6 e1 e5 e3 e7; tests/test_triton_lora.py pins the order.)
    e0, e1 = r0 & 0xFFFF, r0 >> 16
    e2, e3 = r1 & 0xFFFF, r1 >> 16
    e4, e5 = r2 & 0xFFFF, r2 >> 16
    e6, e7 = r3 & 0xFFFF, r3 >> 16
    even = tl.join(tl.join(e0, e4), tl.join(e2, e6))  # b2 = 0: e0, e2, e4, e6
    odd = tl.join(tl.join(e1, e5), tl.join(e3, e7))   # b2 = 1: e1, e3, e5, e7
    u = tl.reshape(tl.join(even, odd), (offs_m.shape[0], BLOCK_K))
    return u.to(tl.int32) >= p16
