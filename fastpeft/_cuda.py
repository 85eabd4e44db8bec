"""Python side of the optional C++/CUDA extension ``fastpeft._C``.

The extension registers its ops in ``torch.ops.fastpeft`` (C++ ``TORCH_LIBRARY_FRAGMENT(fastpeft, ...)``)::

    lora_fwd_cuda(x, weight, bias?, lora_A, lora_E?, lora_B, scaling, dropout_p, seed, fold) -> (y, S)
    lora_decode_cuda(x, weight, bias?, lora_A, lora_E?, lora_B, scaling, dropout_p, seed) -> (y, S)     M <= 16
    lora_bwd_cuda(dy, x, weight, lora_A, lora_E?, lora_B, S, scaling, dropout_p, seed, needs_dx, has_bias)
        -> (dx, dA, dE, dB, dbias)
    ia3_fwd_cuda(x, weight, bias?, ia3_l, feedforward, save_z) -> (y, saved)
    ia3_bwd_cuda(dy, x, weight, ia3_l, saved, feedforward, needs_dx, has_bias) -> (dx, dl, dbias)

This module wraps them in the functions ``fastpeft.ops.lora`` / ``fastpeft.ops.ia3`` look up by name
(``lora_fwd_cuda``, ``lora_bwd_cuda``, ``ia3_fwd_cuda``, ``ia3_bwd_cuda``), with exactly the signatures and return
conventions of the ``*_ref`` functions there, and registers the ops' fake kernels so ``torch.compile`` and
``torch.library.opcheck`` can trace them.  Operands the kernels do not take (an empty feature dimension, a dtype
other than float32 / float16 / bfloat16) go to the torch reference instead, forward and backward alike.

Importing this module never fails and never touches CUDA: when ``fastpeft._C`` is absent (a CPU build of torch, no
toolkit, ``FASTPEFT_BUILD_CUDA=0``) the wrappers raise ``RuntimeError`` with the reason, and ``fastpeft._backend``
never selects them.

The extension is never the default on a GPU with Triton: ``fastpeft._backend`` picks it only when asked
(``backend="cuda"``) or by a measured entry of the dispatch table.  (Its helper kernels - shrink / column
reductions / expand, the IA3 scale and backward - predate the pass-budget design of the default triton path.)

Variants inside the cuda backend (chosen per shape by ``fastpeft._dispatch.lora_fwd_variant``):
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

logger = logging.getLogger("fastpeft")

__all__ = ["available", "unavailable_reason", "lora_fwd_cuda", "lora_bwd_cuda", "ia3_fwd_cuda", "ia3_bwd_cuda",
           "ia3_fwd_cuda_inference", "lora_decode_cuda", "FOLD_ACCUM", "FOLD_KAUG", "OPS"]

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
            importlib.import_module("fastpeft._C")
        except (ImportError, OSError) as e:
            if torch.version.cuda is None:
                reason = "torch is a CPU build, so fastpeft._C was not built"
            else:
                reason = f"fastpeft._C did not load ({type(e).__name__}: {e})"
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
        m = x.shape[0]
        return x.new_empty(m, weight.shape[0]), x.new_empty(m, lora_A.shape[0], dtype=torch.float32)

    @reg("fastpeft::lora_decode_cuda")
    def _lora_decode_fake(x, weight, bias, lora_A, lora_E, lora_B, scaling, dropout_p, seed):
        m = x.shape[0]
        return x.new_empty(m, weight.shape[0]), x.new_empty(m, lora_A.shape[0], dtype=torch.float32)

    @reg("fastpeft::lora_bwd_cuda")
    def _lora_bwd_fake(dy, x, weight, lora_A, lora_E, lora_B, S, scaling, dropout_p, seed, needs_dx, has_bias):
        dx = x.new_empty(x.shape) if needs_dx else x.new_empty(0)
        dE = lora_E.new_empty(lora_E.shape) if lora_E is not None else dy.new_empty(0, dtype=lora_A.dtype)
        dbias = (dy.new_empty(weight.shape[0], dtype=weight.dtype) if has_bias
                 else dy.new_empty(0, dtype=weight.dtype))
        return dx, lora_A.new_empty(lora_A.shape), dE, lora_B.new_empty(lora_B.shape), dbias

    @reg("fastpeft::ia3_fwd_cuda")
    def _ia3_fwd_fake(x, weight, bias, ia3_l, feedforward, save_z):
        m, n = x.shape[0], weight.shape[0]
        saved = x.new_empty(m, n) if (not feedforward and save_z) else x.new_empty(0)
        return x.new_empty(m, n), saved

    @reg("fastpeft::ia3_bwd_cuda")
    def _ia3_bwd_fake(dy, x, weight, ia3_l, saved, feedforward, needs_dx, has_bias):
        if needs_dx:
            dx = dy.new_empty(dy.shape[0], weight.shape[1])
        else:
            dx = x.new_empty(0) if feedforward else dy.new_empty(0)
        dbias = (dy.new_empty(weight.shape[0], dtype=weight.dtype) if has_bias
                 else dy.new_empty(0, dtype=weight.dtype))
        return dx, ia3_l.new_empty(ia3_l.shape), dbias

    _state["fakes"] = True


# ---------------------------------------------------------------------------------------------------------------
# Contract wrappers (same signatures as fastpeft.ops.*.<name>_ref)
# ---------------------------------------------------------------------------------------------------------------


# The element types the kernels and the C++ argument checks take (csrc/common/checks.h check_float_dtype).
KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _use_reference(weight: torch.Tensor, *tensors: Optional[torch.Tensor]) -> bool:
    """True when the torch reference runs instead of the kernels: an empty feature dimension (legal for the op
    contract, not worth kernels) or an operand dtype the kernels do not take (e.g. float64: the auto backend picks
    the extension for every CUDA tensor, and the C++ checks would reject it).  Depends only on tensors the forward
    and the backward both see, so a reference forward is always paired with a reference backward."""
    if weight.shape[0] == 0 or weight.shape[1] == 0:
        return True
    return any(t is not None and t.dtype not in KERNEL_DTYPES for t in (weight, *tensors))


def lora_decode_cuda(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], lora_A: torch.Tensor,
                     lora_E: Optional[torch.Tensor], lora_B: torch.Tensor, scaling: float, dropout_p: float,
                     seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Fused decode forward for M <= 16 rows (shrink, then one GEMV + LoRA kernel).  Shapes as ``lora_fwd_ref``."""
    _require()
    return torch.ops.fastpeft.lora_decode_cuda(x, weight, bias, lora_A, lora_E, lora_B, float(scaling),
                                               float(dropout_p), int(seed))


def lora_fwd_cuda(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], lora_A: torch.Tensor,
                  lora_E: Optional[torch.Tensor], lora_B: torch.Tensor, scaling: float, dropout_p: float,
                  seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """LoRA / AdaLoRA forward on the extension.

    Args:
        x: (M, K) contiguous CUDA.  weight: (N, K) (row-major or a transposed view).  bias: (N,) or None.
        lora_A: (r, K).  lora_E: (r,) or None.  lora_B: (N, r).  scaling, dropout_p, seed: as ``lora_fwd_ref``.
    Returns:
        y (M, N) in x's dtype and S = drop(x)·Aᵀ (M, r) fp32.
    """
    _require()
    if _use_reference(weight, x, lora_A, lora_E, lora_B):
        from .ops.lora import lora_fwd_ref
        return lora_fwd_ref(x, weight, bias, lora_A, lora_E, lora_B, scaling, dropout_p, seed)
    from . import _dispatch
    variant = _dispatch.lora_fwd_variant(x, weight, lora_A)
    if variant == "decode":
        return lora_decode_cuda(x, weight, bias, lora_A, lora_E, lora_B, scaling, dropout_p, seed)
    fold = FOLD_KAUG if variant == "kaug" else FOLD_ACCUM
    return torch.ops.fastpeft.lora_fwd_cuda(x, weight, bias, lora_A, lora_E, lora_B, float(scaling),
                                            float(dropout_p), int(seed), fold)


def lora_bwd_cuda(dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, lora_A: torch.Tensor,
                  lora_E: Optional[torch.Tensor], lora_B: torch.Tensor, S: torch.Tensor, scaling: float,
                  dropout_p: float, seed: int, needs_dx: bool, has_bias: bool
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """LoRA / AdaLoRA backward on the extension; arguments and returns as ``lora_bwd_ref``."""
    _require()
    if _use_reference(weight, x, lora_A, lora_E, lora_B):
        from .ops.lora import lora_bwd_ref
        return lora_bwd_ref(dy, x, weight, lora_A, lora_E, lora_B, S, scaling, dropout_p, seed, needs_dx, has_bias)
    return torch.ops.fastpeft.lora_bwd_cuda(dy, x, weight, lora_A, lora_E, lora_B, S, float(scaling),
                                            float(dropout_p), int(seed), bool(needs_dx), bool(has_bias))


def ia3_fwd_cuda(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], ia3_l: torch.Tensor,
                 feedforward: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(IA)³ forward on the extension; arguments and returns as ``ia3_fwd_ref`` (saves z in output mode)."""
    _require()
    if _use_reference(weight, x, ia3_l):
        from .ops.ia3 import ia3_fwd_ref
        return ia3_fwd_ref(x, weight, bias, ia3_l, feedforward)
    return torch.ops.fastpeft.ia3_fwd_cuda(x, weight, bias, ia3_l, bool(feedforward), True)


def ia3_fwd_cuda_inference(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                           ia3_l: torch.Tensor, feedforward: bool) -> torch.Tensor:
    """(IA)³ forward without saving z: in output mode l is cuBLASLt's per-row alpha vector (free in the GEMM).

    Returns only y (M, N); use it when no backward follows (``torch.no_grad`` / inference).
    """
    _require()
    if _use_reference(weight, x, ia3_l):
        from .ops.ia3 import ia3_fwd_ref
        return ia3_fwd_ref(x, weight, bias, ia3_l, feedforward)[0]
    return torch.ops.fastpeft.ia3_fwd_cuda(x, weight, bias, ia3_l, bool(feedforward), False)[0]


def ia3_bwd_cuda(dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, ia3_l: torch.Tensor,
                 saved: torch.Tensor, feedforward: bool, needs_dx: bool, has_bias: bool
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(IA)³ backward on the extension; arguments and returns as ``ia3_bwd_ref``."""
    _require()
    if _use_reference(weight, dy, ia3_l):
        from .ops.ia3 import ia3_bwd_ref
        return ia3_bwd_ref(dy, x, weight, ia3_l, saved, feedforward, needs_dx, has_bias)
    return torch.ops.fastpeft.ia3_bwd_cuda(dy, x, weight, ia3_l, saved, bool(feedforward), bool(needs_dx),
                                           bool(has_bias))
