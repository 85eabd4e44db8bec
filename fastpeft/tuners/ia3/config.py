"""``IA3Config`` (HF PEFT's)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Union

from ..._peft_compat import adopt_field_metadata
from ...config import PeftConfig, PeftType, _check_module_spec, _to_set, register_config

__all__ = ["IA3Config"]


@register_config(PeftType.IA3)
@dataclass
class IA3Config(PeftConfig):
    """(IA)³ configuration (HF PEFT's ``IA3Config``).

    ``target_modules`` / ``exclude_modules`` match as in LoRA.  ``feedforward_modules`` are the targets whose *input*
    is scaled (str: regex fullmatch; list: ``name.endswith(entry)``, PEFT's rule); they must be a subset of
    ``target_modules`` when both are lists.  ``init_ia3_weights=True`` initialises the vectors to ones.
    """

    target_modules: Optional[Union[list, set, str]] = None
    exclude_modules: Optional[Union[list, set, str]] = None
    feedforward_modules: Optional[Union[list, set, str]] = None
    fan_in_fan_out: bool = False
    modules_to_save: Optional[list] = None
    init_ia3_weights: bool = True

    def __post_init__(self):
        super().__post_init__()
        _check_module_spec("target_modules", self.target_modules)
        _check_module_spec("exclude_modules", self.exclude_modules)
        _check_module_spec("feedforward_modules", self.feedforward_modules)
        _check_module_spec("modules_to_save", self.modules_to_save, allow_str=False)
        self.target_modules = _to_set(self.target_modules)
        self.exclude_modules = _to_set(self.exclude_modules)
        self.feedforward_modules = _to_set(self.feedforward_modules)
        if isinstance(self.feedforward_modules, set) and isinstance(self.target_modules, set):
            extra = self.feedforward_modules - self.target_modules
            if extra:
                raise ValueError(f"feedforward_modules must be a subset of target_modules; {sorted(extra)} are not "
                                 f"in target_modules={sorted(self.target_modules)}")
        if not isinstance(self.fan_in_fan_out, bool):
            raise TypeError(f"fan_in_fan_out must be a bool, got {self.fan_in_fan_out!r}")
        if not isinstance(self.init_ia3_weights, bool):
            raise TypeError(f"init_ia3_weights must be a bool, got {self.init_ia3_weights!r}")


adopt_field_metadata(IA3Config, "IA3Config")
