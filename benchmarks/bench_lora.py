"""LoRA and AdaLoRA layer benchmarks: ``setup_lora(shape, dtype, device, ...)`` -> providers (Liger's layout).

Every provider computes the same layer on the same tensors: the frozen base weight W (N, K) in ``dtype`` and HF PEFT's
adapter parameters (fp32 by PEFT's default ``autocast_adapter_dtype=True``; the fastpeft providers use exactly those
tensors, so they compute the same thing).  Providers:

* ``base``            the frozen ``nn.Linear`` alone (the floor every adapter adds to);
* ``fastpeft-<b>``    ``fastpeft.functional.lora_linear`` / ``adalora_linear`` with ``backend=b`` (torch, triton, cuda);
* ``peft``            HF PEFT's ``lora.Linear`` / ``adalora.SVDLinear``, eager, its defaults;
* ``peft-compile``    ``torch.compile`` of that same HF PEFT layer.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
import torch.nn as nn

import fastpeft.functional as FF
from fastpeft.ops.lora import lora_fwd_ref

from ._utils import Rotating, peft_or_none
from .shapes import Shape


@dataclass
class Provider:
    """``call(x) -> y`` in training mode; ``call_eval(x)`` without dropout (for the error column)."""

    call: Callable[[torch.Tensor], torch.Tensor]
    call_eval: Callable[[torch.Tensor], torch.Tensor]
    params: list = field(default_factory=list)  # tensors whose .grad is reset between calls


@dataclass
class LayerCase:
    op: str
    shape: Shape
    dtype: torch.dtype
    device: torch.device
    inputs: Rotating                      # -> (x (M, K) requires grad, dy (M, N))
    reference: Callable[[torch.Tensor], torch.Tensor]  # fp64 ground truth, no dropout
    providers: dict[str, Provider]
    skipped: dict[str, str] = field(default_factory=dict)  # provider -> why it is not run
    keep: list = field(default_factory=list)  # tensors excluded from the CPU memory proxy (weights, inputs)


class _One(nn.Module):
    """A model with one projection named ``proj`` for HF PEFT to wrap."""

    def __init__(self, k: int, n: int, bias: bool, device, dtype):
        super().__init__()
        self.proj = nn.Linear(k, n, bias=bias, device=device, dtype=dtype)


def make_inputs(shape: Shape, dtype: torch.dtype, device: torch.device) -> Rotating:
    def make():
        x = torch.randn(shape.M, shape.K, device=device, dtype=dtype).requires_grad_(True)
        dy = torch.randn(shape.M, shape.N, device=device, dtype=dtype)
        return x, dy
    per_copy = (shape.M * (shape.K + shape.N)) * torch.finfo(dtype).bits // 8
    return Rotating(make, device, per_copy)


def _compiled(layer: nn.Module):
    # Every case wraps a new layer of the same PEFT class, i.e. the same forward code object: without a reset,
    # dynamo's per-code-object recompile limit (8) would silently run later cases eagerly.
    torch._dynamo.reset()
    return torch.compile(layer, dynamic=False)


def setup_lora(shape: Shape, dtype: torch.dtype, device: torch.device, providers: list[str],
               method: str = "lora", dropout: float = 0.0) -> LayerCase:
    """Build the layer for every requested provider.

    Args:
        shape: (M, K, N, r) from ``benchmarks.shapes``.
        dtype: the base weight and activation dtype (bf16/fp16/fp32).
        providers: names among ``base``, ``fastpeft-torch``, ``fastpeft-triton``, ``fastpeft-cuda``, ``peft``,
            ``peft-compile``.
        method: ``"lora"`` or ``"adalora"``.  dropout: the LoRA dropout (LoRA only; AdaLoRA uses 0).
    """
    peft = peft_or_none()
    if peft is None:
        raise RuntimeError("the LoRA benchmarks build the layer with HF PEFT: pip install peft")
    torch.manual_seed(0)
    model = _One(shape.K, shape.N, False, device, dtype)
    with torch.no_grad():
        model.proj.weight.normal_(0, shape.K ** -0.5)
    if method == "lora":
        cfg = peft.LoraConfig(r=shape.r, lora_alpha=2 * shape.r, lora_dropout=dropout, target_modules=["proj"])
    elif method == "adalora":
        cfg = peft.AdaLoraConfig(init_r=shape.r, target_r=shape.r, lora_alpha=2 * shape.r, lora_dropout=dropout,
                                 target_modules=["proj"], total_step=10)
    else:
        raise ValueError(f"method must be 'lora' or 'adalora', got {method!r}")
    pm = peft.get_peft_model(model, cfg)
    layer = pm.base_model.model.proj
    layer.train()
    W = layer.base_layer.weight
    if method == "lora":
        A, B = layer.lora_A["default"].weight, layer.lora_B["default"].weight
        E, ranknum = None, None
        scale = layer.scaling["default"]
    else:
        A, B, E = layer.lora_A["default"], layer.lora_B["default"], layer.lora_E["default"]
        ranknum = float(layer.ranknum["default"].item())
        scale = layer.scaling["default"]
    with torch.no_grad():
        # PEFT initialises B (LoRA) or E (AdaLoRA) to zero; random values make the error column meaningful.
        B.normal_(0, shape.r ** -0.5)
        if E is not None:
            E.normal_(0, 1.0)
    adapter = [p for p in (A, B, E) if p is not None]
    eff_scale = scale if method == "lora" else scale / (ranknum + 1e-5)

    def reference(x):
        return lora_fwd_ref(x.detach(), W, None, A.detach(), None if E is None else E.detach().reshape(-1),
                            B.detach(), eff_scale, 0.0, 0, upcast=True)[0]

    case = LayerCase(f"{method}" + (f"_dropout{dropout:g}" if dropout else ""), shape, dtype, device,
                     make_inputs(shape, dtype, device), reference, {}, keep=[W, *adapter])
    for name in providers:
        if name == "base":
            base = layer.base_layer
            case.providers[name] = Provider(base, base, [])
        elif name.startswith("fastpeft-"):
            backend = name.split("-", 1)[1]
            if method == "lora":
                def call(x, _b=backend, _p=dropout):
                    return FF.lora_linear(x, W, None, A, B, scale, _p, backend=_b)

                def call_eval(x, _b=backend):
                    return FF.lora_linear(x, W, None, A, B, scale, 0.0, backend=_b)
            else:
                def call(x, _b=backend, _p=dropout):
                    return FF.adalora_linear(x, W, None, A, E, B, scale, ranknum, _p, backend=_b)

                def call_eval(x, _b=backend):
                    return FF.adalora_linear(x, W, None, A, E, B, scale, ranknum, 0.0, backend=_b)
            case.providers[name] = Provider(call, call_eval, adapter)
        elif name == "peft":
            case.providers[name] = Provider(layer, _eval_call(layer), adapter)
        elif name == "peft-compile":
            compiled = _compiled(layer)
            case.providers[name] = Provider(compiled, _eval_call(compiled, layer), adapter)
        else:
            case.skipped[name] = "unknown provider"
    return case


def _eval_call(fn, module: Optional[nn.Module] = None):
    module = module if module is not None else fn

    def call(x):
        was = module.training
        module.eval()
        try:
            return fn(x)
        finally:
            module.train(was)
    return call
