"""The measured dispatch table: per shape, which backend and variant was fastest.  It answers lookups;
``fastpeft._backend.select_backend`` decides (this module chooses nothing on its own).

A table maps ``(GPU name, dtype, op, shape bucket)`` to an entry: the backend (``"cuda"``, ``"triton"`` or
``"torch"``) and its variant: for triton ``"cublas"`` (the default path: cuBLAS GEMMs + skinny Triton kernels) or
``"fused"`` (the Triton GEMM with the adapter in its epilogue); for the LoRA forward on the cuda backend
``"decode"``, ``"accum"`` or ``"kaug"`` (see ``fastpeft._cuda``).  A non-default variant becomes the default for a
shape only through such an entry.  Every entry carries the reason it exists (measured timings, or where it was
loaded from).

Sources of entries, in order of precedence:
  1. measured in this process by the autotuner (opt-in: ``FASTPEFT_AUTOTUNE=1`` or ``set_autotune(True)``): the
     first call of an op on a new (GPU, dtype, bucket) times every usable backend on the real tensors (CUDA events,
     median of a few runs, forward + backward) and caches the faster one;
  2. a JSON table named by ``FASTPEFT_DISPATCH_TABLE`` (written by ``export_table`` on a GPU machine);
  3. the table shipped with the package, the data file ``fastpeft/dispatch_table.json`` (written by
     ``benchmarks/gpu_check.sh`` on a GPU; what it holds is said in docs/STATUS.md).  Without an entry for a shape
     ``choose`` returns None and ``fastpeft._backend`` keeps its default order.

Nothing here touches CUDA at import; ``describe()`` (shown by ``fastpeft.backend_info()``) reads the GPU name only
when CUDA is already initialised.
"""

from __future__ import annotations

import json
import logging
import os
import statistics
import threading
from typing import Callable, Optional

import torch

from .ops import _registry

logger = logging.getLogger(__package__)

__all__ = ["committed", "bucket", "choose", "describe", "record", "clear", "set_autotune",
           "autotune_enabled", "export_table", "load_table", "table_key", "version", "VARIANTS"]

# Variants an entry may name, per backend (those of any op).
VARIANTS = {"torch": (), **{b: tuple(dict.fromkeys(v for vs in per_op.values() for v in vs))
                            for b, per_op in _registry.VARIANTS.items()}}

# The shipped table: "gpu|dtype|op|bucket" -> {"backend": ..., "variant": ..., "reason": ..., "timings_ms": {...}}.
_SHIPPED = os.path.join(os.path.dirname(os.path.abspath(__file__)), "dispatch_table.json")
_committed: dict = {}

_M_EDGES = (1, 16, 256, 2048, 8192)


def _read_table(path: str) -> dict:
    """The entries of a JSON table file, validated (``ValueError`` naming the file and the bad entry)."""
    with open(path) as f:
        data = json.load(f)
    if not isinstance(data, dict):
        raise ValueError(f"{path}: a dispatch table must be a JSON object, got {type(data).__name__}")
    out = {}
    for key, entry in data.items():
        if not isinstance(entry, dict) or entry.get("backend") not in VARIANTS \
                or entry.get("variant") not in (None, *VARIANTS[entry["backend"]]):
            raise ValueError(f"{path}: bad entry {key!r}: {entry!r}")
        e = dict(entry)
        e.setdefault("variant", None)
        e.setdefault("timings_ms", {})
        out[key] = e
    return out


def committed() -> dict:
    """The table shipped with the package (``fastpeft/dispatch_table.json``), read once."""
    if "table" not in _committed:
        _committed["table"] = _read_table(_SHIPPED)
    return _committed["table"]
_lock = threading.Lock()
_table: dict = {}
_state = {"autotune": None, "env_loaded": False, "version": 0}


def version() -> int:
    """A counter that changes whenever the table may answer differently (``fastpeft._backend`` caches by it)."""
    return _state["version"]


def _pow2_ceil(v: int) -> int:
    p = 1
    while p < v:
        p <<= 1
    return p


def bucket(m: int, n: int, k: int, r: Optional[int] = None) -> str:
    """Shape bucket of a linear problem: M by fixed edges (1, 16, 256, 2048, 8192), N and K by powers of two.

    >>> bucket(1, 4096, 4096)
    'm<=1,n4096,k4096'
    """
    mb = next((f"m<={e}" for e in _M_EDGES if m <= e), f"m>{_M_EDGES[-1]}")
    out = f"{mb},n{_pow2_ceil(max(n, 1))},k{_pow2_ceil(max(k, 1))}"
    if r is not None:
        out += f",r{_pow2_ceil(max(r, 1))}"
    return out


def _gpu_name(device: torch.device) -> Optional[str]:
    if device.type != "cuda" or not torch.cuda.is_available():
        return None
    try:
        return torch.cuda.get_device_name(device)
    except Exception:  # a broken driver must not break dispatch
        return None


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def table_key(gpu: str, dtype: torch.dtype | str, op: str, bkt: str) -> str:
    """The string key of a table entry (JSON-friendly): ``"gpu|dtype|op|bucket"``."""
    d = dtype if isinstance(dtype, str) else _dtype_name(dtype)
    return f"{gpu}|{d}|{op}|{bkt}"


def set_autotune(enabled: Optional[bool]) -> None:
    """Turn the autotune-on-first-use on or off (None: follow ``FASTPEFT_AUTOTUNE``)."""
    _state["autotune"] = enabled


def autotune_enabled() -> bool:
    if _state["autotune"] is not None:
        return bool(_state["autotune"])
    return os.environ.get("FASTPEFT_AUTOTUNE", "0").strip().lower() not in ("", "0", "false", "no")


def record(gpu: str, dtype: torch.dtype | str, op: str, bkt: str, backend: str, reason: str,
           variant: Optional[str] = None, timings_ms: Optional[dict] = None) -> None:
    """Add or replace one entry of the in-process table."""
    if backend not in VARIANTS:
        raise ValueError(f"backend must be 'cuda', 'triton' or 'torch', got {backend!r}")
    if variant is not None and variant not in VARIANTS[backend]:
        raise ValueError(f"variant of backend {backend!r} must be one of {VARIANTS[backend]} or None, got {variant!r}")
    with _lock:
        _table[table_key(gpu, dtype, op, bkt)] = {"backend": backend, "variant": variant, "reason": reason,
                                                  "timings_ms": dict(timings_ms or {})}
        _state["version"] += 1


def clear() -> None:
    """Forget every in-process entry (committed and file tables are re-read on next use)."""
    with _lock:
        _table.clear()
        _state["env_loaded"] = False
        _state["version"] += 1


def load_table(path: str) -> int:
    """Merge a JSON table written by ``export_table`` into the in-process table; returns the number of entries."""
    data = _read_table(path)
    n = 0
    with _lock:
        for key, e in data.items():
            e["reason"] = f"{e.get('reason', 'measured')} (loaded from {os.path.basename(path)})"
            _table.setdefault(key, e)
            n += 1
        _state["version"] += 1
    return n


def export_table(path: Optional[str] = None) -> dict:
    """The in-process table as a JSON-able dict; written to `path` when given."""
    with _lock:
        data = {k: dict(v) for k, v in sorted(_table.items())}
    if path is not None:
        with open(path, "w") as f:
            json.dump(data, f, indent=1, sort_keys=True)
    return data


def _lookup(key: str) -> Optional[dict]:
    if not _state["env_loaded"]:
        _state["env_loaded"] = True
        path = os.environ.get("FASTPEFT_DISPATCH_TABLE")
        if path:
            try:
                load_table(path)
            except (OSError, ValueError) as e:
                logger.warning("fastpeft: FASTPEFT_DISPATCH_TABLE=%s not loaded: %s", path, e)
    with _lock:
        e = _table.get(key)
    if e is None and key in committed():
        e = dict(committed()[key])
        e["reason"] = f"{e.get('reason', 'measured')} (shipped table)"
    return e


def _can_measure(x: torch.Tensor) -> bool:
    if not x.is_cuda or not autotune_enabled():
        return False
    try:
        if torch.compiler.is_compiling():
            return False
    except AttributeError:
        pass
    if type(x) is not torch.Tensor:  # FakeTensor / functional tensors under tracing
        return False
    if torch.cuda.is_current_stream_capturing():
        return False
    return True


def _time_ms(fn: Callable[[], object], reps: int = 5, warmup: int = 2) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


# ---------------------------------------------------------------------------------------------------------------
# Measuring one op on the real tensors
# ---------------------------------------------------------------------------------------------------------------


def _lora_runner(backend: str, args: tuple) -> Callable[[], object]:
    x, weight, bias, lora_A, lora_E, lora_B = args
    impl = _registry.impl
    fwd_impl, bwd_impl = impl("lora_fwd", backend), impl("lora_bwd", backend)
    dy = torch.randn(x.shape[0], weight.shape[0], device=x.device, dtype=x.dtype)

    def step():
        _, s = fwd_impl(x, weight, bias, lora_A, lora_E, lora_B, 2.0, 0.0, 0)
        return bwd_impl(dy, x, weight, lora_A, lora_E, lora_B, s, 2.0, 0.0, 0, True, bias is not None)
    return step


def _ia3_runner(backend: str, args: tuple) -> Callable[[], object]:
    x, weight, bias, ia3_l, feedforward = args
    impl = _registry.impl
    from .ops.ia3 import _bwd_call, _wants_output
    fwd_impl = impl("ia3_fwd", backend)
    dy = torch.randn(x.shape[0], weight.shape[0], device=x.device, dtype=x.dtype)

    def step():
        y, saved = fwd_impl(x, weight, bias, ia3_l, feedforward)
        if _wants_output(feedforward, saved):
            return _bwd_call(dy, x, weight, ia3_l, saved, feedforward, True, bias is not None, backend, y, bias)
        xx = x if feedforward else x.new_empty(0)
        return _bwd_call(dy, xx, weight, ia3_l, saved, feedforward, True, bias is not None, backend)
    return step


def _autotune(op: str, key: str, gpu: str, x: torch.Tensor, args: tuple, candidates: tuple) -> Optional[dict]:
    """Time every candidate (``"<backend>:<variant>"`` names the caller found usable) and record the fastest."""
    if len(candidates) < 2:
        return None  # nothing to choose between
    runners = {c: (_lora_runner(c, args) if op == "lora" else _ia3_runner(c, args)) for c in candidates}
    timings = {}
    for name, fn in runners.items():
        try:
            timings[name] = round(_time_ms(fn), 5)
        except Exception as e:  # a candidate that fails here is simply not chosen
            logger.warning("fastpeft: autotune of %s for %s failed: %s", name, key, e)
    if not timings:
        return None
    best = min(timings, key=timings.get)
    backend, _, variant = best.partition(":")
    reason = "autotuned fwd+bwd: " + ", ".join(f"{k} {v:.4f} ms" for k, v in sorted(timings.items()))
    record(gpu, x.dtype, op, key.split("|")[-1], backend, reason, variant or None, timings)
    logger.info("fastpeft: dispatch %s -> %s (%s)", key, best, reason)
    return _lookup(key)


def choose(op: str, x: torch.Tensor, weight: Optional[torch.Tensor] = None, *args,
           candidates: Optional[Callable[[], tuple]] = None) -> Optional[str]:
    """The measured backend for `op` on this shape, or None when nothing has been measured for it.

    Args:
        op: ``"lora"`` or ``"ia3"``.
        x: the op's 2-D input (M, K).  weight: the base weight (N, K); without it the bucket uses N = K.
        *args: the op's remaining forward inputs exactly as the forward takes them (lora: bias, lora_A, lora_E,
            lora_B; ia3: bias, ia3_l, feedforward).
        candidates: for autotuning, a callable giving the ``"<backend>:<variant>"`` names that can run these
            arguments (``fastpeft._backend`` passes it).  Without it (or the args) no autotune runs.
    Returns:
        ``"<backend>"`` or ``"<backend>:<variant>"`` as the entry names it, or None.  Never measures on CPU
        tensors, while compiling, or while a CUDA graph is being captured.
    """
    gpu = _gpu_name(x.device)
    if gpu is None or x.dim() != 2:
        return None
    m, k = x.shape
    n = weight.shape[0] if weight is not None else k
    r = args[1].shape[0] if (op == "lora" and len(args) >= 2) else None
    key = table_key(gpu, x.dtype, op, bucket(m, n, k, r))
    e = _lookup(key)
    if e is None and weight is not None and args and candidates is not None and _can_measure(x):
        e = _autotune(op, key, gpu, x, (x, weight) + tuple(args), candidates())
    if e is None:
        return None
    return f"{e['backend']}:{e['variant']}" if e.get("variant") else e["backend"]


def describe() -> dict:
    """What dispatch knows and why (shown by ``fastpeft.backend_info()``); never initialises CUDA."""
    gpu = None
    if torch.cuda.is_initialized():
        try:
            gpu = torch.cuda.get_device_name()
        except Exception:
            gpu = None
    with _lock:
        entries = {k: dict(v) for k, v in sorted(_table.items())}
    return {
        "gpu": gpu,
        "autotune": autotune_enabled(),
        "table_file": os.environ.get("FASTPEFT_DISPATCH_TABLE"),
        "committed_entries": len(committed()),
        "entries": entries,
        "default": ("no measurement for a shape -> triton (variant cublas: the frozen layer's cuBLAS GEMMs + "
                    "skinny Triton kernels) > cuda extension > torch; the fused Triton GEMM only by a measured "
                    "entry or an explicit backend='triton:fused'"),
        "note": ("the shipped table (fastpeft/dispatch_table.json) is empty" if not committed()
                 else f"{len(committed())} shipped measurements"),
    }
