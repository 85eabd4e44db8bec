"""``PromptTuningConfig`` / ``PromptTuningInit`` (HF PEFT 0.21.2's names, fields and defaults)."""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Any, Optional, Union

from ...config import PeftType, PromptLearningConfig, register_config

__all__ = ['PromptTuningInit', 'PromptTuningConfig']


class PromptTuningInit(str, enum.Enum):
    """How prompt-tuning embeddings start: N(0,1) (RANDOM), rows of random vocabulary tokens, or a text's tokens."""

    TEXT = "TEXT"
    SAMPLE_VOCAB = "SAMPLE_VOCAB"
    RANDOM = "RANDOM"

    def __str__(self) -> str:
        return self.value


@register_config(PeftType.PROMPT_TUNING)
@dataclass
class PromptTuningConfig(PromptLearningConfig):
    """Prompt tuning (Lester et al. 2021): ``n`` learned embeddings prepended to the input embeddings.

    Args:
        prompt_tuning_init: ``"RANDOM"`` (default), ``"SAMPLE_VOCAB"`` or ``"TEXT"``.
        prompt_tuning_init_text: the text for TEXT.
        tokenizer_name_or_path: for TEXT, a LOCAL tokenizer directory, or a tokenizer object (anything callable as
            ``tok(text)["input_ids"]``); fastpeft never downloads.  An object is kept aside and its
            ``name_or_path`` (or None) is what the field and the file hold.
        tokenizer_kwargs: extra kwargs for ``AutoTokenizer.from_pretrained`` (TEXT only; ``trust_remote_code`` is
            dropped).
    """

    prompt_tuning_init: Union[PromptTuningInit, str] = PromptTuningInit.RANDOM
    prompt_tuning_init_text: Optional[str] = None
    tokenizer_name_or_path: Optional[str] = None
    tokenizer_kwargs: Optional[dict] = None

    def __post_init__(self):
        super().__post_init__()
        init = getattr(self.prompt_tuning_init, "value", self.prompt_tuning_init)
        if init not in PromptTuningInit._value2member_map_:
            raise ValueError(f"prompt_tuning_init must be one of {[i.value for i in PromptTuningInit]}, got "
                             f"{self.prompt_tuning_init!r}")
        self.prompt_tuning_init = PromptTuningInit(init)
        if self.prompt_tuning_init_text is not None and not isinstance(self.prompt_tuning_init_text, str):
            raise TypeError(f"prompt_tuning_init_text must be a str or None, got {self.prompt_tuning_init_text!r}")
        if self.tokenizer_kwargs is not None and not isinstance(self.tokenizer_kwargs, dict):
            raise TypeError(f"tokenizer_kwargs must be a dict or None, got {self.tokenizer_kwargs!r}")
        tok = self.tokenizer_name_or_path
        self._tokenizer: Any = None
        # A config built with inference_mode=True is one read from a saved adapter (files always say true); loading it
        # trainable flips inference_mode afterwards, and its TEXT init is then moot (the saved prompt replaces it).
        self._from_saved = bool(self.inference_mode)
        if tok is not None and not isinstance(tok, str):
            if not callable(tok):
                raise TypeError(f"tokenizer_name_or_path must be a local path (str) or a tokenizer object, got "
                                f"{type(tok).__name__}")
            self._tokenizer = tok
            self.tokenizer_name_or_path = getattr(tok, "name_or_path", None) or None
        if self.prompt_tuning_init == PromptTuningInit.TEXT and not self.inference_mode:
            if self._tokenizer is None and not self.tokenizer_name_or_path:
                raise ValueError("prompt_tuning_init='TEXT' needs tokenizer_name_or_path (a local tokenizer directory "
                                 f"or a tokenizer object), got {self.tokenizer_name_or_path!r}")
            if self.prompt_tuning_init_text is None:
                raise ValueError("prompt_tuning_init='TEXT' needs prompt_tuning_init_text, got None")
        if self.tokenizer_kwargs and self.prompt_tuning_init != PromptTuningInit.TEXT:
            raise ValueError("tokenizer_kwargs is only valid with prompt_tuning_init='TEXT', got "
                             f"prompt_tuning_init={self.prompt_tuning_init.value!r}")

    def copy(self):
        new = super().copy()
        new._tokenizer = self._tokenizer
        new._from_saved = self._from_saved
        return new
