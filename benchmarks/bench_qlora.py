"""LoRA on a 4-bit bitsandbytes base (QLoRA): ``setup_qlora(shape, dtype, device, ...)`` -> providers.

The base is a ``bitsandbytes.nn.Linear4bit`` (nf4, double quantization, compute dtype = the benchmark dtype) holding
the same random weight in every provider; the adapters are HF PEFT's (fp32).  Providers:

* ``base``            the quantized ``Linear4bit`` alone (the floor);
* ``fastpeft-torch``  fastpeft's layer for quantized bases (``fastpeft.tuners.lora.bnb.LoraQuantLinear``) sharing the
                      base and the adapter tensors; quantized bases always take the torch path;
* ``peft``            HF PEFT's ``lora.bnb.Linear4bit``.

The reference is fp64 math on the dequantized weight.  Needs bitsandbytes (``pip install bitsandbytes``).
"""

from __future__ import annotations

import torch

import fastpeft
from fastpeft.tuners.lora.bnb import LoraQuantLinear
from fastpeft.utils.quantization import dequantize_weight

from ._utils import peft_or_none
from .bench_lora import LayerCase, Provider, _eval_call, _One, make_inputs
from .shapes import Shape


def setup_qlora(shape: Shape, dtype: torch.dtype, device: torch.device, providers: list[str],
                quant_type: str = "nf4") -> LayerCase:
    """Build the 4-bit layer for every requested provider (see the module docstring)."""
    peft = peft_or_none()
    if peft is None:
        raise RuntimeError("the QLoRA benchmark builds the layer with HF PEFT: pip install peft")
    try:
        import bitsandbytes as bnb
    except ImportError as e:
        raise RuntimeError("the QLoRA benchmark needs bitsandbytes: pip install bitsandbytes") from e
    torch.manual_seed(0)
    dense = _One(shape.K, shape.N, False, "cpu", torch.float32)
    with torch.no_grad():
        dense.proj.weight.normal_(0, shape.K ** -0.5)
    q = bnb.nn.Linear4bit(shape.K, shape.N, bias=False, compute_dtype=dtype, compress_statistics=True,
                          quant_type=quant_type)
    q.weight = bnb.nn.Params4bit(dense.proj.weight.data.to(dtype), requires_grad=False, compress_statistics=True,
                                 quant_type=quant_type)
    dense.proj = q.to(device)
    dense.is_loaded_in_4bit = True  # what transformers sets; PEFT dispatches its bnb layer on it
    cfg = peft.LoraConfig(r=shape.r, lora_alpha=2 * shape.r, target_modules=["proj"])
    pm = peft.get_peft_model(dense, cfg)
    layer = pm.base_model.model.proj
    layer.train()
    A, B = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    with torch.no_grad():
        B.normal_(0, shape.r ** -0.5)  # PEFT initialises B to zero; random values make the error column meaningful
    scale = layer.scaling["default"]
    base = layer.base_layer
    W = dequantize_weight(base)

    fl = LoraQuantLinear(base, "default", shape.r, 2 * shape.r, fastpeft.LoraConfig(r=shape.r, lora_alpha=2 * shape.r))
    fl.lora_A["default"].weight = A
    fl.lora_B["default"].weight = B
    fl.train()

    def reference(x):
        xd = x.detach().double()
        return xd @ W.double().T + scale * (xd @ A.detach().double().T) @ B.detach().double().T

    case = LayerCase(f"qlora_{quant_type}", shape, dtype, device, make_inputs(shape, dtype, device), reference, {},
                     keep=[W, base.weight, A, B])  # keep[0]: the dense weight of the base row's reference
    for name in providers:
        if name == "base":
            case.providers[name] = Provider(base, base, [])
        elif name == "fastpeft-torch":
            case.providers[name] = Provider(fl, _eval_call(fl), [A, B])
        elif name == "peft":
            case.providers[name] = Provider(layer, _eval_call(layer), [A, B])
        else:
            case.skipped[name] = "quantized bases run on the torch path only" if name.startswith("fastpeft-") \
                else "not a QLoRA provider"
    return case
