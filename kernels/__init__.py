"""Triton kernels of fastpeft, installed as ``fastpeft.kernels`` (an install never puts a top-level ``kernels``).

This ``__init__`` imports nothing: triton is imported by the submodules, and fastpeft imports those lazily, only when
the triton backend is used (``fastpeft._backend`` checks triton itself).  Keeping it empty also matters in a source
checkout: running ``python -m ...`` from the repository root puts this folder on ``sys.path`` as a top-level
``kernels``, and transformers probes a package of that name (Hugging Face's ``kernels``) by importing it - that import
must succeed without triton, and then transformers sees no version and ignores it.

Modules (launchers have exactly the signatures of the torch references in ``fastpeft.ops``):
  ``lora``     ``lora_fwd_triton`` / ``lora_bwd_triton``  (LoRA and AdaLoRA; seeded dropout regenerated, never stored)
  ``ia3``      ``ia3_fwd_triton`` / ``ia3_bwd_triton``    (output-feature scale in the epilogue, input scale in the
                                                          prologue)
  ``_common``  the persistent GEMM kernel with its prologue/epilogue options, the dropout mask, autotune configs

Environment: ``FASTPEFT_TRITON_TMA=auto|0|1`` chooses the tensor-descriptor (TMA) path of the GEMM (auto: on sm90+
when the operands are 16-byte aligned with a unit-stride dimension).  The autotune configurations are NOT measured
yet (written without a GPU); see ``_common``.
"""
