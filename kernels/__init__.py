"""Triton kernels of fastpeft, installed as ``fastpeft.kernels`` (never importable as top-level ``kernels``).

Importing this package imports triton; fastpeft imports it lazily, only when the triton backend is used.

Modules (launchers have exactly the signatures of the torch references in ``fastpeft.ops``):
  ``lora``     ``lora_fwd_triton`` / ``lora_bwd_triton``  (LoRA and AdaLoRA; seeded dropout regenerated, never stored)
  ``ia3``      ``ia3_fwd_triton`` / ``ia3_bwd_triton``    (output-feature scale in the epilogue, input scale in the
                                                          prologue)
  ``_common``  the persistent GEMM kernel with its prologue/epilogue options, the dropout mask, autotune configs

Environment: ``FASTPEFT_TRITON_TMA=auto|0|1`` chooses the tensor-descriptor (TMA) path of the GEMM (auto: on sm90+
when the operands are 16-byte aligned with a unit-stride dimension).  The autotune configurations are NOT measured
yet (written without a GPU); see ``_common``.
"""

import triton  # noqa: F401  (fail early and clearly if triton is missing)
