"""Kernel cost reporting for the cost model: the module is ``fastpeft.kernels._cost`` (the launchers report to it,
and ``kernels/`` imports nothing of ``fastpeft`` but the leaf ``fastpeft._numerics``); this name is where the cost model and its tests open a recording."""

from .kernels._cost import KernelCost, active, recording, report

__all__ = ["KernelCost", "active", "recording", "report"]
