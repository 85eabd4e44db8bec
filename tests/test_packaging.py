"""Packaging: the Triton sources in kernels/ install as fastpeft.kernels (never as a top-level `kernels`, which would
clash with the PyPI package of that name), in a regular (non-editable) wheel install as well as the editable one."""

import importlib.util
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    out = tmp_path_factory.mktemp("wheel")
    env = dict(os.environ, FASTPEFT_BUILD_CUDA="0")
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", str(ROOT), "--no-deps", "--no-build-isolation",
                           "-q", "-w", str(out)], capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    wheels = list(out.glob("fastpeft-*.whl"))
    assert len(wheels) == 1, f"expected one wheel, got {wheels}"
    return wheels[0]


def test_wheel_maps_kernels_into_fastpeft(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    assert "fastpeft/kernels/__init__.py" in names
    assert "fastpeft/ops/lora.py" in names
    assert not any(n.startswith("kernels/") for n in names), "a top-level kernels package must not be installed"
    assert not any(n.startswith(("tests/", "benchmarks/")) for n in names)


def test_non_editable_install_imports_kernels(wheel, tmp_path):
    target = tmp_path / "site"
    proc = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target),
                           str(wheel)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    code = ("import fastpeft, fastpeft.kernels, importlib.util; "
            "print(fastpeft.__file__); print(fastpeft.kernels.__file__); "
            "print(importlib.util.find_spec('kernels') is None or 'site-packages' in "
            "importlib.util.find_spec('kernels').origin)")
    env = dict(os.environ, PYTHONPATH=str(target))
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, env=env,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    fp_file, kernels_file, no_local_top_level = proc.stdout.split()
    assert fp_file.startswith(str(target)), fp_file
    assert kernels_file.startswith(str(target / "fastpeft" / "kernels")), kernels_file
    assert no_local_top_level == "True"


def test_editable_install_resolves_kernels_to_source_folder():
    import fastpeft
    import fastpeft.kernels

    if Path(fastpeft.__file__).resolve().parent != (ROOT / "fastpeft").resolve():
        pytest.skip("fastpeft is not the editable install of this checkout")
    assert Path(fastpeft.kernels.__file__).resolve() == (ROOT / "kernels" / "__init__.py").resolve()


def _run_in(cwd, code):
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=cwd, env=env,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout.split()


def test_source_tree_kernels_folder_does_not_break_transformers_without_triton(tmp_path):
    """From the repository root (``python -m ...`` puts it on sys.path) the kernels/ folder is importable as a
    top-level ``kernels``, the name of Hugging Face's kernels package, which transformers imports (>= 5.25 at module
    level, when installed) and probes.  From the checkout everything must behave as it does elsewhere: transformers
    imports and builds a model without triton, and sees Hugging Face's package exactly when it is installed."""
    pytest.importorskip("transformers")
    code = (
        "import sys; sys.modules['triton'] = None\n"  # triton unimportable
        "import transformers\n"
        "from transformers import BertConfig, BertForSequenceClassification\n"
        "from transformers.utils.import_utils import is_kernels_available\n"
        "m = BertForSequenceClassification(BertConfig(vocab_size=32, hidden_size=16, num_hidden_layers=1, "
        "num_attention_heads=2, intermediate_size=32))\n"
        "import fastpeft; print(fastpeft.backend_info()['backends']['triton']['available'], is_kernels_available())\n"
    )
    inside = _run_in(ROOT, code)
    assert inside[0] == "False", inside
    assert inside == _run_in(tmp_path, code)


def test_source_tree_kernels_name_is_hugging_faces_package_when_installed(tmp_path):
    """``import kernels`` (and its submodules) from the checkout gives Hugging Face's package when it is installed,
    and peft imports; without it, the folder poses as an absent package (no ``__file__``, ModuleNotFoundError)."""
    code = (
        "import importlib.util, kernels\n"
        "print(getattr(kernels, '__file__', None))\n"
    )
    outside = _run_in(tmp_path, "import importlib.util; s = importlib.util.find_spec('kernels'); "
                                "print(s.origin if s else None)")
    inside = _run_in(ROOT, "import importlib.util; print(importlib.util.find_spec('kernels') is not None)")
    assert inside == ["True"]  # the folder itself is always found from the checkout
    if outside == ["None"]:
        proc = subprocess.run([sys.executable, "-c", "import kernels; kernels.get_kernel"], capture_output=True,
                              text=True, cwd=ROOT, timeout=300)
        assert "ModuleNotFoundError: No module named 'kernels'" in proc.stderr, proc.stderr[-2000:]
    else:
        assert _run_in(ROOT, code) == outside
        if importlib.util.find_spec("peft") is not None:
            assert _run_in(ROOT, "import peft; print('ok')")[-1] == "ok"
