"""``PromptEncoderConfig`` (P-tuning; HF PEFT 0.21.2's names, fields and defaults)."""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Union

from ...config import PeftType, PromptLearningConfig, _check_opt_pos_int, register_config

__all__ = ['PromptEncoderReparameterizationType', 'PromptEncoderConfig']


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
