"""fastpeft: parameter-efficient fine-tuning with fused kernels, compatible with Hugging Face PEFT.

Importing fastpeft does not touch CUDA and needs neither a GPU, triton nor the compiled extension.
"""

from __future__ import annotations

__version__ = "0.1.0"

from . import functional, ops  # noqa: F401,E402
from ._backend import backend_info, select_backend  # noqa: E402

__all__ = ["__version__", "backend_info", "functional", "ops", "select_backend"]
