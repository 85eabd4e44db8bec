"""``AdaLoRALinear``: HF PEFT's AdaLoRA ``SVDLinear`` layer as a drop-in ``nn.Linear`` replacement.

Only the layer lives here; the RankAllocator that masks ``lora_E`` across a whole model is part of the model API
(``fastpeft.tuners``).
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn

from ..functional import adalora_linear
from ..utils.adapter_init import init_adalora_triplet
from ..utils.adapter_math import adalora_delta, orth_reg_term
from ._base import DeltaAdapterBase, check_alpha, check_dropout, check_rank

__all__ = ["AdaLoRALinear"]


class AdaLoRALinear(DeltaAdapterBase):
    """AdaLoRA (SVD-form) linear layer: ``y = x Wᵀ + b + (dropout(x) (A ⊙ E)ᵀ) Bᵀ · scaling / (ranknum + 1e-5)``.

    Parameters: frozen ``weight`` (out_features, in_features) and ``bias`` (out_features,); trainable ``lora_A``
    (r, in_features), ``lora_E`` (r, 1) (the singular values) and ``lora_B`` (out_features, r).  ``ranknum`` is
    the float ``r`` and never changes (HF PEFT keeps it at ``init_r`` even when ranks are masked); ``scaling`` is
    ``lora_alpha`` (or ``r`` when ``lora_alpha <= 0``), as in HF PEFT, so the effective scale is
    ``effective_scaling = scaling / (ranknum + 1e-5)``.

    Args:
        in_features, out_features: as ``nn.Linear``.
        r: the initial rank (AdaLoRA's ``init_r``), >= 1.
        lora_alpha: see above.  lora_dropout: LoRA-branch input dropout in [0, 1) (training mode only).
        bias: whether the base layer has a bias.
        init_lora_weights: True: E = 0 and A, B ~ N(0, 0.02) (starts equal to the base); False: A, E, B ~ N(0, 1).
        device, dtype: factory kwargs.  backend: passed to ``fastpeft.functional.adalora_linear``.

    Shapes: input (..., in_features) -> output (..., out_features) in the input's dtype.
    """

    def __init__(self, in_features: int, out_features: int, r: int = 12, lora_alpha: float = 8,
                 lora_dropout: float = 0.0, bias: bool = True, init_lora_weights: bool = True, device=None,
                 dtype=None, backend: Optional[str] = None) -> None:
        super().__init__()
        self._init_base(in_features, out_features, bias, device, dtype)
        self._init_adapter(r, lora_alpha, lora_dropout, init_lora_weights, backend, device, dtype)
        self.reset_parameters()

    def _init_adapter(self, r, lora_alpha, lora_dropout, init_lora_weights, backend, device, dtype):
        self.r = check_rank(r)
        self.lora_alpha = check_alpha(lora_alpha)
        self.lora_dropout = check_dropout(lora_dropout)
        if not isinstance(init_lora_weights, bool):
            raise ValueError(f"init_lora_weights must be True or False for AdaLoRA, got {init_lora_weights!r}")
        self.init_lora_weights = init_lora_weights
        self.backend = backend
        self.ranknum = float(r)
        self.scaling = self.lora_alpha if self.lora_alpha > 0 else float(r)
        fk = {"device": device, "dtype": dtype}
        self.lora_A = nn.Parameter(torch.empty(r, self.in_features, **fk))
        self.lora_E = nn.Parameter(torch.empty(r, 1, **fk))
        self.lora_B = nn.Parameter(torch.empty(self.out_features, r, **fk))

    @classmethod
    def from_linear(cls, linear: nn.Module, r: int = 12, lora_alpha: float = 8, lora_dropout: float = 0.0,
                    init_lora_weights: bool = True, backend: Optional[str] = None,
                    dtype: Optional[torch.dtype] = None) -> "AdaLoRALinear":
        """Wrap an ``nn.Linear`` or transformers ``Conv1D``, sharing (not copying) its weight and bias Parameters.

        The adapter is created on the base weight's device in `dtype` (default: the base dtype).
        Raises TypeError for any other module type.
        """
        self = cls.__new__(cls)
        DeltaAdapterBase.__init__(self)
        self._share_base(linear)
        w = self.weight
        self._init_adapter(r, lora_alpha, lora_dropout, init_lora_weights, backend, w.device, dtype or w.dtype)
        self.reset_lora_parameters()
        self._freeze_base()
        return self

    @property
    def effective_scaling(self) -> float:
        """``scaling / (ranknum + 1e-5)``: the factor the low-rank product is multiplied by."""
        return self.scaling / (self.ranknum + 1e-5)

    def reset_parameters(self) -> None:
        """nn.Linear init of the base, HF PEFT's init of the adapter."""
        self.reset_base_parameters()
        self.reset_lora_parameters()

    def reset_lora_parameters(self) -> None:
        """Re-initialise ``lora_A``/``lora_E``/``lora_B`` per ``init_lora_weights``."""
        if self._merged:
            raise ValueError("cannot reset the adapter of a merged AdaLoRALinear; call unmerge() first")
        with torch.no_grad():
            if self.init_lora_weights:
                init_adalora_triplet(self.lora_A, self.lora_E, self.lora_B)
            else:
                for p in (self.lora_A, self.lora_E, self.lora_B):
                    nn.init.normal_(p)

    def orth_reg(self) -> torch.Tensor:
        """This layer's orthogonal-regularisation terms: ``||A Aᵀ - I||_F + ||Bᵀ B - I||_F`` (0-d, differentiable).

        The Frobenius norms are not squared (HF PEFT).  HF PEFT's model loss adds
        ``orth_reg_weight * mean over all lora_A and lora_B matrices``, i.e. the sum of ``orth_reg()`` over the
        layers divided by ``2 * n_layers``.
        """
        return orth_reg_term(self.lora_A, is_a=True) + orth_reg_term(self.lora_B, is_a=False)

    def delta_weight(self) -> torch.Tensor:
        """``B (A ⊙ E) · scaling / (ranknum + 1e-5)`` as (out_features, in_features), in >= fp32, no gradient."""
        return adalora_delta(self.lora_A, self.lora_E, self.lora_B, self.effective_scaling)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (..., in_features) -> (..., out_features)."""
        if self._merged:
            return self._base_forward(x)
        p = self.lora_dropout if self.training else 0.0
        return adalora_linear(x, self.weight_nk, self.bias, self.lora_A, self.lora_E, self.lora_B,
                                 self.scaling, self.ranknum, p, None, backend=self.backend)

    def extra_repr(self) -> str:
        s = f"{self._extra_base_repr()}, r={self.r}, lora_alpha={self.lora_alpha}"
        if self.lora_dropout:
            s += f", lora_dropout={self.lora_dropout}"
        if self._merged:
            s += ", merged=True"
        return s
