"""``get_peft_model`` and the state-dict helpers, with HF PEFT's signatures."""

from __future__ import annotations

from typing import Optional

import torch.nn as nn

from .config import CONFIG_CLASSES, PeftConfig
from .peft_model import MODEL_TYPE_TO_PEFT_MODEL_MAPPING, PeftModel
from .save_load import get_peft_model_state_dict, load_peft_weights, set_peft_model_state_dict
from .tuners import TUNER_CLASSES, get_tuner_class

__all__ = ["get_peft_model", "inject_adapter_in_model", "get_peft_config", "get_peft_model_state_dict",
           "set_peft_model_state_dict", "load_peft_weights", "PEFT_TYPE_TO_CONFIG_MAPPING",
           "PEFT_TYPE_TO_TUNER_MAPPING", "MODEL_TYPE_TO_PEFT_MODEL_MAPPING"]

# HF PEFT's registries under its names: peft_type -> config class / tuner class (filled as the method packages
# register themselves; the same dicts, so they always agree with what fastpeft loads)
PEFT_TYPE_TO_CONFIG_MAPPING = CONFIG_CLASSES
PEFT_TYPE_TO_TUNER_MAPPING = TUNER_CLASSES


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


def get_peft_config(config_dict: dict) -> PeftConfig:
    """The config a dict describes (``config_dict["peft_type"]`` picks the class), as HF PEFT's ``get_peft_config``;
    keys the class does not know are dropped with a warning (``PeftConfig.from_dict``)."""
    if not isinstance(config_dict, dict):
        raise TypeError(f"config_dict must be a dict, got {type(config_dict).__name__}")
    if "peft_type" not in config_dict:
        raise ValueError("config_dict has no 'peft_type' key; cannot tell which method it describes")
    return PeftConfig.from_dict(config_dict)


def inject_adapter_in_model(peft_config: PeftConfig, model: nn.Module, adapter_name: str = "default",
                            low_cpu_mem_usage: bool = False, state_dict: Optional[dict] = None) -> nn.Module:
    """Put adapter layers into ``model`` in place and return ``model`` itself (no ``PeftModel`` around it), as HF
    PEFT's ``inject_adapter_in_model``: the layers are fastpeft's, so the model's forward runs fastpeft's ops.

    For the weight-side methods (LoRA, AdaLoRA, IA3, bottleneck adapters); prompt learning and adaption prompt need
    the ``PeftModel`` wrapper (``get_peft_model``), as in PEFT.  The adapter's weights are initialised as in
    ``get_peft_model`` (fp32 adapters on a 16-bit base); load trained values with ``set_peft_model_state_dict``.

    Raises:
        TypeError / ValueError naming the argument (a config of another method, ``low_cpu_mem_usage``, a
        ``state_dict`` to take the targets from - use ``target_modules``) or a model that already carries adapter
        layers (add more through a ``PeftModel``); the model is then unchanged.
    """
    if not isinstance(peft_config, PeftConfig):
        raise TypeError(f"peft_config must be a fastpeft PeftConfig, got {type(peft_config).__name__}")
    if peft_config.is_prompt_learning or peft_config.is_adaption_prompt:
        raise ValueError(f"inject_adapter_in_model does not support {str(peft_config.peft_type)} (prompt learning and "
                         "adaption prompt live in the PeftModel wrapper): use get_peft_model")
    if low_cpu_mem_usage:
        raise ValueError("low_cpu_mem_usage=True is not supported by fastpeft")
    if state_dict is not None:
        raise ValueError("inject_adapter_in_model: targeting the layers a state_dict's keys name is not supported by "
                         "fastpeft; set the config's target_modules instead")
    return get_tuner_class(peft_config.peft_type)(model, peft_config, adapter_name).model
