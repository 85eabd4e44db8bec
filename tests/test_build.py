"""Building the optional extension: setup.py's decision, the package without it, and the CI compile check.

setup.py is exercised through its ``get_extensions()`` with environment variables set (its module-level
``setup(...)`` call is replaced by a no-op), never through a full pip install.
"""

from __future__ import annotations

import os
import runpy
import shutil
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, ".ci", "compile_csrc.sh")


@pytest.fixture
def get_extensions(monkeypatch):
    import setuptools
    monkeypatch.setattr(setuptools, "setup", lambda **kw: None)
    monkeypatch.chdir(ROOT)
    monkeypatch.setenv("FASTPEFT_BUILD_CUDA", "0")  # the module-level call builds nothing
    # get_extensions() may set CUDA_HOME (its toolkit search): restore it after each test
    monkeypatch.setenv("CUDA_HOME", os.environ.get("CUDA_HOME", ""))
    monkeypatch.delenv("CUDA_HOME")
    monkeypatch.delenv("CUDA_PATH", raising=False)
    ns = runpy.run_path(os.path.join(ROOT, "setup.py"))
    return ns["get_extensions"]


cpu_torch = pytest.mark.skipif(torch.version.cuda is not None, reason="checks the CPU-build-of-torch behaviour")


@cpu_torch
def test_auto_skips_extension_on_cpu_torch(get_extensions, monkeypatch, capsys):
    monkeypatch.setenv("FASTPEFT_BUILD_CUDA", "auto")
    assert get_extensions() == ([], {})
    assert "skipping the CUDA extension (torch is a CPU build)" in capsys.readouterr().out


def test_zero_never_builds(get_extensions, monkeypatch):
    monkeypatch.setenv("FASTPEFT_BUILD_CUDA", "0")
    assert get_extensions() == ([], {})


@cpu_torch
def test_one_fails_loudly_on_cpu_torch(get_extensions, monkeypatch):
    monkeypatch.setenv("FASTPEFT_BUILD_CUDA", "1")
    with pytest.raises(RuntimeError, match=r"FASTPEFT_BUILD_CUDA=1 but the extension cannot be built: torch is a CPU"):
        get_extensions()


def test_bad_value_is_rejected(get_extensions, monkeypatch):
    monkeypatch.setenv("FASTPEFT_BUILD_CUDA", "yes")
    with pytest.raises(ValueError, match="FASTPEFT_BUILD_CUDA must be auto, 0 or 1, got 'yes'"):
        get_extensions()


def test_one_without_toolkit_fails_loudly(get_extensions, monkeypatch):
    import torch.utils.cpp_extension as ce
    monkeypatch.setattr(torch.version, "cuda", "13.0")
    monkeypatch.setattr(ce, "CUDA_HOME", None)
    monkeypatch.setenv("FASTPEFT_BUILD_CUDA", "1")
    monkeypatch.setattr("shutil.which", lambda name: None)
    monkeypatch.setattr("glob.glob", lambda *a, **k: [])
    with pytest.raises(RuntimeError, match=r"no CUDA toolkit with include/cuda_runtime.h found"):
        get_extensions()


def _toolkit(root, cublas: bool) -> str:
    """A fake CUDA toolkit root under `root`: include/cuda_runtime.h, and include/cublasLt.h when `cublas`."""
    home = os.path.join(str(root), "cuda-13.0")
    os.makedirs(os.path.join(home, "include"), exist_ok=True)
    os.makedirs(os.path.join(home, "bin"), exist_ok=True)
    open(os.path.join(home, "include", "cuda_runtime.h"), "w").close()
    if cublas:
        open(os.path.join(home, "include", "cublasLt.h"), "w").close()
    return home


def test_extension_lists_every_csrc_source(get_extensions, monkeypatch, tmp_path):
    # Pretend torch is a CUDA build with a toolkit: the extension must be fastpeft._C over all of csrc/.
    import torch.utils.cpp_extension as ce
    monkeypatch.setattr(torch.version, "cuda", "13.0")
    monkeypatch.setattr(ce, "CUDA_HOME", _toolkit(tmp_path, cublas=True))
    monkeypatch.setenv("FASTPEFT_BUILD_CUDA", "auto")
    exts, cmdclass = get_extensions()
    (ext,) = exts
    assert ext.name == "fastpeft._C"
    want = set()
    for dirpath, _, files in os.walk(os.path.join(ROOT, "csrc")):
        for f in files:
            if f.endswith((".cu", ".cpp")):
                want.add(os.path.relpath(os.path.join(dirpath, f), ROOT))
    assert {"csrc/ext.cpp", "csrc/module.cpp", "csrc/lora/lora_kernels.cu"} <= want
    assert set(ext.sources) == want
    assert "cublasLt" in ext.libraries and not ext.extra_link_args
    assert "build_ext" in cmdclass
    # torch's libstdc++ string ABI stated for both compilers (cpp_extension no longer passes it; a compiler with the
    # other default would lay out c10::Error's strings unlike torch does)
    abi = f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}"
    assert abi in ext.extra_compile_args["cxx"] and abi in ext.extra_compile_args["nvcc"]


def test_cublas_from_torchs_nvidia_wheel_when_the_toolkit_has_none(get_extensions, monkeypatch, tmp_path):
    # A bare toolkit (nvcc and the runtime, no cuBLAS): cublasLt comes from the wheel a CUDA torch depends on,
    # which ships only libcublasLt.so.<major> - linked by file name.
    import site

    import torch.utils.cpp_extension as ce
    wheel = tmp_path / "site" / "nvidia" / "cu13"
    (wheel / "include").mkdir(parents=True)
    (wheel / "lib").mkdir()
    (wheel / "include" / "cublasLt.h").touch()
    (wheel / "lib" / "libcublasLt.so.13").touch()
    monkeypatch.setattr(site, "getsitepackages", lambda: [str(tmp_path / "site")])
    monkeypatch.setattr(torch.version, "cuda", "13.0")
    monkeypatch.setattr(ce, "CUDA_HOME", _toolkit(tmp_path, cublas=False))
    monkeypatch.setenv("FASTPEFT_BUILD_CUDA", "1")
    (ext,) = get_extensions()[0]
    assert str(wheel / "include") in ext.include_dirs
    assert ext.extra_link_args == [f"-L{wheel / 'lib'}", "-l:libcublasLt.so.13"]
    assert "cublasLt" not in ext.libraries
    # ... and with neither, FASTPEFT_BUILD_CUDA=1 says what is missing
    monkeypatch.setattr(site, "getsitepackages", lambda: [])
    monkeypatch.setattr(site, "getusersitepackages", lambda: str(tmp_path / "nothing"))
    with pytest.raises(RuntimeError, match="cuBLASLt headers not found"):
        get_extensions()


def test_cuda_home_found_behind_a_wrapper_script_nvcc(get_extensions, monkeypatch, tmp_path):
    # torch guesses CUDA_HOME from the nvcc on PATH; a wrapper script there (/usr/local/bin/nvcc on the CPU
    # machines) would make it guess a root without headers.  setup.py follows the script to the real toolkit.
    home = _toolkit(tmp_path, cublas=True)
    bindir = tmp_path / "wrapbin"
    bindir.mkdir()
    wrapper = bindir / "nvcc"
    wrapper.write_text(f'#!/bin/sh\nexec {home}/bin/nvcc "$@"\n')
    wrapper.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bindir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setattr("glob.glob", lambda *a, **k: [])  # no /usr/local/cuda-* fallback
    ns = get_extensions.__globals__
    ns["_ensure_cuda_home"]()
    assert os.environ["CUDA_HOME"] == home


def test_package_works_without_extension():
    import fastpeft
    from fastpeft import _cuda
    from fastpeft._backend import select_backend
    info = fastpeft.backend_info()
    if not _cuda.available():
        assert info["backends"]["cuda"]["available"] is False
        assert info["backends"]["cuda"]["reason"] == _cuda.unavailable_reason()
        x = torch.randn(2, 3)
        assert select_backend("lora", x, "auto") in ("torch", "triton")
        with pytest.raises(RuntimeError, match="backend 'cuda' is unavailable"):
            select_backend("lora", x, "cuda")
    assert "dispatch" in info
    # The torch path still computes.
    from fastpeft import functional as Fn
    x, w, a, b = torch.randn(3, 4), torch.randn(5, 4), torch.randn(2, 4), torch.randn(5, 2)
    y = Fn.lora_linear(x, w, None, a, b, scaling=0.5, backend="torch")
    assert torch.allclose(y, x @ w.t() + 0.5 * (x @ a.t()) @ b.t(), atol=1e-5)


# ---------------------------------------------------------------------------------------------------------------
# The CI compile check
# ---------------------------------------------------------------------------------------------------------------


def test_compile_script_is_valid_bash():
    assert os.access(SCRIPT, os.X_OK), f"{SCRIPT} is not executable"
    subprocess.run(["bash", "-n", SCRIPT], check=True)


needs_nvcc = pytest.mark.skipif(shutil.which("nvcc") is None or shutil.which("g++") is None,
                                reason="needs nvcc and g++")


def _run_script(csrc, tmp_path):
    env = dict(os.environ, CSRC_DIR=str(csrc), PYTHON=sys.executable, FASTPEFT_CI_CACHE=str(tmp_path / "cache"))
    return subprocess.run(["bash", SCRIPT], capture_output=True, text=True, env=env, timeout=600)


@needs_nvcc
def test_compile_script_passes_good_and_fails_bad_sources(tmp_path):
    # Tiny sources (no torch, no cuBLAS include), so this takes seconds, not the full csrc/ build.
    good = tmp_path / "good"
    (good / "k").mkdir(parents=True)
    (good / "k" / "ok.cu").write_text("__global__ void k(float* p) { p[threadIdx.x] = 1.f; }\n")
    (good / "host.cpp").write_text("int f(int a) { return a + 1; }\n")
    out = _run_script(good, tmp_path)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "OK   nvcc -c" in out.stdout and "OK   g++ -fsyntax-only" in out.stdout
    assert "2 compiled, 0 failed" in out.stdout

    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "ok.cu").write_text("__global__ void k(float* p) { p[threadIdx.x] = 1.f; }\n")
    (bad / "broken.cu").write_text("__global__ void k(float* p) { p[threadIdx.x] = undefined_name; }\n")
    (bad / "broken.cpp").write_text("int f(int a) { return a + ; }\n")
    out = _run_script(bad, tmp_path)
    assert out.returncode == 1, out.stdout + out.stderr
    assert "FAIL nvcc -c" in out.stderr and "FAIL g++ -fsyntax-only" in out.stderr
    assert "1 compiled, 2 failed" in out.stdout
