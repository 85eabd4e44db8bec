"""The one place that decides which backend runs an op, and what each backend's availability is.

Backends (the implementations and their ``supports`` predicates are in the op registry, ``fastpeft/ops/_registry.py``):
  * ``"torch"``  - pure PyTorch (``fastpeft.ops.*_ref``); runs everywhere; ground truth in tests.
  * ``"triton"`` - the default GPU path: the frozen layer's own cuBLAS GEMMs plus skinny Triton kernels for the
    adapter (``fastpeft.kernels``, variant ``cublas``); ``"triton:fused"`` runs the Triton GEMM with the adapter
    in its prologue / epilogue instead.  CUDA tensors, or CPU tensors when ``TRITON_INTERPRET=1`` (how CI runs the
    kernels without a GPU).
  * ``"cuda"``   - the optional compiled extension ``fastpeft._C`` (cuBLASLt-anchored paths); CUDA tensors only;
    the LoRA forward has variants ``decode`` / ``accum`` / ``kaug``.

Selection (``select_backend``): an explicit ``backend=`` argument wins, then ``FASTPEFT_BACKEND``, then auto.
A backend is usable when it is installed (``_why_not``) and its registry predicate takes the arguments
(``fastpeft.ops._registry.supports``: dtype, device, shape limits).  Auto on CUDA tensors: the per-shape entry of
the measured dispatch table (``fastpeft._dispatch``, data file ``fastpeft/dispatch_table.json``) when one exists and
is usable, else ``triton`` (variant ``cublas``: no slower than the frozen layer by construction), else the
extension, else torch; torch for everything else.  Auto's answer is cached per (op, device, dtype, shapes) until the
dispatch table changes.  An explicit backend that cannot run raises ``RuntimeError`` with the reason.  The cuda
backend's LoRA forward variant is decided here too (measured, else ``decode`` for M <= 16 on a row-major weight,
else ``accum``).  Nothing below this module falls back to another backend.

Nothing here touches CUDA or imports triton at import time; every probe is lazy and cached.
"""

from __future__ import annotations

import importlib
import logging
import os
from typing import Optional

import torch

from ._cuda import available as _cuda_available, unavailable_reason as _cuda_unavailable_reason
from ._dispatch import choose as _dispatch_choose, describe as _dispatch_describe, version as _dispatch_version
from ._version import __version__
from .ops import _registry

logger = logging.getLogger(__package__)

BACKENDS = ("torch", "triton", "cuda")
# Explicitly selectable variants ("<backend>:<variant>"), of any op (the registry says which op has which); the
# launcher receives ``variant=``.
VARIANTS = {b: tuple(dict.fromkeys(v for vs in per_op.values() for v in vs)) for b, per_op in _registry.VARIANTS.items()}
_VALID_CHOICES = ("auto",) + BACKENDS + tuple(f"{b}:{v}" for b, vs in VARIANTS.items() for v in vs)


# Probe results, cached in a plain dict (not functools.lru_cache) so torch.compile can trace select_backend:
# dynamo reads a populated dict as a constant, while it cannot trace through lru_cache wrappers.
_PROBES: dict[str, tuple[bool, str]] = {}


def _cached(name: str, fn) -> tuple[bool, str]:
    if name not in _PROBES:
        _PROBES[name] = fn()
    return _PROBES[name]


def _triton_probe() -> tuple[bool, str]:
    return _cached("triton", _probe_triton)


def _probe_triton() -> tuple[bool, str]:
    try:
        triton = importlib.import_module("triton")
    except Exception as e:  # ImportError, or a broken install raising something else
        return False, f"triton is not importable ({type(e).__name__}: {e})"
    try:
        for mod in ("fastpeft.kernels.lora", "fastpeft.kernels.ia3"):
            importlib.import_module(mod)
    except Exception as e:
        return False, f"fastpeft.kernels failed to import ({type(e).__name__}: {e})"
    return True, f"triton {getattr(triton, '__version__', '?')}"


def triton_available() -> bool:
    """True if triton and ``fastpeft.kernels`` import (does not say whether a GPU exists)."""
    return _triton_probe()[0]


def _cuda_ext_probe() -> tuple[bool, str]:
    # fastpeft._cuda loads the extension (once, and registers its fake kernels); this only caches its answer.
    return _cached("cuda", lambda: (_cuda_available(), _cuda_unavailable_reason() or "fastpeft._C loaded"))


def cuda_ext_available() -> bool:
    """True if the compiled extension ``fastpeft._C`` loaded (its ops are then in ``torch.ops.fastpeft``)."""
    return _cuda_ext_probe()[0]


def _cuda_ext_has(op: str) -> bool:
    """Whether the loaded extension registered both halves of `op` ("lora" -> ``lora_fwd_cuda`` and
    ``lora_bwd_cuda``): the names the op registry looks the implementations up by."""
    if not cuda_ext_available():
        return False
    return all(hasattr(torch.ops.fastpeft, f"{op}_{half}_cuda") for half in ("fwd", "bwd"))


def _env_choice() -> str:
    choice = os.environ.get("FASTPEFT_BACKEND", "auto").strip().lower() or "auto"
    if choice not in _VALID_CHOICES:
        raise ValueError(f"FASTPEFT_BACKEND={choice!r} is not one of {_VALID_CHOICES}")
    return choice


def _why_not(backend: str, op: str, device: torch.device) -> Optional[str]:
    """None if `backend` is installed and can run `op` on tensors on `device`, else the reason it cannot."""
    backend = backend.partition(":")[0]
    if backend == "torch":
        return None
    if backend == "triton":
        ok, reason = _triton_probe()
        if not ok:
            return reason
        if device.type == "cuda" or (device.type == "cpu" and _registry.interpret_mode()):
            return None
        return f"triton runs on CUDA tensors (or CPU tensors with TRITON_INTERPRET=1), got device {device}"
    if backend == "cuda":
        ok, reason = _cuda_ext_probe()
        if not ok:
            return reason
        if device.type != "cuda":
            return f"the cuda backend needs CUDA tensors, got device {device}"
        if not _cuda_ext_has(op):
            return f"fastpeft._C has no kernel for op {op!r}"
        return None
    raise ValueError(f"backend must be one of {_VALID_CHOICES}, got {backend!r}")


def _refusal(choice: str, op: str, x: torch.Tensor, dispatch_args: tuple) -> Optional[str]:
    """Why `choice` cannot run this call (not installed, or its registry predicate refuses the arguments)."""
    return _why_not(choice, op, x.device) or _registry.supports(op, choice, x, dispatch_args)


def _with_variant(choice: str, op: str, x: torch.Tensor, dispatch_args: tuple) -> str:
    """`choice` with the variant it runs: the cuda LoRA forward's is decided per shape (the measured entry's, checked
    by `_measured_choice`, arrives with its variant already); every other backend's default is its launcher's."""
    if choice != "cuda" or op != "lora" or not dispatch_args:
        return choice
    x2, weight = dispatch_args[0], dispatch_args[1]
    decode = x2.shape[0] <= _registry.DECODE_MAX_ROWS and _registry.decode_layout_ok(weight)
    return "cuda:decode" if decode else "cuda:accum"


def _candidates(op: str, x: torch.Tensor, dispatch_args: tuple) -> tuple:
    """Every usable fused ``"<backend>[:<variant>]"`` for this call (what the dispatch autotuner times)."""
    names = [f"{b}:{v}" if v else b for b in ("triton", "cuda") for v in (_registry.VARIANTS[b][op] or ("",))]
    return tuple(n for n in names if _refusal(n, op, x, dispatch_args) is None)


def _measured_choice(op: str, device: torch.device, dispatch_args: tuple) -> Optional[str]:
    """The backend the dispatch table measured fastest for this (GPU, dtype, shape bucket), if any and usable."""
    if not dispatch_args or torch.compiler.is_compiling():
        # Under torch.compile the default order is traced; the table lookup reads device properties.
        return None
    x = dispatch_args[0]
    choice = _dispatch_choose(op, *dispatch_args, candidates=lambda: _candidates(op, x, dispatch_args))
    if choice is not None and _why_not(choice, op, device) is None \
            and _registry.supports(op, choice, x, dispatch_args) is None:
        return choice
    return None


def _auto_choice(op: str, device: torch.device, dispatch_args: tuple = ()) -> str:
    if device.type != "cuda":
        return "torch"
    # Per shape, the measured table decides; without a measurement the triton backend's cublas variant (the frozen
    # layer's cuBLAS GEMMs plus skinny kernels: no slower than the layer by construction), then the extension.
    measured = _measured_choice(op, device, dispatch_args)
    if measured is not None:
        return measured
    for candidate in ("triton", "cuda"):
        if _why_not(candidate, op, device) is None and \
                (not dispatch_args or _registry.supports(op, candidate, dispatch_args[0], dispatch_args) is None):
            return candidate
    return "torch"


# Auto's answers: (op, device, dtype, shapes of the dispatch args, dispatch-table version) -> backend.
_AUTO_CACHE: dict = {}


def _args_key(dispatch_args: tuple) -> tuple:
    # torch.Size is a hashable tuple: no conversion needed
    return tuple((a.shape, a.dtype, a.stride()) if isinstance(a, torch.Tensor) else a for a in dispatch_args)


def _auto_final(op: str, x: torch.Tensor, dispatch_args: tuple) -> str:
    """Auto's whole answer for this call: the backend, its variant, and torch where the registry refuses the
    operands (e.g. float64: only the torch implementation takes them)."""
    chosen = _with_variant(_auto_choice(op, x.device, dispatch_args), op, x, dispatch_args)
    if chosen != "torch" and _registry.supports(op, chosen, x, dispatch_args) is not None:
        chosen = "torch"
    return chosen


def _cached_auto_choice(op: str, x: torch.Tensor, dispatch_args: tuple) -> str:
    if x.device.type != "cuda":
        return "torch"
    if torch.compiler.is_compiling():
        return _auto_final(op, x, dispatch_args)
    # the whole answer is cached: select_backend runs on every layer call, where the host time decides small layers
    key = (op, x.device, x.dtype, _args_key(dispatch_args), _dispatch_version())
    chosen = _AUTO_CACHE.get(key)
    if chosen is None:
        chosen = _auto_final(op, x, dispatch_args)
        if len(_AUTO_CACHE) > 4096:  # many distinct shapes (e.g. variable sequence lengths): start over
            _AUTO_CACHE.clear()
        _AUTO_CACHE[key] = chosen
    return chosen


def select_backend(op: str, x: torch.Tensor, backend: Optional[str] = None, dispatch_args: tuple = ()) -> str:
    """Return the backend (``"<name>"`` or ``"<name>:<variant>"``) that runs `op` for input tensor `x`.

    Args:
        op: op name, ``"lora"`` or ``"ia3"``.
        x: the op's main input; its device and dtype decide what can run.
        backend: ``None``/``"auto"`` or one of ``"torch"``, ``"triton"``, ``"cuda"``, or a variant
            ``"triton:cublas"`` (= ``"triton"``) / ``"triton:fused"`` / ``"cuda:decode"`` / ``"cuda:accum"`` /
            ``"cuda:kaug"``.  ``None`` defers to the ``FASTPEFT_BACKEND`` environment variable (default ``auto``).
        dispatch_args: the op's forward inputs with x flattened to 2-D (lora: x2, weight, bias, lora_A, lora_E,
            lora_B; ia3: x2, weight, bias, ia3_l, feedforward): the registry predicates check them, and auto looks
            their shape up in the measured table.  Without them only x is checked.
    Raises:
        ValueError: `backend` is not a known name.
        RuntimeError: an explicitly requested backend cannot run these arguments here (the message says why).
    """
    if backend is not None and not isinstance(backend, str):
        raise TypeError(f"backend must be a str or None, got {type(backend).__name__}")
    choice = (backend or _env_choice()).lower()
    if choice not in _VALID_CHOICES:
        raise ValueError(f"backend must be one of {_VALID_CHOICES}, got {backend!r}")
    if choice == "auto":
        chosen = _cached_auto_choice(op, x, dispatch_args)
        if not torch.compiler.is_compiling():
            logger.debug("fastpeft: op %s on %s -> backend %s", op, x.device, chosen)
        return chosen
    reason = _refusal(choice, op, x, dispatch_args)
    if reason is not None:
        raise RuntimeError(f"fastpeft backend {choice!r} is unavailable for op {op!r}: {reason}")
    return _with_variant(choice, op, x, dispatch_args)


def backend_info() -> dict:
    """Versions and availability of every backend, with the reason when one is unavailable.

    Safe to call without a GPU; does not initialise CUDA unless a CUDA device is already in use.
    """
    try:
        triton_version = importlib.import_module("triton").__version__
    except Exception:
        triton_version = None
    tri_ok, tri_reason = _triton_probe()
    ext_ok, ext_reason = _cuda_ext_probe()
    return {
        "fastpeft": __version__,
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "triton": triton_version,
        "triton_interpret": _registry.interpret_mode(),
        # Whether the fused backends have a device to run on: the extension can load with no GPU present.
        "cuda_devices": torch.cuda.device_count() if torch.version.cuda is not None else 0,
        "backends": {
            "torch": {"available": True, "reason": "always available (reference)"},
            "triton": {"available": tri_ok, "reason": tri_reason},
            "cuda": {"available": ext_ok, "reason": ext_reason},
        },
        "FASTPEFT_BACKEND": os.environ.get("FASTPEFT_BACKEND", "auto"),
        "dispatch": _dispatch_describe(),
    }
