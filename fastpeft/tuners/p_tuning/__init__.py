"""P-tuning: virtual-token embeddings produced by an MLP or LSTM encoder, prepended to the input embeddings."""

from __future__ import annotations

from .config import PromptEncoderConfig, PromptEncoderReparameterizationType
from .model import PromptEncoder, PromptEncoderTuner

__all__ = ["PromptEncoderConfig", "PromptEncoderReparameterizationType", "PromptEncoder", "PromptEncoderTuner"]
