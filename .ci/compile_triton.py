"""Compile every fastpeft Triton kernel for a real GPU target without a GPU (ahead-of-time, nothing is launched).

The CPU tests run the kernels in Triton's interpreter, which never lowers them to PTX: a kernel can pass there and
still fail to compile for a GPU (a layout the backend rejects, an op the pipeliner cannot handle, a configuration
whose pipelined stages do not fit in shared memory, register spills).  This script closes that gap as far as a
machine without a GPU can: it replaces Triton's driver by a stub that reports the chosen target (default sm_90, the
H100/H200) and makes every launch a compile-only warmup, then calls the real launchers
(``fastpeft.kernels.lora.lora_fwd_triton`` etc.) on CPU tensors with the GPU's launch heuristics (a
``fastpeft.kernels._target.LaunchTarget`` with ``compile_only=True``, passed to every launcher).  For autotuned
kernels every configuration that survives pruning is compiled, not just one.  For each compiled kernel it reports
shared memory (against the target's per-block limit), registers and spills (``cuobjdump -res-usage`` on the cubin), and whether the PTX uses wgmma and TMA.

    python .ci/compile_triton.py [--arch 90] [--quick | --ci] [--json out.json]

Modes: default - fp16/bf16/fp32, aligned and odd shapes, every configuration (about 25 min on 2 CPU cores);
``--quick`` - bf16, aligned shapes, every configuration (about 4 min); ``--ci`` - bf16, aligned shapes, the first
configuration of each autotuned launch only (about 1 min; catches a kernel that no longer lowers for the GPU, not a
configuration that no longer fits).

Exit status: 0 when every kernel compiled and every launch has at least one configuration that fits the target;
1 otherwise.  A configuration over the shared-memory limit alone is reported, not fatal (the autotuner skips it on
the GPU).  Needs triton with its NVIDIA backend (ptxas ships in the wheel); needs no GPU and no CUDA driver.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import time
import traceback

os.environ.pop("TRITON_INTERPRET", None)  # must be unset before triton is imported: this compiles for real
# Run as a script, only .ci/ is on sys.path: the checkout's root goes last, so a checkout that was never installed
# (benchmarks/gpu_check.sh runs this while its `pip install -e .` is still building) finds fastpeft, and an
# installed fastpeft still wins.
sys.path.append(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.runtime import driver  # noqa: E402
from triton.runtime.autotuner import Autotuner  # noqa: E402
from triton.runtime.jit import JITFunction  # noqa: E402

# Max dynamic shared memory per block (bytes), CUDA programming guide's per-architecture table.
SHARED_LIMIT = {80: 163 * 1024, 86: 99 * 1024, 89: 99 * 1024, 90: 227 * 1024, 100: 227 * 1024, 120: 99 * 1024}
SMS = {80: 108, 86: 84, 89: 128, 90: 132, 100: 148, 120: 84}


class _StubDriver:
    """Just enough of Triton's driver interface for compiling: a device index, a stream, the target."""

    def __init__(self, target: GPUTarget):
        self.target = target

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):  # noqa: ARG002
        return 0

    def get_current_target(self):
        return self.target

    def get_active_torch_device(self):
        return torch.device("cpu")


class Recorder:
    """Patches JITFunction.run (compile only) and Autotuner.run (compile every pruned config)."""

    def __init__(self):
        self.kernels: list[dict] = []
        self.errors: list[dict] = []
        self.scenario = ""
        self.first_config_only = False
        self._orig_run = JITFunction.run

    def install(self):
        rec = self
        orig = self._orig_run

        def run(self, *args, grid, warmup, **kwargs):  # noqa: ARG001 - warmup is forced
            meta = {k: v for k, v in kwargs.items() if k[:1].isupper() or k in ("num_warps", "num_stages")}
            try:
                k = orig(self, *args, grid=grid, warmup=True, **kwargs)
            except Exception as e:  # noqa: BLE001 - recorded and reported
                rec.errors.append({"scenario": rec.scenario, "kernel": self.fn.__name__, "meta": _jsonable(meta),
                                   "error": f"{type(e).__name__}: {str(e)[:2000]}"})
                raise
            rec.kernels.append({"scenario": rec.scenario, "kernel": self.fn.__name__, "meta": _jsonable(meta),
                                "compiled": k})
            return k

        def autotune_run(self, *args, **kwargs):
            self.nargs = dict(zip(self.arg_names, args))
            configs = self.prune_configs(kwargs)
            if rec.first_config_only:
                configs = configs[:1]
            last = None
            for cfg in configs:
                with contextlib.suppress(Exception):  # recorded by run(); keep compiling the other configs
                    last = self.fn.run(*args, **kwargs, **cfg.all_kwargs())
            self.nargs = None
            if last is None:
                raise RuntimeError(f"no configuration of {self.base_fn.__name__} compiled")
            return last

        JITFunction.run = run
        Autotuner.run = autotune_run


def _jsonable(d: dict) -> dict:
    return {k: (v if isinstance(v, (int, float, str, bool)) or v is None else str(v)) for k, v in d.items()}


def _flags(meta: dict) -> str:
    """The feature switches a kernel was compiled with (its upper-case constexprs that are True), as one string."""
    return " ".join(f for f, v in meta.items() if f.isupper() and v in (True, "True"))


def _resources(cubin: bytes) -> dict:
    """Registers, spill (local) bytes and stack of a cubin, from the cuobjdump that ships with Triton."""
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    if not os.path.exists(tool):
        return {}
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([tool, "-res-usage", f.name], capture_output=True, text=True).stdout
    res = {}
    for line in out.splitlines():
        if "REG:" in line:
            for item in line.split():
                if ":" in item:
                    key, _, val = item.partition(":")
                    if val.isdigit() and key in ("REG", "STACK", "LOCAL"):
                        res[key.lower()] = int(val)
    return res


# ---------------------------------------------------------------------------------------------------------------
# scenarios: real launcher calls on CPU tensors
# ---------------------------------------------------------------------------------------------------------------


def _scenarios(quick: bool, target, dtypes: list | None = None):
    """(name, callable) pairs.  M = 512 selects the large-tile configurations, M = 8 the decode ones; K = N = 512
    (16-byte aligned rows: TMA-eligible) and, outside quick mode, K = 520 / N = 392 (not multiples of 64) too.
    LoRA also at M = 4224 and 8448, where the forward's single launch takes 32- and 64-row blocks
    (``shrink_expand_blocks``: rows enough for every SM), as at M = 8192 on an H200."""
    from fastpeft.kernels.dora import dora_grads_triton, dora_prep_triton, dora_rowscale_triton
    from fastpeft.kernels.ia3 import ia3_bwd_triton, ia3_fwd_triton
    from fastpeft.kernels.lora import lora_bwd_triton, lora_fwd_triton

    dtypes = dtypes or ([torch.bfloat16] if quick else [torch.bfloat16, torch.float16, torch.float32])
    ms = [512, 8]
    shapes = [(512, 512)] if quick else [(512, 512), (520, 392)]
    out = []
    for dt in dtypes:
        for m in ms:
            for k, n in shapes:
                def lora(dt=dt, m=m, k=k, n=n, adt=None, e=False, bias=True, p=0.1, r=16, variant=None):
                    adt = adt or dt
                    x = torch.randn(m, k, dtype=dt)
                    w = torch.randn(n, k, dtype=dt)
                    b = torch.randn(n, dtype=dt) if bias else None
                    a = torch.randn(r, k, dtype=adt)
                    bb = torch.randn(n, r, dtype=adt)
                    ee = torch.randn(r, dtype=adt) if e else None
                    for v in ((variant,) if variant else ("cublas", "fused")):
                        y, s = lora_fwd_triton(x, w, b, a, ee, bb, 2.0, p, 1234, variant=v, target=target)
                        lora_bwd_triton(torch.randn_like(y), x, w, a, ee, bb, s, 2.0, p, 1234, True, bias,
                                        variant=v, target=target)

                def ia3(dt=dt, m=m, k=k, n=n, ff=False):
                    x = torch.randn(m, k, dtype=dt)
                    w = torch.randn(n, k, dtype=dt)
                    b = torch.randn(n, dtype=dt)
                    lv = torch.randn(k if ff else n, dtype=torch.float32 if dt == torch.float32 else dt)
                    for v in ("cublas", "fused"):
                        y, z = ia3_fwd_triton(x, w, b, lv, ff, variant=v, target=target)
                        ia3_bwd_triton(torch.randn_like(y), x, w, lv, z, ff, True, True, variant=v, y=y, bias=b,
                                       target=target)

                def dora(dt=dt, m=m, k=k, n=n, r=16):
                    # DoRA's own pieces (its LoRA part is the lora scenario's): fp32 adapters, PEFT's default
                    w = torch.randn(n, k, dtype=dt)
                    mag = torch.rand(n) + 0.5
                    kk, kn, _, _ = dora_prep_triton(w, torch.randn(r, k), torch.randn(n, r), mag, 2.0,
                                                    w.float().square().sum(1), 4.0, 2.0 ** -64, target=target,
                                                    want_wk=True)  # as the forward runs it
                    dora_rowscale_triton(w, kk, target=target)
                    dora_grads_triton(torch.randn(m, n, dtype=dt), torch.randn(m, n, dtype=dt), kn, torch.randn(n, r),
                                      kk, target=target)
                    # the LoRA backward as DoRA runs it: its pass over dY also sums dY ⊙ u (HAS_U)
                    x, a = torch.randn(m, k, dtype=dt), torch.randn(r, k)
                    y, s = lora_fwd_triton(x, w, None, a, None, torch.randn(n, r), 2.0, 0.0, 0, target=target)
                    lora_bwd_triton(torch.randn_like(y), x, w, a, None, torch.randn(n, r), s, 2.0, 0.0, 0, True, False,
                                    target=target, dy_u=torch.randn_like(y))

                tag = f"{str(dt).replace('torch.', '')} M={m} K={k} N={n}"
                if m == ms[0]:
                    for big in (4224, 8448):  # the single-launch forward's 32- and 64-row blocks
                        btag = tag.replace(f"M={m}", f"M={big}")
                        out.append((f"lora dropout=0.1 bias {btag}", lambda f=lora, big=big: f(m=big, variant="cublas")))
                        out.append((f"lora fp32 adapters {btag}",
                                    lambda f=lora, big=big: f(m=big, adt=torch.float32, p=0.0, variant="cublas")))
                out.append((f"lora dropout=0.1 bias {tag}", lora))
                out.append((f"lora dropout=0 {tag}", lambda f=lora: f(bias=False, p=0.0)))
                out.append((f"adalora (E) {tag}", lambda f=lora: f(e=True, bias=False, p=0.0, r=12)))
                if dt == torch.bfloat16:  # PEFT's default precision: the rank-r products split in bf16 pieces
                    out.append((f"lora fp32 adapters {tag}", lambda f=lora: f(adt=torch.float32, variant="cublas")))
                if dt != torch.float32 and not quick:
                    out.append((f"lora fp32 adapters r=3 {tag}", lambda f=lora: f(adt=torch.float32, r=3)))
                out.append((f"dora pieces {tag}", dora))
                out.append((f"ia3 output {tag}", ia3))
                out.append((f"ia3 feedforward {tag}", lambda f=ia3: f(ff=True)))
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--arch", type=int, default=90, help="compute capability x10 (90 = H100/H200, 80 = A100)")
    ap.add_argument("--quick", action="store_true", help="bf16 and aligned shapes only")
    ap.add_argument("--ci", action="store_true", help="as --quick, one configuration per autotuned launch")
    ap.add_argument("--json", help="write every compiled kernel's record here")
    ap.add_argument("--dtypes", help="comma-separated subset of bf16,fp16,fp32 (overrides the mode's dtypes)")
    ap.add_argument("--csv", help="write one row per compiled kernel here (scenario, config, resources)")
    args = ap.parse_args(argv)
    if args.arch not in SHARED_LIMIT:
        ap.error(f"--arch must be one of {sorted(SHARED_LIMIT)}, got {args.arch}")
    names = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
    dtypes = None
    if args.dtypes:
        bad = [d for d in args.dtypes.split(",") if d not in names]
        if bad:
            ap.error(f"--dtypes takes bf16, fp16, fp32; got {bad}")
        dtypes = [names[d] for d in args.dtypes.split(",")]

    driver.set_active(_StubDriver(GPUTarget("cuda", args.arch, 32)))
    rec = Recorder()
    rec.first_config_only = args.ci
    rec.install()
    from fastpeft.kernels._target import LaunchTarget
    target = LaunchTarget(num_sms=SMS[args.arch], smem_per_block=SHARED_LIMIT[args.arch],
                          capability_major=args.arch // 10, compile_only=True)

    # TMA is compiled only where the real launcher would use it (sm_90+); the pointer path everywhere.
    tma_modes = ["1", "0"] if args.arch >= 90 else ["0"]
    t0 = time.time()
    failed_calls = []
    for tma in tma_modes:
        os.environ["FASTPEFT_TRITON_TMA"] = tma
        for name, fn in _scenarios(args.quick or args.ci, target, dtypes):
            rec.scenario = f"{name} tma={tma}"
            try:
                fn()
            except Exception:  # noqa: BLE001 - a failing TMA launch raises too (the launchers never fall back)
                failed_calls.append((rec.scenario, traceback.format_exc(limit=3)))
    elapsed = time.time() - t0

    limit = SHARED_LIMIT[args.arch]
    rows = []
    for r in rec.kernels:
        k = r.pop("compiled")
        md = k.metadata
        asm = k.asm.get("ptx", "")
        res = _resources(k.asm["cubin"]) if "cubin" in k.asm else {}
        r.update(shared=int(md.shared), num_warps=int(md.num_warps), num_stages=int(md.num_stages),
                 fits=int(md.shared) <= limit, wgmma="wgmma" in asm, tma="cp.async.bulk.tensor" in asm, **res)
        rows.append(r)

    # a launch (scenario x kernel) with no configuration that fits cannot run on this target
    no_fit = {}
    for r in rows:
        key = (r["scenario"], r["kernel"])
        no_fit[key] = no_fit.get(key, True) and not r["fits"]
    unrunnable = sorted(k for k, v in no_fit.items() if v)

    seen = set()
    print(f"triton {triton.__version__}, target sm_{args.arch} (shared limit {limit} B), "
          f"{len(rows)} kernels compiled in {elapsed:.0f} s")
    print(f"{'kernel':<22} {'BM':>4} {'BN':>4} {'BK':>4} {'st':>2} {'wp':>2} {'shared':>7} {'reg':>4} {'spill':>5} "
          f"{'wgmma':>5} {'tma':>4}  flags")
    for r in rows:
        m = r["meta"]
        flags = _flags(m)
        line = (f"{r['kernel']:<22} {m.get('BLOCK_M', ''):>4} {m.get('BLOCK_N', ''):>4} {m.get('BLOCK_K', ''):>4} "
                f"{r['num_stages']:>2} {r['num_warps']:>2} {r['shared']:>7} {r.get('reg', '?'):>4} "
                f"{r.get('local', '?'):>5} {str(r['wgmma']):>5} {str(r['tma']):>4}  {flags}"
                f"{'' if r['fits'] else '  OVER SHARED LIMIT'}")
        if line not in seen:
            seen.add(line)
            print(line)
    spills = [r for r in rows if r.get("local", 0) > 0]
    print(f"\n{len(seen)} distinct kernels; {sum(not r['fits'] for r in rows)} over the shared limit; "
          f"{len(spills)} with register spills; {len(rec.errors)} compile errors; {len(failed_calls)} failed calls; "
          f"{len(unrunnable)} launches with no fitting configuration")
    for e in rec.errors[:20]:
        print(f"COMPILE ERROR [{e['scenario']}] {e['kernel']} {e['meta']}\n  {e['error'][:1500]}")
    for s, tb in failed_calls[:20]:
        print(f"FAILED CALL [{s}]\n{tb}")
    for s, k in unrunnable:
        print(f"NO CONFIG FITS [{s}] {k}")
    if args.csv:
        import csv
        cols = ["triton", "arch", "scenario", "kernel", "flags", "BLOCK_M", "BLOCK_N", "BLOCK_K", "num_stages",
                "num_warps", "shared", "fits", "reg", "local", "wgmma", "tma"]
        with open(args.csv, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=cols)
            w.writeheader()
            for r in rows:
                m = r["meta"]
                w.writerow({"triton": triton.__version__, "arch": f"sm_{args.arch}", "scenario": r["scenario"],
                            "kernel": r["kernel"], "flags": _flags(m), "BLOCK_M": m.get("BLOCK_M", ""),
                            "BLOCK_N": m.get("BLOCK_N", ""), "BLOCK_K": m.get("BLOCK_K", ""),
                            **{k: r.get(k, "") for k in cols[8:]}})
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"triton": triton.__version__, "arch": args.arch, "kernels": rows, "errors": rec.errors,
                       "failed_calls": [s for s, _ in failed_calls]}, f, indent=1)
    return 1 if (rec.errors or failed_calls or unrunnable) else 0


if __name__ == "__main__":
    sys.exit(main())
