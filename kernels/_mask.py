"""Host-side numbers the torch references and the kernels share.

* The threshold of the seeded dropout stream: the one number every backend derives from the drop probability.  The
  stream itself is defined in ``fastpeft/ops/dropout.py`` (torch), ``kernels/_philox.py`` (Triton) and
  ``csrc/common/philox.cuh`` (CUDA).
* ``tiny_scale``: below which magnitude a per-feature output scale (IA3's l, DoRA's k) is not divided out again.

Pure Python: importing it needs neither torch nor triton, so ``fastpeft.ops`` (imported by ``import fastpeft``) can
use it.
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


# Integer lane instructions per element of a regenerated dropout mask, counted in the sm_90 SASS that triton 3.9
# builds for the LoRA kernels (``.ci/dropout_sass.py``: a kernel's instruction count with dropout minus the same
# kernel and configuration without, per element a thread masks; results in
# benchmarks/results/triton-compile-sm90/dropout_sass.csv).  One Philox-4x32-10 call - ten rounds of two
# 32x32->64-bit multiplies and two three-way XORs - serves 8 elements; each element adds its 16-bit extraction,
# compare, select and scale.
#   MASK_INT_OPS_PER_ELEMENT: a pass that masks one operand - the forward's shrink-expand, 16.5-25 over the H200's
#     tiles and adapter dtypes (19.0 at M = 8448 with bf16 adapters); the dA pass alone measured 15.4-17.9.
#   MASK_INT_OPS_X_AND_DX: the backward's one pass over x and dX, which masks x and dX's rank-r term: 28.2-32.2
#     (the same pass without dX's term: 15.8-16.5 at its tiles) - against 15.4 + 21.5 for the two passes it
#     replaced.
MASK_INT_OPS_PER_ELEMENT = 19
MASK_INT_OPS_X_AND_DX = 30


def mask_int_ops(elements: int, tile: tuple[int, int, int] | None = None,
                 per_element: int = MASK_INT_OPS_PER_ELEMENT) -> int:
    """Integer lane instructions a kernel spends regenerating the dropout mask of `elements` elements:
    `per_element` each (``MASK_INT_OPS_PER_ELEMENT``, or ``MASK_INT_OPS_X_AND_DX`` for the pass that uses the mask
    twice).  `tile`: (rows, cols, warps) of the kernel's masked tile; a tile with fewer Philox groups
    (rows x cols / 8) than threads has each call computed by several threads, which multiplies the count (at
    16 x 64 over 8 warps the SASS counts 48 per element).  None: a tile with enough groups."""
    replication = 1
    if tile is not None:
        rows, cols, warps = tile
        replication = max(1, (32 * warps * 8) // max(1, rows * cols))
    return int(elements) * per_element * replication
