"""The GitHub Actions workflows (.github/workflows/) against GitHub's workflow schema, offline: check-jsonschema's
vendored copy of the schema (``--builtin-schema vendor.github-workflows``) - also what .ci/run runs."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
WORKFLOWS = sorted((ROOT / ".github" / "workflows").glob("*.yml"))


def _check(*files):
    pytest.importorskip("check_jsonschema")
    # Any network access fails: proxies that refuse connections.
    env = dict(os.environ, HTTP_PROXY="http://127.0.0.1:9", HTTPS_PROXY="http://127.0.0.1:9", NO_PROXY="")
    return subprocess.run([sys.executable, "-m", "check_jsonschema", "--builtin-schema", "vendor.github-workflows",
                           *map(str, files)], capture_output=True, text=True, env=env, timeout=120)


def test_workflows_exist_and_are_valid():
    assert {p.name for p in WORKFLOWS} >= {"ci.yml", "gpu.yml"}
    r = _check(*WORKFLOWS)
    assert r.returncode == 0, r.stdout + r.stderr


def test_workflows_run_the_project_scripts():
    ci = (ROOT / ".github" / "workflows" / "ci.yml").read_text()
    gpu = (ROOT / ".github" / "workflows" / "gpu.yml").read_text()
    assert "bash .ci/run" in ci and "ubuntu-latest" in ci and '"3.11"' in ci
    assert "self-hosted" in gpu and "bash benchmarks/gpu_check.sh" in gpu and "upload-artifact" in gpu
    assert "check_jsonschema --builtin-schema vendor.github-workflows" in (ROOT / ".ci" / "run").read_text()


@pytest.mark.parametrize("breakage", [
    ("    runs-on: ubuntu-latest\n", ""),  # a job without runs-on
    ("    timeout-minutes: 45\n", "    timeout-minutes: soon\n"),  # a wrong type
    ("    steps:\n", "    stepz:\n"),  # an unknown key
])
def test_a_broken_workflow_is_rejected(tmp_path, breakage):
    text = (ROOT / ".github" / "workflows" / "ci.yml").read_text()
    old, new = breakage
    assert old in text
    bad = tmp_path / "ci.yml"
    bad.write_text(text.replace(old, new, 1))
    r = _check(bad)
    assert r.returncode == 1 and "Schema validation errors" in r.stdout + r.stderr, r.stdout + r.stderr
