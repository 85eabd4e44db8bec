"""Kernel cost reporting for the cost model (``python -m benchmarks --model``); ``fastpeft._cost`` re-exports it.

It lives in ``kernels/`` because the launchers report to it and ``kernels/`` imports nothing of ``fastpeft`` but the leaf ``fastpeft._numerics``.

The cost model traces one layer's forward and backward with fake tensors (no memory, no GPU) at production shapes.
torch ops are counted by a dispatch mode; fastpeft's own kernels cannot run on fake tensors, so their launchers,
when ``recording()`` is active, call :func:`report` with the traffic and work of each kernel they would launch
(and return correctly shaped outputs without launching).  Outside ``recording()`` :func:`report` does nothing
and :func:`active` is False, so launchers pay one attribute read per call.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Iterator, List

__all__ = ["KernelCost", "active", "recording", "report"]


@dataclass
class KernelCost:
    """One kernel launch: ``name`` (kernel name), bytes read and written from global memory, floating-point ops
    (``flops``: tensor-core or elementwise; ``fma_flops``: ieee fp32 dot products, on the CUDA cores) and
    ``int_ops``: integer lane instructions that bound a kernel on the SM's integer pipes rather than on memory (the
    dropout mask's Philox rounds, ``kernels._mask.mask_int_ops``)."""

    name: str
    bytes_read: int
    bytes_written: int
    flops: int
    launches: int = 1
    fma_flops: int = 0
    int_ops: int = 0


_stack: List[List[KernelCost]] = []


def active() -> bool:
    """True while a :func:`recording` block is open (launchers then report instead of launching)."""
    return bool(_stack)


def report(name: str, *, bytes_read: int, bytes_written: int, flops: int, launches: int = 1,
           fma_flops: int = 0, int_ops: int = 0) -> None:
    """Record one kernel (or ``launches`` identical ones) in every open :func:`recording` block."""
    if not _stack:
        return
    cost = KernelCost(name, int(bytes_read), int(bytes_written), int(flops), int(launches), int(fma_flops),
                      int(int_ops))
    for rec in _stack:
        rec.append(cost)


@contextlib.contextmanager
def recording() -> Iterator[List[KernelCost]]:
    """Collect the :class:`KernelCost` of every kernel reported inside the block (blocks may nest)."""
    rec: List[KernelCost] = []
    _stack.append(rec)
    try:
        yield rec
    finally:
        _stack.remove(rec)
