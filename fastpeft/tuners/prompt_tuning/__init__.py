"""Prompt tuning: learned virtual-token embeddings prepended to the input embeddings."""

from __future__ import annotations

from .config import PromptTuningConfig, PromptTuningInit
from .model import PromptEmbedding, PromptTuningTuner, text_init_token_ids

__all__ = ["PromptTuningConfig", "PromptTuningInit", "PromptEmbedding", "PromptTuningTuner", "text_init_token_ids"]
