"""``python -m benchmarks``: layer-level and end-to-end benchmarks of fastpeft against HF PEFT.

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
ALL_OPS = ("lora", "adalora", "ia3", "qlora", "dora", "e2e", "memory")
COLUMNS = ["timestamp", "op", "provider", "mode", "shape", "M", "K", "N", "r", "dtype", "p50_ms", "p20_ms", "p80_ms",
           "peak_mib", "mem_kind", "err_vs_ref", "ratio_to_base", "ratio_to_peft", "tokens_per_s", "gpu", "torch",
           "triton", "fastpeft", "git", "note"]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--quick", action="store_true", help="a small subset of shapes and shorter timing")
    p.add_argument("--op", default="all", help=f"comma list of {ALL_OPS} or 'all'")
    p.add_argument("--dtype", default=None, help="comma list of bf16, fp16, fp32 (default: bf16,fp16 on CUDA; "
                                                 "fp32 on CPU)")
    p.add_argument("--providers", default=None,
                   help="comma list among base, fastpeft-torch, fastpeft-triton, fastpeft-cuda, peft, peft-compile "
                        "(layer ops) and base, fastpeft, peft (e2e). Default: every available one (CPU: no "
                        "peft-compile, whose compile time dominates a CPU run)")
    p.add_argument("--registry", default=None, choices=sorted(REGISTRIES),
                   help="shape registry (default: llama3-8b on CUDA, cpu-small without CUDA)")
    p.add_argument("--e2e-model", default=None, help="llama3-8b-4l (CUDA default) or cpu-small-4l (CPU default)")
    p.add_argument("--e2e-steps", type=int, default=None, help="timed training steps (default 10, quick 3)")
    p.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"),
                   help="folder for results.csv (appended), latest.md and the plots")
    p.add_argument("--no-plot", action="store_true")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")
    p.add_argument("--model", action="store_true",
                   help="no timing: the cost model (benchmarks/cost_model.py) traces each layer with fake tensors and "
                        "writes predicted H200 times to OUT/cost-model/ (no GPU needed)")
    return p


def _split(s: Optional[str]) -> Optional[list[str]]:
    return None if s is None else [x.strip() for x in s.split(",") if x.strip()]


def _progress(total: int):
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
    """Time forward and fwd+bwd, measure memory and error for every provider of one case."""
    rows = []
    dev = case.device
    for prov, P in case.providers.items():
        row_base = {"op": case.op, "provider": prov, "shape": case.shape.name, "M": case.shape.M,
                    "K": case.shape.K, "N": case.shape.N, "r": case.shape.r, "dtype": str(case.dtype)[6:]}
        try:
            # error first, on fresh inputs, output poisoned beforehand (performance.md §4)
            x_err = torch.randn(case.shape.M, case.shape.K, device=dev, dtype=case.dtype)
            y = torch.full((case.shape.M, case.shape.N), float("nan"), device=dev, dtype=case.dtype)
            with torch.no_grad():
                y = P.call_eval(x_err)
                ref = case.reference(x_err) if prov != "base" else torch.nn.functional.linear(
                    x_err.double(), case.keep[0].double())
            err = U.rel_err(y, ref)

            def fwd():
                x, _ = case.inputs.next()
                return P.call(x)

            def full():
                x, dy = case.inputs.next()
                x.grad = None
                for p in P.params:
                    p.grad = None
                P.call(x).backward(dy)

            f50, f20, f80 = U.bench(fwd, dev, quick)
            b50, b20, b80 = U.bench(full, dev, quick)
            mem, kind = U.peak_mem_mib(full, dev, exclude=case.keep + [t for c in case.inputs.copies for t in c])
            rows.append({**row_base, "mode": "forward", "p50_ms": f50, "p20_ms": f20, "p80_ms": f80,
                         "err_vs_ref": err})
            rows.append({**row_base, "mode": "fwd+bwd", "p50_ms": b50, "p20_ms": b20, "p80_ms": b80,
                         "peak_mib": mem, "mem_kind": kind, "err_vs_ref": err})
        except Exception as e:  # one failing provider must not end the run
            note = f"failed: {type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
            rows.append({**row_base, "mode": "fwd+bwd", "note": note})
            if os.environ.get("FASTPEFT_BENCH_DEBUG"):
                traceback.print_exc()
    for prov, why in case.skipped.items():
        rows.append({"op": case.op, "provider": prov, "mode": "fwd+bwd", "shape": case.shape.name,
                     "dtype": str(case.dtype)[6:], "note": f"skipped: {why}"})
    return rows


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


def write_csv(rows: list[dict], path: Path) -> None:
    new = not path.exists()
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=COLUMNS, extrasaction="ignore")
        if new:
            w.writeheader()
        for r in rows:
            w.writerow({c: _cell(r.get(c)) for c in COLUMNS})


def _cell(v):
    if isinstance(v, float):
        return "" if v != v else f"{v:.6g}"
    return "" if v is None else v


def markdown(rows: list[dict], env: dict, title: str) -> str:
    cols = ["op", "provider", "mode", "shape", "dtype", "p50_ms", "p20_ms", "p80_ms", "peak_mib", "err_vs_ref",
            "ratio_to_base", "ratio_to_peft", "tokens_per_s", "note"]
    lines = [f"### {title}", "",
             f"{env['gpu']} · torch {env['torch']} · triton {env['triton']} · fastpeft {env['fastpeft']} · "
             f"git {env['git']} · {rows[0]['timestamp'] if rows else ''}", "",
             "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    specs = {"p50_ms": ".4f", "p20_ms": ".4f", "p80_ms": ".4f", "peak_mib": ".2f", "err_vs_ref": ".2e",
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


def main(argv: Optional[list[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    if args.model:
        from .cost_model import run_model
        run_model(Path(args.out) / "cost-model", quick=args.quick)
        return 0
    if args.device == "auto":
        device = torch.device("cuda" if U.has_cuda() else "cpu")
    else:
        device = torch.device(args.device)
        if device.type == "cuda" and not U.has_cuda():
            print("error: --device cuda but no CUDA device is available", file=sys.stderr)
            return 2
    ops = list(ALL_OPS) if args.op == "all" else _split(args.op)
    bad = [o for o in ops if o not in ALL_OPS]
    if bad:
        print(f"error: --op {bad} not in {ALL_OPS}", file=sys.stderr)
        return 2
    dtypes = _split(args.dtype) or (["bf16", "fp16"] if device.type == "cuda" else ["fp32"])
    bad = [d for d in dtypes if d not in U.DTYPES]
    if bad:
        print(f"error: --dtype {bad} not in {list(U.DTYPES)}", file=sys.stderr)
        return 2
    registry = args.registry or ("llama3-8b" if device.type == "cuda" else "cpu-small")
    e2e_model = args.e2e_model or ("llama3-8b-4l" if device.type == "cuda" else "cpu-small-4l")
    e2e_steps = args.e2e_steps or (3 if args.quick else 10)
    if device.type != "cuda":
        print(f"no CUDA device: running the CPU providers on the small '{registry}' shapes and the "
              f"'{e2e_model}' model; these numbers say nothing about GPU performance.")
    env = U.env_info(device)
    stamp = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    requested = _split(args.providers)
    layer_provs, layer_skipped = _layer_providers(requested, device, args.quick)
    print(f"device: {env['gpu']}; torch {env['torch']}, triton {env['triton']}, git {env['git']}")
    print(f"layer providers: {layer_provs}" + (f"; skipped: {layer_skipped}" if layer_skipped else ""))

    cases = []
    for op in ops:
        if op in ("e2e", "memory"):
            continue
        for variant, kw in LAYER_OPS[op]:
            for dt in dtypes:
                for shp in shapes(registry, args.quick, with_rank=op != "ia3"):
                    cases.append((op, variant, kw, dt, shp))
    total = len(cases) + (1 if "e2e" in ops else 0)
    bar = _progress(total)
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
            rows += run_layer_case(case, args.quick)
        except Exception as e:
            rows.append({"op": variant, "provider": "*", "shape": shp.name, "dtype": dt,
                         "note": f"setup failed: {type(e).__name__}: {str(e)[:200]}"})
        finally:
            if device.type == "cuda":
                torch.cuda.empty_cache()
        if bar is not None:
            bar.update(1)
    if "e2e" in ops:
        from .bench_e2e import E2E, loss_err, run_e2e
        e2e_provs = [p for p in (requested or ["base", "fastpeft", "peft"]) if p in ("base", "fastpeft", "peft")]
        for dt in dtypes[:1] if device.type == "cpu" else dtypes[:1]:
            spec = E2E[e2e_model]
            shape = f"{e2e_model} B{spec['batch']}xS{spec['seq']} lora r16 all-linear p0.05"
            if bar is not None:
                bar.set_postfix_str(f"e2e {e2e_model} {dt}")
            try:
                res = run_e2e(e2e_model, U.DTYPES[dt], device, e2e_provs, e2e_steps)
                ref = next((r for r in res if r.provider == "peft"), None)
                for r in res:
                    rows.append({"op": "e2e_train_step", "provider": r.provider,
                                 "mode": "fwd+bwd" if r.provider == "base" else "fwd+bwd+adamw", "shape": shape,
                                 "M": spec["batch"] * spec["seq"], "K": spec["hidden_size"],
                                 "N": spec["intermediate_size"], "r": 16, "dtype": dt,
                                 "p50_ms": r.p50, "p20_ms": r.p20, "p80_ms": r.p80, "peak_mib": r.mem_mib,
                                 "mem_kind": r.mem_kind, "tokens_per_s": r.tokens_per_s,
                                 "err_vs_ref": loss_err(r, ref) if ref is not None else None,
                                 "note": r.label + ("; err = eval-loss rel. diff vs peft" if ref else "")})
                base = next((r for r in res if r.provider == "base"), None)
                for row in rows[-len(res):]:
                    if base is not None:
                        row["ratio_to_base"] = row["p50_ms"] / base.p50
                    if ref is not None:
                        row["ratio_to_peft"] = row["p50_ms"] / ref.p50
            except Exception as e:
                rows.append({"op": "e2e_train_step", "provider": "*", "shape": shape, "dtype": dt,
                             "note": f"failed: {type(e).__name__}: {str(e)[:200]}"})
                if os.environ.get("FASTPEFT_BENCH_DEBUG"):
                    traceback.print_exc()
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()

    add_ratios([r for r in rows if r.get("op") != "e2e_train_step"])
    for r in rows:
        r.setdefault("timestamp", stamp)
        r.update({k: env[k] for k in ("gpu", "torch", "triton", "fastpeft", "git")})
        r["timestamp"] = stamp
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    write_csv(rows, out / "results.csv")
    tag = f"{env['gpu']}, {'quick' if args.quick else 'full'}"
    md = markdown(rows, env, f"fastpeft benchmarks ({tag})")
    (out / "latest.md").write_text(md)
    print(md)
    plots = [] if args.no_plot else plot(rows, out, tag)
    print(f"appended {len(rows)} rows to {out / 'results.csv'}; table in {out / 'latest.md'}"
          + (f"; plots: {', '.join(str(p) for p in plots)}" if plots else ""))
    failed = [r for r in rows if str(r.get("note", "")).startswith(("failed", "setup failed"))]
    if failed:
        print(f"{len(failed)} case(s) failed; see the note column", file=sys.stderr)
    if "memory" in ops:  # activation memory per family and method (memory.csv / memory.md in the same folder)
        from .bench_memory import main as memory_main
        memory_main(["--out", str(out), "--device", device.type] + (["--quick"] if args.quick else []))
    return 0
