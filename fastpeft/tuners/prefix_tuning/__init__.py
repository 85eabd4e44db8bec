"""Prefix tuning: learned per-layer key/value prefixes handed to the model as its KV cache."""

from __future__ import annotations

from .config import PrefixTuningConfig
from .model import PrefixEncoder, PrefixTuningTuner

__all__ = ["PrefixTuningConfig", "PrefixEncoder", "PrefixTuningTuner"]
