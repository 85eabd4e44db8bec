"""``LoRALinear``: a drop-in replacement for ``nn.Linear`` with a trainable low-rank update (HF PEFT's LoRA)."""

from __future__ import annotations

import math
from typing import Optional, Union

import torch
import torch.nn as nn

from ..functional import lora_linear
from ..utils.adapter_init import init_lora_pair
from ..utils.adapter_math import lora_delta
from ._base import DeltaAdapterBase, check_alpha, check_dropout, check_rank

__all__ = ["LoRALinear"]


def _check_init(init_lora_weights) -> Union[bool, str]:
    if isinstance(init_lora_weights, bool):
        return init_lora_weights
    if isinstance(init_lora_weights, str) and init_lora_weights.lower() == "gaussian":
        return "gaussian"
    raise ValueError(f"init_lora_weights must be True, False or 'gaussian', got {init_lora_weights!r}")


class LoRALinear(DeltaAdapterBase):
    """LoRA linear layer: ``y = x Wᵀ + b + scaling · (dropout(x) Aᵀ) Bᵀ``, dropout on the LoRA branch only.

    A drop-in replacement for ``nn.Linear`` in training code, numerically HF PEFT's ``lora.Linear`` with one
    adapter.  The base ``weight`` (out_features, in_features) and ``bias`` (out_features,) are frozen
    (``requires_grad=False``); ``lora_A`` (r, in_features) and ``lora_B`` (out_features, r) are trainable
    Parameters.  The forward calls ``fastpeft.functional.lora_linear`` (so a fused backend runs underneath when one
    is available for the input's device); while merged it is a plain ``F.linear``.

    Args:
        in_features, out_features: as ``nn.Linear``.
        r: LoRA rank, >= 1.
        lora_alpha: the LoRA alpha; ``scaling = lora_alpha / r`` (``lora_alpha / sqrt(r)`` with ``use_rslora``).
        lora_dropout: dropout probability of the LoRA branch input in [0, 1); active only in training mode.  The
            mask is drawn like ``F.dropout`` (HF PEFT's RNG stream) on the torch backend.
        bias: whether the base layer has a bias.
        use_rslora: rank-stabilised scaling.
        init_lora_weights: ``True`` (A kaiming-uniform(a=sqrt(5)), B = 0: the layer starts equal to the base),
            ``"gaussian"`` (A ~ N(0, 1/r), B = 0) or ``False`` (A and B both nn.Linear-style random, so the update
            is non-zero; for tests).
        device, dtype: factory kwargs for every parameter.
        backend: ``None`` (auto / ``FASTPEFT_BACKEND``), ``"torch"``, ``"triton"`` or ``"cuda"``, passed to the op.

    Shapes: input (..., in_features) -> output (..., out_features) in the input's dtype.
    """

    def __init__(self, in_features: int, out_features: int, r: int = 8, lora_alpha: float = 8,
                 lora_dropout: float = 0.0, bias: bool = True, use_rslora: bool = False,
                 init_lora_weights: Union[bool, str] = True, device=None, dtype=None,
                 backend: Optional[str] = None) -> None:
        super().__init__()
        self._init_base(in_features, out_features, bias, device, dtype)
        self._init_adapter(r, lora_alpha, lora_dropout, use_rslora, init_lora_weights, backend, device, dtype)
        self.reset_parameters()

    def _init_adapter(self, r, lora_alpha, lora_dropout, use_rslora, init_lora_weights, backend, device, dtype):
        self.r = check_rank(r)
        self.lora_alpha = check_alpha(lora_alpha)
        self.lora_dropout = check_dropout(lora_dropout)
        self.use_rslora = bool(use_rslora)
        self.init_lora_weights = _check_init(init_lora_weights)
        self.backend = backend
        self.scaling = self.lora_alpha / (math.sqrt(r) if self.use_rslora else r)
        fk = {"device": device, "dtype": dtype}
        self.lora_A = nn.Parameter(torch.empty(r, self.in_features, **fk))
        self.lora_B = nn.Parameter(torch.empty(self.out_features, r, **fk))

    @classmethod
    def from_linear(cls, linear: nn.Module, r: int = 8, lora_alpha: float = 8, lora_dropout: float = 0.0,
                    use_rslora: bool = False, init_lora_weights: Union[bool, str] = True,
                    backend: Optional[str] = None, dtype: Optional[torch.dtype] = None) -> "LoRALinear":
        """Wrap an existing ``nn.Linear`` (or transformers ``Conv1D``), sharing its weight and bias Parameters.

        The base Parameters are not copied: the new module holds the same objects (and freezes them, as HF PEFT
        does).  The adapter is created on the base weight's device, in `dtype` (default: the base weight's dtype;
        HF PEFT's default for a bf16 base would be ``dtype=torch.float32``).
        Raises TypeError for any other module type.
        """
        self = cls.__new__(cls)
        DeltaAdapterBase.__init__(self)
        self._share_base(linear)
        w = self.weight
        self._init_adapter(r, lora_alpha, lora_dropout, use_rslora, init_lora_weights, backend, w.device,
                           dtype or w.dtype)
        self.reset_lora_parameters()
        self._freeze_base()
        return self

    def reset_parameters(self) -> None:
        """Re-initialise the base weight/bias like nn.Linear, and the adapter like HF PEFT (see the class doc)."""
        self.reset_base_parameters()
        self.reset_lora_parameters()

    def reset_lora_parameters(self) -> None:
        """Re-initialise ``lora_A``/``lora_B`` per ``init_lora_weights`` (the base weight is untouched)."""
        if self._merged:
            raise ValueError("cannot reset the LoRA parameters of a merged LoRALinear; call unmerge() first")
        if self.init_lora_weights is False:
            # What untouched nn.Linear(in, r) and nn.Linear(r, out) hold (HF PEFT's init_lora_weights=False)
            with torch.no_grad():
                nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
                nn.init.kaiming_uniform_(self.lora_B, a=math.sqrt(5))
        else:
            init_lora_pair(self.lora_A, self.lora_B, self.r, self.init_lora_weights)

    def delta_weight(self) -> torch.Tensor:
        """``scaling · B A`` as (out_features, in_features), computed in >= fp32 (no gradient)."""
        return lora_delta(self.lora_A, self.lora_B, self.scaling)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (..., in_features) -> (..., out_features)."""
        if self._merged:
            return self._base_forward(x)
        p = self.lora_dropout if self.training else 0.0
        return lora_linear(x, self.weight_nk, self.bias, self.lora_A, self.lora_B, self.scaling, p, None,
                              backend=self.backend)

    def extra_repr(self) -> str:
        s = f"{self._extra_base_repr()}, r={self.r}, lora_alpha={self.lora_alpha}"
        if self.lora_dropout:
            s += f", lora_dropout={self.lora_dropout}"
        if self.use_rslora:
            s += ", use_rslora=True"
        if self._merged:
            s += ", merged=True"
        return s
