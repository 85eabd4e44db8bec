"""Prompt-style methods (prompt tuning, P-tuning, prefix tuning, adaption prompt) and bottleneck adapters.

The methods live in their packages under ``fastpeft.tuners`` (``prompt_tuning``, ``p_tuning``, ``prefix_tuning``,
``adaption_prompt``, ``bottleneck``); this package re-exports their public names where they were importable before.
"""

from __future__ import annotations

from ..config import PromptLearningConfig
from ..tuners.adaption_prompt import AdaptionPromptConfig
from ..tuners.bottleneck import BottleneckConfig
from ..tuners.p_tuning import PromptEncoder, PromptEncoderConfig, PromptEncoderReparameterizationType
from ..tuners.prefix_tuning import PrefixEncoder, PrefixTuningConfig
from ..tuners.prompt_tuning import PromptEmbedding, PromptTuningConfig, PromptTuningInit

__all__ = [
    "AdaptionPromptConfig", "BottleneckConfig", "PrefixTuningConfig", "PromptEncoderConfig",
    "PromptEncoderReparameterizationType", "PromptLearningConfig", "PromptTuningConfig", "PromptTuningInit",
    "PromptEmbedding", "PromptEncoder", "PrefixEncoder",
]
