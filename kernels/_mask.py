"""The threshold of the seeded dropout stream: the one number every backend derives from the drop probability.

The stream itself is defined in ``fastpeft/ops/dropout.py`` (torch), ``kernels/_philox.py`` (Triton) and
``csrc/common/philox.cuh`` (CUDA); this module holds the host-side part they share.  Pure Python: importing it
needs neither torch nor triton, so ``fastpeft.ops.dropout`` (imported by ``import fastpeft``) can re-export it.
"""

from __future__ import annotations

import struct


def dropout_threshold(p: float) -> tuple[int, float]:
    """The integer threshold and the scale of the stream for drop probability ``p``.

    Returns:
        ``(p16, scale)``: ``p16 = min(round(p * 65536), 65535)`` (Python's round-half-even on the float64 product,
        which is exact) and ``scale = fp32(65536 / (65536 - p16))``.  An element is kept when its 16-bit uniform
        is ``>= p16``, so the effective drop probability is ``p16 / 65536``; kept values are multiplied by
        ``scale``.  Every backend receives these two numbers from here (the CUDA extension recomputes them with
        the same two correctly rounded IEEE operations; tests/test_cuda_ext.py checks they agree).
    Raises:
        ValueError: ``p`` is not a number in [0, 1).
    """
    try:
        pf = float(p)
    except (TypeError, ValueError):
        raise ValueError(f"dropout p must be a number in [0, 1), got {p!r}") from None
    if not 0.0 <= pf < 1.0:
        raise ValueError(f"dropout p must be in [0, 1), got {p!r}")
    p16 = min(round(pf * 65536.0), 65535)
    # float64 quotient (correctly rounded) then one rounding to fp32, as the C++ side does
    scale = struct.unpack("f", struct.pack("f", 65536.0 / (65536 - p16)))[0]
    return p16, scale
