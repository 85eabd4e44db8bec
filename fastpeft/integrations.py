"""Speed up a model built by Hugging Face PEFT, in place and reversibly: ``accelerate(peft_model)`` / ``restore``.

``accelerate`` walks the model and, for every HF PEFT ``lora.Linear``, ``adalora.SVDLinear`` and ``ia3.Linear`` whose
base layer is a plain ``nn.Linear`` or a transformers ``Conv1D``, replaces the forward *of that instance* (a bound
method stored in the instance ``__dict__``; the class is never touched) with one that calls fastpeft's fused
functional op (``fastpeft.functional.lora_linear`` / ``adalora_linear`` / ``ia3_linear``) on the very same Parameter
objects.  Nothing is copied or re-registered, so

* an optimizer created before or after ``accelerate`` keeps updating the parameters the layer uses;
* PEFT's ``save_pretrained`` / ``get_peft_model_state_dict`` see the same tensors under the same names;
* ``restore`` deletes the instance attribute and PEFT's own forward is back, bit for bit.

Every call re-checks the cases the fused op does not cover and then runs PEFT's forward unchanged (the fallback):
adapters disabled or merged, several active adapters, mixed-batch ``adapter_names``, LoRA variants (DoRA, aLoRA...),
``lora_bias``, a dropout module other than ``nn.Dropout``/``nn.Identity``, input-dtype casting disabled, a base layer
with hooks (accelerate offloading) or a trainable base weight, dtype/device mismatches, extra forward arguments.
``fallback_reason(layer, x)`` says which one applies.
"""

from __future__ import annotations

import types
from typing import Any, Optional

import torch
import torch.nn as nn

from .functional import adalora_linear, ia3_linear, lora_linear
from .recompute import install as _install_recompute
from ._peft_compat import peft_layer_classes
from .utils.fused import base_layer_reason, dense_base_weight, input_reason

__all__ = ["accelerate", "restore", "is_accelerated", "fallback_reason"]

# Instance attribute holding our bound forward; its presence marks an accelerated layer.
_MARK = "_fastpeft_backend"
_RANKNUM = "_fastpeft_ranknum"


def _kind(layer: nn.Module) -> Optional[str]:
    return peft_layer_classes().get(type(layer))


# ---------------------------------------------------------------------------------------------------------------
# When the fused path applies
# ---------------------------------------------------------------------------------------------------------------


def _structural_reason(layer: nn.Module, kind: str) -> Optional[str]:
    """Reasons that do not depend on the input (cheap attribute checks)."""
    if layer.disable_adapters:
        return "adapters are disabled"
    if layer.merged:
        return "adapters are merged into the base weight"
    if getattr(layer, "cast_input_dtype_enabled", True) is False:
        return "input dtype casting is disabled (peft.helpers.disable_input_dtype_casting)"
    params = layer.ia3_l if kind == "ia3" else layer.lora_A
    active = [a for a in layer.active_adapters if a in params.keys()]
    if len(active) != 1:
        return f"{len(active)} active adapters on this layer (the fused op handles exactly one)"
    name = active[0]
    base = layer.base_layer
    reason = base_layer_reason(base)  # the check fastpeft's own tuner layers make (fastpeft.utils.fused)
    if reason is not None:
        return reason
    if base.weight.requires_grad:
        return "the base weight is trainable (the fused op never computes its gradient)"
    if kind == "ia3":
        return None
    if kind == "lora":
        if name in getattr(layer, "lora_variant", {}):
            return f"adapter {name!r} uses a LoRA variant ({type(layer.lora_variant[name]).__name__}, e.g. DoRA)"
        a_mod, b_mod = layer.lora_A[name], layer.lora_B[name]
        if type(a_mod) is not nn.Linear or type(b_mod) is not nn.Linear:
            return "lora_A/lora_B are not nn.Linear"
        if a_mod.bias is not None or b_mod.bias is not None:
            return "lora_bias=True (lora_B has a bias)"
        if a_mod.weight.dtype != b_mod.weight.dtype:
            return "lora_A and lora_B have different dtypes"
    else:
        if layer.lora_A[name].dtype != layer.lora_B[name].dtype or layer.lora_E[name].dtype != layer.lora_A[name].dtype:
            return "lora_A, lora_E and lora_B have different dtypes"
    drop = layer.lora_dropout[name]
    if type(drop) not in (nn.Dropout, nn.Identity):
        return f"dropout module {type(drop).__name__} is not nn.Dropout or nn.Identity"
    if type(drop) is nn.Dropout and drop.inplace:
        return "in-place dropout"
    return None


def _input_reason(layer: nn.Module, x: Any, args: tuple, kwargs: dict) -> Optional[str]:
    return input_reason(layer.base_layer, x, args, kwargs)


def fallback_reason(layer: nn.Module, x: Any = None, *args: Any, **kwargs: Any) -> Optional[str]:
    """Why ``layer`` would run HF PEFT's own forward for input ``x`` instead of the fused op (None if it would not).

    Args:
        layer: an HF PEFT ``lora.Linear``, ``adalora.SVDLinear`` or ``ia3.Linear`` (accelerated or not).
        x: (..., in_features) the input, or None to check only the layer's state.
    Returns:
        A human-readable reason, or None when the fused path applies.
    """
    kind = _kind(layer)
    if kind is None:
        return f"{type(layer).__name__} is not an HF PEFT LoRA/AdaLoRA/IA3 linear layer"
    reason = _structural_reason(layer, kind)
    if reason is None and x is not None:
        reason = _input_reason(layer, x, args, kwargs)
    return reason


# ---------------------------------------------------------------------------------------------------------------
# The replacement forwards (bound to one instance each)
# ---------------------------------------------------------------------------------------------------------------


def _fused_forward(self: nn.Module, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
    kind = _kind(self)
    reason = _structural_reason(self, kind) if kind is not None else "unknown layer"
    if reason is None:
        reason = _input_reason(self, x, args, kwargs)
    if reason is not None:
        # PEFT's own forward, looked up on the class (our bound method lives on the instance only).
        return type(self).forward(self, x, *args, **kwargs)
    backend = getattr(self, _MARK)
    base = self.base_layer
    weight = dense_base_weight(base)
    if kind == "ia3":
        (name,) = [a for a in self.active_adapters if a in self.ia3_l.keys()]
        return ia3_linear(x, weight, base.bias, self.ia3_l[name], bool(self.is_feedforward), backend=backend)
    (name,) = [a for a in self.active_adapters if a in self.lora_A.keys()]
    drop = self.lora_dropout[name]
    p = float(drop.p) if (type(drop) is nn.Dropout and drop.training) else 0.0
    if kind == "lora":
        return lora_linear(x, weight, base.bias, self.lora_A[name].weight, self.lora_B[name].weight,
                              self.scaling[name], p, backend=backend)
    return adalora_linear(x, weight, base.bias, self.lora_A[name], self.lora_E[name], self.lora_B[name],
                             self.scaling[name], _ranknum(self, name), p, backend=backend)


def _ranknum(layer: nn.Module, name: str) -> float:
    """AdaLoRA's ranknum (a frozen scalar Parameter) as a float, re-read only when the tensor changes, so the fused
    path does not force a device sync on every call."""
    t = layer.ranknum[name]
    if torch.compiler.is_compiling():
        # data_ptr/_version are not traceable; PEFT keeps ranknum equal to the adapter's r.
        return float(layer.r[name])
    key = (t.data_ptr(), t._version)
    cache = layer.__dict__.setdefault(_RANKNUM, {})
    hit = cache.get(name)
    if hit is not None and hit[0] == key:
        return hit[1]
    value = float(t.detach().reshape(-1)[0].item())
    cache[name] = (key, value)
    return value


# ---------------------------------------------------------------------------------------------------------------
# Public API
# ---------------------------------------------------------------------------------------------------------------


def _check_module(model) -> None:
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module (e.g. a peft.PeftModel), got {type(model).__name__}")


def accelerate(model: nn.Module, backend: Optional[str] = None) -> nn.Module:
    """Make the LoRA / AdaLoRA / IA3 linear layers of an HF PEFT model run fastpeft's fused ops, in place.

    Args:
        model: a model built by HF PEFT (``peft.get_peft_model`` / ``PeftModel.from_pretrained``) or any module
            containing HF PEFT ``lora.Linear``, ``adalora.SVDLinear`` or ``ia3.Linear`` layers.
        backend: passed to the functional ops: None (``FASTPEFT_BACKEND``, default auto), ``"auto"``, ``"torch"``,
            ``"triton"`` or ``"cuda"``.
    Returns:
        The same ``model`` object.  Parameters, names, state dict, optimizer state and PEFT's ``save_pretrained``
        output are unchanged; the layers' outputs and gradients equal PEFT's (up to floating-point reassociation;
        with dropout on the torch backend even the mask is PEFT's, drawn with ``F.dropout`` from torch's RNG).
        Layers the fused op cannot serve at call time run PEFT's own forward (see ``fallback_reason``).
        Calling it again only changes the backend.
    Raises:
        TypeError: ``model`` is not an ``nn.Module``.
        ValueError: ``backend`` is not a known backend name.
        ImportError: peft is not installed (``pip install peft``).
    """
    _check_module(model)
    if backend is not None:
        if not isinstance(backend, str) or backend.lower() not in ("auto", "torch", "triton", "cuda"):
            raise ValueError(f"backend must be None, 'auto', 'torch', 'triton' or 'cuda', got {backend!r}")
        backend = backend.lower()
    classes = peft_layer_classes()
    if not classes:
        raise ImportError("fastpeft.accelerate needs Hugging Face PEFT: pip install peft")
    for module in model.modules():
        if type(module) in classes:
            # Instance attributes only: __dict__ entries shadow the class's forward for this object alone.
            object.__setattr__(module, _MARK, backend)
            object.__setattr__(module, "forward", types.MethodType(_fused_forward, module))
    _install_recompute(model)  # rebuild the adapters' saved inputs in backward (fastpeft.recompute)
    return model


def restore(model: nn.Module) -> nn.Module:
    """Undo ``accelerate``: every layer runs HF PEFT's own forward again.  Returns the same ``model``.

    Safe to call on a model that was never accelerated (it does nothing then).
    """
    _check_module(model)
    for module in model.modules():
        if _MARK in module.__dict__:
            del module.__dict__[_MARK]
            module.__dict__.pop("forward", None)
            module.__dict__.pop(_RANKNUM, None)
    return model


def is_accelerated(module: nn.Module) -> bool:
    """True if ``module`` (a PEFT layer) or any of its submodules was accelerated and not restored."""
    return any(_MARK in m.__dict__ for m in module.modules())


def _peft_lora_linear(target: nn.Module, adapter_name: str, **kwargs: Any) -> Optional[nn.Module]:
    """HF PEFT's ``lora.Linear`` around a plain ``nn.Linear``, accelerated (None for any other layer, which PEFT's
    own dispatchers then handle).

    fastpeft's LoRA configs list this under PEFT's ``_custom_modules`` hook, so a model that HF PEFT builds from a
    fastpeft config (TRL's ``SFTTrainer(peft_config=fastpeft.LoraConfig(...))`` calls ``peft.get_peft_model``) runs
    fastpeft's ops in those layers, as after ``fastpeft.accelerate(model)``.
    """
    base = target.get_base_layer() if hasattr(target, "get_base_layer") else target
    if type(base) is not nn.Linear:
        return None
    from peft.tuners.lora.layer import Linear

    return accelerate(Linear(target, adapter_name, **kwargs))


def peft_custom_modules() -> dict:
    """The ``_custom_modules`` mapping fastpeft's LoRA configs carry when HF PEFT is installed (see above)."""
    return {nn.Linear: _peft_lora_linear}
