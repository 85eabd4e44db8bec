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
