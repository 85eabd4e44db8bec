"""bitsandbytes-quantized base layers (``Linear4bit`` nf4/fp4, ``Linear8bitLt``): what LoRA, AdaLoRA and IA3 share
(detection, dequantize / requantize, merge into a quantized weight, ``prepare_model_for_kbit_training``).  The
quantized-base layers themselves are in each method's ``bnb`` module.

The adapters are HF PEFT's (same parameters, same saved keys); what changes with a quantized base is

* the forward: the base layer is called as it is (bitsandbytes dequantizes inside its own matmul) and the adapter
  term is added in PEFT's order for these layers - the adapter output is cast to the base output's dtype *before* it
  is added (``peft/tuners/{lora,adalora,ia3}/bnb.py``).  These layers never take the fused path (their
  ``_fused_capable`` is False): the fused kernels read a dense weight, and a quantized one has none;
* merge / unmerge: dequantize the base weight, add (subtract) the delta in float, and quantize the result again with
  the layer's own settings (4-bit: blocksize, quant_type, double quant, storage; 8-bit: ``has_fp16_weights``), exactly
  as PEFT does, with PEFT's warning that rounding may change generations.  The new quantized weight replaces the old
  one only after the (optional ``safe_merge``) finiteness check, so a failed merge leaves the layer as it was.

bitsandbytes is optional: nothing here imports it at module import.  A model whose layers are bitsandbytes layers has
imported it already, so ``quant_kind`` looks the classes up in ``sys.modules``.
"""

from __future__ import annotations

import sys
import warnings
from typing import Callable, Optional

import torch
import torch.nn as nn

__all__ = ["quant_kind", "dequantize_weight", "replace_quantized_weight", "merge_quantized",
           "prepare_model_for_kbit_training", "autocast_on", "to_compute_dtype"]


def _bnb():
    return sys.modules.get("bitsandbytes")


def quant_kind(layer: nn.Module) -> Optional[str]:
    """``"4bit"`` for a bitsandbytes ``Linear4bit``, ``"8bit"`` for ``Linear8bitLt``, else None (never imports)."""
    bnb = _bnb()
    if bnb is None:
        return None
    nnm = getattr(bnb, "nn", None)
    if nnm is None:
        return None
    if isinstance(layer, nnm.Linear4bit):
        return "4bit"
    if isinstance(layer, nnm.Linear8bitLt):
        return "8bit"
    return None


def _unpack_cpu_4bit(bnb, w) -> None:
    """Bring a 4-bit weight back to bitsandbytes' canonical layout when its CPU inference path repacked it.

    On CPUs with AVX512-BF16, ``Linear4bit.forward`` in eval mode without grad repacks the weight in place for its
    CPU kernel (``quant_state.packing_format_for_cpu``; the absmax becomes bf16), and ``dequantize_4bit`` does not
    read that layout.  bitsandbytes undoes it itself before saving a state dict, with the same function.
    """
    if getattr(w.quant_state, "packing_format_for_cpu", False):
        w.data, w.quant_state = bnb.functional._convert_weight_packed_for_cpu_inverse(w.data, w.quant_state)


def dequantize_weight(layer: nn.Module) -> torch.Tensor:
    """The dense (out_features, in_features) weight of a quantized layer (4-bit: in the quantized weight's original
    dtype; 8-bit: fp32), computed the way PEFT's ``dequantize_bnb_weight`` does."""
    bnb = _bnb()
    kind = quant_kind(layer)
    w = layer.weight
    if kind == "4bit":
        _unpack_cpu_4bit(bnb, w)
        return bnb.functional.dequantize_4bit(w.data, w.quant_state)
    if kind == "8bit":
        state = layer.state
        if state.SCB is None:
            state.SCB = w.SCB
        return bnb.functional.int8_vectorwise_dequant(w.data, state.SCB.to(w.data.device))
    raise TypeError(f"{type(layer).__name__} is not a bitsandbytes Linear4bit/Linear8bitLt layer")


def replace_quantized_weight(layer: nn.Module, w_data: torch.Tensor) -> None:
    """Quantize the dense ``w_data`` (out, in) with ``layer``'s own settings and make it the layer's weight."""
    bnb = _bnb()
    kind = quant_kind(layer)
    w = layer.weight
    if kind == "4bit":
        # the same Params4bit attributes (blocksize, quant_type, compress_statistics, quant_storage, module), quantized
        # again by the move to the device
        attrs = {k: v for k, v in w.__dict__.items() if not k.startswith("_") and k != "data"}
        attrs["bnb_quantized"] = False
        attrs["requires_grad"] = False
        layer.weight = bnb.nn.Params4bit(w_data.to("cpu"), **attrs).to(w.device)
    elif kind == "8bit":
        layer.weight = bnb.nn.Int8Params(w_data.to("cpu"), requires_grad=False,
                                         has_fp16_weights=w.has_fp16_weights).to(w.device)
        layer.state.reset_grads()
    else:
        raise TypeError(f"{type(layer).__name__} is not a bitsandbytes Linear4bit/Linear8bitLt layer")


def merge_quantized(layer: nn.Module, update: Callable[[torch.Tensor], torch.Tensor], safe_merge: bool,
                    adapter_name: str, unmerge: bool = False) -> None:
    """Dequantize ``layer``'s weight, apply ``update`` (dense (out, in) -> dense), check, requantize in place.

    Warns like PEFT that the requantized weight rounds differently.  With ``safe_merge`` a non-finite result raises
    ValueError and the layer is not modified.
    """
    kind = quant_kind(layer)
    bits = "4-bit" if kind == "4bit" else "8-bit"
    warnings.warn(f"{'Unmerge' if unmerge else 'Merge'} lora module to {bits} linear may get different generations "
                  "due to rounding errors.", UserWarning, stacklevel=3)
    new = update(dequantize_weight(layer))
    if safe_merge and not torch.isfinite(new).all():
        raise ValueError(f"NaNs detected in the merged weights. The adapter {adapter_name} seems to be broken (the "
                         "weights were not modified)")
    replace_quantized_weight(layer, new)


def prepare_model_for_kbit_training(model: nn.Module, use_gradient_checkpointing: bool = True,
                                    gradient_checkpointing_kwargs: Optional[dict] = None,
                                    auto_clear_cache: bool = True) -> nn.Module:
    """Prepare a (quantized) transformers model for adapter training, as HF PEFT's function of the same name does.

    Freezes every parameter; casts every fp16/bf16 parameter that is not a 4-bit ``Params4bit`` to fp32 (norms,
    embeddings, head); for a bitsandbytes-quantized model with ``use_gradient_checkpointing``, makes the input
    embeddings' output require grad (unless ``use_reentrant=False`` is asked for) and enables gradient checkpointing
    with ``gradient_checkpointing_kwargs``.  Returns ``model`` (modified in place).
    """
    if gradient_checkpointing_kwargs is None:
        gradient_checkpointing_kwargs = {}
    if not isinstance(gradient_checkpointing_kwargs, dict):
        raise TypeError(f"gradient_checkpointing_kwargs must be a dict or None, got "
                        f"{type(gradient_checkpointing_kwargs).__name__}")
    for p in model.parameters():
        p.requires_grad = False
    method = getattr(model, "quantization_method", None)
    other_quant = method in ("gptq", "aqlm", "eetq", "torchao", "hqq") or getattr(model, "hqq_quantized", False)
    if not other_quant:
        for p in model.parameters():
            if p.dtype in (torch.float16, torch.bfloat16) and type(p).__name__ != "Params4bit":
                p.data = p.data.to(torch.float32)
        if auto_clear_cache and torch.cuda.is_available() and torch.cuda.is_initialized():
            torch.cuda.empty_cache()
    loaded_in_kbit = getattr(model, "is_loaded_in_8bit", False) or getattr(model, "is_loaded_in_4bit", False)
    if (loaded_in_kbit or other_quant) and use_gradient_checkpointing:
        if gradient_checkpointing_kwargs.get("use_reentrant", True):
            if hasattr(model, "enable_input_require_grads"):
                model.enable_input_require_grads()
            else:
                def _require_grad(module, inputs, output):
                    output.requires_grad_(True)

                model.get_input_embeddings().register_forward_hook(_require_grad)
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=gradient_checkpointing_kwargs)
    return model


# ---------------------------------------------------------------------------------------------------------------
# layers: the quantized variants of the three tuners' linear layers
# ---------------------------------------------------------------------------------------------------------------


def autocast_on() -> bool:
    return torch.is_autocast_enabled()


def to_compute_dtype(layer, adapter_name: str, attrs: tuple[str, ...]) -> None:
    """PEFT creates the adapters of a 4-bit base in the layer's ``compute_dtype``
    (``_get_base_layer_device_and_dtype``); with the default ``autocast_adapter_dtype=True`` they are upcast to fp32
    afterwards, so a bf16 compute dtype rounds the initial values to bf16 - reproduced here so both libraries start
    from the same weights."""
    dtype = getattr(layer.base_layer, "compute_dtype", None)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        return
    for attr in attrs:
        container = getattr(layer, attr)
        if adapter_name not in container:
            continue
        item = container[adapter_name]
        for p in ([item] if isinstance(item, nn.Parameter) else list(item.parameters())):
            p.data = p.data.to(dtype)
