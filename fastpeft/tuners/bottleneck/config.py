"""``BottleneckConfig``: Houlsby/Pfeiffer bottleneck adapters (fastpeft only; HF PEFT has no such method)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Union

from ...config import PeftConfig, PeftType, register_config
from .layer import ACTIVATIONS

__all__ = ['BottleneckConfig']


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
