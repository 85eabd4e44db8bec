"""The op registry: per op and backend, the implementation and the ``supports`` predicate that says whether it can
take a call's arguments.  ``fastpeft._backend.select_backend`` is the only caller that decides with the predicates;
the implementations below it never fall back to another backend.

Ops (declared with schema, fake kernel and autograd formula in ``fastpeft/ops/lora.py`` and ``fastpeft/ops/ia3.py``):
``lora`` (``lora_fwd`` / ``lora_bwd``; AdaLoRA is lora with ``lora_E``) and ``ia3`` (``ia3_fwd`` / ``ia3_bwd``).
DoRA's three extra pieces (``dora_prep``, ``dora_rowscale``, ``dora_grads``; ``fastpeft/ops/dora.py``) are looked up here too, on
the backend chosen for its ``lora`` op (torch's for ``cuda``, which has no such kernels).

Backends and where their implementations live (looked up by name, imported on first use):
  ``torch``   ``fastpeft.ops.<op>.<op>_{fwd,bwd}_ref``           every dtype, every device, every shape
  ``triton``  ``fastpeft.kernels.<op>.<op>_{fwd,bwd}_triton``    CUDA tensors (CPU with ``TRITON_INTERPRET=1``)
  ``cuda``    ``fastpeft._cuda.<op>_{fwd,bwd}_cuda``             CUDA tensors
A backend name may carry a variant (``"triton:fused"``, ``"cuda:decode"``), passed to the launcher as ``variant=``.

This module imports neither triton nor the extension.
"""

from __future__ import annotations

import functools
import importlib
import os
from typing import Callable, Optional

import torch

# The element types the Triton kernels and the extension's kernels take (csrc/common/checks.h check_float_dtype):
# the one list of them.
KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)

# Variants a backend name may carry, per backend and op ("triton" = "triton:cublas"; "cuda" = "cuda:accum").
VARIANTS = {
    "triton": {"lora": ("cublas", "fused"), "ia3": ("cublas", "fused")},
    "cuda": {"lora": ("decode", "accum", "kaug"), "ia3": ()},
}
# The cuda LoRA forward's decode kernel (one fused GEMV + LoRA kernel reading W once) takes at most this many rows.
DECODE_MAX_ROWS = 16

# Argument names of the dispatch arguments (the op's forward inputs with x flattened to 2-D), per op.
ARG_NAMES = {"lora": ("x", "weight", "bias", "lora_A", "lora_E", "lora_B"),
             "ia3": ("x", "weight", "bias", "ia3_l", "feedforward")}


def interpret_mode() -> bool:
    """True when Triton runs kernels in its CPU interpreter (``TRITON_INTERPRET=1``): the triton backend then takes
    CPU tensors.  (``kernels/_target.py`` has its own: ``kernels/`` imports nothing of fastpeft but ``fastpeft._numerics``.)"""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _operands_reason(op: str, x: torch.Tensor, args: tuple) -> Optional[str]:
    """Why the fused kernels cannot take these operands (a dtype outside KERNEL_DTYPES, an empty feature
    dimension), or None.  Without `args` only x is checked."""
    named = tuple(zip(ARG_NAMES[op], args)) if args else (("x", x),)
    for name, t in named:
        if isinstance(t, torch.Tensor) and t.dtype not in KERNEL_DTYPES:
            return f"{name} has dtype {t.dtype}; the kernels take {', '.join(str(d) for d in KERNEL_DTYPES)}"
    if args:
        n, k = args[1].shape
        if n == 0 or k == 0:
            return f"weight has an empty feature dimension (shape {tuple(args[1].shape)}); only torch takes it"
    return None


def _torch_supports(op: str, variant: str, x: torch.Tensor, args: tuple) -> Optional[str]:
    return None


def _triton_supports(op: str, variant: str, x: torch.Tensor, args: tuple) -> Optional[str]:
    dev = x.device
    if not (dev.type == "cuda" or (dev.type == "cpu" and interpret_mode())):
        return f"triton runs on CUDA tensors (or CPU tensors with TRITON_INTERPRET=1), got device {dev}"
    return _operands_reason(op, x, args)


def _cuda_supports(op: str, variant: str, x: torch.Tensor, args: tuple) -> Optional[str]:
    if x.device.type != "cuda":
        return f"the cuda backend needs CUDA tensors, got device {x.device}"
    reason = _operands_reason(op, x, args)
    if reason is None and variant == "decode" and args:
        weight = args[1]
        if x.shape[0] > DECODE_MAX_ROWS:
            return f"variant 'decode' takes at most {DECODE_MAX_ROWS} rows, got M = {x.shape[0]}"
        if not decode_layout_ok(weight):
            # The decode kernel streams rows of W; a transposed view (Conv1D's weight.t()) would need a copy of W.
            return "variant 'decode' streams rows of a row-major weight; this weight is a transposed view"
    return reason


def decode_layout_ok(weight: torch.Tensor) -> bool:
    """Whether the cuda decode kernel can stream `weight`'s rows (row-major, or a single column)."""
    return weight.dim() == 2 and (weight.stride(1) == 1 or weight.shape[1] <= 1)


SUPPORTS: dict[str, Callable[[str, str, torch.Tensor, tuple], Optional[str]]] = {
    "torch": _torch_supports, "triton": _triton_supports, "cuda": _cuda_supports}

_MODULES = {"torch": "fastpeft.ops.{op}", "triton": "fastpeft.kernels.{op}", "cuda": "fastpeft._cuda"}


def supports(op: str, backend: str, x: torch.Tensor, args: tuple = ()) -> Optional[str]:
    """None when `backend` (``"<name>[:<variant>]"``) can take op `op` on these arguments, else the reason.

    Args:
        op: ``"lora"`` or ``"ia3"``.  x: the op's input (its device and dtype).  args: the op's forward inputs with x
            flattened to 2-D (see ``ARG_NAMES``); may be empty (then x alone is checked).
    Does not say whether the backend is installed (``fastpeft._backend`` probes that).
    """
    name, _, variant = backend.partition(":")
    if variant and variant not in VARIANTS.get(name, {}).get(op, ()):
        valid = VARIANTS.get(name, {}).get(op, ())
        return f"backend {name!r} has no variant {variant!r} for op {op!r} (variants: {valid})"
    return SUPPORTS[name](op, variant, x, args)


def needs_autograd(*tensors) -> bool:
    """Whether an op on these inputs (tensors or None) must build a backward: grad mode is on and one of them
    requires grad.  Without it (inference, ``torch.no_grad``) the ops call their implementation directly - the
    autograd Function's own Python (its saving, its functorch checks) is a tenth of a small layer's eager forward on
    the host."""
    if not torch.is_grad_enabled():
        return False
    for t in tensors:
        if t is not None and t.requires_grad:
            return True
    return False


@functools.lru_cache(maxsize=None)
def impl(name: str, backend: str) -> Callable:
    """The implementation of op function `name` (e.g. ``"lora_fwd"``) on `backend` (``"<name>[:<variant>]"``).

    ``"torch"`` takes ``<name>_ref`` from ``fastpeft.ops.<op>``; ``"triton"`` / ``"cuda"`` take ``<name>_<backend>``
    from their module, imported on first use; a variant is passed as ``variant=``.
    """
    base, _, variant = backend.partition(":")
    op = name.rsplit("_", 1)[0]
    module = importlib.import_module(_MODULES[base].format(op=op))
    fn = getattr(module, f"{name}_{'ref' if base == 'torch' else base}")
    return functools.partial(fn, variant=variant) if variant else fn
