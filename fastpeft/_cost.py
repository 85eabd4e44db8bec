"""Kernel cost reporting for the cost model: the module is ``fastpeft.kernels._cost`` (the launchers report to it,
and ``kernels/`` never imports ``fastpeft``); this name is where the cost model and its tests open a recording."""

from .kernels._cost import KernelCost, active, recording, report

__all__ = ["KernelCost", "active", "recording", "report"]
