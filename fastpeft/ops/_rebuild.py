"""The hand-off between an op that saves an output-sized tensor and ``fastpeft.recompute`` (which imports transformers
and PEFT helpers, so the ops must not import it).

An op calls ``rebuild_with(t, fn)`` just before it saves ``t = fn(x)``, x being the adapter layer's input; while
``fastpeft.recompute`` runs a training forward with GEMM rebuilds switched on it sets ``wanted`` and its pack hook
takes ``fn`` from the tensor (``ATTR``).  Otherwise the call does nothing."""

from __future__ import annotations

from typing import Callable

import torch

ATTR = "_fastpeft_rebuild"
wanted = False   # set by fastpeft.recompute for the duration of a training forward with GEMM rebuilds on


def rebuild_with(t: torch.Tensor, fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
    """Offer the recompute a way to rebuild ``t``, an output-sized tensor an op is about to save, as ``fn(x)`` from
    the adapter layer's input x - a computation as costly as the layer's forward (DoRA's M x N output, kept for the
    magnitude's gradient).  Taken only when GEMM rebuilds are switched on (``FASTPEFT_RECOMPUTE=all`` or
    ``fastpeft.recompute.set_enabled(model, True, gemm=True)``) inside an adapter layer of a training forward, and
    only once ``fn(x)`` has been checked bit-equal to ``t`` for that layer, shape and dtype; otherwise ``t`` is saved
    as usual.  ``fn`` must not hold x or t (it runs under ``torch.no_grad`` in backward)."""
    if wanted and not torch.compiler.is_compiling():
        setattr(t, ATTR, fn)
