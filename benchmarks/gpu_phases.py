"""The measuring phases of ``benchmarks/gpu_check.sh``: ``python -m benchmarks.gpu_phases PHASE --out DIR``.

Every result row is appended to ``DIR/<phase>.csv`` and flushed to disk the moment it is measured, so a phase
killed by its time limit leaves everything it finished.  Exit status: 0 done, 3 skipped (no GPU), 1 failed.

Phases (in the order gpu_check.sh runs them, most decisive first):
  gemm         a plain Triton GEMM (fastpeft.kernels._gemm.gemm, first fitting configuration, no autotuning)
               against torch.mm at M=2048/8192 on q/up/down: whether any Triton-GEMM path can be the default.
  launch       what one launch costs (host µs eager, GPU µs per kernel in a CUDA graph): a trivial Triton kernel
               launched raw (Triton's own host cost), a tiny fastpeft Triton kernel, a tiny torch op, the frozen
               q_proj forward at M=16 - the cost model's fitted gap, measured.
  host         host µs per layer call (``benchmarks.bench_host`` with real launches: frozen, default, HF PEFT at
               q_proj M=2048/16), a cProfile table of a q_proj 2048 LoRA step, and its synchronising CUDA calls.
  correctness  every available backend (torch, triton, triton:fused, cuda) at the production shapes against an fp32
               reference: LoRA p=0 / p=0.1, AdaLoRA, IA3, DoRA; outputs and every gradient; the bound is 2x (3x for
               gradients) the torch backend's own bf16 error.
  ratios       layer fwd+bwd time of the default path (backend auto), the fused path (triton:fused), the
               extension (cuda, when it built; not DoRA) and the torch backend against the frozen layer and HF
               PEFT's layer, side by side,
               M=1/16/2048/8192, LoRA p=0/0.1, IA3, AdaLoRA, DoRA;
               IA3 also with the other folding of l (``fold-flipped``: W where the default scales the activations,
               and back - kernels/ia3.py ``scales_activations`` decides by bytes; this row checks that by time);
               the faster fastpeft backend per shape bucket goes to OUT/dispatch_table.json (fastpeft._dispatch's
               format);
               DoRA (fastpeft's dora_linear, row norm included, vs HF PEFT's DoRA layer) last in each bucket.
  decode       the LoRA forward (no grad, p=0) at M=1/16, eager and replayed as a CUDA graph, against the frozen
               layer and HF PEFT's: the decode target (<= 1.3x under a graph) and that the paths are capturable;
               also ``single-launch``, the shrink-expand launch the default takes above TWO_LAUNCH_MAX_ROWS (each
               program walks all of K: serial latency at decode), against the default's split-K shrink + expand -
               the comparison that sets TWO_LAUNCH_MAX_ROWS (the first run: 3.1-3.8x vs 1.2-1.44x the frozen layer).
  profile      a torch.profiler kernel table of one fwd+bwd per path (q_proj and down_proj, M=8192, LoRA p=0 and
               p=0.1: the dropout mask's cost per kernel).
  tiles        the skinny LoRA kernels (forward launch, dY pass, x-and-dX pass) at q_proj M=8192 under each candidate
               tile and program count: µs and fraction of the copy ceiling (they reached 0.49-0.80 on the first run).
  e2e          end-to-end training step time and peak memory (benchmarks/bench_e2e.py), one provider at a time.
"""

from __future__ import annotations

import argparse
import csv
import math
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.nn.functional as F

SKIPPED = 3
SHAPES = {"q_proj": (4096, 4096), "up_proj": (4096, 14336), "down_proj": (14336, 4096)}
RANK, ALPHA = 16, 32
IA3_FEEDFORWARD = {"q_proj": False, "up_proj": False, "down_proj": True}
METHODS = ("lora", "lora_p0.1", "ia3", "adalora", "dora")
# The fused path's backend name: the Triton GEMM with the adapter in its epilogue ("triton" alone is the default,
# cuBLAS-anchored variant).
FUSED = "triton:fused"


class Rows:
    """Append-only CSV: the header once, then each row written, flushed and fsynced as it comes."""

    def __init__(self, path: Path, columns: list):
        self.path, self.columns = Path(path), list(columns)
        new = not self.path.exists() or self.path.stat().st_size == 0
        self._f = open(self.path, "a", newline="")
        self._w = csv.DictWriter(self._f, fieldnames=self.columns + ["gpu", "commit", "time"],
                                 extrasaction="ignore")
        if new:
            self._w.writeheader()
            self._sync()
        self._env = {"gpu": _gpu_name(), "commit": _commit()}

    def _sync(self) -> None:
        self._f.flush()
        os.fsync(self._f.fileno())

    def add(self, **row) -> None:
        row.update(self._env, time=time.strftime("%H:%M:%S", time.gmtime()))
        self._w.writerow({k: _fmt(v) for k, v in row.items()})
        self._sync()
        print(", ".join(f"{k}={_fmt(row[k])}" for k in self.columns if k in row), flush=True)

    def close(self) -> None:
        self._f.close()


def _fmt(v):
    return f"{v:.5g}" if isinstance(v, float) else v


def _gpu_name() -> str:
    return torch.cuda.get_device_name() if torch.cuda.is_available() else "none"


def _commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=Path(__file__).resolve().parent, timeout=10).stdout.strip()
    except Exception:  # noqa: BLE001 - not a git checkout
        return "?"


def bench_ms(fn: Callable[[], object]) -> float:
    """Median ms of ``fn()`` (triton.testing.do_bench: warm-up, L2 flushed between repetitions)."""
    import triton.testing
    return float(triton.testing.do_bench(fn, warmup=5, rep=25, return_mode="median"))


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.double(), ref.double()
    if not torch.isfinite(out).all():
        return math.nan
    return ((out - ref).norm() / ref.norm().clamp_min(1e-30)).item()


def _method_parts(method: str) -> tuple:
    return ("lora", float(method[len("lora_p"):])) if method.startswith("lora_p") else (method, 0.0)


# ---------------------------------------------------------------------------------------------------------------


def phase_gemm(out: Path, deadline: float) -> None:
    os.environ["FASTPEFT_TRITON_AUTOTUNE"] = "0"
    from fastpeft.kernels._gemm import gemm
    from fastpeft.kernels._tl import base_precision
    rows = Rows(out / "gemm.csv", ["layer", "M", "K", "N", "torch_mm_ms", "triton_ms", "triton_x_mm",
                                   "torch_tflops", "triton_tflops", "triton_err", "note"])
    dt = torch.bfloat16
    for m in (8192, 2048):
        for layer, (k, n) in SHAPES.items():
            if time.time() > deadline:
                return
            x = torch.randn(m, k, device="cuda", dtype=dt)
            w = torch.randn(n, k, device="cuda", dtype=dt) / math.sqrt(k)
            flops = 2 * m * k * n
            t_mm = bench_ms(lambda: torch.mm(x, w.t()))
            row = dict(layer=layer, M=m, K=k, N=n, torch_mm_ms=t_mm, torch_tflops=flops / t_mm / 1e9)
            try:
                y = torch.empty(m, n, device="cuda", dtype=dt)
                gemm(x, w.t(), y, prec=base_precision(dt))
                err = rel_err(y, x.float() @ w.float().t())
                t_tr = bench_ms(lambda: gemm(x, w.t(), y, prec=base_precision(dt)))
                row.update(triton_ms=t_tr, triton_x_mm=t_tr / t_mm, triton_tflops=flops / t_tr / 1e9, triton_err=err)
            except Exception as e:  # noqa: BLE001 - the row says what failed
                row.update(note=f"triton failed: {type(e).__name__}: {e}"[:300])
            rows.add(**row)


def _inputs(layer: str, m: int, method: str, dev="cuda", seed=0):
    """x (bf16), W (bf16, frozen), adapters (fp32, PEFT's default) - fresh random data."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    k, n = SHAPES[layer]
    kind, _ = _method_parts(method)

    def rnd(*shape, scale=1.0, dtype=torch.float32):
        return (torch.randn(*shape, generator=g) * scale).to(device=dev, dtype=dtype)
    t = dict(x=rnd(m, k, dtype=torch.bfloat16), w=rnd(n, k, scale=k ** -0.5, dtype=torch.bfloat16),
             gy=rnd(m, n, dtype=torch.bfloat16))
    if kind == "ia3":
        t["l"] = 1 + 0.1 * rnd(k if IA3_FEEDFORWARD[layer] else n)
    else:
        t["a"] = rnd(RANK, k, scale=k ** -0.5)
        t["b"] = rnd(n, RANK, scale=0.1)
        if kind == "adalora":
            t["e"] = rnd(RANK, scale=0.5)
        if kind == "dora":
            # m near the row norms of W (≈ 1 here), as DoRA initialises it; ‖W‖² is the layer's cache (no grad)
            t["mag"] = 1 + 0.1 * rnd(n)
            t["wsq"] = t["w"].float().square().sum(1)
    return t


def _call(method: str, layer: str, t: dict, backend: Optional[str], seed: int = 1234):
    """One fastpeft functional call on the tensors `t` (whatever requires grad gets a gradient)."""
    from fastpeft import functional as Fn
    kind, p = _method_parts(method)
    if kind == "ia3":
        return Fn.ia3_linear(t["x"], t["w"], None, t["l"], feedforward=IA3_FEEDFORWARD[layer], backend=backend)
    if kind == "adalora":
        return Fn.adalora_linear(t["x"], t["w"], None, t["a"], t["e"], t["b"], ALPHA / RANK, RANK, p, seed,
                                 backend=backend)
    if kind == "dora":
        return Fn.dora_linear(t["x"], t["w"], None, t["a"], t["b"], t["mag"], ALPHA / RANK, weight_sq=t["wsq"],
                              backend=backend)
    return Fn.lora_linear(t["x"], t["w"], None, t["a"], t["b"], ALPHA / RANK, p, seed, backend=backend)


def _grads(method, layer, t, backend):
    t = {k: (v.detach().clone().requires_grad_(k not in ("w", "gy", "wsq"))) for k, v in t.items()}
    y = _call(method, layer, t, backend)
    y.backward(t["gy"])
    return {"y": y.detach(), **{f"d{k}": v.grad for k, v in t.items() if v.grad is not None}}


def _backends() -> dict:
    from fastpeft._backend import _why_not
    out = {}
    for b in ("torch", "triton", "cuda"):
        out[b] = {op: _why_not(b, op, torch.device("cuda")) for op in ("lora", "ia3")}
    return out


def phase_correctness(out: Path, deadline: float) -> None:
    rows = Rows(out / "correctness.csv", ["backend", "layer", "M", "method", "tensor", "err", "torch_err",
                                          "bound", "ok", "note"])
    avail = _backends()
    for m in (8192, 16):
        for method in METHODS:
            for layer in SHAPES:
                if time.time() > deadline:
                    return
                op = "ia3" if method == "ia3" else "lora"
                t = _inputs(layer, m, method)
                ref = _grads(method, layer, {k: v.float() for k, v in t.items()}, "torch")
                torch_res = _grads(method, layer, t, "torch")
                for backend in ("torch", "triton", FUSED, "cuda"):
                    why = avail[backend.partition(":")[0]][op]
                    if why is not None:
                        rows.add(backend=backend, layer=layer, M=m, method=method, note=f"skipped: {why}"[:200])
                        continue
                    try:
                        res = torch_res if backend == "torch" else _grads(method, layer, t, backend)
                    except Exception as e:  # noqa: BLE001
                        rows.add(backend=backend, layer=layer, M=m, method=method, ok=False,
                                 note=f"failed: {type(e).__name__}: {e}"[:300])
                        continue
                    for name, ref_v in ref.items():
                        err, terr = rel_err(res[name], ref_v), rel_err(torch_res[name], ref_v)
                        bound = (2 if name == "y" else 3) * terr
                        rows.add(backend=backend, layer=layer, M=m, method=method, tensor=name, err=err,
                                 torch_err=terr, bound=bound, ok=bool(err <= bound or err <= 1e-6))
                del t, ref, torch_res
                torch.cuda.empty_cache()


def _peft_module(method: str, layer: str):
    from benchmarks.cost_model import _peft_layer
    kind, p = _method_parts(method)
    k, n = SHAPES[layer]
    with torch.device("cuda"):
        mod = _peft_layer(kind, k, n, p, IA3_FEEDFORWARD[layer])
    if kind in ("lora", "adalora") and p > 0:
        mod.lora_dropout["default"] = torch.nn.Dropout(p)
    return mod.train()


def _step_fn(provider: str, method: str, layer: str, t: dict) -> Callable[[], None]:
    """fwd+bwd of one provider: base (frozen F.linear), default (backend auto), fused (``FUSED``: the Triton GEMM
    with the adapter in its epilogue), cuda (the extension), torch (fastpeft's torch implementation: HF PEFT's ops,
    torch ops only, no Triton launch), peft."""
    x = t["x"].detach().clone().requires_grad_(True)
    gy = t["gy"]
    if provider == "base":
        return lambda: F.linear(x, t["w"]).backward(gy)
    if provider == "peft":
        mod = _peft_module(method, layer)
        return lambda: mod(x).backward(gy)
    tt = {k: (v.detach().clone().requires_grad_(k not in ("w", "gy", "x", "wsq"))) for k, v in t.items()}
    tt["x"] = x
    if provider == "fold-flipped":
        return _fold_flipped(lambda: _call(method, layer, tt, "triton", seed=None).backward(gy))
    backend = {"default": None, "fused": FUSED, "cuda": "cuda", "torch": "torch"}[provider]
    return lambda: _call(method, layer, tt, backend, seed=None).backward(gy)


def _fold_flipped(fn: Callable[[], None]) -> Callable[[], None]:
    """``fn`` run with IA3's folding of l flipped (``kernels.ia3.scales_activations`` negated: W where the default
    folds into the activations, and the other way round)."""
    from fastpeft.kernels import ia3 as KI
    orig = KI.scales_activations

    def run():
        KI.scales_activations = lambda m, other, backward=False: not orig(m, other, backward)
        try:
            fn()
        finally:
            KI.scales_activations = orig
    return run


def _single_launch_fwd(t: dict) -> Callable[[], torch.Tensor]:
    """The LoRA forward (p = 0, no grad) with the single shrink-expand launch after the frozen layer's F.linear
    (``kernels.lora.shrink_expand``), which the default takes only above ``TWO_LAUNCH_MAX_ROWS`` rows."""
    from fastpeft.kernels import lora as KL
    x, w, a, b = t["x"].detach(), t["w"], t["a"].detach(), t["b"].detach()
    tgt = KL.launch_target(x.device, None)

    def fn():
        y = F.linear(x, w)
        KL.shrink_expand(y, x, a, None, b, ALPHA / RANK, 0.0, 0, tgt)
        return y
    return fn


def _has_triton() -> bool:
    from fastpeft._backend import triton_available
    return triton_available()


def _record_dispatch(out: Path, op: str, layer: str, m: int, times: dict, backends: dict) -> None:
    """The measured dispatch entry of this shape bucket (fastest fastpeft backend, fwd+bwd), then the whole table
    rewritten to OUT/dispatch_table.json (atomically) - the file to commit as fastpeft's measured table."""
    from fastpeft import _dispatch
    # backend names as select_backend takes them: "triton", "triton:fused", "cuda", "cuda:decode", "torch"
    cands = {backends[p]: times[p] for p in ("default", "fused", "cuda", "torch") if p in times and
             backends[p].partition(":")[0] in ("cuda", "triton", "torch")}
    if not cands:
        return
    k, n = SHAPES[layer]
    win = min(cands, key=cands.get)
    backend, _, variant = win.partition(":")
    _dispatch.record(_gpu_name(), torch.bfloat16, op, _dispatch.bucket(m, n, k, RANK if op == "lora" else None),
                     backend, "measured by benchmarks/gpu_check.sh (layer fwd+bwd, bf16, fp32 adapters): " +
                     ", ".join(f"{b} {t:.4f} ms" for b, t in sorted(cands.items())), variant=variant or None,
                     timings_ms=cands)
    tmp = out / ".dispatch_table.json.tmp"
    _dispatch.export_table(str(tmp))
    os.replace(tmp, out / "dispatch_table.json")


def phase_ratios(out: Path, deadline: float) -> None:
    """Shape-major (the most decisive M first); a bucket's dispatch entry is recorded only after every method of
    it was measured, so ``default`` (auto, which reads the table) means the same thing for all of them."""
    from fastpeft._backend import select_backend
    rows = Rows(out / "ratios.csv", ["layer", "M", "method", "provider", "backend", "ms", "x_base", "x_peft",
                                     "note"])
    for m in (8192, 2048, 16, 1):
        for layer in SHAPES:
            measured = {}
            for method in METHODS:
                if time.time() > deadline:
                    return
                t = _inputs(layer, m, method)
                op = "ia3" if method == "ia3" else "lora"
                times, backends = {}, {}
                extra = ("fold-flipped",) if method == "ia3" and _has_triton() else ()
                # the extension, when it built: a candidate of the measured dispatch table (its launches cost a
                # torch op's host time, where the default's Triton launches cost 51 µs on the first run's host)
                cuda = ("cuda",) if _backends()["cuda"][op] is None and method != "dora" else ()
                # torch: fastpeft's torch implementation (HF PEFT's ops, 16-bit casts in row chunks; torch ops only,
                # no Triton launch) - a candidate where the host decides (the first run: the default host-bound at
                # M <= 2048, slower than HF PEFT there)
                for provider in ("base", "peft", "default", "fused") + cuda + ("torch",) + extra:
                    backend = {"base": "torch (frozen)", "peft": "HF PEFT", "fused": FUSED, "cuda": "cuda",
                               "torch": "torch",
                               "fold-flipped": "triton, IA3's folding of l flipped"}.get(provider)
                    if provider == "default":
                        backend = select_backend(op, t["x"], None)
                    backends[provider] = backend
                    try:
                        times[provider] = bench_ms(_step_fn(provider, method, layer, t))
                        note = ""
                    except Exception as e:  # noqa: BLE001
                        note = f"failed: {type(e).__name__}: {e}"[:300]
                    ms = times.get(provider)
                    rows.add(layer=layer, M=m, method=method, provider=provider, backend=backend, ms=ms if ms else "",
                             x_base=ms / times["base"] if ms and "base" in times else "",
                             x_peft=ms / times["peft"] if ms and "peft" in times else "", note=note)
                if method in ("lora", "ia3"):
                    measured[op] = (times, backends)
                del t
                torch.cuda.empty_cache()
            for op, (times, backends) in measured.items():
                try:
                    _record_dispatch(out, op, layer, m, times, backends)
                except Exception as e:  # noqa: BLE001 - the table is a by-product; the rows are the result
                    print(f"dispatch table: {type(e).__name__}: {e}", flush=True)


def phase_profile(out: Path, deadline: float) -> None:
    from torch.profiler import ProfilerActivity, profile
    rows = Rows(out / "profile.csv", ["layer", "M", "method", "provider", "kernel", "calls", "device_us"])
    m = 8192
    # q_proj, and down_proj (K = 14336), whose dropout passes the cost model predicts bound by the mask's integer work:
    # the per-kernel times at p = 0 and 0.1 calibrate kernels/_mask.py's constants
    for layer, method in (("q_proj", "lora"), ("q_proj", "lora_p0.1"),
                          ("down_proj", "lora"), ("down_proj", "lora_p0.1")):
        t = _inputs(layer, m, method)
        for provider in ("base", "default", "fused", "peft"):
            if time.time() > deadline:
                return
            try:
                fn = _step_fn(provider, method, layer, t)
                fn()
                fn()
                torch.cuda.synchronize()
                with profile(activities=[ProfilerActivity.CUDA]) as prof:
                    fn()
                    torch.cuda.synchronize()
            except Exception as e:  # noqa: BLE001
                rows.add(layer=layer, M=m, method=method, provider=provider,
                         kernel=f"failed: {type(e).__name__}: {e}"[:300])
                continue
            evts = [e for e in prof.key_averages() if getattr(e, "self_device_time_total", 0) > 0]
            for e in sorted(evts, key=lambda e: -e.self_device_time_total):
                rows.add(layer=layer, M=m, method=method, provider=provider, kernel=e.key[:160], calls=e.count,
                         device_us=float(e.self_device_time_total))
            rows.add(layer=layer, M=m, method=method, provider=provider, kernel="TOTAL",
                     calls=sum(e.count for e in evts), device_us=float(sum(e.self_device_time_total for e in evts)))


# (BLOCK_M, BLOCK_K, num_warps) the tile sweep tries, the launchers' current choice first: the skinny kernels
# reached 0.49-0.80 of the copy ceiling on the first GPU run (benchmarks/results/cost-model/gpu_fit.md), with tiles
# chosen by arithmetic, never timed.
TILE_CANDIDATES = [(64, 128, 4), (32, 128, 4), (64, 64, 4), (64, 128, 8), (64, 256, 8), (128, 128, 8),
                   (32, 256, 8), (16, 128, 4)]


def tile_cases(dev: str = "cuda", m: int = 8192, k: int = 4096, n: int = 4096, r: int = RANK) -> dict:
    """{kernel: fn(tgt)} - one launch of each skinny LoRA kernel of the default path on fresh bf16 data with fp32
    adapters (the forward's shrink + expand launch, the backward's pass over dY, its pass over x and dX), for the
    tile sweep: each runs under ``forced_launch_shape`` (the kernels then take the forced tile)."""
    from fastpeft.kernels import lora as KL
    g = torch.Generator(device="cpu").manual_seed(0)

    def rnd(*shape, dtype=torch.bfloat16, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).to(device=dev, dtype=dtype)
    x, dy, y, dx = rnd(m, k), rnd(m, n), rnd(m, n), rnd(m, k)
    a, b = rnd(r, k, dtype=torch.float32, scale=k ** -0.5), rnd(n, r, dtype=torch.float32, scale=0.1)
    s = (x.float() @ a.t()).contiguous()

    def da(tgt):
        part = KL._dy_pass(dy, b, s, None, 2.0, False, tgt)[0]
        return lambda: KL._da_pass(x, part, None, s, torch.float32, 0.0, 0, tgt, dx=dx, lora_A=a)
    return {"lora_shrink_expand": lambda tgt: (lambda: KL.shrink_expand(y, x, a, None, b, 2.0, 0.0, 0, tgt)),
            "lora_dy": lambda tgt: (lambda: KL._dy_pass(dy, b, s, None, 2.0, False, tgt)),
            "lora_da_dx": da}


def phase_tiles(out: Path, deadline: float) -> None:
    """The skinny kernels' tiles by measurement: each of the default path's three skinny LoRA kernels at q_proj
    M = 8192 (bf16, fp32 adapters, p = 0) under every ``TILE_CANDIDATES`` tile, with the launchers' program target
    (two waves of SMs) and with four waves; µs per launch and the fraction of the copy ceiling (3.0 TB/s on an H100,
    ``cost_model.RUN_COPY_BYTES_PER_S``) from the bytes the launcher reports.  The forward's launch runs unsplit
    (one program per row block), as at M = 8192 in production.  Picks nothing: the next change of
    ``kernels/_target.py``'s block functions reads this table."""
    from fastpeft import _cost
    from fastpeft.kernels import _target as KT
    from benchmarks.cost_model import RUN_COPY_BYTES_PER_S
    rows = Rows(out / "tiles.csv", ["kernel", "M", "K", "N", "block_m", "block_k", "warps", "programs", "us",
                                    "bytes", "tb_per_s", "of_ceiling", "note"])
    m, k, n = 8192, 4096, 4096
    cases = tile_cases("cuda", m, k, n)
    tgt = KT.launch_target(torch.device("cuda"))
    ceiling = RUN_COPY_BYTES_PER_S.get(_gpu_name())
    for name, make in cases.items():
        for programs in (None, 4 * tgt.num_sms):
            for blocks in TILE_CANDIDATES:
                if time.time() > deadline:
                    return
                if name == "lora_shrink_expand" and programs is not None:
                    continue  # unsplit either way
                progs = 1 if name == "lora_shrink_expand" else (programs or 2 * tgt.num_sms)
                row = dict(kernel=name, M=m, K=k, N=n, block_m=blocks[0], block_k=blocks[1], warps=blocks[2],
                           programs=progs)
                try:
                    with KT.forced_launch_shape(blocks=blocks, programs=progs):
                        fn = make(tgt)
                        with _cost.recording() as rec:
                            fn()
                        nbytes = sum(c.bytes_read + c.bytes_written for c in rec if c.name == name)
                        us = bench_ms(fn) * 1e3
                    row.update(us=us, bytes=nbytes, tb_per_s=nbytes / us / 1e6,
                               of_ceiling=(nbytes / us / 1e6 * 1e12 / ceiling) if ceiling else "")
                except Exception as e:  # noqa: BLE001 - a tile that does not compile or launch says so
                    row.update(note=f"failed: {type(e).__name__}: {e}"[:300])
                rows.add(**row)


def phase_e2e(out: Path, deadline: float) -> None:
    from benchmarks.bench_e2e import run_e2e
    rows = Rows(out / "e2e.csv", ["model", "provider", "label", "p50_ms", "p20_ms", "p80_ms", "tokens_per_s",
                                  "mem_mib", "mem_kind", "eval_loss", "note"])
    # fastpeft twice: with the activation recompute (the default) and without it (FASTPEFT_RECOMPUTE=0), the
    # recompute's cost on a GPU side by side (memory issue: it should cost <= 2% of a step)
    for provider, recompute in (("base", None), ("fastpeft", None), ("fastpeft", "0"), ("peft", None)):
        if time.time() > deadline:
            return
        name = provider if recompute is None else f"{provider} FASTPEFT_RECOMPUTE={recompute}"
        old = os.environ.get("FASTPEFT_RECOMPUTE")
        if recompute is not None:
            os.environ["FASTPEFT_RECOMPUTE"] = recompute
        try:
            (r,) = run_e2e("llama3-8b-4l", torch.bfloat16, torch.device("cuda"), [provider], steps=3)
            rows.add(model="llama3-8b-4l", provider=name, label=r.label, p50_ms=r.p50, p20_ms=r.p20,
                     p80_ms=r.p80, tokens_per_s=r.tokens_per_s, mem_mib=r.mem_mib, mem_kind=r.mem_kind,
                     eval_loss=r.eval_loss)
        except Exception as e:  # noqa: BLE001
            rows.add(model="llama3-8b-4l", provider=name, note=f"failed: {type(e).__name__}: {e}"[:300])
        finally:
            if old is None:
                os.environ.pop("FASTPEFT_RECOMPUTE", None)
            else:
                os.environ["FASTPEFT_RECOMPUTE"] = old
        torch.cuda.empty_cache()


def _graph_ms(fn: Callable[[], object], calls: int = 1) -> float:
    """Median ms of replaying a CUDA graph of `calls` calls of ``fn`` (warmed up on a side stream first, as torch's
    capture rules ask), per call."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for _ in range(calls):
            fn()
    return bench_ms(g.replay) / calls


def _host_us(fn: Callable[[], object], calls: int = 500) -> float:
    """Wall µs per call of ``fn`` issued back to back (one sync at the end): the host's cost per launch when the GPU
    work is tiny."""
    for _ in range(10):
        fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) / calls * 1e6


def phase_launch(out: Path, deadline: float) -> None:
    """What one launch costs, the cost model's least determined constant (its fitted 17.5 µs GPU gap): a tiny
    Triton kernel of fastpeft's (one sum_partials tile, output allocated per call like every launcher's) and a tiny
    torch op, each issued eagerly (host µs per launch) and replayed as a CUDA graph of 100 (GPU µs per kernel:
    launch latency plus the tiny kernel itself); and the frozen q_proj forward at M = 16 both ways."""
    from fastpeft.kernels._partials import sum_partials
    rows = Rows(out / "launch.csv", ["what", "mode", "us_per_call", "note"])
    part = torch.randn(1, 1024, device="cuda")
    small = torch.zeros(1024, device="cuda")
    k, n = SHAPES["q_proj"]
    x = torch.randn(16, k, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16)
    raw = _raw_triton_launch(part)
    cases = [("triton raw launch, 3 args (Triton's own host cost)", raw, 100),
             ("triton sum_partials, 1 tile", lambda: sum_partials([(part, torch.bfloat16)], part), 100),
             ("torch add_, 1024 fp32", lambda: small.add_(1.0), 100),
             ("frozen q_proj fwd, M=16 (F.linear)", lambda: F.linear(x, w), 1)]
    for what, fn, calls in cases:
        if time.time() > deadline:
            return
        for mode in ("eager host", "graph"):
            try:
                us = _host_us(fn) if mode == "eager host" else _graph_ms(fn, calls) * 1e3
                rows.add(what=what, mode=mode, us_per_call=us)
            except Exception as e:  # noqa: BLE001
                rows.add(what=what, mode=mode, note=f"failed: {type(e).__name__}: {e}"[:300])


def phase_host(out: Path, deadline: float) -> None:
    """Where the host time of an eager layer call goes (the first GPU run found q_proj M = 2048 host-bound: 1.14 ms
    per fwd+bwd against 0.19 ms of frozen GPU time).  host.csv: ``benchmarks.bench_host`` with real launches - µs
    per call of the frozen layer, fastpeft's default path (functional and model-API layer), its torch backend and HF
    PEFT's layer, q_proj at M = 2048 and 16, LoRA p = 0 / 0.1, AdaLoRA, IA3, fwd+bwd and the inference forward.
    host_profile.csv: cProfile of 30 LoRA fwd+bwd
    steps at q_proj M = 2048 (the 25 functions of most own time, µs per step), and as its last row the number of
    synchronising CUDA calls one step makes (``torch.cuda.set_sync_debug_mode``: a sync serialises host and GPU,
    which would make the step cost host + GPU instead of the larger of the two)."""
    import cProfile
    import pstats
    import warnings

    from benchmarks.bench_host import COLUMNS, iter_rows
    rows = Rows(out / "host.csv", [c for c in COLUMNS if c not in ("device", "torch", "git")])
    for row in iter_rows("cuda", calls=30, rounds=5):
        rows.add(**row)
        if time.time() > deadline:
            return
    prof_rows = Rows(out / "host_profile.csv", ["function", "calls_per_step", "own_us_per_step",
                                                "cum_us_per_step", "note"])
    t = _inputs("q_proj", 2048, "lora")
    step = _step_fn("default", "lora", "q_proj", t)
    for _ in range(3):
        step()
    torch.cuda.synchronize()
    steps = 30
    pr = cProfile.Profile()
    pr.enable()
    for _ in range(steps):
        step()
    pr.disable()
    torch.cuda.synchronize()
    st = pstats.Stats(pr)
    top = sorted(st.stats.items(), key=lambda kv: -kv[1][2])[:25]
    for (file, line, name), (_cc, nc, tt, ct, _callers) in top:
        prof_rows.add(function=f"{Path(file).name}:{line}({name})", calls_per_step=nc / steps,
                      own_us_per_step=tt / steps * 1e6, cum_us_per_step=ct / steps * 1e6)
    old = torch.cuda.get_sync_debug_mode()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            step()
        finally:
            torch.cuda.set_sync_debug_mode(old)
    syncs = [str(w.message).splitlines()[0][:200] for w in caught if "synchroniz" in str(w.message).lower()]
    prof_rows.add(function="(synchronizing CUDA calls in one step)", calls_per_step=len(syncs),
                  note="; ".join(sorted(set(syncs)))[:300])


def _raw_triton_launch(t: torch.Tensor) -> Callable[[], None]:
    """A launch of a trivial Triton kernel straight through ``kernel[grid](...)``: what Triton's launcher costs on
    the host without any fastpeft Python around it."""
    import triton
    import triton.language as tl

    @triton.jit
    def _touch(ptr, n, BLOCK: tl.constexpr):
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        tl.store(ptr + offs, tl.load(ptr + offs, mask=offs < n), mask=offs < n)

    n = t.numel()
    return lambda: _touch[(1,)](t, n, BLOCK=1024)


def phase_decode(out: Path, deadline: float) -> None:
    """The decode target (issue 15: LoRA forward at M <= 16 within 1.3x the frozen layer under a CUDA graph): the
    forward (no grad, p = 0) of the frozen layer, the default and fused paths and HF PEFT's layer at M = 1 and 16,
    eager and replayed as a CUDA graph (capture also checks that the path is capturable)."""
    rows = Rows(out / "decode.csv", ["layer", "M", "provider", "backend", "eager_ms", "graph_ms", "x_base_eager",
                                     "x_base_graph", "note"])
    from fastpeft._backend import select_backend
    for m in (16, 1):
        for layer in SHAPES:
            t = _inputs(layer, m, "lora")
            x, w = t["x"].detach(), t["w"]
            base = {}
            for provider in ("base", "default", "fused", "peft") + (("single-launch",) if _has_triton() else ()):
                if time.time() > deadline:
                    return
                backend = {"base": "torch (frozen)", "peft": "HF PEFT", "fused": FUSED,
                           "single-launch": "triton, F.linear + one shrink-expand launch"}.get(provider)
                if provider == "default":
                    backend = select_backend("lora", x, None)
                if provider == "base":
                    fn = (lambda: F.linear(x, w))
                elif provider == "peft":
                    mod = _peft_module("lora", layer)
                    fn = (lambda mod=mod: mod(x))
                elif provider == "single-launch":
                    fn = _single_launch_fwd(t)
                else:
                    tt = {kk: v.detach() for kk, v in t.items()}
                    fn = (lambda tt=tt, b=(None if provider == "default" else FUSED): _call("lora", layer, tt, b))
                res, note = {}, ""
                with torch.no_grad():
                    for mode in ("eager", "graph"):
                        try:
                            res[mode] = bench_ms(fn) if mode == "eager" else _graph_ms(fn)
                        except Exception as e:  # noqa: BLE001
                            note += f"{mode} failed: {type(e).__name__}: {e}"[:200] + "; "
                if provider == "base":
                    base = res
                rows.add(layer=layer, M=m, provider=provider, backend=backend, eager_ms=res.get("eager", ""),
                         graph_ms=res.get("graph", ""),
                         x_base_eager=res["eager"] / base["eager"] if "eager" in res and "eager" in base else "",
                         x_base_graph=res["graph"] / base["graph"] if "graph" in res and "graph" in base else "",
                         note=note)
            del t
            torch.cuda.empty_cache()


PHASES = {"gemm": phase_gemm, "launch": phase_launch, "host": phase_host, "correctness": phase_correctness,
          "ratios": phase_ratios, "decode": phase_decode, "profile": phase_profile, "tiles": phase_tiles,
          "e2e": phase_e2e}


def main(argv: Optional[list] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.gpu_phases", description=__doc__.splitlines()[0])
    p.add_argument("phase", choices=sorted(PHASES))
    p.add_argument("--out", required=True, help="folder; rows are appended to OUT/<phase>.csv")
    p.add_argument("--budget", type=float, default=600.0, help="seconds; the phase starts no new case after it "
                                                              "(gpu_check.sh also kills it with `timeout`)")
    args = p.parse_args(argv)
    if not torch.cuda.is_available() or os.environ.get("GPU_CHECK_DRY_RUN") == "1":
        print(f"{args.phase}: skipped: no GPU")
        return SKIPPED
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    PHASES[args.phase](out, time.time() + args.budget)
    return 0


if __name__ == "__main__":
    sys.exit(main())
