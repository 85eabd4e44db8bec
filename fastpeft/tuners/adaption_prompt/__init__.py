"""Adaption prompt (LLaMA-Adapter): gated adaption prompts in the top attention layers."""

from __future__ import annotations

from .config import AdaptionPromptConfig
from .layer import AdaptedAttention, adaption_attention_ref
from .model import AdaptionPromptTuner

__all__ = ["AdaptionPromptConfig", "AdaptedAttention", "AdaptionPromptTuner", "adaption_attention_ref"]
