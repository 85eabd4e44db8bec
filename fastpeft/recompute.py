"""Adapter training at the frozen model's activation memory: rebuild the adapters' saved inputs in backward.

A frozen linear layer keeps nothing for backward (dX = dY·W needs only W), but a LoRA layer keeps its input x for
dA = dSᵀ·x (and a dropped / dtype-cast copy of it), and an IA3 layer keeps its input or its M×N output.  Those
tensors are almost always cheap functions of tensors the frozen model keeps anyway.  While a model with adapters
runs its forward in training mode, this module installs ``torch.autograd.graph.saved_tensors_hooks`` whose pack
hook replaces such a saved tensor by a *recipe* - "recompute with f from T", T being held by the frozen graph
anyway - and whose unpack hook runs the recipe when backward needs the tensor.  Every recipe replays exactly the
forward's own ops on the same inputs (same kernels, same RNG state for dropout), so the numerics are unchanged.

Recipes (the per-family knowledge is only the table of producer modules, ``FAMILIES``):

* norm output (the x of q/k/v, gate/up, fc1, BERT's query/key/value/intermediate): the norm module's forward
  re-run on the tensor its own autograd saved (HF's RMSNorm keeps its fp32 upcast input, ``nn.LayerNorm`` its
  input);
* activation-module output (GPT-2's ``c_proj`` input ``act(c_fc(x))``, BERT's ``output.dense`` input): the
  activation re-run on its input, which it saved itself - or, when the activation ends in a product of two tensors
  its node saved (GPT-2's gelu_new), that one product;
* a product ``a * b`` whose autograd node saved both factors (the gated MLP's ``act(gate) * up`` feeding
  ``down_proj``): the product of the saved factors;
* ``x.to(dtype)`` of any of these (fp32 adapters on a bf16 model);
* train-mode dropout of any of these (HF PEFT's ``F.dropout`` stream): the dropout op re-run under the RNG state
  captured when the adapter layer was entered; its noise/mask is regenerated the same way, never kept;
* IA3's unscaled base output ``x Wᵀ + b`` (output mode): the base linear re-run on the (recomputed) input.

* ``x.to(adapter dtype)`` of an input that needs no grad (layer 0 with frozen embeddings), in the known linear
  layer classes without dropout and autocast (no autograd link exists there; see ``_Session._cast_of_input``).
* opt-in (``FASTPEFT_RECOMPUTE=all`` or ``set_enabled(model, True, gemm=True)``), because each use re-runs a
  layer's forward GEMM: an output-sized tensor an op offered through ``fastpeft.ops._rebuild.rebuild_with`` (DoRA's
  M×N output, kept for the magnitude's gradient), re-run from the layer's rebuilt input once checked bit-equal.

Still saved: ``S = drop(x)·Aᵀ`` (M×r per LoRA layer, ~3 % of a layer's activations at r=16, hidden 4096), and the
dropout copies of an input that needs no grad.  Anything else is saved as usual.  The mechanism is off for model types missing from ``FAMILIES`` (one log line
says so), under ``torch.compile`` tracing and outside training; gradient checkpointing's own hooks take precedence
inside checkpointed blocks.  Switch: ``FASTPEFT_RECOMPUTE=0`` in the environment, or ``set_enabled(model, False)``.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import weakref
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from ._backend import select_backend
from .ops import _rebuild
from .ops._rebuild import rebuild_with
from ._peft_compat import peft_layer_classes
from .utils.other import linear_weight_oi

__all__ = ["FAMILIES", "install", "uninstall", "set_enabled", "is_enabled", "RecomputeStats", "last_stats",
           "saved_tensor_bytes", "rebuild_with"]

logger = logging.getLogger(__name__)

# model_type -> class names of the modules whose outputs are rebuilt (norms, activations).  The gated-MLP product
# needs no entry: it is recognised from its autograd node.  A family is listed once its recipes are verified
# (tests/test_memory.py: loss and every adapter gradient equal with the mechanism off, saved bytes bounded).
FAMILIES: dict[str, dict[str, tuple[str, ...]]] = {
    "llama": {"norm": ("LlamaRMSNorm",)},
    "mistral": {"norm": ("MistralRMSNorm",)},
    "qwen2": {"norm": ("Qwen2RMSNorm",)},
    "qwen3": {"norm": ("Qwen3RMSNorm",)},
    "gemma": {"norm": ("GemmaRMSNorm",)},
    "gemma2": {"norm": ("Gemma2RMSNorm",)},
    "phi3": {"norm": ("Phi3RMSNorm",)},
    "gpt2": {"norm": ("LayerNorm",), "act": ("NewGELUActivation", "GELUActivation", "FastGELUActivation",
                                             "GELUTanh", "PytorchGELUTanh", "GELU")},
    "bert": {"norm": ("LayerNorm",), "act": ("GELUActivation", "GELU")},
    "roberta": {"norm": ("LayerNorm",), "act": ("GELUActivation", "GELU")},
}

# How many autograd nodes back a saved tensor's layout chain (views, casts, transposes, copies) is followed to an
# attention output: Phi-3's o_proj input is 7 deep (view, cast, view, clone, transpose, view, attention), Llama's 6.
_MAX_LAYOUT_DEPTH = 9

_ENV = "FASTPEFT_RECOMPUTE"
_ATTR = "_fastpeft_recompute"        # on the root module: _Install
_LAYER_MARK = "_fastpeft_recompute_layer"
_PRODUCER_MARK = "_fastpeft_recompute_producer"


def _env_enabled() -> bool:
    return os.environ.get(_ENV, "1").strip().lower() not in ("0", "false", "off", "no")


def _env_gemm() -> bool:
    return os.environ.get(_ENV, "1").strip().lower() == "all"


# ---------------------------------------------------------------------------------------------------------------
# Recipes
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class RecomputeStats:
    """What one forward packed.  ``recipes``: saved tensors replaced by recipes; ``recomputed_bytes``: their total
    size (what backward recomputes, once per unpack); ``ops``: recipe steps run per backward (each an elementwise
    op, a norm forward, or - IA3 output mode - one base linear); ``kept_bytes``: bytes of the tensors the hooks
    kept (unique storages)."""

    recipes: int = 0
    recomputed_bytes: int = 0
    ops: int = 0
    kept_bytes: int = 0
    mask_bytes: int = 0     # CPU only: dropout keep masks kept as bits (part of kept_bytes; 0 on accelerators)
    _storages: dict = field(default_factory=dict, repr=False)

    def kept(self, t: torch.Tensor) -> bool:
        try:
            return (t.untyped_storage().data_ptr(), t.device) in self._storages
        except Exception:
            return False

    def keep(self, t: torch.Tensor) -> None:
        try:
            st = t.untyped_storage()
            key = (st.data_ptr(), t.device)
            if key not in self._storages:
                self._storages[key] = st.nbytes()
                self.kept_bytes += st.nbytes()
        except Exception:  # tensor subclasses / fake tensors without storage
            pass


# Depth of pack-time evaluations (the bit-for-bit checks of a recipe against the tensor it replaces): a recipe's
# value is then computed without touching the use counts of the backward's unpacks.
_UNCOUNTED = [0]


@contextlib.contextmanager
def _uncounted():
    _UNCOUNTED[0] += 1
    try:
        yield
    finally:
        _UNCOUNTED[0] -= 1


class _Recipe:
    """Recomputes one tensor; ``sources`` are the tensors it holds (all kept by the frozen graph anyway).

    One recipe is often reached by several saved tensors - the norm's output that q, k and v (gate and up) each save,
    through casts or views of their own.  Each pack reaching a recipe counts one pending use (``hold``); a backward's
    unpacks take the value through ``value()``, and a recipe with ``memo`` (the ones that launch work: module
    replays, products, linear re-runs) keeps its result while uses are pending, so it is computed once per backward
    instead of once per consumer (a Llama layer's two norms were replayed 5 times, the product once, per backward)
    and held no longer than its last consumer needs it."""

    steps = 1
    memo = False  # keep the value for the pending uses (recipes whose run launches real work)

    def __init__(self, dtype: torch.dtype, shape: torch.Size) -> None:
        self.dtype, self.shape = dtype, shape
        self.pending = 0
        self._value: Optional[torch.Tensor] = None

    def run(self) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def parts(self) -> list:
        """The recipes whose ``value()`` this one's ``run`` takes."""
        inner = getattr(self, "inner", None)
        return [inner] if inner is not None else []

    def hold(self) -> None:
        """One more saved tensor will be unpacked through this recipe (and the recipes it runs)."""
        self.pending += 1
        for r in self.parts():
            r.hold()

    def value(self) -> torch.Tensor:
        """The recomputed tensor for one pending use: computed on the first, kept for the others (``memo``).
        Outside counted use (a pack-time check, or a second backward through a retained graph) just ``run``."""
        if _UNCOUNTED[0] or self.pending <= 0:
            return self.run()
        out = self._value if self._value is not None else self.run()
        self.pending -= 1
        self._value = out if (self.memo and self.pending > 0) else None
        return out

    def sources(self) -> list:
        return []

    def nsteps(self) -> int:
        """Ops a backward runs for this recipe, given those already held: a memoised recipe another saved tensor
        already reaches adds none (its value is shared)."""
        if self.memo and self.pending > 0:
            return 0
        return self.steps + sum(r.nsteps() for r in self.parts())


class _Held(_Recipe):
    """A tensor the frozen graph saves anyway (the leaf of a recipe chain)."""

    steps = 0

    def __init__(self, t: torch.Tensor) -> None:
        super().__init__(t.dtype, t.shape)
        self.t = t

    def run(self) -> torch.Tensor:
        return self.t

    def sources(self) -> list:
        return [self.t]


class _ModuleReplay(_Recipe):
    """``module.forward(source.to(in_dtype))`` under the forward's autocast state (norms, activations)."""

    memo = True

    def __init__(self, module: nn.Module, source: torch.Tensor, in_dtype: torch.dtype, out: torch.Tensor,
                 autocast: tuple) -> None:
        super().__init__(out.dtype, out.shape)
        self.module, self.source, self.in_dtype, self.autocast = module, source, in_dtype, autocast

    def run(self) -> torch.Tensor:
        src = self.source if self.source.dtype == self.in_dtype else self.source.to(self.in_dtype)
        with _replaying(self.autocast):
            return self.module.forward(src)

    def sources(self) -> list:
        return [self.source]


class _Mul(_Recipe):
    memo = True

    def __init__(self, a: torch.Tensor, b: torch.Tensor) -> None:
        super().__init__(torch.promote_types(a.dtype, b.dtype), torch.broadcast_shapes(a.shape, b.shape))
        self.a, self.b = a, b

    def run(self) -> torch.Tensor:
        with torch.no_grad():
            return self.a * self.b

    def sources(self) -> list:
        return [self.a, self.b]


def _product_of(node, shape: Optional[tuple], dtype: Optional[torch.dtype]) -> Optional[_Mul]:
    """``a * b`` from a MulBackward0 node that saved both factors (both needing grad, so the frozen graph keeps
    them) - the gated MLP's ``act(gate) * up``, GPT-2's gelu_new - when that product has ``shape`` and ``dtype``
    (each unchecked when None); else None."""
    a, b = getattr(node, "_saved_self", None), getattr(node, "_saved_other", None)
    if not (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.requires_grad and b.requires_grad):
        return None
    if shape is not None and tuple(torch.broadcast_shapes(a.shape, b.shape)) != tuple(shape):
        return None
    if dtype is not None and torch.promote_types(a.dtype, b.dtype) != dtype:
        return None
    return _Mul(a, b)


class _ToDtype(_Recipe):
    def __init__(self, inner: _Recipe, dtype: torch.dtype) -> None:
        super().__init__(dtype, inner.shape)
        self.inner = inner

    def run(self) -> torch.Tensor:
        return self.inner.value().to(self.dtype)

    def sources(self) -> list:
        return self.inner.sources()


class _View(_Recipe):
    """A view of a recomputed contiguous tensor, with the saved view's geometry."""

    steps = 0

    def __init__(self, inner: _Recipe, t: torch.Tensor) -> None:
        super().__init__(t.dtype, t.shape)
        self.inner, self.geometry = inner, (t.size(), t.stride(), t.storage_offset())

    def run(self) -> torch.Tensor:
        return self.inner.value().contiguous().as_strided(*self.geometry)

    def sources(self) -> list:
        return self.inner.sources()


class _Reshape(_Recipe):
    """``transpose`` / ``contiguous`` / ``view`` of a recomputed tensor (the attention output feeding o_proj)."""

    steps = 0

    def __init__(self, inner: _Recipe, kind: str, arg, dtype, shape) -> None:
        super().__init__(dtype, shape)
        self.inner, self.kind, self.arg = inner, kind, arg
        self.steps = 1 if kind == "contiguous" else 0

    def run(self) -> torch.Tensor:
        x = self.inner.value()
        if self.kind == "transpose":
            return x.transpose(*self.arg)
        if self.kind == "contiguous":
            return x.contiguous()
        return x.reshape(self.arg)

    def sources(self) -> list:
        return self.inner.sources()


class _RNG:
    """The device generator's state when an adapter layer was entered (its first dropout draws from it)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        if device.type == "cpu":
            self.state = torch.get_rng_state()
        elif device.type == "cuda":
            self.state = torch.cuda.get_rng_state(device)
        else:
            raise ValueError(device.type)

    @contextlib.contextmanager
    def replay(self):
        if self.device.type == "cpu":
            cur = torch.get_rng_state()
            torch.set_rng_state(self.state)
            try:
                yield
            finally:
                torch.set_rng_state(cur)
        else:
            cur = torch.cuda.get_rng_state(self.device)
            torch.cuda.set_rng_state(self.state, self.device)
            try:
                yield
            finally:
                torch.cuda.set_rng_state(cur, self.device)


class _DropoutOut(_Recipe):
    """``F.dropout(inner, p, True)`` under the recorded RNG state (the same draw as the forward's).

    On CPU the draw is not re-run: ``bernoulli_`` is most of a CPU dropout's time (as much as a small layer's
    matmuls).  The forward's noise is kept as one bit per element (``bits``: 1/32 of an fp32 input's bytes, 1/16 of a
    bf16 one's) and rebuilt once per backward for both tensors that need it (the noise the dropout's own backward
    keeps, and the output lora_A's backward keeps): torch's CPU dropout is ``input * noise`` with
    ``noise = bernoulli_(1 - p).div_(1 - p)`` in the input's dtype, so ``bits.to(dtype).div_(1 - p)`` is that noise and
    ``inner * noise`` the output, bit for bit.  On CUDA the mask is re-drawn under the recorded RNG state (Philox,
    cheap) and nothing is kept."""

    def __init__(self, inner: _Recipe, p: float, rng: _RNG) -> None:
        super().__init__(inner.dtype, inner.shape)
        self.inner, self.p, self.rng = inner, p, rng
        self.bits: Optional[torch.Tensor] = None   # CPU: the forward's keep mask, packed
        self.users = 1          # recipes that take the shared CPU noise in one backward (2 with a _DropoutNoise)
        self._noise: Optional[torch.Tensor] = None
        self._taken = 0

    def take_noise(self, shape, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """The forward's scaled noise, rebuilt on first use (from ``bits``, else drawn again under the recorded RNG
        state) and dropped once every user took it (a second backward through a retained graph rebuilds it)."""
        noise = self._noise
        if noise is None:
            with torch.no_grad():
                if self.bits is not None:
                    noise = _unpack_bits(self.bits, shape).to(dtype).div_(1 - self.p)
                else:
                    with self.rng.replay():
                        noise = F.dropout(torch.ones(shape, dtype=dtype, device=device), self.p, True)
            self._noise, self._taken = noise, 0
        self._taken += 1
        if self._taken >= self.users:
            self._noise = None
        return noise

    def run(self) -> torch.Tensor:
        x = self.inner.value()
        if self.bits is not None:
            with torch.no_grad():
                return x * self.take_noise(x.shape, x.dtype, x.device)
        with torch.no_grad(), self.rng.replay():
            return F.dropout(x, self.p, True)

    def sources(self) -> list:
        return self.inner.sources()


class _DropoutNoise(_Recipe):
    """What ``F.dropout`` saved besides its output: the CPU kernel's scaled noise (rebuilt by ``_DropoutOut``), or
    the fused (CUDA) kernel's bool mask ``native_dropout(input)[1]``."""

    def __init__(self, saved: torch.Tensor, drop: _DropoutOut) -> None:
        super().__init__(saved.dtype, saved.shape)
        self.drop, self.is_mask = drop, saved.dtype == torch.bool
        self.device = saved.device

    def run(self) -> torch.Tensor:
        d = self.drop
        if not self.is_mask:
            return d.take_noise(self.shape, self.dtype, self.device)
        with torch.no_grad(), d.rng.replay():
            return torch.native_dropout(d.inner.value(), d.p, True)[1]

    def parts(self) -> list:
        return [self.drop.inner] if self.is_mask else []

    def sources(self) -> list:
        return self.drop.sources() if self.is_mask else []



# Elements per chunk when packing / unpacking bits: the byte-per-element temporary of one chunk (256 KiB) instead of
# the whole tensor's (32 MiB at 8192 x 4096, on top of the mask in a training forward: the peak of Llama's
# LoRA-with-dropout step at 4 x 256 tokens was 1.12x the frozen model's with whole-tensor temporaries).
_BITS_CHUNK = 1 << 18


def _pack_bits(noise: torch.Tensor) -> torch.Tensor:
    """The nonzero pattern of `noise` (a CPU dropout mask or noise tensor, any dtype) as uint8 words of 8 elements
    (little-endian, zero-padded): shape (ceil(numel / 8),).  numpy's packbits on chunks of ``_BITS_CHUNK`` elements
    (one C call each, no per-bit temporaries)."""
    flat = noise.detach().reshape(-1)
    n = flat.numel()
    out = np.empty((n + 7) // 8, dtype=np.uint8)
    for lo in range(0, n, _BITS_CHUNK):   # the chunk size is a multiple of 8: only the last chunk is padded
        out[lo // 8:(min(n, lo + _BITS_CHUNK) + 7) // 8] = np.packbits(
            (flat[lo:lo + _BITS_CHUNK] != 0).numpy(), bitorder="little")
    return torch.from_numpy(out)


def _unpack_bits(bits: torch.Tensor, shape) -> torch.Tensor:
    """Inverse of ``_pack_bits``: the bool tensor of ``shape`` (one C call)."""
    n = math.prod(shape)
    flat = np.unpackbits(bits.numpy(), count=n, bitorder="little")
    return torch.from_numpy(flat.view(np.bool_)).view(shape)

class _Linear(_Recipe):
    """An output-sized tensor re-run from the layer's input with the layer's own computation: IA3 output mode's
    unscaled base output, or (opt-in) what an op marked with ``rebuild_with``."""

    memo = True

    def __init__(self, inner: _Recipe, fn: Callable, out: torch.Tensor) -> None:
        super().__init__(out.dtype, out.shape)
        self.inner, self.fn = inner, fn

    def run(self) -> torch.Tensor:
        with torch.no_grad():
            return self.fn(self.inner.value()).view(self.shape)

    def sources(self) -> list:
        return self.inner.sources()


@contextlib.contextmanager
def _replaying(autocast: tuple):
    dev, enabled, dtype = autocast
    with torch.no_grad(), torch.autocast(dev, dtype=dtype, enabled=enabled) if dev in ("cpu", "cuda") \
            else contextlib.nullcontext():
        yield


def _autocast_state(device: torch.device) -> tuple:
    dev = device.type
    if dev in ("cpu", "cuda"):
        return dev, torch.is_autocast_enabled(dev), torch.get_autocast_dtype(dev)
    return dev, False, None


# ---------------------------------------------------------------------------------------------------------------
# Pack / unpack
# ---------------------------------------------------------------------------------------------------------------


def _is_input_node(node, x: torch.Tensor) -> bool:
    """True when autograd ``node`` produced ``x`` (or accumulates into the leaf ``x``)."""
    if x.grad_fn is not None:
        return node is x.grad_fn
    return node is not None and getattr(node, "variable", None) is x


class _Packed:
    __slots__ = ("t", "recipe")

    def __init__(self, t: Optional[torch.Tensor], recipe: Optional[_Recipe] = None) -> None:
        self.t, self.recipe = t, recipe


@dataclass
class _LayerFrame:
    layer: nn.Module
    x: Optional[torch.Tensor]
    p: float
    rng: Optional[_RNG]
    base_fn: Optional[Callable]          # IA3 output mode: x -> unscaled base output, when replayable
    pending: list = field(default_factory=list)   # packed dropout noise/masks awaiting their dropout output
    dropouts: int = 0
    plain: bool = False   # a known LoRA/AdaLoRA/IA3 linear layer, no dropout, no autocast


@dataclass
class _ProducerFrame:
    module: nn.Module
    x: torch.Tensor
    source: Optional[torch.Tensor] = None


class _Session:
    """State of one training forward: producer outputs seen, the adapter layer being run, statistics."""

    def __init__(self) -> None:
        self.recipes: dict[int, tuple] = {}     # id(tensor) -> (weakref(tensor), recipe)
        self.products: dict[int, tuple] = {}    # id(activation output) -> (weakref, its MulBackward0, fallback)
        self.nodes: dict[int, tuple] = {}       # id(grad_fn) -> (grad_fn, weakref(tensor)) of adapter-layer inputs
        self.layer: Optional[_LayerFrame] = None
        self.producers: list[_ProducerFrame] = []
        self.stats = RecomputeStats()

    # -- recipe lookup ------------------------------------------------------------------------------------------
    def recipe_of(self, t: torch.Tensor) -> Optional[_Recipe]:
        hit = self.recipes.get(id(t))
        if hit is not None and hit[0]() is t:
            return hit[1]
        hit = self.products.pop(id(t), None)
        if hit is not None and hit[0]() is t:
            r = _product_of(hit[1], t.shape, t.dtype) or hit[2]
            if r is not None:
                self.recipes[id(t)] = (hit[0], r)
            return r
        return None

    def tensor_of_node(self, node) -> Optional[torch.Tensor]:
        hit = self.nodes.get(id(node))
        if hit is not None and hit[0] is node:
            return hit[1]()
        return None

    def resolve(self, t: torch.Tensor, depth: int = 0) -> Optional[_Recipe]:
        """A recipe rebuilding ``t`` from tensors the frozen graph keeps, or None."""
        r = self.recipe_of(t)
        if r is not None:
            return r
        base = t._base
        if base is not None:
            if not base.is_contiguous() or base.dtype != t.dtype:
                return None
            inner = self.resolve(base, depth + 1)
            return _View(inner, t) if inner is not None else None
        node = t.grad_fn
        if node is None or depth > 3:
            return None
        return self._resolve_node(node, t.dtype, tuple(t.shape), t, depth)

    def _resolve_node(self, node, dtype, shape, t: Optional[torch.Tensor], depth: int) -> Optional[_Recipe]:
        src = self.tensor_of_node(node)
        if src is not None:
            r = self.recipe_of(src)
            if r is not None:
                return r
            if self.stats.kept(src):   # its storage is saved by the frozen graph anyway (e.g. attention output)
                return _Held(src)
        name = node.name()
        nxt = node.next_functions
        if name == "ToCopyBackward0" and dtype is not None and nxt and nxt[0][0] is not None:
            inner = self._resolve_node(nxt[0][0], None, shape, None, depth + 1)
            return _ToDtype(inner, dtype) if inner is not None else None
        if shape is not None and depth < _MAX_LAYOUT_DEPTH:
            r = self._layout(node, name, nxt, dtype, shape, depth)
            if r is not None:
                return r
        if name in ("MulBackward0", "NativeDropoutBackward0"):
            frame = self.layer
            drop = self._dropout(node, name, frame, depth) if frame is not None else None
            if drop is not None:
                return drop
            if name == "MulBackward0":
                return _product_of(node, shape, dtype)
        return None

    def _layout(self, node, name, nxt, dtype, shape, depth) -> Optional[_Recipe]:
        """Layout ops over an attention output that the attention node saved itself."""
        if "Attention" in name:
            out = getattr(node, "_saved_output", None)
            if isinstance(out, torch.Tensor) and tuple(out.shape) == tuple(shape):
                return _Held(out)
            return None
        if not nxt or nxt[0][0] is None:
            return None
        if name == "TransposeBackward0":
            d0, d1 = node._saved_dim0, node._saved_dim1
            ndim = len(shape)
            d0, d1 = d0 % ndim, d1 % ndim
            child = list(shape)
            child[d0], child[d1] = child[d1], child[d0]
            inner = self._resolve_node(nxt[0][0], dtype, tuple(child), None, depth + 1)
            return _Reshape(inner, "transpose", (d0, d1), dtype, shape) if inner is not None else None
        if name == "CloneBackward0":
            inner = self._resolve_node(nxt[0][0], dtype, shape, None, depth + 1)
            return _Reshape(inner, "contiguous", None, dtype, shape) if inner is not None else None
        if name in ("ViewBackward0", "UnsafeViewBackward0", "ReshapeAliasBackward0"):
            sizes = getattr(node, "_saved_self_sym_sizes", None)
            if sizes is None:
                return None
            inner = self._resolve_node(nxt[0][0], dtype, tuple(int(v) for v in sizes), None, depth + 1)
            return _Reshape(inner, "view", tuple(shape), dtype, shape) if inner is not None else None
        return None

    def _dropout(self, node, name, frame: _LayerFrame, depth: int) -> Optional[_Recipe]:
        """The layer's first dropout: CPU ``input * noise`` (MulBackward0 saving only the noise) or CUDA's
        ``native_dropout`` (saving the mask)."""
        if frame.rng is None or frame.dropouts > 0 or not frame.pending:
            return None
        if name == "MulBackward0":
            if getattr(node, "_saved_self", None) is not None:
                return None
            helper = getattr(node, "_saved_other", None)
        else:
            helper = getattr(node, "_saved_result1", None)
        if not isinstance(helper, torch.Tensor):
            return None
        pend = next((pk for pk in frame.pending if pk.t is helper), None)
        if pend is None:
            return None
        nxt = node.next_functions
        if not nxt or nxt[0][0] is None:
            return None
        dtype = helper.dtype if helper.is_floating_point() else None
        inner = self._resolve_node(nxt[0][0], dtype, helper.shape, None, depth + 1)
        if inner is None:
            return None
        drop = _DropoutOut(inner, frame.p, frame.rng)
        noise = _DropoutNoise(helper, drop)
        if not noise.is_mask and helper.device.type == "cpu":
            # CPU: the keep mask as bits, shared by the noise and output recipes (see _DropoutOut)
            drop.bits, drop.users = _pack_bits(helper), 2
        frame.pending.remove(pend)
        frame.dropouts += 1
        self._account(noise, helper)
        if drop.bits is not None:
            self.stats.keep(drop.bits)
            self.stats.mask_bytes += drop.bits.numel()
        pend.t, pend.recipe = None, noise
        noise.hold()
        return drop

    def _cast_of_input(self, t: torch.Tensor, frame: _LayerFrame) -> Optional[_Recipe]:
        """An input that needs no grad has no autograd link to its casts: inside a LoRA / AdaLoRA / IA3 linear layer
        (known classes, no dropout, no autocast) the only tensor of x's shape and another float dtype that such a
        layer saves is ``x.to(adapter dtype)`` (see ``_LayerFrame.plain``)."""
        x = frame.x
        if not frame.plain or x is None or x.requires_grad:
            return None
        b = t if t._base is None else t._base
        if (isinstance(b, nn.Parameter) or b.shape != x.shape or b.dtype == x.dtype or not b.is_contiguous()
                or b.requires_grad):
            return None
        inner = self.recipe_of(x)
        if inner is None:
            if x.element_size() > b.element_size():
                return None
            inner = _Held(x)
        r = _ToDtype(inner, b.dtype)
        return r if t is b else _View(r, t)

    def _dropout_of_input(self, t: torch.Tensor, frame: _LayerFrame) -> Optional[_Recipe]:
        """An input that needs no grad has no autograd link to its dropout either (no noise is saved then): inside a
        layer with dropout, the x-shaped float tensor without grad it saves is its dropout output, kept for dA:
        ``drop(x)``, or with adapters in another dtype ``drop(x).to(dt)`` (fastpeft's op) or ``drop(x.to(dt))``
        (HF PEFT's layer).  The order is checked bit for bit against ``t``: on CPU every time, from the keep mask's
        bits (kept; cheap next to a forward); elsewhere once per layer and dtypes, by re-drawing under the recorded
        RNG state.  A tensor that matches no order stays saved."""
        x = frame.x
        if x is None or x.requires_grad or frame.dropouts > 0 or not frame.p > 0.0 or t.dtype == torch.bool:
            return None
        b = t if t._base is None else t._base   # matmul keeps the flattened (M, K) view of a 3-D input
        if isinstance(b, nn.Parameter) or b.shape != x.shape or not b.is_contiguous() or b.requires_grad:
            return None
        inner = self.recipe_of(x)
        if inner is None:
            if x.element_size() > b.element_size():
                return None   # holding x would cost more than keeping t
            inner = _Held(x)
        p, rng = frame.p, frame.rng

        def build(order: str) -> tuple[_Recipe, _DropoutOut]:
            if order == "cast_drop":
                drop = _DropoutOut(_ToDtype(inner, b.dtype), p, rng)
                return drop, drop
            drop = _DropoutOut(inner, p, rng)
            return (drop if order == "same" else _ToDtype(drop, b.dtype)), drop

        orders = ("same",) if b.dtype == x.dtype else ("drop_cast", "cast_drop")
        bits = None
        with torch.no_grad():
            if x.device.type == "cpu":
                bits = _pack_bits(b)
                keep = _unpack_bits(bits, x.shape)
                order = None
                for o in orders:
                    dt = b.dtype if o == "cast_drop" else x.dtype
                    rebuilt = x.to(dt) * keep.to(dt).div_(1 - p)
                    if torch.equal(rebuilt.to(b.dtype), b):
                        order = o
                        break
            else:
                cache = frame.layer.__dict__.setdefault("_fastpeft_recompute_drop_order", {})
                key = (x.dtype, b.dtype)
                if key not in cache:
                    with _uncounted():
                        cache[key] = next((o for o in orders if torch.equal(build(o)[0].run(), b)), None)
                order = cache[key]
        if order is None:
            return None
        r, drop = build(order)
        if bits is not None:
            drop.bits = bits
            self.stats.keep(bits)
            self.stats.mask_bytes += bits.numel()
        frame.dropouts += 1
        return r if t is b else _View(r, t)

    def _rebuilt(self, t: torch.Tensor, frame: _LayerFrame) -> Optional[_Recipe]:
        """A tensor an op marked with ``rebuild_with``: re-run from the layer's (rebuilt, else held) input, once
        checked bit-equal for this layer, shape and dtype."""
        fn = getattr(t, _rebuild.ATTR, None)
        if fn is None:
            return None
        delattr(t, _rebuild.ATTR)
        x = frame.x
        if x is None:
            return None
        inner = self.resolve(x) if x.requires_grad else (self.recipe_of(x) or _Held(x))
        if inner is None:
            if not self.stats.kept(x):
                return None
            inner = _Held(x)
        r = _Linear(inner, fn, t)
        checked = frame.layer.__dict__.setdefault("_fastpeft_recompute_rebuild_ok", {})
        key = (t.dtype, tuple(t.shape), x.dtype, tuple(x.shape))
        if key not in checked:
            with torch.no_grad(), _uncounted():
                checked[key] = bool(torch.equal(r.run(), t))
            if not checked[key]:
                logger.warning("fastpeft.recompute: %s's output rebuilt from its input differs from the saved one; "
                               "it stays saved for this layer and shape", type(frame.layer).__name__)
        return r if checked[key] else None

    def _account(self, recipe: _Recipe, t: torch.Tensor) -> None:
        self.stats.recipes += 1
        self.stats.recomputed_bytes += t.numel() * t.element_size()
        self.stats.ops += recipe.nsteps()

    def _packed_recipe(self, r: _Recipe, t: torch.Tensor) -> "_Packed":
        """`t` saved as recipe `r`: accounted (before this use is counted: a shared memoised recipe adds no ops),
        its sources kept, one more pending use of it."""
        self._account(r, t)
        for s in r.sources():
            self.stats.keep(s)
        r.hold()
        return _Packed(None, r)

    # -- hooks --------------------------------------------------------------------------------------------------
    def pack(self, t: torch.Tensor):
        frame = self.layer
        if self.producers:
            pf = self.producers[-1]
            if pf.source is None and t.shape == pf.x.shape and (
                    t is pf.x or (t.dtype != pf.x.dtype and t.grad_fn is not None
                                  and t.grad_fn.name() == "ToCopyBackward0"
                                  and _is_input_node(t.grad_fn.next_functions[0][0], pf.x))):
                pf.source = t
        if frame is not None and not isinstance(t, nn.Parameter) and t.dim() > 0:
            r = self._rebuilt(t, frame)   # only tensors an op marked (while _rebuild.wanted) carry the offer
            if r is not None:
                return self._packed_recipe(r, t)
            if t.dtype == torch.bool or (t.grad_fn is None and not t.requires_grad and t.is_floating_point()):
                if frame.rng is not None:
                    r = self._dropout_of_input(t, frame)
                if r is None and frame.rng is not None and frame.x is not None and t.shape == frame.x.shape:
                    pk = _Packed(t)           # dropout noise/mask: becomes a recipe when its output is packed
                    frame.pending.append(pk)
                    return pk
                if r is None:
                    r = self._cast_of_input(t, frame)
                if r is None and frame.base_fn is not None and frame.x is not None and not frame.x.requires_grad \
                        and (t._base is None or (t._base.is_contiguous() and t._base.numel() == t.numel())) \
                        and t.shape[:-1] == frame.x.shape[:-1] \
                        and t.shape[-1] == getattr(frame.layer, "out_features", -1) and t.dtype == frame.x.dtype:
                    # IA3 output mode on an input that needs no grad: the unscaled base output z is the only
                    # output-shaped tensor the layer saves (F.linear returns a 3-D x's z as a view of its 2-D
                    # product)
                    inner = self.recipe_of(frame.x) or _Held(frame.x)
                    r = _Linear(inner, frame.base_fn, t)
            elif t.is_floating_point():
                r = self.resolve(t)
                if r is None and frame.base_fn is not None and frame.x is not None \
                        and t.shape[:-1] == frame.x.shape[:-1] and t.requires_grad:
                    inner = self.resolve(frame.x) if frame.x.requires_grad else None
                    if inner is None and not frame.x.requires_grad:
                        inner = _Held(frame.x)
                    if inner is not None:
                        r = _Linear(inner, frame.base_fn, t)
            if r is not None:
                return self._packed_recipe(r, t)
        self.stats.keep(t)
        return _Packed(t)

    @staticmethod
    def unpack(pk: _Packed) -> torch.Tensor:
        if pk.recipe is not None:
            return pk.recipe.value()
        return pk.t


_SESSION: Optional[_Session] = None
_LAST_STATS: Optional[RecomputeStats] = None
_OBSERVERS: list = []


def last_stats() -> Optional[RecomputeStats]:
    """Statistics of the last training forward that ran with recomputation (None before the first)."""
    return _LAST_STATS


# ---------------------------------------------------------------------------------------------------------------
# Module hooks
# ---------------------------------------------------------------------------------------------------------------


def _producer_pre(module, args):
    s = _SESSION
    if s is None or not args or not isinstance(args[0], torch.Tensor):
        return
    s.producers.append(_ProducerFrame(module, args[0]))


def _producer_post(module, args, out):
    s = _SESSION
    if s is None or not s.producers or s.producers[-1].module is not module:
        return
    pf = s.producers.pop()
    if not isinstance(out, torch.Tensor) or s.layer is not None:
        return
    src = pf.source
    if src is None and not pf.x.requires_grad:
        src = pf.x   # nothing upstream needs grad: holding the input costs at most what the frozen model keeps
    replay = _ModuleReplay(module, src, pf.x.dtype, out, _autocast_state(out.device)) if src is not None else None
    node = out.grad_fn
    if node is not None and node.name() == "MulBackward0":
        # a composite activation ending in a product (GPT-2's gelu_new: 0.5·x · (1 + tanh(...))): that one product
        # of the two factors its node saved anyway, where replaying the module holds several output-sized
        # temporaries at once (GPT-2 IA3: 3 x 4 MiB at its peak).  The factors are read when an adapter layer's
        # save asks for the recipe (``recipe_of``), not here: inside a checkpointed block the node's saved tensors
        # belong to checkpoint's hooks, and reading them now would run its recomputation mid-forward.
        s.products[id(out)] = (weakref.ref(out), node, replay)
        return
    if replay is not None:
        s.recipes[id(out)] = (weakref.ref(out), replay)


def _layer_dropout_p(layer) -> float:
    drops = getattr(layer, "lora_dropout", None)
    if not isinstance(drops, nn.ModuleDict) or not layer.training:
        return 0.0
    ps = [float(d.p) for d in drops.values() if isinstance(d, nn.Dropout) and d.p > 0]
    return ps[0] if ps else 0.0


def _ia3_base_fn(layer, x: torch.Tensor) -> Optional[Callable]:
    """IA3 output mode: the function computing the unscaled base output exactly as the layer's forward does, when
    that is ``F.linear`` on the torch backend (the fused kernels compute it themselves, so it is kept then)."""
    if getattr(layer, "is_feedforward", True) or not hasattr(layer, "ia3_l"):
        return None
    try:
        if select_backend("ia3", x, getattr(layer, "_fastpeft_backend", None)) != "torch":
            return None
    except Exception:
        return None
    base = layer.base_layer
    if type(base) is not nn.Linear:
        # Conv1D: fastpeft's fused layer runs F.linear on the transposed weight; anything else is not replayed.
        if not (getattr(layer, "_fusable", False) and len(layer.active_adapters) == 1):
            return None
    weight, bias = linear_weight_oi(base), base.bias
    dev, enabled, dt = _autocast_state(x.device)

    def fn(t):
        with torch.autocast(dev, enabled=False) if dev in ("cpu", "cuda") else contextlib.nullcontext():
            if enabled:
                return F.linear(t.to(dt), weight.to(dt), bias.to(dt) if bias is not None else None)
            return F.linear(t, weight, bias)
    return fn


_PLAIN_LAYERS = ("Linear", "SVDLinear")


def _layer_pre(layer, args):
    s = _SESSION
    if s is None:
        return
    x = args[0] if args and isinstance(args[0], torch.Tensor) else None
    p = _layer_dropout_p(layer)
    rng = None
    if p > 0 and x is not None and x.device.type in ("cpu", "cuda"):
        rng = _RNG(x.device)
    base_fn = _ia3_base_fn(layer, x) if x is not None else None
    plain = (p == 0.0 and x is not None and type(layer).__name__ in _PLAIN_LAYERS
             and type(layer).__module__.startswith(("fastpeft.tuners.", "peft.tuners."))
             and not _autocast_state(x.device)[1])
    s.layer = _LayerFrame(layer, x, p, rng, base_fn, plain=plain)
    if x is not None and x.grad_fn is not None:
        s.nodes[id(x.grad_fn)] = (x.grad_fn, weakref.ref(x))


def _layer_post(layer, args, out):
    s = _SESSION
    if s is None or s.layer is None or s.layer.layer is not layer:
        return
    for pk in s.layer.pending:   # a helper whose dropout output was not rebuilt: it stays saved
        s.stats.keep(pk.t)
    s.layer = None


# ---------------------------------------------------------------------------------------------------------------
# Install
# ---------------------------------------------------------------------------------------------------------------


class _Install:
    def __init__(self, family: dict, layer_types: tuple) -> None:
        self.family = family
        self.layer_types = layer_types
        self.enabled = True
        self.gemm = False
        self.nmodules = -1
        self.ctx = None
        self.handles: list = []


# Adapter layer base classes whose forwards are hooked; fastpeft's tuner layer base registers itself when its module
# is imported (this module sits below the tuners and never imports them), HF PEFT's classes are looked up per install.
_LAYER_TYPES: list[type] = []


def register_adapter_layer_type(cls: type) -> None:
    """Have ``install`` hook the layers that are instances of ``cls`` (idempotent)."""
    if cls not in _LAYER_TYPES:
        _LAYER_TYPES.append(cls)


def _adapter_layer_types() -> tuple:
    try:
        peft_types = list(peft_layer_classes())
    except Exception:  # a peft install we cannot read: its layers keep their inputs
        peft_types = []
    return tuple(_LAYER_TYPES + peft_types)


def _family_of(model: nn.Module) -> Optional[str]:
    cfg = getattr(model, "config", None)
    return getattr(cfg, "model_type", None)


def _module_count(model: nn.Module) -> int:
    """Modules in ``model``'s tree (a shared one once per place), by an explicit stack over ``_modules``: what
    ``_hook_modules`` compares every forward, 5x cheaper than ``model.modules()``'s nested generators (a 6-layer BERT
    with LoRA, 418 modules: 0.065 ms against 0.33 ms per forward on the 2-core CPU)."""
    n, stack = 0, [model]
    while stack:
        m = stack.pop()
        if m is not None:  # a registered None child (nn.Module allows it) is no module
            n += 1
            stack.extend(m._modules.values())
    return n


def _hook_modules(model: nn.Module, inst: _Install) -> None:
    """Hook the adapter layers and the family's producers (norms, activations) not hooked yet, when the module tree
    changed since the last forward (a new adapter, a replaced module; a layer not hooked keeps its input saved)."""
    count = _module_count(model)
    if count == inst.nmodules:
        return
    inst.nmodules = count
    mods = list(model.modules())
    names = set(inst.family.get("norm", ())) | set(inst.family.get("act", ()))
    for m in mods:
        if isinstance(m, inst.layer_types):
            if not getattr(m, _LAYER_MARK, False):
                inst.handles.append(m.register_forward_pre_hook(_layer_pre))
                inst.handles.append(m.register_forward_hook(_layer_post, always_call=True))
                object.__setattr__(m, _LAYER_MARK, True)
        elif type(m).__name__ in names and not getattr(m, _PRODUCER_MARK, False):
            inst.handles.append(m.register_forward_pre_hook(_producer_pre))
            inst.handles.append(m.register_forward_hook(_producer_post, always_call=True))
            object.__setattr__(m, _PRODUCER_MARK, True)


def _root_pre(model, args, kwargs=None):
    global _SESSION
    inst: _Install = model.__dict__.get(_ATTR)
    if (inst is None or not inst.enabled or _SESSION is not None or not model.training
            or not torch.is_grad_enabled() or torch.compiler.is_compiling() or not _env_enabled()):
        return
    _hook_modules(model, inst)
    _SESSION = _Session()
    _rebuild.wanted = inst.gemm or _env_gemm()
    inst.ctx = torch.autograd.graph.saved_tensors_hooks(_SESSION.pack, _Session.unpack)
    inst.ctx.__enter__()


def _root_post(model, args, kwargs=None, out=None):
    global _SESSION, _LAST_STATS
    inst: _Install = model.__dict__.get(_ATTR)
    if inst is None or inst.ctx is None:
        return
    ctx, inst.ctx = inst.ctx, None
    ctx.__exit__(None, None, None)
    _LAST_STATS = _SESSION.stats
    for cb in list(_OBSERVERS):
        cb(_SESSION.stats)
    # Every tensor saved under the hooks keeps the pack hook - this session's bound method - alive until backward
    # releases it, so the lookup tables must not outlive the forward: their recipes would hold each recipe's sources
    # (norm inputs, an activation's factors) past the node that frees them in the frozen graph (GPT-2 IA3: +8 MiB
    # per layer still held at layer 0's backward)
    _rebuild.wanted = False
    _SESSION.recipes.clear()
    _SESSION.products.clear()
    _SESSION.nodes.clear()
    _SESSION.producers.clear()
    _SESSION.layer = None
    _SESSION = None


def _root_of(model: nn.Module) -> nn.Module:
    """The transformers model inside ``model`` (itself, or the first submodule with a ``config.model_type``)."""
    if getattr(getattr(model, "config", None), "model_type", None) is not None and not hasattr(model, "base_model"):
        return model
    for m in model.modules():
        cfg = m.__dict__.get("config", None)
        if getattr(cfg, "model_type", None) is not None:
            return m
    return model


def install(model: nn.Module) -> bool:
    """Enable recomputation for ``model`` (a transformers model holding adapter layers, or a PEFT model around
    one); idempotent.

    Called by ``BaseTuner`` (fastpeft models) and ``fastpeft.accelerate`` (HF PEFT models).  Returns True when the
    model's family is in ``FAMILIES``; otherwise logs one line saying that the model trains at standard activation
    memory and returns False.  Active only in training mode with grad enabled, outside ``torch.compile`` tracing,
    unless ``FASTPEFT_RECOMPUTE=0`` or ``set_enabled(model, False)``.
    """
    root = _root_of(model)
    if _ATTR in root.__dict__:
        return True
    mt = _family_of(root)
    fam = FAMILIES.get(mt) if mt is not None else None
    if fam is None:
        logger.info("fastpeft: activation recompute does not know model_type %r; the adapters keep their inputs "
                    "(standard activation memory)", mt)
        return False
    inst = _Install(fam, _adapter_layer_types())
    object.__setattr__(root, _ATTR, inst)
    inst.handles.append(root.register_forward_pre_hook(_root_pre, with_kwargs=True))
    inst.handles.append(root.register_forward_hook(_root_post, with_kwargs=True, always_call=True))
    return True


def uninstall(model: nn.Module) -> None:
    """Remove every hook ``install`` added (the model then keeps the adapters' inputs as usual)."""
    model = _root_of(model)
    inst: _Install = model.__dict__.get(_ATTR)
    if inst is None:
        return
    for h in inst.handles:
        h.remove()
    for m in model.modules():
        for mark in (_LAYER_MARK, _PRODUCER_MARK):
            if mark in m.__dict__:
                object.__delattr__(m, mark)
    object.__delattr__(model, _ATTR)


def _find_install(model: nn.Module) -> Optional[_Install]:
    for m in model.modules():
        inst = m.__dict__.get(_ATTR)
        if inst is not None:
            return inst
    return None


def set_enabled(model: nn.Module, enabled: bool, *, gemm: Optional[bool] = None) -> None:
    """The switch: ``set_enabled(peft_model, False)`` makes the adapters keep their inputs (as without fastpeft);
    ``True`` (the default) rebuilds them in backward.  ``FASTPEFT_RECOMPUTE=0`` turns it off process-wide.

    ``gemm=True`` (off by default; ``FASTPEFT_RECOMPUTE=all`` process-wide) also rebuilds what costs a re-run of the
    layer's forward GEMM in backward: DoRA's M x N output (kept for the magnitude's gradient) - about half a frozen
    layer's fwd+bwd more per DoRA layer, for activation memory at LoRA's.  None leaves it as it is."""
    if not isinstance(enabled, bool):
        raise TypeError(f"enabled must be a bool, got {type(enabled).__name__}")
    if gemm is not None and not isinstance(gemm, bool):
        raise TypeError(f"gemm must be a bool or None, got {type(gemm).__name__}")
    inst = _find_install(model)
    if inst is None:
        if enabled:
            raise ValueError("this model has no fastpeft activation recompute installed (unknown model family or "
                             "not a fastpeft/accelerated PEFT model)")
        return
    inst.enabled = enabled
    if gemm is not None:
        inst.gemm = gemm


def is_enabled(model: nn.Module) -> bool:
    """True when a training forward of ``model`` would rebuild the adapters' inputs in backward."""
    inst = _find_install(model)
    return inst is not None and inst.enabled and _env_enabled()


@contextlib.contextmanager
def saved_tensor_bytes(exclude: Optional[nn.Module] = None):
    """Count the bytes autograd keeps for backward (unique storages) while the block runs, whether or not the
    recompute hooks are active (they report what they keep).  Yields a dict; ``["bytes"]`` is filled on exit, with
    ``["recipes"]``, ``["recomputed_bytes"]``, ``["ops"]`` and ``["mask_bytes"]`` (the part of ``bytes`` that is CPU
    dropout keep masks stored as bits; 0 on accelerators, where the masks are re-drawn).

    Args:
        exclude: storages of this module's parameters and buffers are not counted (weights are not activations).

    Used by the tests and the memory benchmark as the deterministic measure of activation memory."""
    result: dict[str, Any] = {"bytes": 0}
    stats = RecomputeStats()
    inner: list[RecomputeStats] = []

    def pack(t):
        stats.keep(t)
        return t

    _OBSERVERS.append(inner.append)
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            yield result
    finally:
        _OBSERVERS.remove(inner.append)
        for st in inner:
            for key, n in st._storages.items():
                if key not in stats._storages:
                    stats._storages[key] = n
                    stats.kept_bytes += n
        skip = set()
        if exclude is not None:
            for t in list(exclude.parameters()) + list(exclude.buffers()):
                local = t.to_local() if hasattr(t, "to_local") else t  # FSDP2 / TP: a DTensor's own shard
                try:
                    skip.add((local.untyped_storage().data_ptr(), local.device))
                except RuntimeError:  # a storage FSDP2 has freed (resharded): nothing of it can be counted
                    pass
        result["bytes"] = sum(n for key, n in stats._storages.items() if key not in skip)
        result["recomputed_bytes"] = sum(st.recomputed_bytes for st in inner)
        result["ops"] = sum(st.ops for st in inner)
        result["recipes"] = sum(st.recipes for st in inner)
        result["mask_bytes"] = sum(st.mask_bytes for st in inner)
