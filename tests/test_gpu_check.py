"""benchmarks/gpu_check.sh and benchmarks/gpu_phases.py without a GPU: the dry run, phase order, per-phase time
limits, and rows on disk the moment they are written."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_check.sh"
PHASES = ["build", "gemm", "launch", "host", "correctness", "ratios", "decode", "profile", "tiles", "e2e", "tests",
          "tests_ext"]


def _run(tmp_path, **env):
    full = dict(os.environ, OUT=str(tmp_path / "out"), PYTHON=sys.executable, GPU_CHECK_DRY_RUN="1", **env)
    p = subprocess.run(["bash", str(SCRIPT)], cwd=tmp_path, env=full, capture_output=True, text=True, timeout=120)
    summary = (tmp_path / "out" / "summary.txt").read_text()
    return p, summary


def _phase_lines(summary: str) -> list:
    return [line.split("] ", 1)[1] for line in summary.splitlines() if "] " in line]


def test_dry_run_skips_every_gpu_phase_in_order(tmp_path):
    p, summary = _run(tmp_path)
    assert p.returncode == 0, p.stdout + p.stderr
    lines = _phase_lines(summary)
    assert lines[0].startswith("gpu_check: commit") and "gpu=0" in lines[0]
    assert [line.split(":")[0] for line in lines[1:-1]] == PHASES
    assert all(line.endswith("skipped: no GPU") for line in lines[1:-1])
    assert lines[-1].startswith("gpu_check: done") and "failed=0" in lines[-1]


def test_a_phase_over_its_limit_is_killed_and_the_next_ones_run(tmp_path):
    p, summary = _run(tmp_path, GPU_CHECK_SELFTEST_SLEEP="gemm", GPU_CHECK_LIMIT_GEMM="1")
    assert p.returncode == 0, p.stdout + p.stderr
    lines = _phase_lines(summary)
    gemm = next(line for line in lines if line.startswith("gemm:"))
    assert gemm.startswith("gemm: timed out after 1 s")
    after = [line.split(":")[0] for line in lines[lines.index(gemm) + 1:]]
    assert after[:10] == ["launch", "host", "correctness", "ratios", "decode", "profile", "tiles", "e2e", "tests",
                          "tests_ext"]


def test_phases_skip_without_gpu(tmp_path, monkeypatch):
    from benchmarks import gpu_phases
    monkeypatch.setenv("GPU_CHECK_DRY_RUN", "1")
    for name in gpu_phases.PHASES:
        assert gpu_phases.main([name, "--out", str(tmp_path)]) == gpu_phases.SKIPPED
    assert not list(tmp_path.iterdir())  # a skipped phase writes nothing
    with pytest.raises(SystemExit):
        gpu_phases.main(["nope", "--out", str(tmp_path)])


def test_rows_are_on_disk_as_soon_as_written(tmp_path):
    from benchmarks.gpu_phases import Rows
    path = tmp_path / "x.csv"
    rows = Rows(path, ["a", "b"])
    rows.add(a=1, b=0.123456789)
    # read through a separate handle while the writer is still open (as after a kill)
    with open(path) as f:
        got = list(csv.DictReader(f))
    assert len(got) == 1 and got[0]["a"] == "1" and got[0]["b"] == "0.12346" and got[0]["gpu"]
    rows.close()
    rows = Rows(path, ["a", "b"])  # a rerun appends, header once
    rows.add(a=2, b="")
    rows.close()
    with open(path) as f:
        assert [r["a"] for r in csv.DictReader(f)] == ["1", "2"]


@pytest.mark.interpreter
def test_phase_helpers_run_on_cpu_at_tiny_shapes(monkeypatch):
    """The per-case code of the correctness and ratios phases, on CPU tensors at tiny shapes (catches API drift
    before a GPU run does)."""
    pytest.importorskip("peft")
    from benchmarks import gpu_phases as G
    monkeypatch.setattr(G, "SHAPES", {"q_proj": (32, 24), "down_proj": (48, 16)})
    monkeypatch.setattr(G, "IA3_FEEDFORWARD", {"q_proj": False, "down_proj": True})
    for method in G.METHODS:
        for layer in G.SHAPES:
            t = G._inputs(layer, 5, method, dev="cpu")
            ref = G._grads(method, layer, {k: v.double() for k, v in t.items()}, "torch")
            res = G._grads(method, layer, {k: v.float() for k, v in t.items()}, "torch")
            assert set(res) == set(ref) and {"y", "dx"} <= set(res)
            assert all(G.rel_err(res[k], ref[k]) < 1e-5 for k in ref)
            extra = ("fused",) + (("fold-flipped",) if method == "ia3" else ()) if _has_triton() else ()
            for provider in ("base", "default", "torch", "peft") + extra:
                t32 = {k: v.float() for k, v in t.items()}
                if provider == "peft":
                    monkeypatch.setattr(G, "_peft_module", lambda m, lay: _cpu_peft(G, m, lay))
                G._step_fn(provider, method, layer, t32)()
            if method != "dora":  # the ratios phase's extension provider names its backend (refused on CPU)
                with pytest.raises(RuntimeError, match="'cuda'"):
                    G._step_fn("cuda", method, layer, {k: v.float() for k, v in t.items()})()


@pytest.mark.interpreter
def test_tile_sweep_cases_run_under_every_candidate_tile():
    """The tile phase's three kernels (in the interpreter at a small shape) launch with every candidate tile and
    both program targets, each reporting its traffic under its own name (what the phase divides by the time)."""
    if not _has_triton():
        pytest.skip("no triton")
    from benchmarks import gpu_phases as G
    from fastpeft import _cost
    from fastpeft.kernels import _target as KT
    cases = G.tile_cases("cpu", m=40, k=72, n=48, r=4)
    assert set(cases) == {"lora_shrink_expand", "lora_dy", "lora_da_dx"}
    for name, make in cases.items():
        for blocks in G.TILE_CANDIDATES:
            with KT.forced_launch_shape(blocks=blocks, programs=1 if name == "lora_shrink_expand" else 8):
                fn = make(None)
                with _cost.recording() as rec:
                    fn()
            assert [c.name for c in rec if c.name == name] == [name], (name, [c.name for c in rec])


@pytest.mark.interpreter
def test_raw_triton_launch_of_the_launch_phase_runs():
    """The launch phase's raw Triton launch (Triton's own host cost, no fastpeft Python) is a valid kernel: it
    runs (in the interpreter here) and leaves its tensor as it was."""
    if not _has_triton():
        pytest.skip("no triton")
    from benchmarks import gpu_phases as G
    t = torch.randn(1500)
    before = t.clone()
    G._raw_triton_launch(t)()
    assert torch.equal(t, before)


def test_host_benchmark_on_cpu(tmp_path):
    """``python -m benchmarks.bench_host`` on CPU (Triton launches stubbed in a subprocess of its own): every case,
    mode and provider gets a positive time; the training step of LoRA / AdaLoRA is the 4 Triton launches the
    default path makes (3 at most in an inference forward), IA3's fewer."""
    if not _has_triton():
        pytest.skip("no triton")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    p = subprocess.run([sys.executable, "-m", "benchmarks.bench_host", "--device", "cpu", "--calls", "2",
                        "--rounds", "2", "--out", str(tmp_path)], cwd=ROOT, env=env, capture_output=True, text=True,
                       timeout=300)
    assert p.returncode == 0, p.stdout + p.stderr
    rows = list(csv.DictReader(open(tmp_path / "host.csv")))
    from benchmarks.bench_host import METHODS
    want = {(m, mode, prov) for m in METHODS for mode in ("fwd+bwd", "fwd")
            for prov in ("frozen", "fastpeft", "fastpeft-torch")}
    got = {(r["method"], r["mode"], r["provider"]) for r in rows}
    assert want <= got
    assert all(float(r["us"]) > 0 for r in rows)
    launches = {(r["method"], r["mode"]): int(r["launches"]) for r in rows if r["provider"] == "fastpeft"}
    assert launches[("lora", "fwd+bwd")] == launches[("adalora", "fwd+bwd")] == 4
    assert all(launches[(m, "fwd")] <= 3 for m in METHODS)
    assert launches[("ia3", "fwd+bwd")] < 4
    # the torch backend launches no Triton kernel
    assert {int(r["launches"]) for r in rows if r["provider"] == "fastpeft-torch"} == {0}
    assert "| lora | fwd+bwd |" in (tmp_path / "host.md").read_text()


def _has_triton() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def test_fused_provider_runs_the_fused_variant(monkeypatch):
    """The ratios / profile phases' "fused" provider is the Triton GEMM with the adapter in its epilogue
    (backend "triton:fused"), not "triton" (the default, cuBLAS-anchored variant): otherwise the GPU run would
    time the default path twice and the fused path never."""
    import torch

    from benchmarks import gpu_phases as G
    seen = []
    monkeypatch.setattr(G, "_call", lambda method, layer, t, backend, seed=1234: seen.append(backend) or t["x"] * 2)
    t = {"x": torch.zeros(2, 3), "gy": torch.zeros(2, 3), "w": torch.zeros(3, 3)}
    G._step_fn("fused", "lora", "q_proj", t)()
    G._step_fn("default", "lora", "q_proj", t)()
    assert G.FUSED == "triton:fused" and seen == ["triton:fused", None], seen


def _cpu_peft(G, method, layer):
    from benchmarks.cost_model import _peft_layer
    kind, p = G._method_parts(method)
    k, n = G.SHAPES[layer]
    mod = _peft_layer(kind, k, n, p, G.IA3_FEEDFORWARD[layer])
    return mod.float().train()


def test_measured_dispatch_entry_is_written_atomically(tmp_path):
    import json

    from benchmarks import gpu_phases as G
    from fastpeft import _dispatch
    try:
        G._record_dispatch(tmp_path, "lora", "q_proj", 8192, {"base": 0.7, "default": 0.9, "fused": 0.8},
                           {"base": "torch (frozen)", "default": "triton", "fused": "triton:fused"})
        table = json.loads((tmp_path / "dispatch_table.json").read_text())
        (key, entry), = table.items()
        assert "lora" in key and entry["backend"] == "triton" and entry["variant"] == "fused"
        assert entry["timings_ms"] == {"triton": 0.9, "triton:fused": 0.8}
        assert [p.name for p in tmp_path.iterdir()] == ["dispatch_table.json"]
        # the default path faster: the entry names it, without a variant
        G._record_dispatch(tmp_path, "lora", "q_proj", 8192, {"base": 0.7, "default": 0.75, "fused": 0.8},
                           {"base": "torch (frozen)", "default": "triton", "fused": "triton:fused"})
        (key, entry), = json.loads((tmp_path / "dispatch_table.json").read_text()).items()
        assert entry["backend"] == "triton" and entry["variant"] is None
        # fastpeft's torch implementation (torch ops only, no Triton launch) faster - where the host decides: the entry names it
        G._record_dispatch(tmp_path, "lora", "q_proj", 2048, {"base": 0.2, "default": 1.1, "fused": 1.3, "torch": 0.5},
                           {"base": "torch (frozen)", "default": "triton", "fused": "triton:fused", "torch": "torch"})
        entries = json.loads((tmp_path / "dispatch_table.json").read_text())
        entry = next(e for k, e in entries.items() if k != key)
        assert entry["backend"] == "torch" and entry["variant"] is None
        assert entry["timings_ms"] == {"triton": 1.1, "triton:fused": 1.3, "torch": 0.5}
    finally:
        _dispatch.clear()


@pytest.mark.interpreter
def test_decode_phase_cases_run_on_cpu_at_tiny_shapes(tmp_path, monkeypatch):
    """The decode phase's per-case code (frozen, default, fused and HF PEFT forwards, and the single-launch forward
    the default takes only above TWO_LAUNCH_MAX_ROWS; rows with both ratios) on CPU tensors at tiny shapes, with the
    timers replaced by one call each; the single-launch forward gives the default's output."""
    pytest.importorskip("peft")
    import csv

    from benchmarks import gpu_phases as G
    monkeypatch.setattr(G, "SHAPES", {"q_proj": (32, 24)})
    monkeypatch.setattr(G, "IA3_FEEDFORWARD", {"q_proj": False})
    inputs = G._inputs
    monkeypatch.setattr(G, "_inputs", lambda layer, m, method, dev="cpu", seed=0:
                        {k: v.float() for k, v in inputs(layer, m, method, dev="cpu", seed=seed).items()})
    calls = []
    monkeypatch.setattr(G, "bench_ms", lambda fn: calls.append(fn()) or 1.0)
    monkeypatch.setattr(G, "_graph_ms", lambda fn, n=1: calls.append(fn()) or 2.0)
    monkeypatch.setattr(G, "_peft_module", lambda m, lay: _cpu_peft(G, m, lay))
    if not _has_triton():
        monkeypatch.setattr(G, "FUSED", "torch")
    G.phase_decode(tmp_path, deadline=float("inf"))
    rows = list(csv.DictReader(open(tmp_path / "decode.csv")))
    providers = ("base", "default", "fused", "peft") + (("single-launch",) if _has_triton() else ())
    assert [(r["M"], r["provider"]) for r in rows] == [(m, p) for m in ("16", "1") for p in providers]
    assert all(r["note"] == "" and float(r["x_base_graph"]) == 1.0 for r in rows), rows
    assert all(c.shape[-1] == 24 for c in calls)  # every provider's forward ran and gave (M, N)
    if _has_triton():
        t = {k: v.float() for k, v in inputs("q_proj", 5, "lora", dev="cpu").items()}
        want = G._call("lora", "q_proj", t, "triton")
        assert torch.allclose(G._single_launch_fwd(t)(), want, rtol=1e-5, atol=1e-5)
