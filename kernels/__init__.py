"""Triton kernels of fastpeft, installed as ``fastpeft.kernels`` (never importable as top-level ``kernels``).

Importing this package imports triton; fastpeft imports it lazily, only when the triton backend is used.
"""

import triton  # noqa: F401  (fail early and clearly if triton is missing)
