"""Smoke test of the activation-memory benchmark (``benchmarks/bench_memory.py``): it runs, writes its CSV and
markdown, and the deterministic saved-bytes column shows the recompute's saving."""

from __future__ import annotations

import csv

import pytest
import torch

from benchmarks import bench_memory


def test_bench_memory_tiny(tmp_path):
    rc = bench_memory.main(["--out", str(tmp_path), "--families", "gpt2", "--methods", "lora_dropout0.05",
                            "--providers", "frozen,fastpeft,fastpeft-norecompute", "--batch", "1", "--seq", "16",
                            "--hidden", "64", "--dtype", "fp32", "--device", "cpu"])
    assert rc == 0
    rows = list(csv.DictReader(open(tmp_path / "memory.csv")))
    by = {r["provider"]: r for r in rows}
    assert set(by) == {"frozen", "fastpeft", "fastpeft-norecompute"}
    assert float(by["fastpeft"]["saved_mib"]) < float(by["fastpeft-norecompute"]["saved_mib"])
    assert float(by["fastpeft"]["recompute_ops"]) > 0 and float(by["fastpeft-norecompute"]["recompute_ops"]) == 0
    md = (tmp_path / "memory.md").read_text()
    assert "| gpt2 | lora_dropout0.05 |" in md


def test_cpu_measure_is_the_peak_of_torch_allocations():
    """The CPU measure follows torch's allocations in order: 1 MiB held while 2 MiB are allocated is a 3 MiB peak,
    whatever was allocated before the step (not counted) and whatever the step frees at the end."""
    keep = torch.empty(2 ** 20, dtype=torch.uint8)  # before the step: not part of its growth

    def step():
        a = torch.zeros(2 ** 20, dtype=torch.uint8)
        b = torch.zeros(2 * 2 ** 20, dtype=torch.uint8)
        del a, b
        torch.zeros(2 ** 19, dtype=torch.uint8)

    peak, kind = bench_memory._measure(step, torch.device("cpu"))
    assert peak == 3.0 and "profiler" in kind
    del keep


def test_cpu_measure_keeps_in_place_gradient_sums():
    """Why the CPU measure is not a dispatch mode: under one, autograd sums a tensor's two gradients out of place
    (a third buffer).  Without one the sum reuses a buffer: a tensor h of 1 MiB feeding two branches costs
    2 MiB of gradients at the sum, not 3."""
    x = torch.randn(2 ** 18, requires_grad=True)  # 1 MiB fp32

    def step():
        h = x * 1.0
        ((h * 3.0).sum() + (h * 5.0).sum()).backward()

    step()
    x.grad = None
    peak, _ = bench_memory._measure(step, torch.device("cpu"))
    x.grad = None
    # h and its two gradients (summed into one of them), then h, the sum and x's gradient: 3 MiB (4 out of place)
    assert peak <= 3.0 + 1e-3, peak

    from torch.utils._python_dispatch import TorchDispatchMode

    class Ops(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.names = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.names.append(str(func))
            return func(*args, **(kwargs or {}))

    with Ops() as ops:
        step()
    assert "aten.add.Tensor" in ops.names and "aten.add_.Tensor" not in ops.names  # out of place under a mode


def test_plot_draws_one_panel_per_method(tmp_path):
    """memory.png: bars of peak x frozen per family, a panel per method (only with matplotlib)."""
    pytest.importorskip("matplotlib")
    from benchmarks import bench_memory
    rows = [{"family": f, "method": m, "provider": p, "ratio_to_frozen": str(v)}
            for f in ("llama", "bert") for m, v in (("lora", 1.0), ("dora", 1.4))
            for p in ("peft", "fastpeft", "fastpeft-gemm")] + [
        {"family": "llama", "method": "-", "provider": "frozen", "ratio_to_frozen": ""}]
    path = bench_memory.plot(rows, tmp_path / "memory.png", "test")
    assert path == tmp_path / "memory.png" and path.stat().st_size > 1000
