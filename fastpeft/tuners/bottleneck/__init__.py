"""Bottleneck adapters (Houlsby / Pfeiffer; fastpeft only, HF PEFT has no such method)."""

from __future__ import annotations

from .config import BottleneckConfig
from .layer import ACTIVATIONS, BottleneckLayer, bottleneck_ref
from .model import BottleneckTuner

__all__ = ["BottleneckConfig", "BottleneckLayer", "BottleneckTuner", "ACTIVATIONS", "bottleneck_ref"]
