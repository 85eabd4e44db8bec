"""Python side of the optional C++/CUDA extension ``fastpeft._C``.

The extension registers its ops in ``torch.ops.fastpeft`` (C++ ``TORCH_LIBRARY_FRAGMENT(fastpeft, ...)``)::

    lora_fwd_cuda(x, weight, bias?, lora_A, lora_E?, lora_B, scaling, dropout_p, seed, fold) -> (y, S)
    lora_decode_cuda(x, weight, bias?, lora_A, lora_E?, lora_B, scaling, dropout_p, seed) -> (y, S)     M <= 16
    lora_bwd_cuda(dy, x, weight, lora_A, lora_E?, lora_B, S, scaling, dropout_p, seed, needs_dx, has_bias)
        -> (dx, dA, dE, dB, dbias)
    ia3_fwd_cuda(x, weight, bias?, ia3_l, feedforward, save_z) -> (y, saved)
    ia3_bwd_cuda(dy, x, weight, ia3_l, saved, feedforward, needs_dx, has_bias) -> (dx, dl, dbias)

This module wraps them in the functions the op registry (``fastpeft/ops/_registry.py``) looks up by name
(``lora_fwd_cuda``, ``lora_bwd_cuda``, ``ia3_fwd_cuda``, ``ia3_bwd_cuda``), with exactly the signatures and return
conventions of the ``*_ref`` functions of ``fastpeft.ops``, and registers the ops' fake kernels (the shape functions
of ``fastpeft.ops``) so ``torch.compile`` and ``torch.library.opcheck`` can trace them.  The wrappers take what the
registry's ``supports`` predicate admits (fp16/bf16/fp32 operands, non-empty feature dimensions) and nothing else.

This module is also the one place that loads the extension: ``fastpeft._backend`` asks ``available()`` /
``unavailable_reason()``.  Importing it never fails and never touches CUDA: when ``fastpeft._C`` is absent (a CPU
build of torch, no toolkit, ``FASTPEFT_BUILD_CUDA=0``) the wrappers raise ``RuntimeError`` with the reason, and
``fastpeft._backend`` never selects them.

The extension is never the default on a GPU with Triton: ``fastpeft._backend`` picks it only when asked
(``backend="cuda"``) or by a measured entry of the dispatch table (the reasons are in docs/STATUS.md).

Variants of the LoRA forward (``variant=``; ``fastpeft._backend.select_backend`` chooses one per shape):
  * ``decode``: M <= 16, one fused GEMV + LoRA kernel reading W once (after the shrink S = drop(x)Aᵀ).
  * ``accum``:  T = b + s·(S⊙e)Bᵀ written into y, then cuBLASLt adds x·Wᵀ in place (C = D, beta = 1).
  * ``kaug``:   one cuBLASLt GEMM over [x | s·(S⊙e)]·[W | B]ᵀ (depth K + r, padded to a multiple of 8).
"""

from __future__ import annotations

import importlib
import logging
import threading
from typing import Optional

import torch

from ._meta import ia3_bwd_meta, ia3_fwd_meta, lora_bwd_meta, lora_fwd_meta

logger = logging.getLogger(__package__)

__all__ = ["available", "unavailable_reason", "lora_fwd_cuda", "lora_bwd_cuda", "ia3_fwd_cuda", "ia3_bwd_cuda",
           "lora_decode_cuda", "FOLD_ACCUM", "FOLD_KAUG", "OPS"]

FOLD_ACCUM = 0
FOLD_KAUG = 1
# The extension's ops (names in torch.ops.fastpeft).
OPS = ("lora_fwd_cuda", "lora_decode_cuda", "lora_bwd_cuda", "ia3_fwd_cuda", "ia3_bwd_cuda")

_lock = threading.Lock()
_state: dict = {"loaded": None, "reason": None, "fakes": False}


def _load() -> bool:
    """Import fastpeft._C once (guarded) and register the fake kernels; True when the ops are usable."""
    if _state["loaded"] is not None:
        return _state["loaded"]
    with _lock:
        if _state["loaded"] is not None:
            return _state["loaded"]
        try:
            importlib.import_module("._C", __package__)  # the compiled extension, a child of this package
        except (ImportError, OSError) as e:
            if torch.version.cuda is None:
                reason = "torch is a CPU build, so fastpeft._C was not built"
            else:
                reason = f"fastpeft._C did not load ({type(e).__name__}: {e})"
                logger.warning("fastpeft: the CUDA extension fastpeft._C did not load (%s); using Triton/torch", e)
            _state["loaded"], _state["reason"] = False, reason
            return False
        missing = [op for op in OPS if not hasattr(torch.ops.fastpeft, op)]
        if missing:
            _state["loaded"] = False
            _state["reason"] = f"fastpeft._C loaded but lacks ops {missing} (stale build? rebuild the extension)"
            logger.warning("fastpeft: %s", _state["reason"])
            return False
        _register_fakes()
        _state["loaded"], _state["reason"] = True, "fastpeft._C loaded"
        return True


def available() -> bool:
    """True when ``fastpeft._C`` imported and defines every op of this module (does not initialise CUDA)."""
    return _load()


def unavailable_reason() -> Optional[str]:
    """None when the extension is usable, else why not."""
    return None if _load() else _state["reason"]


def _require() -> None:
    if not _load():
        raise RuntimeError(f"fastpeft's cuda backend is unavailable: {_state['reason']}")


# ---------------------------------------------------------------------------------------------------------------
# Fake kernels (shapes / dtypes only), registered once the C++ schemas exist.
# ---------------------------------------------------------------------------------------------------------------


def _register_fakes() -> None:
    if _state["fakes"]:
        return
    reg = torch.library.register_fake

    @reg("fastpeft::lora_fwd_cuda")
    def _lora_fwd_fake(x, weight, bias, lora_A, lora_E, lora_B, scaling, dropout_p, seed, fold):
        return lora_fwd_meta(x, weight, bias, lora_A, lora_E, lora_B)

    @reg("fastpeft::lora_decode_cuda")
    def _lora_decode_fake(x, weight, bias, lora_A, lora_E, lora_B, scaling, dropout_p, seed):
        return lora_fwd_meta(x, weight, bias, lora_A, lora_E, lora_B)

    @reg("fastpeft::lora_bwd_cuda")
    def _lora_bwd_fake(dy, x, weight, lora_A, lora_E, lora_B, S, scaling, dropout_p, seed, needs_dx, has_bias):
        return lora_bwd_meta(dy, x, weight, lora_A, lora_E, lora_B, S, needs_dx, has_bias)

    @reg("fastpeft::ia3_fwd_cuda")
    def _ia3_fwd_fake(x, weight, bias, ia3_l, feedforward, save_z):
        return ia3_fwd_meta(x, weight, bias, ia3_l, feedforward, save_z)

    @reg("fastpeft::ia3_bwd_cuda")
    def _ia3_bwd_fake(dy, x, weight, ia3_l, saved, feedforward, needs_dx, has_bias):
        return ia3_bwd_meta(dy, x, weight, ia3_l, feedforward, needs_dx, has_bias)

    _state["fakes"] = True


# ---------------------------------------------------------------------------------------------------------------
# Contract wrappers (same signatures as fastpeft.ops.*.<name>_ref)
# ---------------------------------------------------------------------------------------------------------------


def lora_decode_cuda(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], lora_A: torch.Tensor,
                     lora_E: Optional[torch.Tensor], lora_B: torch.Tensor, scaling: float, dropout_p: float,
                     seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Fused decode forward for M <= 16 rows (shrink, then one GEMV + LoRA kernel).  Shapes as ``lora_fwd_ref``."""
    _require()
    return torch.ops.fastpeft.lora_decode_cuda(x, weight, bias, lora_A, lora_E, lora_B, float(scaling),
                                               float(dropout_p), int(seed))


def lora_fwd_cuda(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], lora_A: torch.Tensor,
                  lora_E: Optional[torch.Tensor], lora_B: torch.Tensor, scaling: float, dropout_p: float,
                  seed: int, variant: Optional[str] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """LoRA / AdaLoRA forward on the extension.

    Args:
        x: (M, K) contiguous CUDA.  weight: (N, K) (row-major or a transposed view).  bias: (N,) or None.
        lora_A: (r, K).  lora_E: (r,) or None.  lora_B: (N, r).  scaling, dropout_p, seed: as ``lora_fwd_ref``.
        variant: ``"accum"`` (default), ``"kaug"`` or ``"decode"`` (M <= 16, row-major weight); see above.
    Returns:
        y (M, N) in x's dtype and S = drop(x)·Aᵀ (M, r) fp32.
    """
    _require()
    if variant == "decode":
        return lora_decode_cuda(x, weight, bias, lora_A, lora_E, lora_B, scaling, dropout_p, seed)
    if variant not in (None, "accum", "kaug"):
        raise ValueError(f"variant must be 'accum', 'kaug' or 'decode', got {variant!r}")
    fold = FOLD_KAUG if variant == "kaug" else FOLD_ACCUM
    return torch.ops.fastpeft.lora_fwd_cuda(x, weight, bias, lora_A, lora_E, lora_B, float(scaling),
                                            float(dropout_p), int(seed), fold)


def lora_bwd_cuda(dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, lora_A: torch.Tensor,
                  lora_E: Optional[torch.Tensor], lora_B: torch.Tensor, S: torch.Tensor, scaling: float,
                  dropout_p: float, seed: int, needs_dx: bool, has_bias: bool, variant: Optional[str] = None
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """LoRA / AdaLoRA backward on the extension; arguments and returns as ``lora_bwd_ref``.  `variant`: the
    forward's (every forward variant saves the same S, so one backward serves them all)."""
    _require()
    return torch.ops.fastpeft.lora_bwd_cuda(dy, x, weight, lora_A, lora_E, lora_B, S, float(scaling),
                                            float(dropout_p), int(seed), bool(needs_dx), bool(has_bias))


def ia3_fwd_cuda(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], ia3_l: torch.Tensor,
                 feedforward: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(IA)³ forward on the extension; arguments and returns as ``ia3_fwd_ref`` (saves z in output mode)."""
    _require()
    return torch.ops.fastpeft.ia3_fwd_cuda(x, weight, bias, ia3_l, bool(feedforward), True)


def ia3_bwd_cuda(dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, ia3_l: torch.Tensor,
                 saved: torch.Tensor, feedforward: bool, needs_dx: bool, has_bias: bool
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(IA)³ backward on the extension; arguments and returns as ``ia3_bwd_ref``."""
    _require()
    return torch.ops.fastpeft.ia3_bwd_cuda(dy, x, weight, ia3_l, saved, bool(feedforward), bool(needs_dx),
                                           bool(has_bias))
