"""(IA)³ layer benchmarks: ``setup_ia3(shape, dtype, device, providers, feedforward)`` -> providers.

Attention mode scales the output (``y = (x Wᵀ) ⊙ l``, Llama's k/v targets); feed-forward mode scales the input
(``y = (x ⊙ l) Wᵀ``, Llama's down_proj).  Same providers as ``bench_lora`` on HF PEFT's ``ia3.Linear`` tensors.
"""

from __future__ import annotations

import torch

import fastpeft.functional as FF
from fastpeft.ops.ia3 import ia3_fwd_ref

from ._utils import peft_or_none
from .bench_lora import LayerCase, Provider, _compiled, _eval_call, _One, make_inputs
from .shapes import Shape


def setup_ia3(shape: Shape, dtype: torch.dtype, device: torch.device, providers: list[str],
              feedforward: bool = False) -> LayerCase:
    """Build an HF PEFT ``ia3.Linear`` (random l around 1) and the requested providers on its tensors."""
    peft = peft_or_none()
    if peft is None:
        raise RuntimeError("the IA3 benchmarks build the layer with HF PEFT: pip install peft")
    torch.manual_seed(0)
    model = _One(shape.K, shape.N, False, device, dtype)
    with torch.no_grad():
        model.proj.weight.normal_(0, shape.K ** -0.5)
    cfg = peft.IA3Config(target_modules=["proj"], feedforward_modules=["proj"] if feedforward else [])
    layer = peft.get_peft_model(model, cfg).base_model.model.proj
    layer.train()
    W, L = layer.base_layer.weight, layer.ia3_l["default"]
    with torch.no_grad():
        L.normal_(1.0, 0.1)  # PEFT's init is all ones (the identity); random values exercise the scaling

    def reference(x):
        return ia3_fwd_ref(x.detach(), W, None, L.detach().reshape(-1), feedforward, upcast=True)[0]

    case = LayerCase("ia3_ff" if feedforward else "ia3_attn", shape, dtype, device,
                     make_inputs(shape, dtype, device), reference, {}, keep=[W, L])
    for name in providers:
        if name == "base":
            case.providers[name] = Provider(layer.base_layer, layer.base_layer, [])
        elif name.startswith("fastpeft-"):
            backend = name.split("-", 1)[1]

            def call(x, _b=backend):
                return FF.ia3_linear(x, W, None, L, feedforward, backend=_b)
            case.providers[name] = Provider(call, call, [L])
        elif name == "peft":
            case.providers[name] = Provider(layer, _eval_call(layer), [L])
        elif name == "peft-compile":
            compiled = _compiled(layer)
            case.providers[name] = Provider(compiled, _eval_call(compiled, layer), [L])
        else:
            case.skipped[name] = "unknown provider"
    return case
