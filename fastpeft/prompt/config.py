"""Configurations of the prompt-style methods and bottleneck adapters (HF PEFT 0.21.2 names, fields and defaults).

Registered with ``fastpeft.config.register_config`` so that ``adapter_config.json`` files of these methods (written
by HF PEFT or by fastpeft) load through ``PeftConfig.from_pretrained`` / ``PeftModel.from_pretrained``.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Any, Optional, Union

from ..config import PeftConfig, PeftType, register_config

__all__ = [
    "PromptLearningConfig", "PromptTuningInit", "PromptTuningConfig", "PromptEncoderReparameterizationType",
    "PromptEncoderConfig", "PrefixTuningConfig", "AdaptionPromptConfig", "BottleneckConfig",
]


def _check_opt_pos_int(name: str, v, required: bool = False) -> None:
    if v is None:
        if required:
            raise ValueError(f"{name} is required (a positive int), got None")
        return
    if isinstance(v, bool) or not isinstance(v, int):
        raise TypeError(f"{name} must be an int, got {v!r} ({type(v).__name__})")
    if v <= 0:
        raise ValueError(f"{name} must be a positive int, got {v}")


@dataclass
class PromptLearningConfig(PeftConfig):
    """Fields shared by prompt tuning, P-tuning and prefix tuning (HF PEFT's ``PromptLearningConfig``).

    Args:
        num_virtual_tokens: number of virtual tokens n (required, > 0).
        token_dim: the model's embedding width (prefix tuning: ``num_kv_heads · head_dim``); filled from the model
            config when None.
        num_transformer_submodules: 1 (2 for encoder-decoder; fastpeft supports decoder-only and encoder models).
        num_attention_heads, num_layers: filled from the model config when None (prefix tuning: KV heads).
        modules_to_save: extra modules trained and saved in full.
    """

    num_virtual_tokens: int = None
    token_dim: int = None
    num_transformer_submodules: Optional[int] = None
    num_attention_heads: Optional[int] = None
    num_layers: Optional[int] = None
    modules_to_save: Optional[list] = None

    def __post_init__(self):
        super().__post_init__()
        _check_opt_pos_int("num_virtual_tokens", self.num_virtual_tokens, required=True)
        for name in ("token_dim", "num_attention_heads", "num_layers"):
            _check_opt_pos_int(name, getattr(self, name))
        if self.num_transformer_submodules not in (None, 1, 2):
            raise ValueError("num_transformer_submodules must be 1, 2 or None, got "
                             f"{self.num_transformer_submodules!r}")
        if self.modules_to_save is not None and (isinstance(self.modules_to_save, str)
                                                 or not all(isinstance(m, str) for m in self.modules_to_save)):
            raise TypeError(f"modules_to_save must be a list of module names, got {self.modules_to_save!r}")

    @property
    def is_prompt_learning(self) -> bool:
        return True


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


class PromptEncoderReparameterizationType(str, enum.Enum):
    """P-tuning encoder kinds."""

    MLP = "MLP"
    LSTM = "LSTM"

    def __str__(self) -> str:
        return self.value


@register_config(PeftType.P_TUNING)
@dataclass
class PromptEncoderConfig(PromptLearningConfig):
    """P-tuning (Liu et al. 2021): virtual tokens reparameterised through an MLP or a bidirectional LSTM.

    Args:
        encoder_reparameterization_type: ``"MLP"`` (default) or ``"LSTM"``.
        encoder_hidden_size: hidden width h (None: ``token_dim``).
        encoder_num_layers: LSTM layers (the MLP ignores it, with a warning, as PEFT).
        encoder_dropout: LSTM dropout between layers.
    """

    encoder_reparameterization_type: Union[str, PromptEncoderReparameterizationType] = \
        PromptEncoderReparameterizationType.MLP
    encoder_hidden_size: int = None
    encoder_num_layers: int = 2
    encoder_dropout: float = 0.0

    def __post_init__(self):
        super().__post_init__()
        t = getattr(self.encoder_reparameterization_type, "value", self.encoder_reparameterization_type)
        if t not in PromptEncoderReparameterizationType._value2member_map_:
            raise ValueError(f"encoder_reparameterization_type must be 'MLP' or 'LSTM', got "
                             f"{self.encoder_reparameterization_type!r}")
        self.encoder_reparameterization_type = PromptEncoderReparameterizationType(t)
        _check_opt_pos_int("encoder_hidden_size", self.encoder_hidden_size)
        _check_opt_pos_int("encoder_num_layers", self.encoder_num_layers, required=True)
        if isinstance(self.encoder_dropout, bool) or not isinstance(self.encoder_dropout, (int, float)) \
                or not 0.0 <= self.encoder_dropout < 1.0:
            raise ValueError(f"encoder_dropout must be a number in [0, 1), got {self.encoder_dropout!r}")


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


@register_config(PeftType.BOTTLENECK)
@dataclass
class BottleneckConfig(PeftConfig):
    """Bottleneck adapters (Houlsby et al. 2019 / Pfeiffer et al. 2020); fastpeft only (HF PEFT has none).

    Args:
        target_modules: the sub-layers (nn.Linear / Conv1D) whose output gets an adapter (list: exact name or
            ``.``-suffix; str: regex fullmatch).  None: the architecture default for ``placement`` (llama family:
            ``o_proj`` + ``down_proj`` / ``down_proj``; gpt2: ``attn.c_proj`` + ``mlp.c_proj`` / ``mlp.c_proj``; BERT
            family: ``attention.output.dense`` + ``output.dense`` / the FFN's ``output.dense``).
        exclude_modules: names never adapted (same matching rules).
        placement: ``"houlsby"`` (after attention and feed-forward) or ``"pfeiffer"`` (after the feed-forward only);
            only used to choose the default targets.
        reduction_factor: bottleneck width ``m = d // reduction_factor`` (default 16).
        non_linearity: ``"swish"`` (default), ``"relu"``, ``"gelu"``, ``"gelu_new"``, ``"tanh"``, ... .
        adapter_dropout: dropout on the adapter's input.
        init_weights: True zero-initialises the up projection (identity at init); False keeps nn.Linear's init.
        modules_to_save: extra modules trained and saved in full.
    """

    target_modules: Optional[Union[list, set, str]] = None
    exclude_modules: Optional[Union[list, set, str]] = None
    placement: str = "houlsby"
    reduction_factor: float = 16
    non_linearity: str = "swish"
    adapter_dropout: float = 0.0
    init_weights: bool = True
    modules_to_save: Optional[list] = None

    def __post_init__(self):
        super().__post_init__()
        from .bottleneck import ACTIVATIONS

        for name in ("target_modules", "exclude_modules"):
            v = getattr(self, name)
            if v is None or isinstance(v, str):
                continue
            if not isinstance(v, (list, tuple, set)) or not all(isinstance(t, str) for t in v):
                raise TypeError(f"{name} must be a str (regex), a list of module names or None, got {v!r}")
            setattr(self, name, set(v))
        if self.placement not in ("houlsby", "pfeiffer"):
            raise ValueError(f"placement must be 'houlsby' or 'pfeiffer', got {self.placement!r}")
        rf = self.reduction_factor
        if isinstance(rf, bool) or not isinstance(rf, (int, float)) or not rf > 0:
            raise ValueError(f"reduction_factor must be a positive number, got {rf!r}")
        if self.non_linearity not in ACTIVATIONS:
            raise ValueError(f"non_linearity must be one of {sorted(ACTIVATIONS)}, got {self.non_linearity!r}")
        d = self.adapter_dropout
        if isinstance(d, bool) or not isinstance(d, (int, float)) or not 0.0 <= d < 1.0:
            raise ValueError(f"adapter_dropout must be a number in [0, 1), got {d!r}")
        if not isinstance(self.init_weights, bool):
            raise TypeError(f"init_weights must be a bool, got {self.init_weights!r}")
        if self.modules_to_save is not None and (isinstance(self.modules_to_save, str)
                                                 or not all(isinstance(m, str) for m in self.modules_to_save)):
            raise TypeError(f"modules_to_save must be a list of module names, got {self.modules_to_save!r}")
