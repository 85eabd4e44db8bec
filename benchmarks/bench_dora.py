"""DoRA layer benchmark (``--op dora``): fastpeft's DoRA layer against HF PEFT's, with fastpeft's plain LoRA on the
same shape as the yardstick (the goal: DoRA about as costly as LoRA; PEFT's DoRA costs about 2x its LoRA).

Every provider computes the same layer from the same tensors (frozen W (N, K) in ``dtype``; A, B and the magnitude m
in fp32, PEFT's default ``autocast_adapter_dtype=True``).  Providers:

* ``base``            the frozen ``nn.Linear`` alone;
* ``fastpeft-torch``  fastpeft's ``lora.Linear`` tuner layer with ``use_dora=True`` (expanded row norm, ‖W‖² cached);
* ``fastpeft-lora``   ``fastpeft.functional.lora_linear`` on the same W, A, B (no DoRA), default backend;
* ``peft``            HF PEFT's DoRA ``lora.Linear``, eager, its defaults;
* ``peft-compile``    ``torch.compile`` of that layer.

The error column is against an fp64 ``(m / ‖W + sBA‖_row) · (W + sBA) x``.
"""

from __future__ import annotations

import warnings

import torch

import fastpeft
import fastpeft.functional as FF

from ._utils import peft_or_none
from .bench_lora import LayerCase, Provider, _compiled, _eval_call, _One, make_inputs
from .shapes import Shape


def setup_dora(shape: Shape, dtype: torch.dtype, device: torch.device, providers: list[str],
               dropout: float = 0.0) -> LayerCase:
    """Build the DoRA layer of ``shape`` (M, K, N, r) for every requested provider (see the module docstring)."""
    peft = peft_or_none()
    if peft is None:
        raise RuntimeError("the DoRA benchmark builds the layer with HF PEFT: pip install peft")
    torch.manual_seed(0)
    model = _One(shape.K, shape.N, False, device, dtype)
    with torch.no_grad():
        model.proj.weight.normal_(0, shape.K ** -0.5)
    kw = dict(r=shape.r, lora_alpha=2 * shape.r, lora_dropout=dropout, target_modules=["proj"], use_dora=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fm = fastpeft.get_peft_model(_One(shape.K, shape.N, False, device, dtype), fastpeft.LoraConfig(**kw))
        pm = peft.get_peft_model(model, peft.LoraConfig(**kw))
    layer = pm.base_model.model.proj
    flayer = fm.base_model.model.proj
    W = layer.base_layer.weight
    A, B = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    m = layer.lora_magnitude_vector["default"].weight
    with torch.no_grad():
        B.normal_(0, shape.r ** -0.5)  # B = 0 would make the norm trivial
        m.mul_(1 + 0.1 * torch.randn_like(m))
        flayer.base_layer.weight.copy_(W)
        flayer.lora_A["default"].weight.copy_(A)
        flayer.lora_B["default"].weight.copy_(B)
        flayer.lora_magnitude_vector["default"].weight.copy_(m)
    s = layer.scaling["default"]
    layer.train()
    flayer.train()
    fparams = [flayer.lora_A["default"].weight, flayer.lora_B["default"].weight,
               flayer.lora_magnitude_vector["default"].weight]

    def reference(x):
        with torch.no_grad():
            Wt = W.double() + s * (B.double() @ A.double())
            k = m.double() / torch.linalg.norm(Wt, dim=1)
            return x.double() @ (k[:, None] * Wt).t()

    case = LayerCase("dora" + (f"_dropout{dropout:g}" if dropout else ""), shape, dtype, device,
                     make_inputs(shape, dtype, device), reference, {}, keep=[W, A, B, m, flayer.base_layer.weight, *fparams])
    done_fastpeft = False
    for name in providers:
        if name == "base":
            case.providers[name] = Provider(layer.base_layer, layer.base_layer, [])
        elif name.startswith("fastpeft-"):
            if done_fastpeft:  # the tuner layer picks its own path; one row is enough
                continue
            done_fastpeft = True
            case.providers["fastpeft-torch"] = Provider(flayer, _eval_call(flayer), fparams)

            def lora(x, _p=dropout):
                return FF.lora_linear(x, W, None, A, B, s, _p)

            def lora_eval(x):
                # what LoRA alone computes; the error column of this row is against the DoRA reference
                return FF.lora_linear(x, W, None, A, B, s, 0.0)
            case.providers["fastpeft-lora"] = Provider(lora, lora_eval, [A, B])
        elif name == "peft":
            case.providers[name] = Provider(layer, _eval_call(layer), [A, B, m])
        elif name == "peft-compile":
            compiled = _compiled(layer)
            case.providers[name] = Provider(compiled, _eval_call(compiled, layer), [A, B, m])
        else:
            case.skipped[name] = "unknown provider"
    return case
