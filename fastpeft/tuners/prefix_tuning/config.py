"""``PrefixTuningConfig`` (HF PEFT 0.21.2's names, fields and defaults)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from ...config import PeftType, PromptLearningConfig, _check_opt_pos_int, register_config

__all__ = ['PrefixTuningConfig']


@register_config(PeftType.PREFIX_TUNING)
@dataclass
class PrefixTuningConfig(PromptLearningConfig):
    """Prefix tuning (Li & Liang 2021): learned key/value prefixes in every attention layer.

    Args:
        init_weights: None (random) or ``"zero"`` (zero prefixes; not a no-op, zero keys still take attention mass).
        encoder_hidden_size: hidden width of the projection (None: ``token_dim``).
        prefix_projection: reparameterise the prefixes through ``Linear → tanh → Linear``.

    With grouped-query attention ``token_dim`` becomes ``num_kv_heads · head_dim`` and ``num_attention_heads`` the
    number of KV heads (PEFT's rule).  Refused with gradient checkpointing: the prefix travels in the model's KV
    cache, which transformers' checkpointed layers drop (the backward replay would write it a second time).
    """

    init_weights: Optional[str] = None
    encoder_hidden_size: int = None
    prefix_projection: bool = False

    def __post_init__(self):
        super().__post_init__()
        if self.init_weights not in (None, "zero"):
            raise ValueError(f"init_weights must be None or 'zero', got {self.init_weights!r}")
        _check_opt_pos_int("encoder_hidden_size", self.encoder_hidden_size)
        if not isinstance(self.prefix_projection, bool):
            raise TypeError(f"prefix_projection must be a bool, got {self.prefix_projection!r}")
