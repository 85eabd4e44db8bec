"""Host-side numbers of the kernels' dropout mask: what regenerating it costs (for the cost model), and - from
``fastpeft._numerics``, the stdlib-only leaf every backend takes them from - the stream's threshold
(``dropout_threshold``) and ``tiny_scale``, re-exported for the launchers.
"""

from __future__ import annotations

from .._numerics import dropout_threshold, tiny_scale  # noqa: F401  (re-exported: the launchers import them here)


# Integer lane instructions per element of a regenerated dropout mask, counted in the sm_90 SASS that triton 3.9
# builds for the LoRA kernels (``.ci/dropout_sass.py``: a kernel's instruction count with dropout minus the same
# kernel and configuration without, per element a thread masks; results in
# benchmarks/results/triton-compile-sm90/dropout_sass.csv).  One Philox-4x32-10 call - ten rounds of two
# 32x32->64-bit multiplies (one IMAD.WIDE.U32 each, ``_philox.philox4x32_10``) and two three-way XORs - serves 8
# elements; each element adds its 16-bit extraction, compare, select and scale.
#   MASK_INT_OPS_PER_ELEMENT: a pass that masks one operand - the forward's shrink-expand, 14.5-23 over the H200's
#     tiles and adapter dtypes (17.5 at M = 8448 with bf16 adapters; 16.5-25, 19.0 there, with tl.philox's
#     separate high and low products).
#   MASK_INT_OPS_X_AND_DX: the backward's one pass over x and dX, which masks x and dX's rank-r term: 26.5-30.2
#     (28.2-32.2 with tl.philox; the same pass without dX's term: 15.8-16.5 at its tiles with tl.philox) - against
#     15.4 + 21.5 for the two passes it replaced.  Most of it is not Philox: the mask is formed in x's register
#     layout and used again in dX's (the product's), and the SASS moves it between them (IMAD.MOV, PRMT, shared
#     memory).
MASK_INT_OPS_PER_ELEMENT = 17.5
MASK_INT_OPS_X_AND_DX = 28


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
    return int(round(int(elements) * per_element * replication))
