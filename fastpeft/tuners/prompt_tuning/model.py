"""Prompt tuning: the ``PromptEmbedding`` encoder (``P = E``, an ``(n, token_dim)`` table) and its tuner.

The encoder has HF PEFT's module shape (parameters copy one to one); the value saved under ``prompt_embeddings`` in a
PEFT adapter file is the encoder output ``P`` (see ``fastpeft.tuners._prompt_learning.VirtualTokenEncoder``).
"""

from __future__ import annotations

import math
import os
from typing import Optional

import torch
from torch import nn

from ...config import PeftType
from .._prompt_learning import EmbeddingPromptTuner, VirtualTokenEncoder, _check_positive
from ..tuners_utils import register_tuner
from .config import PromptTuningConfig, PromptTuningInit

__all__ = ["PromptEmbedding", "PromptTuningTuner", "text_init_token_ids"]


class PromptEmbedding(VirtualTokenEncoder):
    """Prompt tuning: a learned ``(num_tokens, token_dim)`` table of virtual-token embeddings.

    Args:
        num_tokens: number of virtual tokens n (``num_virtual_tokens · num_transformer_submodules``).
        token_dim: the model's embedding width d.
        init_weight: optional (n, d) tensor to start from (SAMPLE_VOCAB / TEXT inits: rows of the word embedding,
            stored in fp32 as PEFT does); default N(0, 1) (``nn.Embedding``'s init, PEFT's RANDOM).

    Output of ``forward()``: (n, d).
    """

    def __init__(self, num_tokens: int, token_dim: int, init_weight: Optional[torch.Tensor] = None,
                 device=None, dtype=None) -> None:
        super().__init__()
        _check_positive("num_tokens", num_tokens)
        _check_positive("token_dim", token_dim)
        self.embedding = nn.Embedding(num_tokens, token_dim, device=device, dtype=dtype)
        self._token_dim = token_dim
        if init_weight is not None:
            if tuple(init_weight.shape) != (num_tokens, token_dim):
                raise ValueError(f"init_weight has shape {tuple(init_weight.shape)}, expected "
                                 f"{(num_tokens, token_dim)}")
            # PEFT keeps sampled/text-initialised prompts in fp32 whatever the model dtype.
            self.embedding.weight = nn.Parameter(init_weight.detach().clone().to(torch.float32))
        self.direct = True  # no head: the table is the output

    @property
    def out_dim(self) -> int:
        return self._token_dim


def text_init_token_ids(tokenizer, text: str, num_tokens: int) -> list[int]:
    """Token ids for the TEXT init: the text's ids cut or cycled to exactly ``num_tokens`` (PEFT's rule)."""
    if not isinstance(text, str) or not text:
        raise ValueError(f"prompt_tuning_init_text must be a non-empty string, got {text!r}")
    ids = tokenizer(text)["input_ids"]
    ids = list(ids.tolist() if hasattr(ids, "tolist") else ids)
    if ids and isinstance(ids[0], list):  # a batched tokenizer result
        ids = ids[0]
    if not ids:
        raise ValueError(f"the tokenizer produced no tokens for prompt_tuning_init_text={text!r}")
    reps = math.ceil(num_tokens / len(ids))
    return (ids * reps)[:num_tokens]


@register_tuner(PeftType.PROMPT_TUNING)
class PromptTuningTuner(EmbeddingPromptTuner):
    """Prompt tuning: ``prompt_encoder[adapter]`` is a :class:`PromptEmbedding` (n, token_dim)."""

    config_cls = PromptTuningConfig

    def _build_encoder(self, config: PromptTuningConfig) -> nn.Module:
        n = config.num_virtual_tokens * config.num_transformer_submodules
        init_weight = None
        if not config.inference_mode:
            emb = self.word_embeddings
            if config.prompt_tuning_init == PromptTuningInit.SAMPLE_VOCAB:
                ids = torch.randint(0, emb.num_embeddings, (n,), dtype=torch.long).to(emb.weight.device)
                init_weight = emb(ids).detach()
            elif config.prompt_tuning_init == PromptTuningInit.TEXT and not (
                    getattr(config, "_from_saved", False) and getattr(config, "_tokenizer", None) is None
                    and not _is_local_dir(config.tokenizer_name_or_path)):
                # (a saved adapter loaded trainable whose tokenizer is not at hand skips the init: its saved prompt
                # replaces it anyway; PEFT would download the tokenizer here)
                tok = _get_tokenizer(config)
                ids = text_init_token_ids(tok, config.prompt_tuning_init_text, n)
                bad = [i for i in ids if not 0 <= i < emb.num_embeddings]
                if bad:
                    raise ValueError(f"the tokenizer produced ids {bad[:5]} outside the model's vocabulary "
                                     f"(size {emb.num_embeddings})")
                init_weight = emb(torch.tensor(ids, dtype=torch.long, device=emb.weight.device)).detach()
        return PromptEmbedding(n, config.token_dim, init_weight=init_weight)


def _is_local_dir(path) -> bool:
    return isinstance(path, str) and bool(path) and os.path.isdir(path)


def _get_tokenizer(config: PromptTuningConfig):
    tok = getattr(config, "_tokenizer", None)
    if tok is not None:
        return tok
    path = config.tokenizer_name_or_path
    if not path or not os.path.isdir(path):
        raise ValueError(f"prompt_tuning_init='TEXT' needs a tokenizer: tokenizer_name_or_path={path!r} is not a "
                         "local directory (fastpeft never downloads); pass a local tokenizer directory or a tokenizer "
                         "object")
    from transformers import AutoTokenizer

    kw = dict(config.tokenizer_kwargs or {})
    kw.pop("trust_remote_code", None)  # a prompt-tuning config must not be able to run code
    return AutoTokenizer.from_pretrained(path, local_files_only=True, **kw)
