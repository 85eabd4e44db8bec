"""Smoke test of the activation-memory benchmark (``benchmarks/bench_memory.py``): it runs, writes its CSV and
markdown, and the deterministic saved-bytes column shows the recompute's saving."""

from __future__ import annotations

import csv

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
