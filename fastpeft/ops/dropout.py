"""The seeded dropout mask stream shared by every backend.

Fused kernels never store a dropout mask: the forward and the backward regenerate it from ``(seed, m, k)``.
For the torch reference, the Triton kernels and the CUDA extension to agree bit for bit, the stream is defined
here, once, in plain integer arithmetic.  One Philox call serves 8 consecutive elements of a row (16-bit
uniforms), so the mask costs about an eighth of a Philox call per element:

    element (m, k) of the logical (M, K) input (row_offset is added to m), seed in [0, 2**63)
    counter = (k >> 3, m & 0xffffffff, m >> 32, 0)                     # uint32 words
    key     = (seed & 0xffffffff, (seed >> 32) & 0xffffffff)
    (r0, r1, r2, r3) = philox4x32_10(counter, key)
    j    = k & 7
    u16  = (r[j >> 1] >> (16 * (j & 1))) & 0xffff
    p16, scale = dropout_threshold(p)     # p16 = min(round(p * 65536), 65535), scale = fp32(65536 / (65536 - p16))
    keep = u16 >= p16
    drop(x)[m, k] = x[m, k] * scale if keep else 0

So the effective drop probability is p16 / 65536 (p rounded to a multiple of 2**-16) and the scale makes
E[drop(x)] = x exactly for it.  A group of 8 never straddles two rows, so the stream does not depend on K.
``p16`` and ``scale`` are computed once, on the host, by ``dropout_threshold``, and passed to the kernels as an
int and an fp32; the CUDA extension's ``make_dropout`` (csrc/common/philox.cuh ``threshold``) performs the same
two IEEE-exact steps, which tests/test_cuda_ext.py checks against this function.

Philox-4x32-10 is Salmon et al. (SC'11); the constants are the published ones, and are those of
``triton.language.philox``, so a Triton kernel calls ``tl.philox(seed, k >> 3, m_lo, m_hi, 0)`` once per 8
elements.  In CUDA, the same rounds are written out in ``csrc/common/philox.cuh``.
"""

from __future__ import annotations

import torch

# The threshold is part of the stream's definition and the Triton launchers need it too: it lives in the leaf both
# import (fastpeft/_numerics.py) and is re-exported here.
from .._numerics import dropout_threshold  # noqa: F401

_MASK32 = 0xFFFFFFFF
_ROUND_A = 0xD2511F53
_ROUND_B = 0xCD9E8D57
_KEY_A = 0x9E3779B9
_KEY_B = 0xBB67AE85
N_ROUNDS = 10
GROUP = 8  # elements of a row served by one Philox call (4 words x 2 16-bit halves)


def _mul_hi_lo(a: torch.Tensor, b: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(hi32, lo32) of the 64-bit product of uint32 values `a` (int64 tensor) and constant `b`, without overflow."""
    a_hi = a >> 16
    a_lo = a & 0xFFFF
    t_hi = a_hi * b  # < 2**48
    t_lo = a_lo * b  # < 2**48
    hi = (t_hi + (t_lo >> 16)) >> 16
    lo = ((t_hi << 16) + t_lo) & _MASK32
    return hi, lo


def philox4x32_10(seed: int, c0: torch.Tensor, c1: torch.Tensor, c2: torch.Tensor, c3: torch.Tensor
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """All four output words of Philox-4x32-10 for counters ``(c0, c1, c2, c3)`` and the key taken from ``seed``.

    Args:
        seed: int in [0, 2**63).
        c0, c1, c2, c3: int64 tensors holding uint32 values, broadcastable to one shape.
    Returns:
        Four int64 tensors of uint32 values, of the broadcast shape.
    """
    k0 = seed & _MASK32
    k1 = (seed >> 32) & _MASK32
    c0, c1, c2, c3 = torch.broadcast_tensors(c0, c1, c2, c3)
    for _ in range(N_ROUNDS):
        hi_b, lo_b = _mul_hi_lo(c2, _ROUND_B)
        hi_a, lo_a = _mul_hi_lo(c0, _ROUND_A)
        c0, c1, c2, c3 = hi_b ^ c1 ^ k0, lo_b, hi_a ^ c3 ^ k1, lo_a
        k0 = (k0 + _KEY_A) & _MASK32
        k1 = (k1 + _KEY_B) & _MASK32
    return c0, c1, c2, c3


def dropout_uniform16(seed: int, shape: tuple[int, int], device: torch.device | str = "cpu",
                      row_offset: int = 0) -> torch.Tensor:
    """The 16-bit uniforms ``u16`` of the stream for a logical (M, K) input.

    Args:
        seed: dropout seed, int in [0, 2**63).
        shape: (M, K).
        row_offset: index of the first row (for chunked generation); element (m, k) uses row ``row_offset + m``.
    Returns:
        (M, K) int64 tensor of values in [0, 65536).
    """
    m, k = shape
    groups = -(-k // GROUP)
    rows = torch.arange(m, dtype=torch.int64, device=device).view(m, 1) + int(row_offset)
    g = torch.arange(groups, dtype=torch.int64, device=device).view(1, groups) & _MASK32
    words = philox4x32_10(int(seed), g, rows & _MASK32, (rows >> 32) & _MASK32, torch.zeros_like(g))
    w = torch.stack(words, dim=-1)  # (M, G, 4): word j >> 1 serves elements 2(j>>1), 2(j>>1)+1 of the group
    u = torch.stack((w & 0xFFFF, w >> 16), dim=-1)  # (M, G, 4, 2): element j = 2 * word + half
    # narrow, not [:, :k]: indexing asks for a CUDA device guard, which fake CUDA tensors (the cost model) lack
    return u.reshape(m, groups * GROUP).narrow(1, 0, k)


def dropout_keep_mask(seed: int, shape: tuple[int, int], p: float, device: torch.device | str = "cpu",
                      row_offset: int = 0) -> torch.Tensor:
    """Boolean keep-mask of the shared stream for a logical (M, K) input.

    Args:
        seed: dropout seed, int in [0, 2**63).
        shape: (M, K).
        p: drop probability in [0, 1); the effective one is ``dropout_threshold(p)[0] / 65536``.
        row_offset: index of the first row (for chunked generation); element (m, k) uses row ``row_offset + m``.
    Returns:
        (M, K) bool tensor, True where the element is kept.
    """
    p16, _ = dropout_threshold(p)
    return dropout_uniform16(seed, shape, device, row_offset) >= p16


def dropout_scale(p: float) -> float:
    """The fp32 value kept elements are multiplied by: ``fp32(65536 / (65536 - p16))`` (see ``dropout_threshold``)."""
    return dropout_threshold(p)[1]


def host_seed(seed) -> int:
    """The seed as a host int: a device-side seed (a 1-element int64 tensor, see ``fastpeft.functional.draw_seed``)
    is read back - only the torch implementation needs that; the Triton kernels read it on the device."""
    return int(seed.item()) if isinstance(seed, torch.Tensor) else int(seed)


def seeded_dropout(x2d: torch.Tensor, p: float, seed) -> torch.Tensor:
    """Seeded dropout of a 2-D tensor (M, K) by the shared stream: the torch implementation every backend matches.

    Args:
        x2d: (M, K).  p: drop probability in [0, 1).  seed: int in [0, 2**63), or a 1-element int64 tensor.
    Returns:
        A new (M, K) tensor of x2d's dtype (x2d itself if p == 0): kept elements times ``dropout_scale(p)``, others 0.
    """
    if p == 0.0:
        return x2d
    keep = dropout_keep_mask(host_seed(seed), tuple(x2d.shape), p, x2d.device)
    return torch.where(keep, x2d * dropout_scale(p), torch.zeros((), dtype=x2d.dtype, device=x2d.device))
