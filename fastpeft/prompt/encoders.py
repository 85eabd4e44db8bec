"""Virtual-token encoders for the prompt-learning methods (pure PyTorch).

Three encoders, each mapping the fixed virtual-token indices ``0..n-1`` to learned vectors:

* :class:`PromptEmbedding` (prompt tuning): ``P = E`` with ``E`` an ``(n, token_dim)`` table.
* :class:`PromptEncoder` (P-tuning): ``P = head(E)`` where head is either an MLP
  ``Linear(d,h)→ReLU→Linear(h,h)→ReLU→Linear(h,d)`` or a bidirectional LSTM followed by
  ``Linear(2h,2h)→ReLU→Linear(2h,d)``.
* :class:`PrefixEncoder` (prefix tuning): ``P`` is ``(n, num_layers·2·token_dim)``, either a table or
  ``Linear(tanh(Linear(E)))`` (``prefix_projection``), holding one key and one value vector per layer and virtual token.

These are the same module shapes as HF PEFT's encoders (so their parameters can be copied one to one), and the value
saved in a PEFT adapter file under ``prompt_embeddings`` is always the encoder OUTPUT ``P`` (n, dim).  An encoder that
is loaded from such a file is put in *direct* mode: the head is dropped and the table holds ``P`` itself (this is what
PEFT does in inference mode; fastpeft also does it when the adapter is loaded trainable, where PEFT would push the
saved output through a freshly initialised head).
"""

from __future__ import annotations

import math
import warnings
from typing import Optional

import torch
from torch import nn


class _VirtualTokenEncoder(nn.Module):
    """Common part: an ``embedding`` table, an optional head, and the direct mode used after loading a file."""

    embedding: nn.Embedding

    def __init__(self) -> None:
        super().__init__()
        self.direct = False

    @property
    def num_tokens(self) -> int:
        return self.embedding.num_embeddings

    def head(self, x: torch.Tensor) -> torch.Tensor:  # overridden by encoders that have one
        return x

    def forward(self, indices: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Encode virtual tokens.

        Args:
            indices: (..., k) long tensor of virtual-token indices, or None for all tokens ``0..n-1``.
        Returns:
            (..., k, out_dim) (``(n, out_dim)`` when ``indices`` is None), in the encoder's parameter dtype.
        """
        if indices is None:
            emb = self.embedding.weight
        else:
            emb = self.embedding(indices)
        if self.direct:
            return emb
        return self.head(emb)

    def output(self) -> torch.Tensor:
        """The full prompt ``P``: (n, out_dim); what PEFT stores as ``prompt_embeddings``."""
        return self.forward(None)

    def load_output(self, prompt: torch.Tensor) -> None:
        """Switch to direct mode holding ``prompt`` (n, out_dim) as the encoder output (drops the head).

        The caller validates the shape first (so a failed load changes nothing); ``prompt`` is copied.
        """
        n, d = self.embedding.num_embeddings, self.out_dim
        if tuple(prompt.shape) != (n, d):
            raise ValueError(f"prompt_embeddings has shape {tuple(prompt.shape)}, expected {(n, d)}")
        weight = self.embedding.weight
        new = nn.Embedding(n, d, device=weight.device, dtype=weight.dtype)
        with torch.no_grad():
            new.weight.copy_(prompt.to(device=weight.device, dtype=weight.dtype))
        new.weight.requires_grad_(weight.requires_grad)
        self.embedding = new
        self._drop_head()
        self.direct = True

    def _drop_head(self) -> None:
        pass

    @property
    def out_dim(self) -> int:
        raise NotImplementedError


class PromptEmbedding(_VirtualTokenEncoder):
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


class PromptEncoder(_VirtualTokenEncoder):
    """P-tuning: virtual-token embeddings reparameterised through an MLP or a bidirectional LSTM.

    Args:
        num_tokens: n.   token_dim: d (input and output width).   hidden_size: h (``encoder_hidden_size``).
        encoder_type: ``"MLP"`` or ``"LSTM"``.
        num_layers: LSTM layers (``encoder_num_layers``; the MLP always has 3 linear layers and ignores it).
        dropout: LSTM inter-layer dropout (``encoder_dropout``).

    Shapes: MLP ``(n,d) → Linear(d,h) → ReLU → Linear(h,h) → ReLU → Linear(h,d)``;
    LSTM ``(1,n,d) → BiLSTM(d,h) → (1,n,2h) → Linear(2h,2h) → ReLU → Linear(2h,d)``.  Output (n, d).
    """

    def __init__(self, num_tokens: int, token_dim: int, hidden_size: int, encoder_type: str = "MLP",
                 num_layers: int = 2, dropout: float = 0.0, device=None, dtype=None) -> None:
        super().__init__()
        _check_positive("num_tokens", num_tokens)
        _check_positive("token_dim", token_dim)
        _check_positive("encoder_hidden_size", hidden_size)
        etype = getattr(encoder_type, "value", encoder_type)
        if etype not in ("MLP", "LSTM"):
            raise ValueError(f"encoder_reparameterization_type must be 'MLP' or 'LSTM', got {encoder_type!r}")
        if not (0.0 <= float(dropout) < 1.0):
            raise ValueError(f"encoder_dropout must be in [0, 1), got {dropout!r}")
        fk = {"device": device, "dtype": dtype}
        self.encoder_type = etype
        self._token_dim = token_dim
        self.hidden_size = hidden_size
        self.embedding = nn.Embedding(num_tokens, token_dim, **fk)
        if etype == "LSTM":
            _check_positive("encoder_num_layers", num_layers)
            self.lstm_head = nn.LSTM(input_size=token_dim, hidden_size=hidden_size, num_layers=num_layers,
                                     dropout=float(dropout), bidirectional=True, batch_first=True, **fk)
            self.mlp_head = nn.Sequential(nn.Linear(2 * hidden_size, 2 * hidden_size, **fk), nn.ReLU(),
                                          nn.Linear(2 * hidden_size, token_dim, **fk))
        else:
            if num_layers != 2:
                warnings.warn(f"encoder_num_layers={num_layers} is ignored for the MLP encoder, which always has "
                              "3 linear layers (as in HF PEFT)", stacklevel=2)
            self.mlp_head = nn.Sequential(nn.Linear(token_dim, hidden_size, **fk), nn.ReLU(),
                                          nn.Linear(hidden_size, hidden_size, **fk), nn.ReLU(),
                                          nn.Linear(hidden_size, token_dim, **fk))

    @property
    def out_dim(self) -> int:
        return self._token_dim

    def head(self, x: torch.Tensor) -> torch.Tensor:
        if self.encoder_type == "LSTM":
            # The LSTM needs a batch dimension; the sequence is the virtual tokens.
            squeeze = x.dim() == 2
            h = self.lstm_head(x.unsqueeze(0) if squeeze else x)[0]
            out = self.mlp_head(h)
            return out.squeeze(0) if squeeze else out
        return self.mlp_head(x)

    def _drop_head(self) -> None:
        for name in ("lstm_head", "mlp_head"):
            if hasattr(self, name):
                delattr(self, name)


class PrefixEncoder(_VirtualTokenEncoder):
    """Prefix tuning: per-layer key and value prefixes for every virtual token.

    Args:
        num_tokens: n.   num_layers: L.   token_dim: the KV width per layer, ``num_kv_heads · head_dim`` (already sized
            for grouped-query attention by the tuner).
        prefix_projection: reparameterise through ``Linear(d, h) → tanh → Linear(h, L·2·d)`` from an (n, d) table.
        hidden_size: h (``encoder_hidden_size``), only used with the projection.
        zero_init: ``init_weights="zero"``: zero the last layer (or the table).  Note that zero prefixes are not a
            no-op: zero keys still take attention mass (as in PEFT).

    Output of ``forward()``: (n, L·2·d) laid out as ``[layer][k|v][head][head_dim]`` along the last axis.
    """

    def __init__(self, num_tokens: int, num_layers: int, token_dim: int, prefix_projection: bool = False,
                 hidden_size: Optional[int] = None, zero_init: bool = False, device=None, dtype=None) -> None:
        super().__init__()
        _check_positive("num_tokens", num_tokens)
        _check_positive("num_layers", num_layers)
        _check_positive("token_dim", token_dim)
        fk = {"device": device, "dtype": dtype}
        self.num_layers = num_layers
        self._token_dim = token_dim
        self.prefix_projection = bool(prefix_projection)
        width = num_layers * 2 * token_dim
        if self.prefix_projection:
            hidden_size = token_dim if hidden_size is None else hidden_size
            _check_positive("encoder_hidden_size", hidden_size)
            self.embedding = nn.Embedding(num_tokens, token_dim, **fk)
            self.transform = nn.Sequential(nn.Linear(token_dim, hidden_size, **fk), nn.Tanh(),
                                           nn.Linear(hidden_size, width, **fk))
            if zero_init:
                nn.init.zeros_(self.transform[-1].weight)
                nn.init.zeros_(self.transform[-1].bias)
        else:
            self.embedding = nn.Embedding(num_tokens, width, **fk)
            if zero_init:
                nn.init.zeros_(self.embedding.weight)
            self.direct = True

    @property
    def out_dim(self) -> int:
        return self.num_layers * 2 * self._token_dim

    def head(self, x: torch.Tensor) -> torch.Tensor:
        return self.transform(x)

    def _drop_head(self) -> None:
        if hasattr(self, "transform"):
            del self.transform


def _check_positive(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")


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
