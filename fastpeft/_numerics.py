"""Host-side numbers every backend shares, in one place: the threshold and scale of the seeded dropout stream (the
one pair of numbers every backend derives from the drop probability; the stream itself is defined in
``fastpeft/ops/dropout.py``, ``kernels/_philox.py`` and ``csrc/common/philox.cuh``), and ``tiny_scale``, below which
magnitude a per-feature output scale (IA3's l, DoRA's k) is not divided out again.

A leaf: it imports only the standard library (no torch, no triton, nothing of fastpeft), so the torch references in
``fastpeft/ops`` and the Triton launchers in ``kernels/`` (installed as ``fastpeft.kernels``, which import nothing
else of fastpeft) both take these numbers from here, and neither has to import the other.
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


def tiny_scale(dtype) -> float:
    """|s| below which y / s would not give back the unscaled values of an output of `dtype` (a torch dtype): fp16's
    narrow range would lose them to underflow; fp32 / bf16 keep 2⁻⁶⁴·z as a normal number for any |z| > 1e-19, far
    below any trained scale.  Used by IA3's l (``kernels/ia3.py``) and DoRA's k (``fastpeft/ops/dora.py``)."""
    return 2.0 ** -8 if str(dtype) == "torch.float16" else 2.0 ** -64
