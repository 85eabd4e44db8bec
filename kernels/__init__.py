"""Triton kernels of fastpeft, installed as ``fastpeft.kernels`` (an install never puts a top-level ``kernels``).

This ``__init__`` imports nothing: triton is imported by the submodules, and fastpeft imports those lazily, only when
the triton backend is used (``fastpeft._backend`` checks triton itself).

In a source checkout, running Python from the repository root puts this folder on ``sys.path`` as a top-level
``kernels``, the import name of Hugging Face's ``kernels`` package.  Imported under that name this module hands the
name to Hugging Face's package when it is installed (it replaces itself in ``sys.modules`` with that package, so
``import kernels`` and ``kernels.<submodule>`` give exactly what they give outside the checkout).  When it is not
installed, the module makes itself look like an absent package to the two kinds of probe libraries use:

* transformers (``_is_package_available("kernels")``) finds the folder, finds no distribution metadata and imports
  it; a module with no ``__version__`` and no ``__file__`` counts as absent there (a namespace-package shadow);
* bitsandbytes and transformers' hub-kernel code do ``from kernels import get_kernel`` inside ``try/except``; the
  module ``__getattr__`` below raises the ``ModuleNotFoundError`` (``name="kernels"``) a missing package gives, so
  their fallback runs exactly as on a machine without Hugging Face's ``kernels``.

Dunder lookups keep raising ``AttributeError`` so that ``getattr(module, "__version__", default)`` still works.

Nothing here imports ``fastpeft``: the package sits below it (``fastpeft.ops`` looks the launchers up lazily).

Modules (launchers have exactly the signatures of the torch references in ``fastpeft.ops``, plus ``variant=`` and
``target=``):
  ``lora``      ``lora_fwd_triton`` / ``lora_bwd_triton``  (LoRA and AdaLoRA; seeded dropout regenerated, never stored)
  ``ia3``       ``ia3_fwd_triton`` / ``ia3_bwd_triton``    (output-feature scale in the epilogue, input scale in the
                                                           prologue)
  ``_gemm``     the persistent GEMM kernel with its prologue/epilogue options and its launcher ``gemm``
  ``_configs``  the GEMM's autotune configurations and their pruning
  ``_philox``   the dropout keep-mask inside a kernel; ``_mask`` its host-side threshold (pure Python)
  ``_tl``       dot precision and small ``tl`` helpers
  ``_target``   environment knobs, the ``LaunchTarget`` a launch is sized for, block-size heuristics
  ``_cost``     what launchers report to the cost model

Environment: ``FASTPEFT_TRITON_TMA=auto|0|1`` chooses the tensor-descriptor (TMA) path of the GEMM (auto: on sm90+
when the operands are 16-byte aligned with a unit-stride dimension); ``FASTPEFT_TRITON_AUTOTUNE=0|1``.
"""

if __name__ == "kernels":  # imported as a top-level package from a checkout, not as fastpeft.kernels
    import importlib.machinery as _machinery
    import importlib.util as _util
    import os as _os
    import sys as _sys

    # Hugging Face's ``kernels`` elsewhere on sys.path (transformers >= 5.25 requires it and imports it at module
    # level): load that one under the name and put it in sys.modules in place of this folder.
    _checkout = _os.path.dirname(_os.path.dirname(_os.path.abspath(__file__)))
    _others = [p for p in _sys.path if _os.path.abspath(p or _os.curdir) != _checkout]
    _spec = _machinery.PathFinder.find_spec("kernels", _others)
    if _spec is not None and _spec.loader is not None:
        _real = _util.module_from_spec(_spec)
        _sys.modules["kernels"] = _real
        try:
            _spec.loader.exec_module(_real)
        except BaseException:
            _sys.modules.pop("kernels", None)
            raise
    else:
        del __file__

        def __getattr__(name: str):
            if name.startswith("__") and name.endswith("__"):
                raise AttributeError(name)
            raise ModuleNotFoundError("No module named 'kernels'", name="kernels")
