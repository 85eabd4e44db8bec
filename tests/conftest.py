"""Test configuration shared by every test module.

TRITON_INTERPRET must be set before fastpeft.kernels is imported (triton.jit reads it when a kernel is decorated),
so it is set here, before any test module is collected, whenever no CUDA device is present.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
# Correctness tests on a GPU take the first fitting Triton GEMM configuration instead of autotuning every launch
# (compiles and benchmarks that only cost time); tests/test_triton_lora.py checks every configuration separately.
os.environ.setdefault("FASTPEFT_TRITON_AUTOTUNE", "0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest  # noqa: E402


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


def available_devices():
    return ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


# Installed optional dependencies must import: tests skip when one is absent (``pytest.importorskip``), so an
# installed package that fails to import (a broken environment, a shadowed name) would otherwise turn its tests into
# silent skips.
_OPTIONAL_DEPS = ("peft", "transformers", "trl", "accelerate", "bitsandbytes", "datasets", "triton", "safetensors")


def pytest_sessionstart(session):
    import importlib
    import importlib.metadata

    broken = []
    for name in _OPTIONAL_DEPS:
        try:
            importlib.metadata.distribution(name)
        except importlib.metadata.PackageNotFoundError:
            continue
        try:
            importlib.import_module(name)
        except Exception as e:  # noqa: BLE001 - any failure to import an installed package is reported
            broken.append(f"{name}: {type(e).__name__}: {e}")
    if broken:
        raise pytest.UsageError("installed test dependencies fail to import (their tests would silently skip):\n  "
                                + "\n  ".join(broken))


# ``@pytest.mark.interpreter``: the test runs Triton kernels on CPU tensors, which only Triton's interpreter takes.  The
# interpreter is on where no GPU is (above); on a GPU machine these tests skip, saying so (the kernels are covered on
# CUDA there by tests/test_triton_lora.py, test_triton_ia3.py, test_dora_op.py, test_lora_group.py and
# test_base_weight_grad.py), instead of failing with "triton runs on CUDA tensors" as on the first GPU run.
def pytest_configure(config):
    config.addinivalue_line("markers", "interpreter: runs Triton kernels on CPU tensors (Triton's interpreter only)")


def pytest_collection_modifyitems(config, items):
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        return
    skip = pytest.mark.skip(reason="runs Triton kernels on CPU tensors, which need Triton's interpreter "
                                   "(TRITON_INTERPRET=1); it is off here (a GPU machine)")
    for item in items:
        if "interpreter" in item.keywords:
            item.add_marker(skip)
