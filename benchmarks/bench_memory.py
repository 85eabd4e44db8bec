"""Activation memory of one training step: fastpeft (recompute on / off) vs HF PEFT vs the frozen model.

``python -m benchmarks.bench_memory [--out DIR] [--families llama,gpt2] [--methods lora,ia3] [--quick]``
(also ``python -m benchmarks --op memory``).

The measure (device-independent; activation memory on a GPU follows the same tensors): the peak of torch's own
allocations during one forward + backward, above the level just before it, after two warm-up steps.  On a CPU it is
the running sum of the profiler's allocation events (``torch.profiler``, ``profile_memory=True``: every CPU
allocation and free, in order); on CUDA ``torch.cuda.max_memory_allocated`` growth over the step.  The frozen
reference is the same model with every weight frozen and the input embeddings trainable (so activations need grad).

Also reported, on a CPU, the measure the memory issue was filed with: growth of the C heap (glibc ``mallinfo2()``,
``uordblks + hblkhd``) sampled after every ATen op through a ``TorchDispatchMode``.  It overstates what adapters
cost: while a Python dispatch mode is active torch treats every tensor as a subclass and autograd stops summing a
tensor's gradients in place (each sum of two M x K gradients - an adapter's input gets one from the frozen layer and
one from the adapter - takes a third buffer); it also counts whatever else mallocs (the Triton interpreter's numpy
copies).  Hence the first measure.  Also: the bytes autograd keeps for backward (unique storages, weights excluded;
``fastpeft.recompute.saved_tensor_bytes``) and what the recompute rebuilds per step (bytes, recipe steps).

Default case (the issue's): 2 layers, hidden 512, batch 4 x 256 tokens, bf16 base, fp32 adapters, LoRA r=16 on
every linear layer (dropout 0 and 0.05), AdaLoRA r=16, IA3 on (k, v, down), DoRA (LoRA r=16, use_dora) on every linear
layer.

Provider ``fastpeft-triton`` (opt-in: ``--providers frozen,fastpeft-triton``) runs fastpeft's default GPU path - the
frozen layer's GEMMs plus the Triton kernels, dropout masks generated in-kernel - whose tensors differ from the torch
path's: on a GPU it is what ``fastpeft`` measures already; on a CPU it needs ``TRITON_INTERPRET=1`` and is slow (the
interpreter takes seconds per launch: use ``--quick``).
Writes ``memory.csv`` (appended), ``memory.md`` (the latest table) and ``memory.png`` (the same as bars; needs
matplotlib, skipped with a message without it or with ``--no-plot``) under ``--out``.

Provider ``fastpeft-gemm`` (opt-in) turns on the recompute's GEMM rebuilds (``set_enabled(model, True, gemm=True)``,
``FASTPEFT_RECOMPUTE=all``): DoRA's output, kept for the magnitude's gradient, re-run from the rebuilt input in
backward (a forward GEMM per DoRA layer); for the other methods it is the same as ``fastpeft``.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import ctypes
import datetime as _dt
import os
import sys
from pathlib import Path
from typing import Callable, Optional

import torch
from torch.utils._python_dispatch import TorchDispatchMode

import fastpeft
from fastpeft import recompute as R

FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "phi3", "gpt2", "bert")
METHODS = ("lora", "lora_dropout0.05", "adalora", "ia3", "dora")
PROVIDERS = ("frozen", "peft", "fastpeft", "fastpeft-norecompute")
OPT_IN_PROVIDERS = ("fastpeft-triton", "fastpeft-gemm")
COLUMNS = ["timestamp", "family", "method", "provider", "dtype", "batch", "seq", "hidden", "layers", "peak_mib",
           "ratio_to_frozen", "saved_mib", "saved_ratio_to_frozen", "recomputed_mib", "recompute_ops", "mem_kind",
           "heap_mode_mib", "heap_mode_ratio_to_frozen", "note"]


# ---------------------------------------------------------------------------------------------------------------
# heap measure
# ---------------------------------------------------------------------------------------------------------------


class _Mallinfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                               "fsmblks", "uordblks", "fordblks", "keepcost")]


def _heap_reader() -> Optional[Callable[[], int]]:
    try:
        libc = ctypes.CDLL("libc.so.6")
        fn = libc.mallinfo2
    except (OSError, AttributeError):
        return None
    fn.restype = _Mallinfo2

    def read() -> int:
        m = fn()
        return m.uordblks + m.hblkhd
    return read


class _PeakHeap(TorchDispatchMode):
    def __init__(self, read: Callable[[], int]) -> None:
        super().__init__()
        self.read, self.peak = read, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        v = self.read()
        if v > self.peak:
            self.peak = v
        return out


def _measure(step: Callable[[], None], device: torch.device) -> tuple[float, str]:
    """Peak growth (MiB) of torch's allocations during one step over the level just before it."""
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        step()
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - before) / 2 ** 20, "cuda_max_allocated"
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    cpu = torch._C._autograd.DeviceType.CPU
    events = sorted((e for e in prof.profiler.kineto_results.events()
                     if e.name() == "[memory]" and e.device_type() == cpu), key=lambda e: e.start_ns())
    level = peak = 0
    for e in events:
        level += e.nbytes()
        peak = max(peak, level)
    return peak / 2 ** 20, "torch CPU allocations (profiler)"


def _measure_heap_mode(step: Callable[[], None]) -> float:
    """The issue's measure (see the module docstring): peak C-heap growth (MiB) sampled after every ATen op through
    a dispatch mode; NaN without glibc's mallinfo2."""
    read = _heap_reader()
    if read is None:
        return float("nan")
    mode = _PeakHeap(read)
    before = read()
    mode.peak = before
    with mode:
        step()
    return (mode.peak - before) / 2 ** 20


# ---------------------------------------------------------------------------------------------------------------
# models
# ---------------------------------------------------------------------------------------------------------------


def build_base(family: str, hidden: int, layers: int, vocab: int = 1024):
    import transformers as T
    inter = hidden * 11 // 4
    dec = dict(vocab_size=vocab, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
               num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=1024)
    hd = dict(head_dim=hidden // 8)
    table = {
        "llama": ("LlamaConfig", "LlamaForCausalLM", {}), "mistral": ("MistralConfig", "MistralForCausalLM", {}),
        "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", {}), "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", hd),
        "gemma": ("GemmaConfig", "GemmaForCausalLM", hd), "gemma2": ("Gemma2Config", "Gemma2ForCausalLM", hd),
        "phi3": ("Phi3Config", "Phi3ForCausalLM", {"pad_token_id": 0}),
    }
    if family in table:
        c, m, extra = table[family]
        return getattr(T, m)(getattr(T, c)(**dec, **extra))
    if family == "gpt2":
        return T.GPT2LMHeadModel(T.GPT2Config(vocab_size=vocab, n_embd=hidden, n_layer=layers, n_head=8,
                                              n_positions=1024, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0))
    if family == "bert":
        return T.BertForMaskedLM(T.BertConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=inter,
                                              num_hidden_layers=layers, num_attention_heads=8,
                                              hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                                              max_position_embeddings=1024))
    raise ValueError(f"unknown family {family!r}; choose from {FAMILIES}")


_ALL_LINEAR = {"gpt2": ["c_attn", "c_proj", "c_fc"], "bert": ["query", "key", "value", "dense"]}
_IA3 = {"gpt2": (["c_attn", "mlp.c_proj"], ["mlp.c_proj"]), "bert": (["key", "value", "output.dense"],
                                                                     ["output.dense"]),
        "phi3": (["qkv_proj", "down_proj"], ["down_proj"])}


def adapter_config(lib, family: str, method: str, r: int = 16):
    """The same adapter config for fastpeft (``lib=fastpeft``) and HF PEFT (``lib=peft``)."""
    tm = _ALL_LINEAR.get(family, "all-linear")
    if method.startswith("lora"):
        p = float(method.split("dropout")[1]) if "dropout" in method else 0.0
        return lib.LoraConfig(r=r, lora_alpha=2 * r, target_modules=tm, lora_dropout=p)
    if method == "dora":
        return lib.LoraConfig(r=r, lora_alpha=2 * r, target_modules=tm, use_dora=True)
    if method == "adalora":
        return lib.AdaLoraConfig(init_r=r, target_r=r // 2, total_step=100, target_modules=tm)
    if method == "ia3":
        t, ff = _IA3.get(family, (["k_proj", "v_proj", "down_proj"], ["down_proj"]))
        return lib.IA3Config(target_modules=t, feedforward_modules=ff)
    raise ValueError(f"unknown method {method!r}; choose from {METHODS}")


def make_model(family: str, method: str, provider: str, dtype, device, hidden: int, layers: int):
    torch.manual_seed(0)
    base = build_base(family, hidden, layers).to(device=device, dtype=dtype)
    if provider == "frozen":
        base.requires_grad_(False)
        base.get_input_embeddings().weight.requires_grad_(True)
        return base, base
    if provider == "peft":
        import peft
        model = peft.get_peft_model(base, adapter_config(peft, family, method))
    else:
        model = fastpeft.get_peft_model(base, adapter_config(fastpeft, family, method))
        R.set_enabled(model, provider != "fastpeft-norecompute", gemm=provider == "fastpeft-gemm")
    return model, model


# ---------------------------------------------------------------------------------------------------------------
# run
# ---------------------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def _provider_backend(provider: str):
    """``fastpeft-triton``: every op on the triton backend (the backend is read from the environment per call)."""
    if provider != "fastpeft-triton":
        yield
        return
    old = os.environ.get("FASTPEFT_BACKEND")
    os.environ["FASTPEFT_BACKEND"] = "triton"
    try:
        yield
    finally:
        if old is None:
            del os.environ["FASTPEFT_BACKEND"]
        else:
            os.environ["FASTPEFT_BACKEND"] = old


def run_case(family, method, provider, dtype, device, batch, seq, hidden, layers) -> dict:
    with _provider_backend(provider):
        return _run_case(family, method, provider, dtype, device, batch, seq, hidden, layers)


def _run_case(family, method, provider, dtype, device, batch, seq, hidden, layers) -> dict:
    model, params = make_model(family, method, provider, dtype, device, hidden, layers)
    model.train()
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1, 1000, (batch, seq), generator=g).to(device)

    def step():
        out = model(input_ids=ids, labels=ids)
        out.loss.backward()
        del out

    for _ in range(2):
        step()
        model.zero_grad(set_to_none=True)
    peak, kind = _measure(step, device)
    model.zero_grad(set_to_none=True)
    heap = ""
    if device.type == "cpu":
        heap = _measure_heap_mode(step)
        model.zero_grad(set_to_none=True)
    with R.saved_tensor_bytes(exclude=params) as acc:
        out = model(input_ids=ids, labels=ids)
    del out
    return {"peak_mib": peak, "heap_mode_mib": heap, "mem_kind": kind, "saved_mib": acc["bytes"] / 2 ** 20,
            "recomputed_mib": acc["recomputed_bytes"] / 2 ** 20, "recompute_ops": acc["ops"]}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks.bench_memory", description=__doc__.splitlines()[0])
    p.add_argument("--out", default=str(Path.cwd() / "benchmark-results"), help="folder for memory.csv/memory.md")
    p.add_argument("--families", default=",".join(FAMILIES))
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--providers", default=",".join(PROVIDERS))
    p.add_argument("--dtype", default="bf16", choices=("bf16", "fp16", "fp32"))
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--device", default="auto")
    p.add_argument("--quick", action="store_true", help="batch 2 x 64 tokens, hidden 256")
    p.add_argument("--no-plot", action="store_true", help="skip memory.png")
    return p


def markdown(rows: list[dict]) -> str:
    """One line per (family, method): peak growth relative to the frozen model for each provider."""
    tri = any(r["provider"] == "fastpeft-triton" for r in rows)
    gemm = any(r["provider"] == "fastpeft-gemm" for r in rows)
    heap = any(r.get("heap_mode_ratio_to_frozen", "") != "" for r in rows)
    lines = ["| family | method | HF PEFT | fastpeft (recompute off) | fastpeft | saved for backward, fastpeft / "
             "frozen | recomputed per step |" + (" fastpeft, triton path | saved, triton path |" if tri else "")
             + (" fastpeft, GEMM rebuilds on |" if gemm else "")
             + (" heap + dispatch mode: HF PEFT / fastpeft |" if heap else ""),
             "|---|---|---|---|---|---|---|" + ("---|---|" if tri else "") + ("---|" if gemm else "")
             + ("---|" if heap else "")]
    seen = []
    for r in rows:
        if r["provider"] != "frozen" and (r["family"], r["method"]) not in seen:
            seen.append((r["family"], r["method"]))
    for fam, meth in seen:
        by = {r["provider"]: r for r in rows if r["family"] == fam and r["method"] == meth}

        def cell(p, key="ratio_to_frozen"):
            v = by.get(p, {}).get(key)
            return "-" if v in (None, "") else f"{float(v):.2f}x"
        fp = by.get("fastpeft", {})
        rec = f"{float(fp['recomputed_mib']):.1f} MiB, {fp['recompute_ops']} ops" if fp else "-"
        lines.append(f"| {fam} | {meth} | {cell('peft')} | {cell('fastpeft-norecompute')} | {cell('fastpeft')} | "
                     f"{cell('fastpeft', 'saved_ratio_to_frozen')} | {rec} |"
                     + (f" {cell('fastpeft-triton')} | {cell('fastpeft-triton', 'saved_ratio_to_frozen')} |"
                        if tri else "")
                     + (f" {cell('fastpeft-gemm')} |" if gemm else "")
                     + (f" {cell('peft', 'heap_mode_ratio_to_frozen')} / "
                        f"{cell('fastpeft', 'heap_mode_ratio_to_frozen')} |" if heap else ""))
    return "\n".join(lines) + "\n"


_PLOT_PROVIDERS = {"peft": "HF PEFT", "fastpeft-norecompute": "fastpeft, recompute off", "fastpeft": "fastpeft",
                   "fastpeft-gemm": "fastpeft, GEMM rebuilds on", "fastpeft-triton": "fastpeft, triton path"}


def plot(rows: list[dict], path: Path, title: str) -> Optional[Path]:
    """``rows`` (memory.csv rows) as bars: peak x the frozen model per family, one panel per method, one bar per
    provider; lines at 1.0 (the frozen model) and 1.10 (the target).  Returns the PNG's path, or None without
    matplotlib."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("memory.png skipped: matplotlib is not installed (pip install matplotlib)", file=sys.stderr)
        return None
    rows = [r for r in rows if r["provider"] in _PLOT_PROVIDERS and r.get("ratio_to_frozen") not in (None, "")]
    methods = list(dict.fromkeys(r["method"] for r in rows))
    if not methods:
        return None
    fig, axes = plt.subplots(len(methods), 1, figsize=(11, 2.6 * len(methods)), squeeze=False)
    for ax, meth in zip(axes[:, 0], methods):
        sel = [r for r in rows if r["method"] == meth]
        fams = list(dict.fromkeys(r["family"] for r in sel))
        provs = [p for p in _PLOT_PROVIDERS if any(r["provider"] == p for r in sel)]
        w = 0.8 / max(1, len(provs))
        for i, prov in enumerate(provs):
            vals = {r["family"]: float(r["ratio_to_frozen"]) for r in sel if r["provider"] == prov}
            ax.bar([j + i * w for j in range(len(fams))], [vals.get(f, 0.0) for f in fams], width=w,
                   label=_PLOT_PROVIDERS[prov])
        ax.axhline(1.0, color="k", lw=0.8)
        ax.axhline(1.1, color="k", lw=0.8, ls="--")
        ax.set_xticks([j + 0.4 - w / 2 for j in range(len(fams))])
        ax.set_xticklabels(fams, fontsize=8)
        ax.set_ylabel("peak / frozen")
        ax.set_title(meth, fontsize=9)
        ax.legend(fontsize=7, ncol=len(provs))
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path


def main(argv: Optional[list[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    if args.quick:
        args.batch, args.seq, args.hidden = 2, 64, 256
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if args.device == "auto" else args.device))
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype]
    fams = [f.strip() for f in args.families.split(",") if f.strip()]
    meths = [m.strip() for m in args.methods.split(",") if m.strip()]
    provs = [p.strip() for p in args.providers.split(",") if p.strip()]
    unknown = [p for p in provs if p not in PROVIDERS + OPT_IN_PROVIDERS]
    if unknown:
        raise SystemExit(f"--providers: unknown {', '.join(unknown)}; choose from "
                         f"{', '.join(PROVIDERS + OPT_IN_PROVIDERS)}")
    if "fastpeft-triton" in provs and device.type == "cpu" and os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
        print("fastpeft-triton on a CPU needs TRITON_INTERPRET=1: skipped", file=sys.stderr)
        provs.remove("fastpeft-triton")
    if "peft" in provs:
        try:
            import peft  # noqa: F401
        except ImportError:
            print("HF PEFT not installed: the peft column is skipped (pip install peft)", file=sys.stderr)
            provs.remove("peft")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    ts = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    rows = []
    for fam in fams:
        frozen = run_case(fam, "-", "frozen", dtype, device, args.batch, args.seq, args.hidden, args.layers)
        rows.append({"family": fam, "method": "-", "provider": "frozen", **frozen})
        for meth in meths:
            for prov in [p for p in provs if p != "frozen"]:
                try:
                    res = run_case(fam, meth, prov, dtype, device, args.batch, args.seq, args.hidden, args.layers)
                    note = ""
                except Exception as e:  # one failing case must not lose the others
                    res, note = {}, f"{type(e).__name__}: {e}"[:200]
                row = {"family": fam, "method": meth, "provider": prov, **res, "note": note}
                if res:
                    row["ratio_to_frozen"] = res["peak_mib"] / frozen["peak_mib"]
                    row["saved_ratio_to_frozen"] = res["saved_mib"] / frozen["saved_mib"]
                    if res["heap_mode_mib"] != "":
                        row["heap_mode_ratio_to_frozen"] = res["heap_mode_mib"] / frozen["heap_mode_mib"]
                rows.append(row)
                print(f"{fam:8s} {meth:18s} {prov:22s} peak {res.get('peak_mib', float('nan')):8.2f} MiB "
                      f"({row.get('ratio_to_frozen', float('nan')):.2f}x frozen) {note}", file=sys.stderr)
    common = {"timestamp": ts, "dtype": args.dtype, "batch": args.batch, "seq": args.seq, "hidden": args.hidden,
              "layers": args.layers}
    path = out / "memory.csv"
    if path.exists() and path.read_text().split("\n", 1)[0] != ",".join(COLUMNS):
        path.rename(path.with_name(f"memory-before-{ts.replace(':', '')}.csv"))  # rows of an older column set
    new = not path.exists()
    with open(path, "a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=COLUMNS, extrasaction="ignore")
        if new:
            w.writeheader()
        for r in rows:
            w.writerow({**common, **r})
    md = (f"Activation memory of one training step relative to the frozen model ({args.layers} layers, hidden "
          f"{args.hidden}, batch {args.batch} x {args.seq}, {args.dtype} base, fp32 adapters, r=16; "
          f"{rows[0].get('mem_kind', '')} on {device.type}; {ts})\n\n" + markdown(rows))
    (out / "memory.md").write_text(md)
    if not args.no_plot:
        plot(rows, out / "memory.png", md.split("\n", 1)[0])
    print(md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
