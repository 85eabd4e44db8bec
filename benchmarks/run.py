"""``fastpeft-bench`` (also ``python -m fastpeft.bench``, or ``python -m benchmarks`` in a clone): layer-level and
end-to-end benchmarks of fastpeft against HF PEFT.

See ``benchmarks/README.md`` for the options, the output columns and the measurement rules.
"""

from __future__ import annotations

import argparse
import csv
import datetime as _dt
import os
import sys
import traceback
from pathlib import Path
from typing import Optional

import torch

from . import _utils as U
from .shapes import REGISTRIES, shapes

LAYER_OPS = {  # --op name -> list of (variant op name, setup kwargs)
    "lora": [("lora", {"method": "lora", "dropout": 0.0}), ("lora_dropout0.1", {"method": "lora", "dropout": 0.1})],
    "adalora": [("adalora", {"method": "adalora", "dropout": 0.0})],
    "ia3": [("ia3_attn", {"feedforward": False}), ("ia3_ff", {"feedforward": True})],
    "qlora": [("qlora_nf4", {"quant_type": "nf4"})],  # 4-bit bitsandbytes base (needs bitsandbytes)
    "dora": [("dora", {"dropout": 0.0}), ("dora_dropout0.1", {"dropout": 0.1})],  # benchmarks/bench_dora.py
}
# --op name -> runner(args, device, dtypes, requested_providers, bar) -> rows, for ops that are not a layer case of
# LAYER_OPS (whole models, memory studies).  A new benchmark registers itself here with one line.
OP_RUNNERS: dict = {}
COLUMNS = ["timestamp", "op", "provider", "mode", "shape", "M", "K", "N", "r", "dtype", "p50_ms", "p20_ms", "p80_ms",
           "spread", "peak_mib", "mem_kind", "err_vs_ref", "ratio_to_base", "ratio_to_peft", "tokens_per_s", "gpu",
           "torch", "triton", "fastpeft", "git", "note"]
DEFAULT_MAX_SPREAD = 0.3


def all_ops() -> tuple:
    return tuple(LAYER_OPS) + tuple(OP_RUNNERS)


def default_out_dir() -> Path:
    """Where results go without ``--out``: ``$FASTPEFT_BENCH_OUT``, else ``<user cache>/fastpeft/bench``
    (``$XDG_CACHE_HOME`` or ``~/.cache``) - never inside the source tree."""
    env = os.environ.get("FASTPEFT_BENCH_OUT")
    if env:
        return Path(env).expanduser()
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(cache) / "fastpeft" / "bench"


def build_parser(prog: str = "fastpeft-bench") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description=__doc__.splitlines()[0].replace("``", ""))
    p.add_argument("--quick", action="store_true",
                   help="a small subset of shapes (2 projections x 2 token counts x r=16) and shorter timing")
    p.add_argument("--op", default="all", help=f"comma list of {', '.join(all_ops())}, or all (default)")
    p.add_argument("--dtype", default=None, help="comma list of bf16, fp16, fp32 (default: bf16,fp16 on CUDA, "
                                                 "fp32 on CPU)")
    p.add_argument("--providers", default=None,
                   help="comma list among base, fastpeft-torch, fastpeft-triton, fastpeft-cuda, peft, peft-compile "
                        "(layer ops) and base, fastpeft, peft (e2e) (default: every available one, except "
                        "peft-compile on CPU and with --quick: it recompiles per case)")
    p.add_argument("--registry", default=None, choices=sorted(REGISTRIES),
                   help="shape registry (default: llama3-8b on CUDA, cpu-small without CUDA)")
    p.add_argument("--e2e-model", default=None,
                   help="model of the e2e op: llama3-8b-4l, cpu-small-4l or tiny-4l (default: llama3-8b-4l on "
                        "CUDA, cpu-small-4l without)")
    p.add_argument("--e2e-steps", type=int, default=None, help="timed e2e training steps (default 10; --quick 3)")
    p.add_argument("--out", default=None, metavar="DIR",
                   help="folder for results.csv (appended), latest.md and the plots (default: $FASTPEFT_BENCH_OUT, "
                        f"else {default_out_dir()})")
    p.add_argument("--max-spread", type=float, default=DEFAULT_MAX_SPREAD, metavar="S",
                   help="a case whose (p80 - p20) / p50 exceeds S for any provider, or whose frozen base is "
                        "clearly slower than an adapter, was disturbed by other load: its ratios are left empty and "
                        f"a warning is printed (default {DEFAULT_MAX_SPREAD})")
    p.add_argument("--no-plot", action="store_true", help="skip the PNG plots (they need matplotlib: "
                                                          "pip install 'fastpeft[bench]')")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"],
                   help="auto (default) picks cuda when available")
    p.add_argument("--model", action="store_true",
                   help="no timing: the cost model (benchmarks/cost_model.py) traces each layer with fake tensors and "
                        "writes predicted H200 times to OUT/cost-model/ (no GPU needed)")
    return p


def _split(s: Optional[str]) -> Optional[list[str]]:
    return None if s is None else [x.strip() for x in s.split(",") if x.strip()]


def _progress(total: int):
    """A tqdm bar on a terminal; None when stderr is a file or pipe (a bar there is one endless line)."""
    if not sys.stderr.isatty():
        return None
    try:
        from tqdm.auto import tqdm
    except ImportError:
        print("(install tqdm for a progress bar: pip install tqdm)", file=sys.stderr)
        return None
    return tqdm(total=total, desc="benchmarks", dynamic_ncols=True, file=sys.stderr)


def _layer_providers(requested: Optional[list[str]], device: torch.device, quick: bool = False
                     ) -> tuple[list[str], dict[str, str]]:
    avail = ["base"] + [f"fastpeft-{b}" for b in U.available_fastpeft_backends(device)]
    skipped = {}
    if U.peft_or_none() is not None:
        avail += ["peft", "peft-compile"]
    else:
        skipped["peft"] = skipped["peft-compile"] = "HF PEFT not installed (pip install peft)"
    if requested is None:
        # peft-compile recompiles per case (tens of seconds each): left out of CPU runs and of --quick by default.
        chosen = [p for p in avail if not ((device.type == "cpu" or quick) and p == "peft-compile")]
        return chosen, skipped
    for p in requested:
        if p not in avail and p in ("fastpeft-triton", "fastpeft-cuda"):
            skipped[p] = f"backend unavailable on {device.type}"
    return [p for p in requested if p in avail], skipped


def run_layer_case(case, quick: bool) -> list[dict]:
    """Error, then forward and fwd+bwd times (all providers interleaved), then memory, for every provider of one
    case; a provider that fails gets a ``failed`` row and is left out of the timing of the others."""
    rows = []
    dev = case.device

    def row_base(prov):
        return {"op": case.op, "provider": prov, "shape": case.shape.name, "M": case.shape.M, "K": case.shape.K,
                "N": case.shape.N, "r": case.shape.r, "dtype": str(case.dtype)[6:]}

    def failed(prov, e):
        note = f"failed: {type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
        rows.append({**row_base(prov), "mode": "fwd+bwd", "note": note})
        if os.environ.get("FASTPEFT_BENCH_DEBUG"):
            traceback.print_exc()

    errs, fwds, fulls = {}, {}, {}
    for prov, P in case.providers.items():
        try:
            # error first, on fresh inputs, output poisoned beforehand (a kernel that writes nothing shows NaN)
            x_err = torch.randn(case.shape.M, case.shape.K, device=dev, dtype=case.dtype)
            y = torch.full((case.shape.M, case.shape.N), float("nan"), device=dev, dtype=case.dtype)
            with torch.no_grad():
                y = P.call_eval(x_err)
                ref = case.reference(x_err) if prov != "base" else torch.nn.functional.linear(
                    x_err.double(), case.keep[0].double())
            errs[prov] = U.rel_err(y, ref)

            def fwd(P=P):
                x, _ = case.inputs.next()
                return P.call(x)

            def full(P=P):
                x, dy = case.inputs.next()
                x.grad = None
                for p in P.params:
                    p.grad = None
                P.call(x).backward(dy)

            full()
            fwds[prov], fulls[prov] = fwd, full
        except Exception as e:  # one failing provider must not end the run
            failed(prov, e)
    timings = {}
    for mode, fns in (("forward", fwds), ("fwd+bwd", fulls)):
        try:
            timings[mode] = U.bench_interleaved(fns, dev, quick)
        except Exception:  # find the culprit: time each alone
            timings[mode] = {}
            for prov, fn in list(fns.items()):
                try:
                    timings[mode].update(U.bench_interleaved({prov: fn}, dev, quick))
                except Exception as e:
                    failed(prov, e)
    for prov in fwds:
        f, b = timings["forward"].get(prov), timings["fwd+bwd"].get(prov)
        if f is None or b is None:
            continue
        try:
            mem, kind = U.peak_mem_mib(fulls[prov], dev,
                                       exclude=case.keep + [t for c in case.inputs.copies for t in c])
        except Exception as e:
            failed(prov, e)
            continue
        rows.append({**row_base(prov), "mode": "forward", "p50_ms": f.p50, "p20_ms": f.p20, "p80_ms": f.p80,
                     "err_vs_ref": errs[prov]})
        rows.append({**row_base(prov), "mode": "fwd+bwd", "p50_ms": b.p50, "p20_ms": b.p20, "p80_ms": b.p80,
                     "peak_mib": mem, "mem_kind": kind, "err_vs_ref": errs[prov]})
    for prov, why in case.skipped.items():
        rows.append({"op": case.op, "provider": prov, "mode": "fwd+bwd", "shape": case.shape.name,
                     "dtype": str(case.dtype)[6:], "note": f"skipped: {why}"})
    return rows


def _group_key(r: dict) -> tuple:
    # e2e rows of one model form one group whatever their mode (the base runs no optimizer step)
    return (r.get("op"), r.get("shape"), r.get("dtype"), None if r.get("op") == "e2e_train_step" else r.get("mode"))


def guard_noise(rows: list[dict], max_spread: float = DEFAULT_MAX_SPREAD) -> list[str]:
    """Mark the measurements a busy machine made meaningless; returns one line per affected group.

    Every timed row gets ``spread`` = (p80 - p20) / p50.  A group (same op, shape, dtype, mode) is too noisy when a
    provider's spread exceeds ``max_spread``, or when the frozen base is clearly slower than an adapter provider
    (its p20 above their p80: the adapter does the base's work plus more, so only interference explains it).  The
    ratios of a noisy group are removed and its rows get a ``too noisy`` note.
    """
    groups: dict = {}
    for r in rows:
        if r.get("p50_ms") and r.get("p20_ms") is not None and r.get("p80_ms") is not None:
            r["spread"] = (r["p80_ms"] - r["p20_ms"]) / r["p50_ms"]
            groups.setdefault(_group_key(r), []).append(r)
    lines = []
    for key, rs in groups.items():
        why = [f"{r['provider']} spread {r['spread']:.2f} > {max_spread:g}" for r in rs if r["spread"] > max_spread]
        base = next((r for r in rs if r.get("provider") == "base"), None)
        if base is not None:
            why += [f"base p20 {base['p20_ms']:.4g} ms > {r['provider']} p80 {r['p80_ms']:.4g} ms"
                    for r in rs if r is not base and base["p20_ms"] > r["p80_ms"]]
        if not why:
            continue
        for r in rs:
            r.pop("ratio_to_base", None)
            r.pop("ratio_to_peft", None)
            r["note"] = "; ".join(x for x in (r.get("note"), "too noisy, no ratio: " + ", ".join(why)) if x)
        op, shape, dtype, mode = key
        lines.append(f"{op} {mode or ''} {shape} {dtype}: {', '.join(why)}".replace("  ", " "))
    return lines


def add_ratios(rows: list[dict]) -> None:
    key = lambda r: (r.get("op"), r.get("mode"), r.get("shape"), r.get("dtype"))  # noqa: E731
    base = {key(r): r["p50_ms"] for r in rows if r.get("provider") == "base" and r.get("p50_ms")}
    peft = {key(r): r["p50_ms"] for r in rows if r.get("provider") == "peft" and r.get("p50_ms")}
    for r in rows:
        t = r.get("p50_ms")
        if not t:
            continue
        if key(r) in base:
            r["ratio_to_base"] = t / base[key(r)]
        if key(r) in peft:
            r["ratio_to_peft"] = t / peft[key(r)]


def write_csv(rows: list[dict], path: Path) -> Path:
    """Append ``rows`` to ``path`` (header written once); a file with other columns (an older harness) is left
    alone and the rows go to ``results-<UTC time>.csv`` beside it.  Returns the file written."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.exists():
        with open(path, newline="") as f:
            header = next(csv.reader(f), None)
        if header != COLUMNS:
            path = path.with_name(f"{path.stem}-{_dt.datetime.now(_dt.timezone.utc):%Y%m%dT%H%M%SZ}{path.suffix}")
    new = not path.exists()
    with open(path, "a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=COLUMNS, extrasaction="ignore")
        if new:
            w.writeheader()
        for r in rows:
            w.writerow({c: _cell(r.get(c)) for c in COLUMNS})
    return path


def _cell(v):
    if isinstance(v, float):
        return "" if v != v else f"{v:.6g}"
    return "" if v is None else v


def markdown(rows: list[dict], env: dict, title: str) -> str:
    cols = ["op", "provider", "mode", "shape", "dtype", "p50_ms", "p20_ms", "p80_ms", "spread", "peak_mib",
            "err_vs_ref", "ratio_to_base", "ratio_to_peft", "tokens_per_s", "note"]
    lines = [f"### {title}", "",
             f"{env['gpu']} · torch {env['torch']} · triton {env['triton']} · fastpeft {env['fastpeft']} · "
             f"git {env['git']} · {rows[0]['timestamp'] if rows else ''}", "",
             "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    specs = {"p50_ms": ".4f", "p20_ms": ".4f", "p80_ms": ".4f", "spread": ".2f", "peak_mib": ".2f", "err_vs_ref": ".2e",
             "ratio_to_base": ".3f", "ratio_to_peft": ".3f", "tokens_per_s": ".0f"}
    for r in rows:
        cells = []
        for c in cols:
            v = r.get(c)
            cells.append(U.fmt(v, specs[c]) if c in specs and isinstance(v, float) else ("" if v is None else str(v)))
        lines.append("| " + " | ".join(cells) + " |")
    kinds = sorted({r.get("mem_kind") for r in rows if r.get("mem_kind")})
    if kinds:
        lines += ["", "peak_mib: " + "; ".join({
            "cuda_peak": "cuda_peak = peak CUDA memory of one fwd+bwd above what was allocated before",
            "cpu_saved_for_backward": "cpu_saved_for_backward = bytes of non-parameter tensors saved for backward "
                                      "(CPU proxy; no allocator statistics on CPU)"}[k] for k in kinds)]
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], out_dir: Path, tag: str) -> list[Path]:
    """One PNG per dtype: ratio to base (fwd+bwd p50) per shape and provider, one panel per op."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("plots skipped: matplotlib is not installed (pip install matplotlib)", file=sys.stderr)
        return []
    paths = []
    layer = [r for r in rows if r.get("mode") == "fwd+bwd" and r.get("ratio_to_base") and r["op"] != "e2e_train_step"]
    for dtype in sorted({r["dtype"] for r in layer}):
        sel = [r for r in layer if r["dtype"] == dtype]
        ops = list(dict.fromkeys(r["op"] for r in sel))
        fig, axes = plt.subplots(len(ops), 1, figsize=(11, 2.8 * len(ops)), squeeze=False)
        for ax, op in zip(axes[:, 0], ops):
            rs = [r for r in sel if r["op"] == op]
            shapes_ = list(dict.fromkeys(r["shape"] for r in rs))
            provs = list(dict.fromkeys(r["provider"] for r in rs))
            w = 0.8 / max(1, len(provs))
            for i, prov in enumerate(provs):
                vals = {r["shape"]: r["ratio_to_base"] for r in rs if r["provider"] == prov}
                xs = [j + i * w for j in range(len(shapes_))]
                ax.bar(xs, [vals.get(s, 0.0) for s in shapes_], width=w, label=prov)
            ax.axhline(1.0, color="k", lw=0.8)
            ax.set_xticks([j + 0.4 - w / 2 for j in range(len(shapes_))])
            ax.set_xticklabels([s.split(".", 1)[-1] for s in shapes_], fontsize=7)
            ax.set_ylabel("time / base")
            ax.set_title(f"{op} fwd+bwd, {dtype} ({tag})", fontsize=9)
            ax.legend(fontsize=7, ncol=len(provs))
        fig.tight_layout()
        path = out_dir / f"ratio_to_base_{dtype}.png"
        fig.savefig(path, dpi=90)
        plt.close(fig)
        paths.append(path)
    return paths


def run_e2e_op(args, device: torch.device, dtypes: list, requested: Optional[list], bar) -> list[dict]:
    """The ``e2e`` op: one training step of a small Llama-shaped model per provider (``bench_e2e.py``)."""
    from .bench_e2e import E2E, loss_err, run_e2e
    e2e_model = args.e2e_model or ("llama3-8b-4l" if device.type == "cuda" else "cpu-small-4l")
    if e2e_model not in E2E:
        raise ValueError(f"--e2e-model must be one of {sorted(E2E)}, got {e2e_model!r}")
    steps = args.e2e_steps or (3 if args.quick else 10)
    provs = [p for p in (requested or ["base", "fastpeft", "peft"]) if p in ("base", "fastpeft", "peft")]
    spec, dt = E2E[e2e_model], dtypes[0]
    shape = f"{e2e_model} B{spec['batch']}xS{spec['seq']} lora r16 all-linear p0.05"
    if bar is not None:
        bar.set_postfix_str(f"e2e {e2e_model} {dt}")
    rows = []
    try:
        res = run_e2e(e2e_model, U.DTYPES[dt], device, provs, steps)
    except Exception as e:
        if os.environ.get("FASTPEFT_BENCH_DEBUG"):
            traceback.print_exc()
        return [{"op": "e2e_train_step", "provider": "*", "shape": shape, "dtype": dt,
                 "note": f"failed: {type(e).__name__}: {str(e)[:200]}"}]
    ref = next((r for r in res if r.provider == "peft"), None)
    base = next((r for r in res if r.provider == "base"), None)
    for r in res:
        rows.append({"op": "e2e_train_step", "provider": r.provider,
                     "mode": "fwd+bwd" if r.provider == "base" else "fwd+bwd+adamw", "shape": shape,
                     "M": spec["batch"] * spec["seq"], "K": spec["hidden_size"], "N": spec["intermediate_size"],
                     "r": 16, "dtype": dt, "p50_ms": r.p50, "p20_ms": r.p20, "p80_ms": r.p80, "peak_mib": r.mem_mib,
                     "mem_kind": r.mem_kind, "tokens_per_s": r.tokens_per_s,
                     "err_vs_ref": loss_err(r, ref) if ref is not None else None,
                     "ratio_to_base": r.p50 / base.p50 if base is not None else None,
                     "ratio_to_peft": r.p50 / ref.p50 if ref is not None else None,
                     "note": r.label + ("; err = eval-loss rel. diff vs peft" if ref else "")})
    return rows


OP_RUNNERS["e2e"] = run_e2e_op


def run_memory_op(args, device: torch.device, dtypes: list, requested: Optional[list], bar) -> list[dict]:
    """The ``memory`` op: activation memory per model family and method (``bench_memory.py``; it writes its own
    memory.csv / memory.md into the output folder and adds no timing rows)."""
    from .bench_memory import main as memory_main
    out = Path(args.out).expanduser() if args.out else default_out_dir()
    memory_main(["--out", str(out), "--device", device.type] + (["--quick"] if args.quick else []))
    return []


OP_RUNNERS["memory"] = run_memory_op


def run_dispatch_op(args, device: torch.device, dtypes: list, requested: Optional[list], bar) -> list[dict]:
    """The ``dispatch`` op: a training step through the custom op vs the eager autograd.Function
    (``bench_dispatch.py``), the measurement behind the two entry points of ``fastpeft/ops``."""
    from .bench_dispatch import measure
    rows = []
    for dt in dtypes:
        if bar is not None:
            bar.set_postfix_str(f"dispatch {dt}")
        rows += measure(device, dt, args.quick)
    return rows


OP_RUNNERS["dispatch"] = run_dispatch_op


def noise_warning(lines: list[str], total_groups: int, max_spread: float) -> str:
    """The warning printed when ``guard_noise`` found disturbed cases ('' when none)."""
    if not lines:
        return ""
    head = (f"WARNING: {len(lines)} of {total_groups} measured cases were too noisy to compare (another process was "
            f"using the machine): their ratio_to_base / ratio_to_peft are left empty. Rerun on an idle machine "
            f"(or raise --max-spread above {max_spread:g} knowingly).")
    return "\n".join([head] + ["  " + x for x in lines[:20]] + ([f"  ... and {len(lines) - 20} more"]
                                                                 if len(lines) > 20 else []))


def main(argv: Optional[list[str]] = None, prog: str = "fastpeft-bench") -> int:
    args = build_parser(prog).parse_args(argv)
    if args.model:
        from .cost_model import run_model
        run_model(Path(args.out or default_out_dir()) / "cost-model", quick=args.quick)
        return 0
    if args.device == "auto":
        device = torch.device("cuda" if U.has_cuda() else "cpu")
    else:
        device = torch.device(args.device)
        if device.type == "cuda" and not U.has_cuda():
            print("error: --device cuda but no CUDA device is available", file=sys.stderr)
            return 2
    ops = list(all_ops()) if args.op == "all" else _split(args.op)
    bad = [o for o in ops if o not in all_ops()]
    if bad:
        print(f"error: --op {bad} not in {all_ops()}", file=sys.stderr)
        return 2
    dtypes = _split(args.dtype) or (["bf16", "fp16"] if device.type == "cuda" else ["fp32"])
    bad = [d for d in dtypes if d not in U.DTYPES]
    if bad:
        print(f"error: --dtype {bad} not in {list(U.DTYPES)}", file=sys.stderr)
        return 2
    if not args.max_spread > 0:
        print(f"error: --max-spread must be > 0, got {args.max_spread}", file=sys.stderr)
        return 2
    if args.e2e_steps is not None and args.e2e_steps < 1:
        print(f"error: --e2e-steps must be >= 1, got {args.e2e_steps}", file=sys.stderr)
        return 2
    out = Path(args.out).expanduser() if args.out else default_out_dir()
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        print(f"error: --out {str(out)!r} cannot be created: {e}", file=sys.stderr)
        return 2
    registry = args.registry or ("llama3-8b" if device.type == "cuda" else "cpu-small")
    if device.type != "cuda":
        print(f"no CUDA device: running the CPU providers on the small '{registry}' shapes; these numbers say "
              "nothing about GPU performance.")
    env = U.env_info(device)
    stamp = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    requested = _split(args.providers)
    layer_provs, layer_skipped = _layer_providers(requested, device, args.quick)
    print(f"device: {env['gpu']}; torch {env['torch']}, triton {env['triton']}, git {env['git']}; results -> {out}")
    print(f"layer providers: {layer_provs}" + (f"; skipped: {layer_skipped}" if layer_skipped else ""))

    cases = []
    for op in ops:
        if op not in LAYER_OPS:
            continue
        for variant, kw in LAYER_OPS[op]:
            for dt in dtypes:
                for shp in shapes(registry, args.quick, with_rank=op != "ia3"):
                    cases.append((op, variant, kw, dt, shp))
    runners = [op for op in ops if op in OP_RUNNERS]
    bar = _progress(len(cases) + len(runners))
    rows: list[dict] = []
    for op, variant, kw, dt, shp in cases:
        if bar is not None:
            bar.set_postfix_str(f"{variant} {shp.short} {dt}")
        try:
            if op == "ia3":
                from .bench_ia3 import setup_ia3
                case = setup_ia3(shp, U.DTYPES[dt], device, layer_provs, **kw)
            elif op == "qlora":
                from .bench_qlora import setup_qlora
                case = setup_qlora(shp, U.DTYPES[dt], device, layer_provs, **kw)
            elif op == "dora":
                from .bench_dora import setup_dora
                case = setup_dora(shp, U.DTYPES[dt], device, layer_provs, **kw)
            else:
                from .bench_lora import setup_lora
                case = setup_lora(shp, U.DTYPES[dt], device, layer_provs, **kw)
            case.skipped.update(layer_skipped)
            case_rows = run_layer_case(case, args.quick)
            add_ratios(case_rows)
            rows += case_rows
        except Exception as e:
            rows.append({"op": variant, "provider": "*", "shape": shp.name, "dtype": dt,
                         "note": f"setup failed: {type(e).__name__}: {str(e)[:200]}"})
        finally:
            if device.type == "cuda":
                torch.cuda.empty_cache()
        if bar is not None:
            bar.update(1)
    for op in runners:
        try:
            rows += OP_RUNNERS[op](args, device, dtypes, requested, bar)
        except Exception as e:
            rows.append({"op": op, "provider": "*", "note": f"failed: {type(e).__name__}: {str(e)[:200]}"})
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()

    noisy = guard_noise(rows, args.max_spread)
    n_groups = len({_group_key(r) for r in rows if r.get("spread") is not None})
    for r in rows:
        r.update({k: env[k] for k in ("gpu", "torch", "triton", "fastpeft", "git")})
        r["timestamp"] = stamp
    csv_path = write_csv(rows, out / "results.csv")
    tag = f"{env['gpu']}, {'quick' if args.quick else 'full'}"
    md = markdown(rows, env, f"fastpeft benchmarks ({tag})")
    warning = noise_warning(noisy, n_groups, args.max_spread)
    if warning:
        md += "\n" + warning + "\n"
    (out / "latest.md").write_text(md)
    print(md)
    plots = [] if args.no_plot else plot(rows, out, tag)
    print(f"appended {len(rows)} rows to {csv_path}; table in {out / 'latest.md'}"
          + (f"; plots: {', '.join(str(p) for p in plots)}" if plots else ""))
    if warning:
        print(warning, file=sys.stderr)
    failed = [r for r in rows if str(r.get("note", "")).startswith(("failed", "setup failed"))]
    if failed:
        print(f"{len(failed)} case(s) failed; see the note column", file=sys.stderr)
    return 0
