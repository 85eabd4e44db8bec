"""Sibling LoRA layers that read one input share one shrink: the ``lora_group`` op (``fastpeft/ops/lora_group.py``).

q_proj / k_proj / v_proj (and gate_proj / up_proj, BERT's query / key / value) are called one after another with the
very same tensor x.  Each alone reads x twice per training step for its adapter (the shrink forward, dA backward);
as a group x is read once each way for all of them, and their dX are summed in place.

How a group forms, without a per-model table: the layers called in a row with the same x object (same version) form
a *burst*; a burst of two or more layers is remembered, keyed by its first layer (the leader).  From the next step
on, when the leader is called it runs the group op for itself and the remembered followers (all must be eligible:
one adapter, no active dropout, no DoRA, the triton backend) and keeps the followers' outputs; each follower called
with that same x returns its output.  A follower called with another x (cross-attention, a hook that changed x)
runs alone, and its precomputed output is dropped (its parameters then get no gradient from it).

Determinism under activation checkpointing: a group is used only after a step that learned it, and nothing is
learned or activated while backward runs, so a checkpointed block's recomputation makes the decisions its forward
made (the same saved tensors).  Off under ``torch.compile`` tracing and with ``FASTPEFT_SHARED_SHRINK=0``.
State is per thread.
"""

from __future__ import annotations

import os
import threading
import weakref
from typing import Callable, Optional

import torch

from ..._backend import select_backend
from ...ops import _registry

__all__ = ["shared_forward", "enabled"]

_ENV = "FASTPEFT_SHARED_SHRINK"


def enabled() -> bool:
    """Whether sibling layers may share a shrink (``FASTPEFT_SHARED_SHRINK``, default on)."""
    return os.environ.get(_ENV, "1").strip().lower() not in ("0", "false", "off", "no")


class _Pending:
    __slots__ = ("x", "version", "outputs")

    def __init__(self, x: torch.Tensor, outputs: dict) -> None:
        self.x, self.version, self.outputs = weakref.ref(x), x._version, outputs

    def matches(self, x: torch.Tensor) -> bool:
        return self.x() is x and self.version == x._version


class _State(threading.local):
    def __init__(self) -> None:
        self.burst_x: Optional[weakref.ref] = None
        self.burst_version = -1
        self.burst: list = []                       # weakrefs of the layers called with burst_x, in order
        self.learned = weakref.WeakKeyDictionary()  # leader -> [follower weakrefs, active]
        self.pending: Optional[_Pending] = None


_state = _State()


def _in_backward() -> bool:
    return torch._C._current_graph_task_id() != -1


def _observe(layer, x: torch.Tensor) -> None:
    st = _state
    if st.burst_x is not None and st.burst_x() is x and st.burst_version == x._version:
        if all(r() is not layer for r in st.burst):
            st.burst.append(weakref.ref(layer))
        return
    prev = [r() for r in st.burst]
    if prev and prev[0] is not None:
        followers = [f for f in prev[1:] if f is not None]
        entry = st.learned.get(prev[0])
        if not followers:
            st.learned.pop(prev[0], None)
        elif entry is None or [r() for r in entry[0]] != followers:
            st.learned[prev[0]] = [[weakref.ref(f) for f in followers], False]
    st.burst_x, st.burst_version, st.burst = weakref.ref(x), x._version, [weakref.ref(layer)]


def shared_forward(layer, x: torch.Tensor, spec: Callable[[object, torch.Tensor], Optional[tuple]]
                   ) -> Optional[torch.Tensor]:
    """The output of LoRA layer `layer` for x from a sibling group, or None (then the layer runs its own op).

    `spec(module, x)` gives a layer's ``(weight (N, K), bias, lora_A (r, K), lora_B (N, r), scaling)`` when it can
    take part (one adapter, no active dropout, no DoRA, fused-capable), else None.  x: (..., K).
    """
    if not enabled() or torch.compiler.is_compiling() or _registry.supports("lora", "triton", x) is not None:
        return None   # (the check is cheap, and spares the torch path - every CPU call - the bookkeeping below)
    st = _state
    backward = _in_backward()
    pend = st.pending
    if pend is not None and pend.matches(x):
        y = pend.outputs.pop(id(layer), None)
        if y is not None:
            if not backward:
                _observe(layer, x)
            if not pend.outputs:
                st.pending = None
            return y
    if not backward:
        _observe(layer, x)
    entry = st.learned.get(layer)
    if entry is None:
        return None
    if not backward:
        entry[1] = True   # learned in an earlier burst: active from this call on (and in backward's recomputation)
    if not entry[1]:
        return None
    members = [layer] + [r() for r in entry[0]]
    if any(m is None for m in members):
        return None
    specs = [spec(m, x) for m in members]
    if any(s is None for s in specs):
        return None
    weights, biases, As, Bs, scalings = (list(t) for t in zip(*specs))
    k = x.shape[-1]
    if (any(w.dtype != x.dtype or w.device != x.device or w.shape[1] != k for w in weights)
            or any(a.dtype != As[0].dtype or b.dtype != As[0].dtype for a, b in zip(As, Bs))
            or torch.is_autocast_enabled(x.device.type)):
        return None
    x2 = x.reshape(-1, k).contiguous()
    backend = select_backend("lora", x, None, dispatch_args=(x2, weights[0], biases[0], As[0], None, Bs[0]))
    if not backend.startswith("triton"):
        return None
    from ...ops.lora_group import lora_group_apply  # the op module imports the kernels registry lazily
    ys = lora_group_apply(x2, weights, biases, As, Bs, scalings, backend.partition(":")[0])
    lead = x.shape[:-1]
    ys = [y.reshape(*lead, y.shape[-1]) for y in ys]
    st.pending = _Pending(x, {id(m): y for m, y in zip(members[1:], ys[1:])})
    return ys[0]
