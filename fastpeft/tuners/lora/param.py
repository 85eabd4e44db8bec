"""LoRA on a module's ``nn.Parameter`` (``LoraConfig.target_parameters``): HF PEFT's ``lora.ParamWrapper``.

Mixture-of-experts layers keep their experts as one 3-D parameter (transformers' ``...Experts`` modules:
``gate_up_proj`` / ``down_proj`` of shape (experts, a, b)) rather than as ``nn.Linear`` modules, so
``target_modules`` cannot reach them.  A ``ParamWrapper`` adapts one such parameter W: during the wrapped module's
forward W is replaced by

    W + scaling · ΔW,    ΔW[e] = B_e A_e  (per expert e; one expert for a 2-D parameter)

and the module runs unchanged on it (``torch.func.functional_call``: nothing about the module is modified, so
hooks, other parameters and the module's own code are as before).  Layout, as PEFT's (so files match both ways):
``lora_A`` is an ``nn.Linear(in, r · E)`` whose rows are expert-major (row e·r + j is expert e's j-th row of A),
``lora_B`` an ``nn.Linear(r · E, out)`` whose columns are rank-major (column j·E + e).  A 3-D parameter is
(experts, out, in) unless its module sets ``is_transposed`` (then (experts, in, out), as GPT-OSS's experts); a
2-D one is (out, in).  Several parameters of one module are adapted by nested wrappers, one per parameter, in the
order the module registered them (the saved keys follow the nesting: ``experts.lora_A.weight`` for the outer,
``experts.base_layer.lora_A.weight`` for the inner, as in PEFT).

Memory: W + ΔW (a copy of every expert) would stay alive until backward through the views of it the module's ops
save; they are saved as recipes instead (``saved_tensors_hooks``) and W + ΔW is formed again in backward - only
where no other saved-tensor hooks are active (checkpointing, fastpeft's recompute), since hooks do not nest.

The arithmetic is PEFT's (tested bit-equal in fp32): one active adapter on a 3-D parameter folds the update in one
``torch.baddbmm(W, lhs, rhs, alpha=scaling)`` with the factors cast to W's dtype, outside autocast; otherwise the
adapters' deltas, each cast to W's dtype, are summed and added (float8 parameters: added in the delta's dtype and
clamped, as PEFT).  Not supported, as in PEFT: dropout, DoRA, ``lora_bias``, ``fan_in_fan_out``, mixed-adapter
batches; and init variants other than True / False / "gaussian" (they need a Linear's weight).
"""

from __future__ import annotations

import functools
from typing import Any, Optional

import torch
import torch.nn as nn

from ...utils.adapter_math import add_delta
from ..tuners_utils import BaseTunerLayer
from .config import LoraConfig
from .init import init_lora_adapter
from .layer import LoraLayer

__all__ = ["ParamWrapper", "param_target_problem"]

_FLOAT8 = tuple(getattr(torch, n) for n in ("float8_e4m3fn", "float8_e4m3fnuz", "float8_e5m2", "float8_e5m2fnuz",
                                             "float8_e8m0fnu") if hasattr(torch, n))


def param_target_problem(config: LoraConfig) -> Optional[str]:
    """Why ``config`` cannot adapt a parameter (``target_parameters``), or None.  PEFT's refusals, plus the init
    variants that read a Linear's weight."""
    if config.lora_dropout:
        return f"lora_dropout={config.lora_dropout!r} (dropout acts on a layer's input, which a parameter " \
               "update cannot see); use lora_dropout=0"
    if config.fan_in_fan_out:
        return "fan_in_fan_out=True"
    if config.lora_bias:
        return "lora_bias=True"
    if config.use_dora:
        return "use_dora=True"
    init = config.init_lora_weights
    if not (init is True or init is False or (isinstance(init, str) and init.lower() == "gaussian")):
        return f"init_lora_weights={init!r} (only True, False and 'gaussian')"
    return None


def _may_hook_saved_tensors() -> bool:
    """Whether the wrapped module's saved tensors may go through this file's hooks: in a forward that builds a
    backward, and only where no other saved-tensor hooks are active (``torch.utils.checkpoint``, fastpeft's
    activation recompute, a user's): hooks do not nest, so installing ours would take their tensors from them.
    Needs torch's query of the active hooks; without it the parameter stays saved as in PEFT."""
    if not torch.is_grad_enabled() or torch.compiler.is_compiling():
        return False
    top = getattr(torch._C._autograd, "_top_saved_tensors_default_hooks", None)
    if top is None:
        return False
    try:
        return top(False) is None
    except Exception:  # noqa: BLE001 - a changed private signature: keep PEFT's behaviour
        return False


class _Rebuild:
    """W + ΔW of one wrapper as its forward formed it, rebuilt on demand in backward (once for all the views the
    module saved of it; dropped when the last of them was unpacked) - with the versions of W and of the adapters'
    weights checked, as autograd checks saved tensors."""

    def __init__(self, wrapper: "ParamWrapper", active: list, w_eff: torch.Tensor) -> None:
        self.wrapper, self.active = wrapper, active
        self.shape, self.dtype = tuple(w_eff.shape), w_eff.dtype
        self.sources = [wrapper.get_param()] + [t for a in active for t in
                                                 (wrapper.lora_A[a].weight, wrapper.lora_B[a].weight)]
        self.versions = [t._version for t in self.sources]
        self.users = 0
        self.tensor: Optional[torch.Tensor] = None

    def take(self) -> torch.Tensor:
        if [t._version for t in self.sources] != self.versions:
            raise RuntimeError("one of the tensors needed to rebuild a parameter adapted with target_parameters "
                               f"({self.wrapper.parameter_name!r}: the parameter or its LoRA weights) was modified in "
                               "place between the forward and the backward")
        t = self.tensor
        if t is None:
            with torch.no_grad():
                t = self.wrapper._effective_param(self.active)
            self.tensor = t
        self.users -= 1
        if self.users <= 0:
            self.tensor = None
        return t


class _View:
    __slots__ = ("rebuild", "size", "stride", "offset")

    def __init__(self, rebuild: _Rebuild, t: torch.Tensor) -> None:
        self.rebuild, self.size, self.stride, self.offset = rebuild, t.size(), t.stride(), t.storage_offset()


def _pack(rebuilds: dict, t: torch.Tensor):
    base = t if t._base is None else t._base
    rb = rebuilds.get(id(base))
    if rb is None or tuple(base.shape) != rb.shape or base.dtype != rb.dtype:
        return t
    rb.users += 1
    return _View(rb, t)


def _unpack(obj):
    if not isinstance(obj, _View):
        return obj
    return torch.as_strided(obj.rebuild.take(), obj.size, obj.stride, obj.offset)


class ParamWrapper(LoraLayer):
    """LoRA on parameter ``parameter_name`` of ``base_layer`` (a module, or another ``ParamWrapper`` around it).

    Forward: the wrapped module's forward with that parameter (W, shape (E, out, in), (E, in, out) with
    ``is_transposed``, or (out, in)) replaced by W + scaling · ΔW; inputs and outputs are the module's own.
    """

    _fused_capable = False

    def __init__(self, base_layer: nn.Module, adapter_name: str, parameter_name: str, r: int, lora_alpha: float,
                 config: LoraConfig) -> None:
        BaseTunerLayer.__init__(self, base_layer)  # not LoraLayer's: its features come from a Linear's weight
        self._init_lora_state()
        self.parameter_name = parameter_name
        shape = tuple(self.get_param().shape)
        if len(shape) == 3:
            self.num_experts = shape[0]
            # (E, in, out) when the module says so, else (E, out, in)
            transposed = bool(getattr(self.param_module(), "is_transposed", False))
            self.in_features, self.out_features = (shape[1], shape[2]) if transposed else (shape[2], shape[1])
            self._out_in = not transposed
        elif len(shape) == 2:
            self.num_experts = 1
            self.out_features, self.in_features = shape
            self._out_in = True
        else:
            raise ValueError(f"target_parameters: parameter {parameter_name!r} has {len(shape)} dimensions; only 2-D "
                             "and 3-D parameters can be adapted")
        self.fan_in_fan_out = False
        self._active_adapter = [adapter_name]
        self.update_layer(adapter_name, r, lora_alpha, config)

    # -- the parameter ---------------------------------------------------------------------------------------------
    def param_module(self) -> nn.Module:
        """The module that owns the parameter (below every nested wrapper)."""
        m = self.base_layer
        while isinstance(m, ParamWrapper):
            m = m.base_layer
        return m

    def get_param(self) -> torch.Tensor:
        return getattr(self.param_module(), self.parameter_name)

    @property
    def weight(self) -> torch.Tensor:  # a Linear-like view for code that asks a tuner layer for its weight
        return self.get_param()

    @property
    def bias(self) -> None:
        return None

    # -- adapters --------------------------------------------------------------------------------------------------
    def update_layer(self, adapter_name: str, r: int, lora_alpha: float, config: LoraConfig) -> None:
        """Add adapter ``adapter_name``: lora_A (r·E, in), lora_B (out, r·E), constructed and initialised in PEFT's
        order (same RNG draws), then moved to the parameter's device and floating dtype."""
        problem = param_target_problem(config)
        if problem is not None:
            raise ValueError(f"target_parameters cannot be combined with {problem}")
        self._set_adapter_hparams(adapter_name, r, lora_alpha, config)
        e = self.num_experts
        self.lora_A[adapter_name] = nn.Linear(self.in_features, r * e, bias=False)
        self.lora_B[adapter_name] = nn.Linear(r * e, self.out_features, bias=False)
        self.lora_bias[adapter_name] = False
        init_lora_adapter(self, adapter_name, config.init_lora_weights)
        w = self.get_param()
        dtype = w.dtype if w.is_floating_point() else None
        self.lora_A[adapter_name].to(device=w.device, dtype=dtype)
        self.lora_B[adapter_name].to(device=w.device, dtype=dtype)

    def _factors(self, adapter_name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(A (E, r, in), B (E, out, r)) of a 3-D parameter's adapter: the per-expert views of the two Linears."""
        a = self.lora_A[adapter_name].weight
        b = self.lora_B[adapter_name].weight
        e = self.num_experts
        return a.reshape(e, -1, a.shape[-1]), b.reshape(b.shape[0], -1, e).permute(2, 0, 1)

    def _delta(self, adapter_name: str) -> torch.Tensor:
        """scaling · ΔW in the parameter's layout, in the adapter's dtype, with autograd (PEFT's op order)."""
        s = self.scaling[adapter_name]
        a = self.lora_A[adapter_name].weight
        b = self.lora_B[adapter_name].weight
        if self.num_experts == 1:
            # PEFT's Linear delta: on CPU a half-precision product is formed in fp32 and rounded back
            half_cpu = a.device.type == "cpu" and a.dtype in (torch.float16, torch.bfloat16)
            if half_cpu:
                return ((b.float() @ a.float()) * s).to(a.dtype)
            return (b @ a) * s
        a3, b3 = self._factors(adapter_name)  # (E, r, in), (E, out, r)
        b_ore = b.reshape(b.shape[0], -1, self.num_experts)  # (out, r, E)
        eq = "o r e, e r i -> e o i" if self._out_in else "o r e, e r i -> e i o"
        return torch.einsum(eq, b_ore, a3) * s

    def get_delta_weight(self, adapter_name: str) -> torch.Tensor:
        """scaling · ΔW of ``adapter_name`` in the parameter's layout (no gradient), in at least fp32."""
        with torch.no_grad():
            d = self._delta(adapter_name)
        return d.float() if d.dtype in (torch.float16, torch.bfloat16) else d

    def _effective_param(self, active: list[str]) -> torch.Tensor:
        """W with the active adapters' update, as the wrapped module's forward sees it (PEFT's arithmetic)."""
        w = self.get_param()
        if len(active) == 1 and self.num_experts > 1 and w.dtype not in _FLOAT8:
            a3, b3 = self._factors(active[0])
            lhs, rhs = (b3, a3) if self._out_in else (a3.transpose(-2, -1), b3.transpose(-2, -1))
            # outside autocast: the parameter keeps its dtype (as with the summed deltas below)
            with torch.autocast(device_type=w.device.type, enabled=False):
                return torch.baddbmm(w, lhs.to(w.dtype), rhs.to(w.dtype), alpha=self.scaling[active[0]])
        delta = None
        for a in active:
            d = self._delta(a)
            d = d.to(w.dtype) if w.dtype not in _FLOAT8 else d
            delta = d if delta is None else delta + d
        if w.dtype in _FLOAT8:
            info = torch.finfo(w.dtype)
            return (w.to(delta.dtype) + delta).clamp(min=info.min, max=info.max).to(w.dtype)
        return w + delta

    def _merge_one(self, adapter_name: str, safe_merge: bool) -> None:
        w = self.get_param()
        self._write_base_weight(w, add_delta(w.data, self.get_delta_weight(adapter_name)), safe_merge, adapter_name)

    def _unmerge_one(self, adapter_name: str) -> None:
        w = self.get_param()
        with torch.no_grad():
            w.data.copy_(add_delta(w.data, self.get_delta_weight(adapter_name), -1.0))

    def _check_merge_finite(self, adapter_names: list[str]) -> None:
        acc = self.get_param().data
        for a in adapter_names:
            acc = add_delta(acc, self.get_delta_weight(a))
            if not torch.isfinite(acc).all():
                raise ValueError(f"NaNs or infs detected in the merged weights; adapter {a!r} seems to be broken "
                                 "(the weights were not modified)")

    # -- forward ---------------------------------------------------------------------------------------------------
    def forward(self, x: Any, *args: Any, **kwargs: Any) -> Any:
        if self._batch_adapter_names is not None:
            raise ValueError(f"adapter_names (mixed-adapter batches) is not supported for a parameter adapted with "
                             f"target_parameters ({self.parameter_name!r})")
        return self._run({}, (x, *args), kwargs)

    def _run(self, overrides: dict, args: tuple, kwargs: dict, rebuilds: Optional[dict] = None) -> Any:
        """Collect this wrapper's replaced parameter (unless disabled or merged), then the inner wrappers', and run
        the module once with all of them."""
        rebuilds = {} if rebuilds is None else rebuilds
        active = [] if self._base_only() else self._present_active()
        if active:
            w_eff = self._effective_param(active)
            overrides[self.parameter_name] = w_eff
            rebuilds[id(w_eff)] = _Rebuild(self, list(active), w_eff)
        inner = self.base_layer
        if isinstance(inner, ParamWrapper):
            return inner._run(overrides, args, kwargs, rebuilds)
        if not overrides:
            return inner(*args, **kwargs)
        if not rebuilds or not _may_hook_saved_tensors():
            return torch.func.functional_call(inner, overrides, args, kwargs, tie_weights=False, strict=False)
        # W + ΔW (a copy of the whole parameter: every expert) would stay alive until backward through the views of
        # it the module's own ops save; they are saved as recipes instead and W + ΔW is formed again in backward
        # (one small-rank GEMM per wrapped parameter), once for all its views.
        del w_eff  # (the wrapper keeps no reference: the module's call holds the only ones)
        with torch.autograd.graph.saved_tensors_hooks(functools.partial(_pack, rebuilds), _unpack):
            return torch.func.functional_call(inner, overrides, args, kwargs, tie_weights=False, strict=False)

    def extra_repr(self) -> str:
        return f"parameter_name={self.parameter_name!r}, experts={self.num_experts}, in_features={self.in_features}, " \
               f"out_features={self.out_features}, adapters={self.adapter_names()}"
