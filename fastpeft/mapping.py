"""``get_peft_model`` and the state-dict helpers, with HF PEFT's signatures."""

from __future__ import annotations

from typing import Optional

import torch.nn as nn

from .config import PeftConfig
from .peft_model import MODEL_TYPE_TO_PEFT_MODEL_MAPPING, PeftModel
from .save_load import get_peft_model_state_dict, set_peft_model_state_dict

__all__ = ["get_peft_model", "get_peft_model_state_dict", "set_peft_model_state_dict"]


def get_peft_model(model: nn.Module, peft_config: PeftConfig, adapter_name: str = "default", mixed: bool = False,
                   autocast_adapter_dtype: bool = True, revision: Optional[str] = None,
                   low_cpu_mem_usage: bool = False) -> PeftModel:
    """Wrap ``model`` (modified in place) with a new adapter described by ``peft_config``.

    Args:
        model: any nn.Module (HF transformers models get per-architecture default ``target_modules``).
        peft_config: ``LoraConfig``, ``AdaLoraConfig``, ``IA3Config`` or a config registered by another method.
        adapter_name: name of the adapter ("default").
        autocast_adapter_dtype: upcast fp16/bf16 adapter weights to fp32 (HF PEFT's default, True).
        mixed: mixing adapter types is not supported (must be False).
    Returns:
        ``PeftModelForCausalLM`` etc. by ``peft_config.task_type``, or a plain ``PeftModel`` when task_type is None.
    Raises:
        ValueError / TypeError (naming the argument) for configs that do not fit the model; the model is then
        unchanged.
    """
    if not isinstance(peft_config, PeftConfig):
        raise TypeError(f"peft_config must be a fastpeft PeftConfig, got {type(peft_config).__name__}")
    if mixed:
        raise ValueError("mixed=True (PeftMixedModel) is not supported by fastpeft")
    if low_cpu_mem_usage:
        raise ValueError("low_cpu_mem_usage=True is not supported by fastpeft")
    name = model.__dict__.get("name_or_path", None)
    peft_config.base_model_name_or_path = name or None
    if revision is not None:
        peft_config.revision = revision
    klass = MODEL_TYPE_TO_PEFT_MODEL_MAPPING.get(peft_config.task_type, PeftModel)
    return klass(model, peft_config, adapter_name=adapter_name, autocast_adapter_dtype=autocast_adapter_dtype)
