"""The seeded dropout mask stream shared by every backend.

Fused kernels never store a dropout mask: the forward and the backward regenerate it from ``(seed, index)``.
For the torch reference, the Triton kernels and the CUDA extension to agree bit for bit, the stream is defined
here, once, in plain integer arithmetic:

    element i (row-major index into the logical (M, K) input, i = m*K + k, 0 <= i < 2**64)
    (c0, c1, c2, c3) = philox4x32_10(counter=(i & 0xffffffff, i >> 32, 0, 0),
                                     key=(seed & 0xffffffff, (seed >> 32) & 0xffffffff))
    u    = (c0 >> 8) * 2**-24              # exact in fp32, in [0, 1)
    keep = u >= fp32(p)
    drop(x)[i] = x[i] * fp32(1 / (1 - p)) if keep else 0

Philox-4x32-10 is Salmon et al. (SC'11); the constants are the published ones, and are those of
``triton.language.philox`` with 32-bit counters, so a Triton kernel calls ``tl.philox(seed, c0, c1, 0, 0)``
and applies the same two lines to ``c0``.  In CUDA, the same rounds are written out in ``csrc/common/philox.cuh``.
"""

from __future__ import annotations

import torch

_MASK32 = 0xFFFFFFFF
_ROUND_A = 0xD2511F53
_ROUND_B = 0xCD9E8D57
_KEY_A = 0x9E3779B9
_KEY_B = 0xBB67AE85
N_ROUNDS = 10


def _mul_hi_lo(a: torch.Tensor, b: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(hi32, lo32) of the 64-bit product of uint32 values `a` (int64 tensor) and constant `b`, without overflow."""
    a_hi = a >> 16
    a_lo = a & 0xFFFF
    t_hi = a_hi * b  # < 2**48
    t_lo = a_lo * b  # < 2**48
    hi = (t_hi + (t_lo >> 16)) >> 16
    lo = ((t_hi << 16) + t_lo) & _MASK32
    return hi, lo


def philox4x32(seed: int, counter_lo: torch.Tensor, counter_hi: torch.Tensor) -> torch.Tensor:
    """First output word of Philox-4x32-10 for counters ``(lo, hi, 0, 0)`` and key from ``seed``.

    Args:
        seed: int in [0, 2**63).
        counter_lo, counter_hi: int64 tensors holding uint32 values, same shape.
    Returns:
        int64 tensor of uint32 values, same shape as the counters.
    """
    k0 = seed & _MASK32
    k1 = (seed >> 32) & _MASK32
    c0 = counter_lo
    c1 = counter_hi
    c2 = torch.zeros_like(c0)
    c3 = torch.zeros_like(c0)
    for _ in range(N_ROUNDS):
        hi_b, lo_b = _mul_hi_lo(c2, _ROUND_B)
        hi_a, lo_a = _mul_hi_lo(c0, _ROUND_A)
        c0, c1, c2, c3 = hi_b ^ c1 ^ k0, lo_b, hi_a ^ c3 ^ k1, lo_a
        k0 = (k0 + _KEY_A) & _MASK32
        k1 = (k1 + _KEY_B) & _MASK32
    return c0


def dropout_keep_mask(seed: int, shape: tuple[int, int], p: float, device: torch.device | str = "cpu",
                      row_offset: int = 0) -> torch.Tensor:
    """Boolean keep-mask of the shared stream for a logical (M, K) input.

    Args:
        seed: dropout seed, int in [0, 2**63).
        shape: (M, K).
        p: drop probability in [0, 1).
        row_offset: index of the first row (for chunked generation); element (m, k) uses i = (row_offset+m)*K + k.
    Returns:
        (M, K) bool tensor, True where the element is kept.
    """
    m, k = shape
    idx = torch.arange(m * k, dtype=torch.int64, device=device) + row_offset * k
    r = philox4x32(int(seed), idx & _MASK32, (idx >> 32) & _MASK32)
    u = (r >> 8).to(torch.float32) * (2.0 ** -24)
    return (u >= torch.tensor(p, dtype=torch.float32, device=device)).view(m, k)


def dropout_scale(p: float) -> float:
    """The fp32 value kept elements are multiplied by: ``fp32(1 / (1 - p))``."""
    return float(torch.tensor(1.0 / (1.0 - p), dtype=torch.float32))


def seeded_dropout(x2d: torch.Tensor, p: float, seed: int) -> torch.Tensor:
    """Reference seeded dropout of a 2-D tensor (M, K); returns a new tensor of x2d's dtype."""
    if p == 0.0:
        return x2d
    keep = dropout_keep_mask(seed, tuple(x2d.shape), p, x2d.device)
    return torch.where(keep, x2d * dropout_scale(p), torch.zeros((), dtype=x2d.dtype, device=x2d.device))
