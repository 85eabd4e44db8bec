"""The (IA)³ tuner (HF PEFT's ``IA3Model``): swaps the targeted modules for ``ia3.Linear`` (or its quantized-base
variant) and ``ia3.Conv2d`` / ``Conv3d``, feed-forward modules scaling their input and the others their output."""

from __future__ import annotations

import dataclasses
import re

import torch.nn as nn

from ...config import PeftType
from ..tuners_utils import BaseTuner, register_tuner, union_module_specs
from .bnb import make_ia3_layer
from .config import IA3Config
from .layer import CONV_TYPES, IA3Layer, Linear

__all__ = ["IA3Model", "IA3_TARGET_MODULE_DEFAULTS", "IA3_FEEDFORWARD_MODULE_DEFAULTS"]

IA3_TARGET_MODULE_DEFAULTS = {
    "llama": ["k_proj", "v_proj", "down_proj"], "mistral": ["k_proj", "v_proj", "down_proj"],
    "mixtral": ["k_proj", "v_proj", "w2"], "qwen2": ["q_proj", "v_proj", "down_proj"],
    "qwen3": ["q_proj", "v_proj", "down_proj"], "gemma": ["q_proj", "v_proj", "down_proj"],
    "gemma2": ["q_proj", "v_proj", "down_proj"], "gpt2": ["c_attn", "mlp.c_proj"],
    "bert": ["key", "value", "output.dense"], "roberta": ["key", "value", "output.dense"],
    "opt": ["q_proj", "k_proj", "fc2"], "t5": ["k", "v", "wo"], "phi": ["q_proj", "v_proj", "fc2"],
    "gpt_neox": ["query_key_value", "dense_4h_to_h"], "falcon": ["query_key_value", "dense_4h_to_h"],
    "bloom": ["query_key_value", "mlp.dense_4h_to_h"], "mt5": ["k", "v", "wi_1"],
    "gptj": ["q_proj", "v_proj", "fc_out"], "gpt_neo": ["q_proj", "v_proj", "c_proj"],
    "bart": ["q_proj", "v_proj", "fc2"], "gpt_bigcode": ["c_attn", "mlp.c_proj"],
    "llama4": ["q_proj", "v_proj", "down_proj"], "deberta-v2": ["key_proj", "value_proj", "output.dense"],
    "deberta": ["in_proj", "output.dense"], "RefinedWebModel": ["query_key_value", "dense_4h_to_h"],
    "RefinedWeb": ["query_key_value", "dense_4h_to_h"], "gemma3_text": ["q_proj", "v_proj", "down_proj"],
}
IA3_FEEDFORWARD_MODULE_DEFAULTS = {
    "llama": ["down_proj"], "mistral": ["down_proj"], "mixtral": ["w2"], "qwen2": ["down_proj"],
    "qwen3": ["down_proj"], "gemma": ["down_proj"], "gemma2": ["down_proj"], "gpt2": ["mlp.c_proj"],
    "bert": ["output.dense"], "roberta": ["output.dense"], "opt": ["fc2"], "t5": ["wo"], "phi": ["fc2"],
    "gpt_neox": ["dense_4h_to_h"], "falcon": ["dense_4h_to_h"], "bloom": ["mlp.dense_4h_to_h"], "mt5": [],
    "gptj": ["fc_out"], "gpt_neo": ["c_proj"], "bart": ["fc2"], "gpt_bigcode": ["mlp.c_proj"],
    "llama4": ["down_proj"], "deberta-v2": ["output.dense"], "deberta": ["output.dense"],
    "RefinedWeb": ["dense_4h_to_h"], "RefinedWebModel": ["dense_4h_to_h"], "gemma3_text": ["down_proj"],
}


@register_tuner(PeftType.IA3)
class IA3Model(BaseTuner):
    """(IA)³ tuner (HF PEFT's ``IA3Model``)."""

    prefix = "ia3_"
    layer_cls = IA3Layer
    target_module_defaults = IA3_TARGET_MODULE_DEFAULTS

    def add_weighted_adapter(self, adapters: list[str], weights: list[float], adapter_name: str) -> None:
        """Add adapter ``adapter_name`` with l = Σ_i w_i l_i in every layer (the layers' adapters among ``adapters``;
        HF PEFT's method): the first adapter's config with the union of the adapters' target and feed-forward
        modules; not activated, frozen.  ValueError naming the argument for unknown adapters, a ``weights`` list of
        another length, mixed module-spec types or adapters sharing a modules_to_save module; the model is then
        unchanged.  An existing ``adapter_name`` is left as it is (a warning says so; PEFT returns silently)."""
        if not self._weighted_adapter_args(adapters, weights, adapter_name):
            return
        configs = [self.peft_config[a] for a in adapters]
        spec = {f: union_module_specs([getattr(c, f) for c in configs], f)
                for f in ("target_modules", "feedforward_modules")}
        self.inject_adapter(adapter_name, dataclasses.replace(configs[0], **spec))
        self._freeze_adapter(adapter_name)
        for _, layer in self.tuner_layers():
            if adapter_name not in layer.ia3_l:
                continue
            target = layer.ia3_l[adapter_name]
            target.data = target.data.zero_()
            for a, w in zip(adapters, weights):
                if a in layer.ia3_l:
                    target.data += layer.ia3_l[a].data * w

    def _prepare_adapter_config(self, config: IA3Config) -> IA3Config:
        model_type = getattr(getattr(self.model, "config", None), "model_type", None)
        config = super()._prepare_adapter_config(config)
        if config.feedforward_modules is None:
            ff = IA3_FEEDFORWARD_MODULE_DEFAULTS.get(model_type)
            if ff is None:
                raise ValueError(f"feedforward_modules is None and fastpeft has no default for "
                                 f"model_type={model_type!r}; please specify feedforward_modules (may be [])")
            config.feedforward_modules = set(ff)
        return config

    @staticmethod
    def _is_feedforward(config: IA3Config, key: str) -> bool:
        ff = config.feedforward_modules
        if isinstance(ff, str):
            return bool(re.fullmatch(ff, key))
        return any(key.endswith(t) for t in ff)  # PEFT's rule: plain suffix, no "."

    def _is_supported_target(self, module: nn.Module) -> bool:
        return super()._is_supported_target(module) or type(module) in CONV_TYPES

    def _create_and_replace(self, config, adapter_name, target, target_name, parent, current_key) -> None:
        ff = self._is_feedforward(config, current_key)
        if isinstance(target, IA3Layer):
            if target.is_feedforward != ff:
                raise ValueError(f"module {current_key!r} is feed-forward for one IA3 adapter and not for another")
            target.update_layer(adapter_name, config)
            return
        new = make_ia3_layer(target, adapter_name, config, ff)
        if new is None and type(target) in CONV_TYPES:
            new = CONV_TYPES[type(target)](target, adapter_name, config, ff)
        if new is None:
            self.conv1d_fan_in_fan_out_warning(target, config)
            new = Linear(target, adapter_name, config, ff)
        if adapter_name not in self.active_adapters:
            new.requires_grad_(False)
        setattr(parent, target_name, new)
