"""Host time per layer call: the Python and launch cost of fastpeft's default GPU path, which decides eager speed
wherever a layer's GPU work is short (M <= 2048, decoding).

``python -m benchmarks.bench_host [--device cpu|cuda] [--out DIR] [--calls N]``

The H100 run of 2026-12-06 found fastpeft's default path host-bound at q_proj M = 2048 (1.14 ms per fwd+bwd where the
frozen layer's GPU time is 0.19 ms and HF PEFT's whole step 0.62 ms). Host time is measurable without a GPU: on
CPU this runs the ``triton`` backend under ``TRITON_INTERPRET=1`` with every Triton launch replaced by a no-op
(so the kernels' work is absent and what is left is fastpeft's Python, its torch allocations and the frozen layer's
own ``F.linear`` / ``mm`` on a small CPU layer); on CUDA the launches are real and the time is the host's, per call,
with the GPU running behind (synchronised between rounds only).

Per case (LoRA p = 0 and 0.1, AdaLoRA, IA3; a training step = forward + backward, and an inference forward) the
providers are timed in interleaved rounds:

* ``frozen``: ``F.linear`` on the frozen weight (+ its backward): the floor;
* ``fastpeft``: ``fastpeft.functional`` on the default GPU path (on CUDA ``backend=None``, i.e. auto, as users call
  it; on CPU the explicit ``"triton"``, whose uncached backend check adds ~4 µs that auto's cached answer does not);
* ``fastpeft-torch``: ``fastpeft.functional`` on the torch backend (HF PEFT's ops, 16-bit casts in row chunks:
  torch ops only, no Triton launch; on CPU its time includes its real CPU compute, like ``peft``) - the candidate where the host decides;
* ``fastpeft-layer``: the same through fastpeft's model API (the layer ``fastpeft.get_peft_model`` puts in a model:
  the functional op plus the layer's own checks - fused-path eligibility, sibling groups);
* ``peft``: HF PEFT's layer (when installed; on CPU its time includes its real CPU compute, which fastpeft's
  stubbed kernels skip - a reference, not a like-for-like ratio).

Columns: µs per call (median), p20 / p80, spread (p80 - p20) / median, Triton launches per call, and ``noisy``
when the spread exceeds ``MAX_SPREAD`` (rerun on an idle machine). Writes ``host.csv`` and ``host.md`` under
``--out`` (default ``benchmarks/results/cpu-host`` on CPU) with hardware, versions and git commit.
"""

from __future__ import annotations

import argparse
import csv
import os
import sys
import time
from pathlib import Path
from typing import Callable, Optional

MAX_SPREAD = 0.3
# (name, M, K, N, r): a small layer whose CPU GEMMs are cheap beside the host work; on CUDA Llama-3-8B's q_proj at a
# short prompt and at decode.
CASES = {"cpu": [("64x64", 16, 64, 64, 16)],
         "cuda": [("q_proj", 2048, 4096, 4096, 16), ("q_proj", 16, 4096, 4096, 16)]}
METHODS = ("lora", "lora_p0.1", "adalora", "ia3")
COLUMNS = ["case", "M", "K", "N", "r", "method", "mode", "provider", "us", "p20_us", "p80_us", "spread",
           "launches", "note", "device", "torch", "triton", "git"]


def _stub_triton_launches() -> list:
    """Replace the interpreter's kernel run with a counter (CPU only); returns the one-element call counter."""
    from triton.runtime.interpreter import InterpretedFunction
    calls = [0]

    def run(self, *args, **kwargs):  # noqa: ARG001 - the launch's arguments are not looked at
        calls[0] += 1
    InterpretedFunction.run = run
    return calls


def _count_launches_cuda() -> list:
    """Count Triton launches on CUDA through JITFunction.run (the launch still happens)."""
    from triton.runtime.jit import JITFunction
    calls = [0]
    orig = JITFunction.run

    def run(self, *args, **kwargs):
        calls[0] += 1
        return orig(self, *args, **kwargs)
    JITFunction.run = run
    return calls


def _timed(fns: dict, calls: int, rounds: int, sync: Callable[[], None]) -> dict:
    """{name: [µs per call of each round]}: rounds of `calls` calls per function, order rotated each round.  The
    harness's ``bench_interleaved`` times the GPU on CUDA; this times the host: `sync` only between rounds, so the
    GPU runs behind the calls."""
    names = list(fns)
    out = {n: [] for n in names}
    for i in range(rounds):
        order = names[i % len(names):] + names[:i % len(names)]
        for n in order:
            fn = fns[n]
            sync()
            t0 = time.perf_counter()
            for _ in range(calls):
                fn()
            out[n].append((time.perf_counter() - t0) / calls * 1e6)
    return out


def _providers(method: str, m: int, k: int, n: int, r: int, device, dtype):
    """{(mode, provider): fn} for one case."""
    backend = "triton" if device.type == "cpu" else None
    import torch
    import torch.nn.functional as F

    import fastpeft.functional as FF
    g = torch.Generator().manual_seed(0)

    def rand(*shape, scale=1.0, dt=dtype, grad=False):
        return (torch.randn(*shape, generator=g) * scale).to(device=device, dtype=dt).requires_grad_(grad)
    x = rand(m, k, grad=True)
    w = rand(n, k, scale=k ** -0.5)
    gy = rand(m, n)
    p = 0.1 if method == "lora_p0.1" else 0.0
    a = rand(r, k, scale=k ** -0.5, dt=torch.float32, grad=True)
    b = rand(n, r, scale=r ** -0.5, dt=torch.float32, grad=True)
    e = rand(r, 1, dt=torch.float32, grad=True)
    ll = rand(n, dt=torch.float32, grad=True)

    def op(pp, be=backend):
        if method == "ia3":
            return FF.ia3_linear(x, w, None, ll, backend=be)
        if method == "adalora":
            return FF.adalora_linear(x, w, None, a, e, b, 2.0, float(r), pp, backend=be)
        return FF.lora_linear(x, w, None, a, b, 2.0, pp, backend=be)

    def infer():
        with torch.no_grad():
            op(0.0)
    fns = {("fwd+bwd", "frozen"): lambda: F.linear(x, w).backward(gy),
           ("fwd+bwd", "fastpeft"): lambda: op(p).backward(gy),
           ("fwd+bwd", "fastpeft-torch"): lambda: op(p, "torch").backward(gy),
           ("fwd", "frozen"): lambda: _no_grad(lambda: F.linear(x, w)),
           ("fwd", "fastpeft"): infer,
           ("fwd", "fastpeft-torch"): lambda: _no_grad(lambda: op(0.0, "torch"))}
    # the layers of the inference rows are separate objects in eval mode (switching one layer's mode per call would
    # time Module.train's walk over the submodules)
    mine, mine_eval = (_fastpeft_layer(method, k, n, r, p, device, dtype) for _ in range(2))
    mine_eval.eval()
    xl = x.detach().clone().requires_grad_(True)
    fns[("fwd+bwd", "fastpeft-layer")] = lambda: mine(xl).backward(gy)
    fns[("fwd", "fastpeft-layer")] = lambda: _no_grad(lambda: mine_eval(xl))
    layer = _peft_layer(method, k, n, r, p, device, dtype)
    if layer is not None:
        layer_eval = _peft_layer(method, k, n, r, p, device, dtype).eval()
        xp = x.detach().clone().requires_grad_(True)
        fns[("fwd+bwd", "peft")] = lambda: layer(xp).backward(gy)
        fns[("fwd", "peft")] = lambda: _no_grad(lambda: layer_eval(xp))
    return fns


def _no_grad(fn):
    import torch
    with torch.no_grad():
        return fn()


def _layer(lib, method: str, k: int, n: int, r: int, p: float, device, dtype):
    """The adapter layer `lib` (``fastpeft`` or ``peft``: both take HF PEFT's config names) puts on one
    ``nn.Linear(k, n)`` for the case, in train mode, adapters in fp32 on the base dtype (PEFT's default)."""
    import torch
    model = torch.nn.Sequential()
    model.add_module("proj", torch.nn.Linear(k, n, bias=False, device=device, dtype=dtype))
    if method == "ia3":
        cfg = lib.IA3Config(target_modules=["proj"], feedforward_modules=[])
    elif method == "adalora":
        cfg = lib.AdaLoraConfig(init_r=r, target_r=r, lora_alpha=2 * r, target_modules=["proj"], total_step=10)
    else:
        cfg = lib.LoraConfig(r=r, lora_alpha=2 * r, lora_dropout=p, target_modules=["proj"])
    layer = lib.get_peft_model(model, cfg).base_model.model.proj
    for prm in layer.parameters():
        if prm.requires_grad:
            prm.data = prm.data.float()
    layer.train()
    return layer


def _fastpeft_layer(method: str, k: int, n: int, r: int, p: float, device, dtype):
    """fastpeft's model-API layer for the case (``fastpeft.get_peft_model``): what a model's forward calls, the
    functional op plus the layer's own checks (fused-path eligibility, sibling groups)."""
    import fastpeft
    return _layer(fastpeft, method, k, n, r, p, device, dtype)


def _peft_layer(method: str, k: int, n: int, r: int, p: float, device, dtype):
    """HF PEFT's layer for the case, or None without peft."""
    try:
        import peft
    except ImportError:
        return None
    return _layer(peft, method, k, n, r, p, device, dtype)


def iter_rows(device_name: str, calls: int = 200, rounds: int = 15, cases: Optional[list] = None):
    """Yield a row (``COLUMNS``) per case, method, mode and provider as each case is measured, on `device_name`
    ("cpu": stubbed launches, needs ``TRITON_INTERPRET=1`` set before import; "cuda": real launches).  `cases`:
    (name, M, K, N, r) tuples (default ``CASES`` for the device type)."""
    import torch
    device = torch.device(device_name)
    if device.type == "cpu":
        if os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
            raise RuntimeError("on CPU run with TRITON_INTERPRET=1 set before import (main() does it)")
        counter = _stub_triton_launches()
        sync = (lambda: None)
        os.environ["FASTPEFT_BACKEND"] = "triton"   # the model-API layer's auto choice is torch on CPU
    else:
        counter = _count_launches_cuda()
        sync = torch.cuda.synchronize
    from benchmarks import _utils as U
    env = U.env_info(device)
    for case, m, k, n, r in (cases or CASES[device.type]):
        for method in METHODS:
            fns = _providers(method, m, k, n, r, device, torch.bfloat16)
            for fn in fns.values():  # warm-up: compiles, caches, first allocations
                for _ in range(3):
                    fn()
            launches = {}
            for key, fn in fns.items():
                counter[0] = 0
                fn()
                launches[key] = counter[0]
            times = _timed(fns, calls, rounds, sync)
            for (mode, provider), ts in times.items():
                st = U.Timing.from_samples(ts)   # the harness's quantiles (µs here)
                med, p20, p80, spread = st.p50, st.p20, st.p80, st.spread
                yield dict(case=case, M=m, K=k, N=n, r=r, method=method, mode=mode, provider=provider,
                           us=round(med, 2), p20_us=round(p20, 2), p80_us=round(p80, 2), spread=round(spread, 3),
                           launches=launches[(mode, provider)] if provider.startswith("fastpeft") else "",
                           note="noisy" if spread > MAX_SPREAD else "", device=env["gpu"],
                           torch=env["torch"], triton=env["triton"], git=env["git"])


def write(rows: list[dict], out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "host.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=COLUMNS)
        w.writeheader()
        w.writerows(rows)
    by = {(r["case"], r["M"], r["method"], r["mode"], r["provider"]): r for r in rows}
    r0 = rows[0]
    stub = "Triton launches stubbed (CPU, interpreter mode)" if r0["device"].startswith("CPU") else "real launches"
    L = ["# Host time per layer call", "",
         f"{r0['device']}, torch {r0['torch']}, triton {r0['triton']}, git {r0['git']}; {stub}. "
         "`python -m benchmarks.bench_host`. µs per call, median of interleaved rounds; extra = fastpeft - frozen.",
         "", "| case | M | method | mode | frozen µs | fastpeft µs | extra µs | launches | fastpeft layer µs | HF PEFT "
         "µs | fastpeft torch µs | note |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for (case, m, method, mode, prov), r in by.items():
        if prov != "fastpeft":
            continue
        fr = by.get((case, m, method, mode, "frozen"))
        pe = by.get((case, m, method, mode, "peft"))
        la = by.get((case, m, method, mode, "fastpeft-layer"))
        to = by.get((case, m, method, mode, "fastpeft-torch"))
        notes = sorted({x["note"] for x in (r, fr, pe, la, to) if x and x["note"]})
        L.append(f"| {case} | {m} | {method} | {mode} | {fr['us']} | {r['us']} | {r['us'] - fr['us']:.1f} | "
                 f"{r['launches']} | {la['us'] if la else ''} | {pe['us'] if pe else ''} | {to['us'] if to else ''} "
                 f"| {', '.join(notes)} |")
    (out / "host.md").write_text("\n".join(L) + "\n")


def main(argv: Optional[list] = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.bench_host", description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    ap.add_argument("--out", default=None, help="folder for host.csv / host.md (default benchmarks/results/"
                                                "cpu-host on CPU, ./host-out on CUDA)")
    ap.add_argument("--calls", type=int, default=200, help="calls per round")
    ap.add_argument("--rounds", type=int, default=15)
    args = ap.parse_args(argv)
    dev = args.device
    if dev == "auto":
        import torch
        dev = "cuda" if torch.cuda.is_available() else "cpu"
    if dev == "cpu" and os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
        # the interpreter flag is read when the kernels are decorated: re-run with it set from the start
        import subprocess
        env = dict(os.environ, TRITON_INTERPRET="1")
        return subprocess.call([sys.executable, "-m", "benchmarks.bench_host"] + (argv if argv is not None
                                                                                  else sys.argv[1:]),
                               env=env, cwd=str(Path(__file__).resolve().parents[1]))
    out = Path(args.out) if args.out else (Path(__file__).resolve().parent / "results" / "cpu-host" if dev == "cpu"
                                           else Path("host-out"))
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    rows = list(iter_rows(dev, args.calls, args.rounds))
    write(rows, out)
    print((out / "host.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
