"""P-tuning: the ``PromptEncoder`` (``P = head(E)``, an MLP or a bidirectional LSTM head) and its tuner."""

from __future__ import annotations

import warnings

import torch
from torch import nn

from ...config import PeftType
from .._prompt_learning import EmbeddingPromptTuner, VirtualTokenEncoder, _check_positive
from ..tuners_utils import register_tuner
from .config import PromptEncoderConfig

__all__ = ["PromptEncoder", "PromptEncoderTuner"]


class PromptEncoder(VirtualTokenEncoder):
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


@register_tuner(PeftType.P_TUNING)
class PromptEncoderTuner(EmbeddingPromptTuner):
    """P-tuning: ``prompt_encoder[adapter]`` is a :class:`PromptEncoder` (MLP or LSTM head)."""

    config_cls = PromptEncoderConfig

    def _build_encoder(self, config: PromptEncoderConfig) -> nn.Module:
        n = config.num_virtual_tokens * config.num_transformer_submodules
        return PromptEncoder(n, config.token_dim, config.encoder_hidden_size,
                             encoder_type=config.encoder_reparameterization_type,
                             num_layers=config.encoder_num_layers, dropout=config.encoder_dropout)
