"""The benchmark harness (python -m benchmarks): registry, timing/memory helpers, providers compute the right
layer, CSV/markdown/plot output, and no crash without CUDA.  Uses the ``tiny`` registry so it runs in seconds."""

from __future__ import annotations

import builtins
import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from testing_utils import PLAIN_MATMUL_TOL  # noqa: E402

from benchmarks import _utils as U  # noqa: E402
from benchmarks import run as R  # noqa: E402
from benchmarks.shapes import E2E, LLAMA3_8B, REGISTRIES, Shape, shapes  # noqa: E402

peft = pytest.importorskip("peft")

CPU = torch.device("cpu")


def test_registry_has_llama3_8b_projections():
    assert LLAMA3_8B == {"q_proj": (4096, 4096), "k_proj": (4096, 1024), "v_proj": (4096, 1024),
                         "o_proj": (4096, 4096), "gate_proj": (4096, 14336), "up_proj": (4096, 14336),
                         "down_proj": (14336, 4096)}
    reg = REGISTRIES["llama3-8b"]
    assert reg["M"] == (1, 16, 2048, 8192) and reg["r"] == (8, 16, 64)
    full = shapes("llama3-8b")
    assert len(full) == 7 * 4 * 3
    assert Shape("llama3-8b", "q_proj", 16, 4096, 4096, 8) in full
    assert len(shapes("llama3-8b", with_rank=False)) == 7 * 4
    assert set(shapes("llama3-8b", quick=True)) <= set(full)
    e = E2E["llama3-8b-4l"]
    assert (e["hidden_size"], e["intermediate_size"], e["num_hidden_layers"], e["batch"], e["seq"]) == \
        (4096, 14336, 4, 4, 2048)
    with pytest.raises(ValueError, match="registry"):
        shapes("nope")


def test_bench_cpu_quantiles_ordered():
    a = torch.randn(64, 64)
    p50, p20, p80 = U.bench(lambda: a @ a, CPU, quick=True)
    assert 0 < p20 <= p50 <= p80


def test_peak_mem_cpu_proxy_counts_saved_activations():
    w = torch.randn(32, 32, requires_grad=True)
    x = torch.randn(8, 32)

    def fn():
        (torch.tanh(x @ w)).sum().backward()
    mib, kind = U.peak_mem_mib(fn, CPU, exclude=[w, x])
    assert kind == "cpu_saved_for_backward"
    # tanh saves its (8, 32) fp32 output; x and w are excluded
    assert mib * 2 ** 20 == pytest.approx(8 * 32 * 4)


def test_rel_err_nan_never_passes():
    assert U.rel_err(torch.tensor([float("nan")]), torch.tensor([1.0])) != U.rel_err(torch.ones(1), torch.ones(1))
    assert U.rel_err(torch.ones(3), torch.ones(3)) == 0.0


@pytest.mark.parametrize("method,dropout", [("lora", 0.0), ("lora", 0.1), ("adalora", 0.0)])
def test_lora_providers_compute_the_layer(method, dropout):
    from benchmarks.bench_lora import setup_lora
    shp = shapes("tiny", quick=True)[0]
    case = setup_lora(shp, torch.float32, CPU, ["base", "fastpeft-torch", "peft"], method=method, dropout=dropout)
    x = torch.randn(shp.M, shp.K)
    ref = case.reference(x)
    for name in ("fastpeft-torch", "peft"):
        y = case.providers[name].call_eval(x)
        assert y.shape == (shp.M, shp.N)
        assert U.rel_err(y, ref) < PLAIN_MATMUL_TOL[torch.float32], name
    # the adapter is not the identity: the base alone differs from the reference
    assert U.rel_err(case.providers["base"].call_eval(x), ref) > 1e-3


@pytest.mark.parametrize("ff", [False, True])
def test_ia3_providers_compute_the_layer(ff):
    from benchmarks.bench_ia3 import setup_ia3
    shp = shapes("tiny", quick=True, with_rank=False)[1]
    case = setup_ia3(shp, torch.float32, CPU, ["base", "fastpeft-torch", "peft"], feedforward=ff)
    x = torch.randn(shp.M, shp.K)
    ref = case.reference(x)
    for name in ("fastpeft-torch", "peft"):
        assert U.rel_err(case.providers[name].call_eval(x), ref) < PLAIN_MATMUL_TOL[torch.float32], name


def _read(path):
    with open(path) as f:
        return list(csv.DictReader(f))


def test_cli_layer_run_writes_csv_markdown_and_appends(tmp_path, capsys):
    args = ["--quick", "--registry", "tiny", "--op", "lora,adalora,ia3", "--out", str(tmp_path), "--no-plot",
            "--providers", "base,fastpeft-torch,peft,fastpeft-cuda", "--max-spread", "1e9"]
    assert R.main(args) == 0
    out = capsys.readouterr().out
    assert "no CUDA device" in out or torch.cuda.is_available()
    rows = _read(tmp_path / "results.csv")
    assert list(rows[0].keys()) == R.COLUMNS
    ops = {r["op"] for r in rows}
    assert ops == {"lora", "lora_dropout0.1", "adalora", "ia3_attn", "ia3_ff"}
    timed = [r for r in rows if r["p50_ms"]]
    assert timed and all(float(r["p20_ms"]) <= float(r["p50_ms"]) <= float(r["p80_ms"]) for r in timed)
    assert all(r["git"] and r["torch"] == torch.__version__ and r["gpu"] for r in rows)
    for r in timed:
        p20, p50, p80 = float(r["p20_ms"]), float(r["p50_ms"]), float(r["p80_ms"])
        # the CSV keeps 6 significant digits: p80 - p20 read back is off by up to 5e-6 (p80 + p20), and spread
        # itself by 5e-6 relative (a small spread from nearly equal p80 and p20 made a plain rel=1e-4 check flaky)
        assert float(r["spread"]) == pytest.approx((p80 - p20) / p50, rel=1e-5,
                                                   abs=(5e-6 * (p80 + p20) + 5e-6 * (p80 - p20)) / p50 * 1.01)
        if "too noisy" not in r["note"]:  # a loaded machine can still make the base slower than an adapter
            if r["provider"] == "base":
                assert float(r["ratio_to_base"]) == pytest.approx(1.0)
            if r["provider"] == "peft":
                assert float(r["ratio_to_peft"]) == pytest.approx(1.0)
        else:
            assert r["ratio_to_base"] == "" and r["ratio_to_peft"] == ""
        # fp32 (the CPU run) near exact; a GPU run's default dtypes are bf16 and fp16, whose outputs are rounded:
        # within one machine epsilon of the dtype, norm-relative (the rounding alone is at most half that)
        dt = getattr(torch, r["dtype"])  # the column names torch's dtype: "float32", "bfloat16", "float16"
        bound = 1e-4 if dt == torch.float32 else torch.finfo(dt).eps
        assert float(r["err_vs_ref"]) < bound, r
    full = [r for r in timed if r["mode"] == "fwd+bwd"]
    assert all(r["peak_mib"] != "" for r in full)
    if not torch.cuda.is_available():
        skipped = [r for r in rows if r["provider"] == "fastpeft-cuda"]
        assert skipped and all(r["note"].startswith("skipped") for r in skipped)
    md = (tmp_path / "latest.md").read_text()
    assert "| op | provider |" in md and "lora_dropout0.1" in md
    n = len(rows)
    n_ia3 = sum(r["op"].startswith("ia3") for r in rows)
    small = ["--quick", "--registry", "tiny", "--op", "ia3", "--out", str(tmp_path), "--no-plot",
             "--providers", "base,fastpeft-torch,peft,fastpeft-cuda", "--max-spread", "1e9"]
    assert R.main(small) == 0
    assert len(_read(tmp_path / "results.csv")) == n + n_ia3  # appended, header once


def test_cli_e2e_tiny(tmp_path):
    assert R.main(["--op", "e2e", "--e2e-model", "tiny-4l", "--e2e-steps", "2", "--out", str(tmp_path),
                   "--no-plot", "--max-spread", "1e9"]) == 0
    rows = _read(tmp_path / "results.csv")
    assert [r["provider"] for r in rows] == ["base", "fastpeft", "peft"]
    for r in rows:
        assert r["op"] == "e2e_train_step" and float(r["tokens_per_s"]) > 0 and float(r["p50_ms"]) > 0
    if "too noisy" not in rows[2]["note"]:
        assert float(rows[2]["ratio_to_peft"]) == pytest.approx(1.0)
    # same initial weights and B = 0: the LoRA models' eval loss equals PEFT's
    assert float(rows[1]["err_vs_ref"]) < 1e-5


def test_plot_png_or_clear_message(tmp_path, capsys, monkeypatch):
    rows = [{"op": "lora", "provider": p, "mode": "fwd+bwd", "shape": "tiny.q_proj M=7 r=4", "dtype": "float32",
             "ratio_to_base": v} for p, v in (("base", 1.0), ("fastpeft-torch", 1.2), ("peft", 1.5))]
    try:
        import matplotlib  # noqa: F401
        paths = R.plot(rows, tmp_path, "test")
        assert paths and paths[0].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    except ImportError:
        pass
    real_import = builtins.__import__

    def no_mpl(name, *a, **k):
        if name.startswith("matplotlib"):
            raise ImportError("No module named 'matplotlib'")
        return real_import(name, *a, **k)
    monkeypatch.setattr(builtins, "__import__", no_mpl)
    assert R.plot(rows, tmp_path, "test") == []
    assert "pip install matplotlib" in capsys.readouterr().err


def test_cli_rejects_bad_op_and_dtype(capsys):
    assert R.main(["--op", "nope"]) == 2
    assert R.main(["--dtype", "fp8"]) == 2
    err = capsys.readouterr().err
    assert "--op" in err and "--dtype" in err


# ----- the noise guard, interleaving, output location, running from anywhere -----

def _row(prov, p50, p20, p80, mode="fwd+bwd", shape="s", op="lora"):
    return {"op": op, "provider": prov, "mode": mode, "shape": shape, "dtype": "float32", "p50_ms": p50,
            "p20_ms": p20, "p80_ms": p80}


def test_guard_noise_drops_ratios_of_disturbed_cases_only():
    quiet = [_row("base", 1.0, 0.98, 1.02, shape="quiet"), _row("peft", 2.0, 1.9, 2.1, shape="quiet")]
    wide = [_row("base", 1.0, 0.98, 1.02, shape="wide"), _row("peft", 2.0, 1.0, 3.0, shape="wide")]
    # the frozen base alone clearly slower than base + adapter: only interference explains it
    upside = [_row("base", 5.0, 4.9, 5.1, shape="upside"), _row("peft", 2.0, 1.95, 2.05, shape="upside")]
    rows = quiet + wide + upside
    R.add_ratios(rows)
    lines = R.guard_noise(rows, max_spread=0.3)
    assert len(lines) == 2 and any("wide" in x and "peft spread 1.00 > 0.3" in x for x in lines)
    assert any("upside" in x and "base p20" in x for x in lines)
    assert quiet[1]["ratio_to_base"] == pytest.approx(2.0) and quiet[1]["spread"] == pytest.approx(0.1)
    assert "note" not in quiet[0] and "note" not in quiet[1]
    for r in wide + upside:
        assert "ratio_to_base" not in r and "ratio_to_peft" not in r
        assert r["note"].startswith("too noisy, no ratio")
    warning = R.noise_warning(lines, 3, 0.3)
    assert warning.startswith("WARNING: 2 of 3 measured cases were too noisy") and "ratio" in warning
    assert R.noise_warning([], 3, 0.3) == ""


def test_noisy_run_prints_a_warning_and_writes_no_ratio(tmp_path, capsys, monkeypatch):
    """Synthetic timings with a wide spread (a busy machine): the run says so and reports no ratio."""
    def noisy(fns, device, quick=False, **kw):
        return {n: U.Timing(p50=1.0 + i, p20=0.2, p80=3.0 + i, n=10) for i, n in enumerate(fns)}
    monkeypatch.setattr(U, "bench_interleaved", noisy)
    assert R.main(["--quick", "--registry", "tiny", "--op", "ia3", "--providers", "base,fastpeft-torch",
                   "--out", str(tmp_path), "--no-plot"]) == 0
    cap = capsys.readouterr()
    assert "WARNING:" in cap.err and "too noisy" in cap.err
    assert "WARNING:" in (tmp_path / "latest.md").read_text()
    timed = [r for r in _read(tmp_path / "results.csv") if r["p50_ms"]]
    assert timed and all(r["ratio_to_base"] == "" and "too noisy" in r["note"] for r in timed)


def test_bench_interleaved_alternates_providers():
    calls = []
    fns = {n: (lambda n=n: calls.append(n)) for n in ("base", "fastpeft", "peft")}
    t = U.bench_interleaved(fns, CPU, rounds=4, block_s=0.0)
    assert set(t) == set(fns) and all(v.n == 4 and v.p20 <= v.p50 <= v.p80 for v in t.values())
    timed = calls[6:]  # after two warm-up calls each
    assert len(timed) == 12
    # every round times each provider once, starting with a different one each round
    rounds = [timed[i:i + 3] for i in range(0, 12, 3)]
    assert all(sorted(r) == ["base", "fastpeft", "peft"] for r in rounds)
    assert len({r[0] for r in rounds}) == 3


def test_default_out_dir_is_outside_the_source_tree(monkeypatch, tmp_path):
    monkeypatch.delenv("FASTPEFT_BENCH_OUT", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    assert R.default_out_dir() == tmp_path / "cache" / "fastpeft" / "bench"
    monkeypatch.delenv("XDG_CACHE_HOME")
    d = R.default_out_dir().resolve()
    assert ROOT.resolve() not in d.parents and d != ROOT.resolve()
    monkeypatch.setenv("FASTPEFT_BENCH_OUT", str(tmp_path / "mine"))
    assert R.default_out_dir() == tmp_path / "mine"


def test_help_documents_every_option_once():
    text = R.build_parser().format_help()
    for opt in ("--quick", "--op", "--dtype", "--providers", "--registry", "--e2e-model", "--e2e-steps", "--out",
                "--max-spread", "--no-plot", "--device"):
        assert opt in text, opt
    for action in R.build_parser()._actions:
        if action.dest != "help":
            assert action.help and action.help.count("default") <= 1, action.dest


def test_bench_module_runs_from_another_directory(tmp_path):
    """``python -m fastpeft.bench`` from an unrelated cwd: results land in --out, nothing in the cwd."""
    cwd, out = tmp_path / "elsewhere", tmp_path / "results"
    cwd.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    found = subprocess.run([sys.executable, "-c", "import fastpeft"], cwd=cwd, env=env, capture_output=True)
    if found.returncode != 0:  # e.g. the first GPU machine, whose `pip install -e .` needed the network
        pytest.skip("fastpeft is not installed in this interpreter (importable only from its checkout)")
    proc = subprocess.run([sys.executable, "-m", "fastpeft.bench", "--quick", "--registry", "tiny", "--op", "ia3",
                           "--providers", "base,fastpeft-torch", "--out", str(out), "--no-plot"],
                          cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (out / "results.csv").is_file() and (out / "latest.md").is_file()
    assert list(cwd.iterdir()) == []
    assert f"results -> {out}" in proc.stdout


def test_cli_dispatch_times_both_entry_points(tmp_path):
    """``--op dispatch``: base, custom op and autograd.Function rows for LoRA and IA3 at every CPU case."""
    from benchmarks.bench_dispatch import CASES
    assert R.main(["--op", "dispatch", "--quick", "--out", str(tmp_path), "--no-plot", "--max-spread", "1e9"]) == 0
    rows = _read(tmp_path / "results.csv")
    # a GPU machine runs the CUDA cases in both default dtypes (bf16, fp16), a CPU one the CPU cases in fp32
    cases = len(CASES["cuda" if torch.cuda.is_available() else "cpu"]) * (2 if torch.cuda.is_available() else 1)
    assert len(rows) == 2 * 3 * cases
    for op in ("dispatch_lora", "dispatch_ia3"):
        got = [r["provider"] for r in rows if r["op"] == op]
        assert got == ["base", "custom-op", "autograd-function"] * cases
    assert all(float(r["p50_ms"]) > 0 for r in rows)
    assert all("us/step" in r["note"] for r in rows if r["provider"] == "custom-op")

