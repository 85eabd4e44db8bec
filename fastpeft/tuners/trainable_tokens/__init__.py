"""Trainable tokens: a sparse, trainable delta on selected rows of an embedding (HF PEFT's ``trainable_tokens``).

Used by LoRA's ``trainable_token_indices`` (fastpeft has no stand-alone TRAINABLE_TOKENS method)."""

from __future__ import annotations

from .layer import TrainableTokensLayer, inject_trainable_tokens, saved_key, token_target_layers

__all__ = ["TrainableTokensLayer", "inject_trainable_tokens", "saved_key", "token_target_layers"]
