"""``AdaLoraConfig`` (HF PEFT's): every ``LoraConfig`` field plus the rank budget schedule."""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Optional

from ..._peft_compat import adopt_field_metadata
from ...config import PeftConfig, PeftType, _check_number, _check_pos_int, register_config
from ..lora.config import LoraConfig, _common_lora_checks

__all__ = ["AdaLoraConfig"]


@register_config(PeftType.ADALORA)
@dataclass
class AdaLoraConfig(LoraConfig):
    """AdaLoRA configuration (HF PEFT's ``AdaLoraConfig``): every ``LoraConfig`` field plus the rank budget schedule.

    ``init_r`` is the initial rank of every adapted matrix (``r`` is ignored), ``target_r`` the average final rank,
    ``tinit``/``tfinal`` the warm-up / final fine-tuning steps, ``deltaT`` the masking interval, ``beta1``/``beta2``
    the EMA factors of importance/uncertainty, ``orth_reg_weight`` the weight of the orthogonal regularisation,
    ``total_step`` (required, > 0) the number of training steps.  ``rank_pattern`` (None by default) is filled by the
    rank allocator: ``{module_name: [bool] * init_r}``.
    """

    target_r: int = 8
    init_r: int = 12
    tinit: int = 0
    tfinal: int = 0
    deltaT: int = 1
    beta1: float = 0.85
    beta2: float = 0.85
    orth_reg_weight: float = 0.5
    total_step: Optional[int] = None
    rank_pattern: Optional[dict] = None

    def __post_init__(self):
        PeftConfig.__post_init__(self)
        _check_pos_int("init_r", self.init_r)
        _check_pos_int("target_r", self.target_r)
        _check_pos_int("deltaT", self.deltaT)
        if self.r != 8:
            warnings.warn("r is not used by AdaLoRA and is ignored; set init_r for the initial rank", UserWarning,
                          stacklevel=3)
        if self.use_dora:
            raise ValueError("use_dora=True is not supported by AdaLoRA")
        if self.total_step is None or isinstance(self.total_step, bool) or not isinstance(self.total_step, int) \
                or self.total_step <= 0:
            raise ValueError(f"AdaLoRA needs total_step > 0 (an int), got total_step={self.total_step!r}")
        for name in ("tinit", "tfinal"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise ValueError(f"{name} must be a non-negative int, got {v!r}")
        if self.tinit >= self.total_step - self.tfinal:
            raise ValueError(f"tinit={self.tinit} must be < total_step - tfinal = {self.total_step - self.tfinal}: "
                             "the schedule leaves no budgeting phase")
        for name in ("beta1", "beta2"):
            v = getattr(self, name)
            _check_number(name, v)
            if not 0.0 <= v <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {v}")
        _check_number("orth_reg_weight", self.orth_reg_weight)
        if self.orth_reg_weight < 0:
            raise ValueError(f"orth_reg_weight must be >= 0, got {self.orth_reg_weight}")
        if self.rank_pattern is not None:
            if not isinstance(self.rank_pattern, dict):
                raise TypeError(f"rank_pattern must be a dict or None, got {type(self.rank_pattern).__name__}")
            for k, v in self.rank_pattern.items():
                if not isinstance(v, (list, tuple)) or not all(isinstance(b, (bool, int)) for b in v):
                    raise TypeError(f"AdaLoRA rank_pattern[{k!r}] must be a list of bools, got {v!r}")
        _common_lora_checks(self)


adopt_field_metadata(AdaLoraConfig, "AdaLoraConfig")
