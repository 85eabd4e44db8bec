"""``AdaptionPromptConfig`` (HF PEFT 0.21.2's names, fields and defaults)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from ...config import PeftConfig, PeftType, _check_opt_pos_int, register_config

__all__ = ['AdaptionPromptConfig']


@register_config(PeftType.ADAPTION_PROMPT)
@dataclass
class AdaptionPromptConfig(PeftConfig):
    """Adaption prompt / LLaMA-Adapter (Zhang et al. 2023).

    Args:
        target_modules: name of the attention sub-modules (None: ``"self_attn"`` for llama/mistral/qwen2, ``"attn"``
            for gpt2).
        adapter_len: number of adapter tokens per layer (required, > 0).
        adapter_layers: number of adapted layers, counted from the top (required, > 0).
    """

    target_modules: Optional[str] = None
    adapter_len: int = None
    adapter_layers: int = None

    def __post_init__(self):
        super().__post_init__()
        _check_opt_pos_int("adapter_len", self.adapter_len, required=True)
        _check_opt_pos_int("adapter_layers", self.adapter_layers, required=True)
        if self.target_modules is not None and not isinstance(self.target_modules, str):
            raise TypeError(f"target_modules must be the attention module's name (a str) or None, got "
                            f"{self.target_modules!r}")

    @property
    def is_adaption_prompt(self) -> bool:
        return True
