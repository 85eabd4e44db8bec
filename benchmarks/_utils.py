"""Timing, memory, error and environment helpers shared by every benchmark (rules in benchmarks/README.md).

* ``bench(fn, device)`` -> (p50, p20, p80) ms: ``triton.testing.do_bench`` (median and quantiles; it warms up and
  flushes the L2 between repetitions) on CUDA; ``torch.utils.benchmark.Timer.blocked_autorange`` on CPU.
* ``bench_interleaved({name: fn}, device)`` -> {name: Timing}: the same statistics, but the functions are timed in
  alternating rounds (base, fastpeft, PEFT, base, ...), so a burst of load from another process hits all of them
  alike; ``Timing.spread`` = (p80 - p20) / p50 says how much the machine disturbed the measurement.
* ``peak_mem_mib(fn, device)``: peak CUDA memory of one call above what was allocated before; on CPU the bytes of
  distinct non-parameter tensors autograd saves for backward (a proxy, labelled as such in the ``mem_kind`` column).
* ``Rotating``: a ring of independent random inputs totalling more than twice the L2 (60 MB on H100/H200), so a
  timed call never finds its input in cache.
"""

from __future__ import annotations

import functools
import os
import platform
import subprocess
import time
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch

L2_BYTES = 60 * 2 ** 20  # H100/H200 L2 (50 MB, rounded up); rotate through more than twice this.

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def has_cuda() -> bool:
    return torch.cuda.is_available()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bench(fn: Callable[[], object], device: torch.device, quick: bool = False) -> tuple[float, float, float]:
    """Median, 20th and 80th percentile of ``fn()``'s time in ms."""
    if device.type == "cuda":
        import triton.testing
        warmup, rep = (10, 30) if quick else (25, 100)
        p50, p20, p80 = triton.testing.do_bench(fn, warmup=warmup, rep=rep, quantiles=[0.5, 0.2, 0.8])
        return float(p50), float(p20), float(p80)
    from torch.utils import benchmark
    fn()  # warm-up (first-call allocations, lazy init)
    timer = benchmark.Timer(stmt="fn()", globals={"fn": fn}, num_threads=torch.get_num_threads())
    m = timer.blocked_autorange(min_run_time=0.05 if quick else 0.5)
    times = sorted(m.times)
    return _quantile(times, 0.5) * 1e3, _quantile(times, 0.2) * 1e3, _quantile(times, 0.8) * 1e3


@dataclass
class Timing:
    """Statistics of the per-call times of one function, in ms."""

    p50: float
    p20: float
    p80: float
    n: int  # samples (rounds x repetitions)

    @property
    def spread(self) -> float:
        """(p80 - p20) / p50: the relative width of the middle 60% of the samples (0 on a quiet machine)."""
        return (self.p80 - self.p20) / self.p50 if self.p50 > 0 else float("inf")

    @classmethod
    def from_samples(cls, samples_ms: Sequence[float]) -> "Timing":
        s = sorted(samples_ms)
        return cls(_quantile(s, 0.5), _quantile(s, 0.2), _quantile(s, 0.8), len(s))


def bench_interleaved(fns: dict, device: torch.device, quick: bool = False, rounds: Optional[int] = None,
                      block_s: Optional[float] = None) -> dict:
    """Time every function of ``fns`` ({name: fn}) in alternating rounds; returns {name: Timing} (per call, ms).

    Each round times one block of calls of every function, in an order rotated by one each round (no function is
    always first after another's cache footprint).  CPU: a block is as many calls as fill ``block_s`` (after one
    warm-up call); CUDA: a block is one ``triton.testing.do_bench`` (L2 flushed between repetitions), all its
    samples kept.  An exception from a function propagates (the caller drops that provider and retries).
    """
    names = list(fns)
    if not names:
        return {}
    cuda = device.type == "cuda"
    rounds = rounds or ((3 if quick else 5) if cuda else (8 if quick else 30))
    samples: dict = {n: [] for n in names}
    if cuda:
        import triton.testing
        warmup, rep = (5, 10) if quick else (10, 25)
        for r in range(rounds):
            for n in names[r % len(names):] + names[:r % len(names)]:
                out = triton.testing.do_bench(fns[n], warmup=warmup, rep=rep, return_mode="all")
                samples[n] += [float(t) for t in (out if isinstance(out, (list, tuple)) else [out])]
        return {n: Timing.from_samples(samples[n]) for n in names}
    block_s = block_s if block_s is not None else (0.002 if quick else 0.02)
    calls = {}
    for n in names:  # warm-up, and how many calls fill a block
        fns[n]()
        t0 = time.perf_counter()
        fns[n]()
        calls[n] = max(1, int(block_s / max(time.perf_counter() - t0, 1e-7)))
    for r in range(rounds):
        for n in names[r % len(names):] + names[:r % len(names)]:
            fn, k = fns[n], calls[n]
            t0 = time.perf_counter()
            for _ in range(k):
                fn()
            samples[n].append((time.perf_counter() - t0) * 1e3 / k)
    return {n: Timing.from_samples(samples[n]) for n in names}


def _quantile(sorted_vals: Sequence[float], q: float) -> float:
    if len(sorted_vals) == 1:
        return sorted_vals[0]
    pos = q * (len(sorted_vals) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(sorted_vals) - 1)
    return sorted_vals[lo] + (sorted_vals[hi] - sorted_vals[lo]) * (pos - lo)


class _SavedBytes:
    def __init__(self, exclude: set):
        self.exclude, self.seen, self.bytes = exclude, set(), 0

    def pack(self, t):
        st = t.untyped_storage()
        ptr = st.data_ptr()
        if ptr not in self.exclude and ptr not in self.seen:
            self.seen.add(ptr)
            self.bytes += st.nbytes()
        return t


def peak_mem_mib(fn: Callable[[], object], device: torch.device,
                 exclude: Sequence[torch.Tensor] = ()) -> tuple[float, str]:
    """(MiB, kind) for one call of ``fn`` (a fwd+bwd).  ``exclude``: tensors not counted on CPU (parameters,
    inputs) - on CUDA they are already allocated before the call and so not counted either."""
    if device.type == "cuda":
        sync(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        fn()
        sync(device)
        return (torch.cuda.max_memory_allocated(device) - before) / 2 ** 20, "cuda_peak"
    saved = _SavedBytes({t.untyped_storage().data_ptr() for t in exclude})
    with torch.autograd.graph.saved_tensors_hooks(saved.pack, lambda t: t):
        fn()
    return saved.bytes / 2 ** 20, "cpu_saved_for_backward"


class Rotating:
    """``n`` independent copies of a set of tensors (made by ``make()``), enough to exceed 2x L2 on CUDA; ``next()``
    returns the following copy.  On CPU a single copy (there is no L2 to defeat at these sizes; keeps memory low)."""

    def __init__(self, make: Callable[[], tuple], device: torch.device, bytes_per_copy: int):
        n = 1
        if device.type == "cuda":
            n = max(2, min(64, -(-2 * L2_BYTES // max(1, bytes_per_copy))))
        self.copies = [make() for _ in range(n)]
        self.i = 0

    def next(self) -> tuple:
        c = self.copies[self.i]
        self.i = (self.i + 1) % len(self.copies)
        return c


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """||out - ref|| / ||ref|| in fp64 (NaN if out has a non-finite value: NaN never passes)."""
    out, ref = out.double(), ref.double()
    if not torch.isfinite(out).all():
        return float("nan")
    den = ref.norm().item()
    return (out - ref).norm().item() / den if den > 0 else (out - ref).norm().item()


@functools.lru_cache(maxsize=None)
def git_commit() -> str:
    try:
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        sha = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=root, capture_output=True, text=True,
                             timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return (sha + ("-dirty" if dirty else "")) if sha else "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU {platform.processor() or platform.machine()} ({torch.get_num_threads()} threads)"


def env_info(device: torch.device) -> dict:
    try:
        import triton
        triton_version = triton.__version__
    except Exception:
        triton_version = "none"
    import fastpeft
    return {"gpu": device_name(device), "torch": torch.__version__, "triton": triton_version,
            "fastpeft": fastpeft.__version__, "git": git_commit()}


def peft_or_none():
    try:
        import peft
    except ImportError:
        return None
    return peft


def available_fastpeft_backends(device: torch.device) -> list[str]:
    """fastpeft backends that can run on ``device`` here (torch always; triton/cuda on CUDA when present)."""
    from fastpeft import _backend
    out = ["torch"]
    if device.type == "cuda":
        for b in ("triton", "cuda"):
            if _backend._why_not(b, "lora", device) is None:
                out.append(b)
    return out


def fmt(v: Optional[float], spec: str = ".3f") -> str:
    if v is None or v != v:
        return ""
    return format(v, spec)
