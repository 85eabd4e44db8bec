"""``IA3Linear``: HF PEFT's (IA)³ layer as a drop-in ``nn.Linear`` replacement."""

from __future__ import annotations

import warnings
from typing import Optional

import torch
import torch.nn as nn

from ..functional import ia3_linear
from ..utils.adapter_math import ia3_scale
from ._base import AdapterBase

__all__ = ["IA3Linear"]


class IA3Linear(AdapterBase):
    """(IA)³ linear layer with a learned scaling vector ``ia3_l``.

    * ``feedforward=False`` (attention modules): ``y = (x Wᵀ + b) ⊙ l``, the output (bias included) is scaled;
      ``ia3_l`` has shape (out_features, 1).
    * ``feedforward=True`` (feed-forward modules): ``y = (x ⊙ l) Wᵀ + b``, the input is scaled;
      ``ia3_l`` has shape (1, in_features).

    The base ``weight`` (out_features, in_features) and ``bias`` are frozen; ``ia3_l`` is trainable and starts at
    ones (so the layer starts equal to the base).  Numerically HF PEFT's ``ia3.Linear`` with one adapter.

    Args:
        in_features, out_features, bias: as ``nn.Linear``.
        feedforward: which mode (see above).
        init_ia3_weights: True: ones; False: N(0, 1) (for tests, as HF PEFT).
        device, dtype: factory kwargs.  backend: passed to ``fastpeft.functional.ia3_linear``.

    Shapes: input (..., in_features) -> output (..., out_features) in the input's dtype.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, feedforward: bool = False,
                 init_ia3_weights: bool = True, device=None, dtype=None, backend: Optional[str] = None) -> None:
        super().__init__()
        self._init_base(in_features, out_features, bias, device, dtype)
        self._init_adapter(feedforward, init_ia3_weights, backend, device, dtype)
        self.reset_parameters()

    def _init_adapter(self, feedforward, init_ia3_weights, backend, device, dtype):
        if not isinstance(feedforward, bool):
            raise TypeError(f"feedforward must be a bool, got {type(feedforward).__name__}")
        if not isinstance(init_ia3_weights, bool):
            raise TypeError(f"init_ia3_weights must be a bool, got {type(init_ia3_weights).__name__}")
        self.feedforward = feedforward
        self.init_ia3_weights = init_ia3_weights
        self.backend = backend
        shape = (1, self.in_features) if feedforward else (self.out_features, 1)
        self.ia3_l = nn.Parameter(torch.empty(shape, device=device, dtype=dtype))

    @classmethod
    def from_linear(cls, linear: nn.Module, feedforward: bool = False, init_ia3_weights: bool = True,
                    backend: Optional[str] = None, dtype: Optional[torch.dtype] = None) -> "IA3Linear":
        """Wrap an ``nn.Linear`` or transformers ``Conv1D``, sharing (not copying) its weight and bias Parameters.

        ``ia3_l`` is created on the base weight's device in `dtype` (default: the base dtype).
        Raises TypeError for any other module type.
        """
        self = cls.__new__(cls)
        AdapterBase.__init__(self)
        self._share_base(linear)
        w = self.weight
        self._init_adapter(feedforward, init_ia3_weights, backend, w.device, dtype or w.dtype)
        self.reset_ia3_parameters()
        self._freeze_base()
        return self

    def reset_parameters(self) -> None:
        """nn.Linear init of the base, then ``reset_ia3_parameters()``."""
        self.reset_base_parameters()
        self.reset_ia3_parameters()

    def reset_ia3_parameters(self) -> None:
        """``ia3_l`` <- ones (or N(0, 1) when ``init_ia3_weights=False``)."""
        if self._merged:
            raise ValueError("cannot reset ia3_l of a merged IA3Linear; call unmerge() first")
        with torch.no_grad():
            if self.init_ia3_weights:
                nn.init.ones_(self.ia3_l)
            else:
                nn.init.normal_(self.ia3_l)

    def _scaled(self, divide: bool) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """(new weight in its stored layout, new bias or None) after multiplying (or dividing) by l."""
        return ia3_scale(self.weight, self.bias, self.ia3_l, self.feedforward, self.fan_in_fan_out, divide)

    def merge(self) -> None:
        """Fold l into the base: output mode ``W <- diag(l) W, b <- l ⊙ b``; input mode ``W <- W diag(l)``.

        Computed in >= fp32 and rounded once.  Raises ValueError if already merged.
        """
        self._check_merge()
        zeros = int((self.ia3_l.detach() == 0).sum())
        if zeros:
            warnings.warn(f"ia3_l has {zeros} zero entr{'y' if zeros == 1 else 'ies'}: merging sets the matching base "
                          "weights to zero for good (unmerge() cannot bring them back). Keep a copy of the base "
                          "weights if you need them.", UserWarning, stacklevel=2)
        with torch.no_grad():
            new_w, new_b = self._scaled(divide=False)
            self.weight.copy_(new_w)
            if new_b is not None:
                self.bias.copy_(new_b)
        self._merged = True

    def unmerge(self) -> None:
        """Undo ``merge()`` by dividing by ``l + 1e-8`` (HF PEFT); inexact where l is ~0.  ValueError if not merged."""
        self._check_unmerge()
        with torch.no_grad():
            new_w, new_b = self._scaled(divide=True)
            self.weight.copy_(new_w)
            if new_b is not None:
                self.bias.copy_(new_b)
        self._merged = False

    def merged_weight_nk(self) -> torch.Tensor:
        """The merged weight as (out_features, in_features) in the base dtype (a new tensor)."""
        with torch.no_grad():
            if self._merged:
                return self.weight_nk.detach().clone()
            new_w, _ = self._scaled(divide=False)
            return new_w.t() if self.fan_in_fan_out else new_w

    def _merged_bias(self) -> Optional[torch.Tensor]:
        if self.bias is None:
            return None
        with torch.no_grad():
            if self._merged or self.feedforward:
                return self.bias.detach().clone()
            return self._scaled(divide=False)[1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (..., in_features) -> (..., out_features)."""
        if self._merged:
            return self._base_forward(x)
        return ia3_linear(x, self.weight_nk, self.bias, self.ia3_l, self.feedforward, backend=self.backend)

    def extra_repr(self) -> str:
        s = f"{self._extra_base_repr()}, feedforward={self.feedforward}"
        if self._merged:
            s += ", merged=True"
        return s
