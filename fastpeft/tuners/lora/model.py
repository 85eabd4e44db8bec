"""``LoraModel``: the LoRA tuner (HF PEFT's), which swaps the targeted modules for LoRA layers: ``Linear``
(nn.Linear / Conv1D), ``Embedding``, ``Conv1d`` / ``Conv2d`` / ``Conv3d`` and the bitsandbytes quantized-base
layers; with
``trainable_token_indices`` it also adds trainable-token layers, and with ``target_parameters`` it wraps the named
parameters (``ParamWrapper``: mixture-of-experts weights).
"""

from __future__ import annotations

from typing import Optional

import torch.nn as nn

from ...config import PeftType
from ...utils.other import ModulesToSaveWrapper, get_submodules, pattern_key, strip_base_layer
from ..trainable_tokens import inject_trainable_tokens
from ..tuners_utils import BaseTuner, BaseTunerLayer, register_tuner
from .bnb import make_lora_layer
from .conv import CONV_TYPES, check_conv_target
from .embedding import (Embedding, adapter_key_map, apply_optional_keys, mark_token_deltas_trainable,
                        with_optional_keys, without_optional_keys)
from .init import check_init_for_target
from .layer import Linear, LoraLayer
from .param import ParamWrapper, param_target_problem
from .weighted import add_weighted_adapter

__all__ = ["LoraModel", "LORA_TARGET_MODULE_DEFAULTS"]

# model_type -> default target_modules (HF PEFT's table, peft/utils/constants.py)
LORA_TARGET_MODULE_DEFAULTS = {
    "llama": ["q_proj", "v_proj"], "mistral": ["q_proj", "v_proj"], "mixtral": ["q_proj", "v_proj"],
    "qwen2": ["q_proj", "v_proj"], "qwen3": ["q_proj", "v_proj"], "gemma": ["q_proj", "v_proj"],
    "gemma2": ["q_proj", "v_proj"], "opt": ["q_proj", "v_proj"], "phi": ["q_proj", "v_proj", "fc1", "fc2"],
    "gpt2": ["c_attn"], "bert": ["query", "value"], "roberta": ["query", "value"], "t5": ["q", "v"],
    "gpt_neox": ["query_key_value"], "falcon": ["query_key_value"], "bloom": ["query_key_value"], "mt5": ["q", "v"],
    "bart": ["q_proj", "v_proj"], "blip-2": ["q", "v", "q_proj", "v_proj"], "gptj": ["q_proj", "v_proj"],
    "gpt_neo": ["q_proj", "v_proj"], "xlm-roberta": ["query", "value"], "electra": ["query", "value"],
    "deberta-v2": ["query_proj", "value_proj"], "deberta": ["in_proj"], "layoutlm": ["query", "value"],
    "llama4": ["q_proj", "v_proj"], "chatglm": ["query_key_value"], "gpt_bigcode": ["c_attn"], "mpt": ["Wqkv"],
    "RefinedWebModel": ["query_key_value"], "RefinedWeb": ["query_key_value"], "btlm": ["c_proj", "c_attn"],
    "codegen": ["qkv_proj"], "stablelm": ["q_proj", "v_proj"], "gemma3_text": ["q_proj", "v_proj"],
    "gemma4": ".*language_model\\..*\\.(q_proj|v_proj)", "nemotron_h": ["q_proj", "k_proj", "v_proj", "o_proj"],
    "rwkv": ["key", "value", "receptance", "output"],
    "rwkv7": ["r_proj", "k_proj", "v_proj", "o_proj", "key", "value"],
}


def _rank_alpha(config, key: str) -> tuple[int, float]:
    """(r, lora_alpha) for module or parameter `key`: its rank_pattern / alpha_pattern entry, else the config's."""
    rk = pattern_key((config.rank_pattern or {}).keys(), key)
    ak = pattern_key((config.alpha_pattern or {}).keys(), key)
    return (config.rank_pattern[rk] if rk is not None else config.r,
            config.alpha_pattern[ak] if ak is not None else config.lora_alpha)


@register_tuner(PeftType.LORA)
class LoraModel(BaseTuner):
    """LoRA tuner (HF PEFT's ``LoraModel``).  Usually built through ``fastpeft.get_peft_model``."""

    prefix = "lora_"
    layer_cls = LoraLayer
    target_module_defaults = LORA_TARGET_MODULE_DEFAULTS
    supports_mixed_batch = True

    def _finish_injection(self, adapter_name: str) -> None:
        inject_trainable_tokens(self, adapter_name, self.peft_config[adapter_name])

    def add_weighted_adapter(self, adapters: list[str], weights: list[float], adapter_name: str,
                             combination_type: str = "svd", svd_rank: Optional[int] = None,
                             svd_clamp: Optional[float] = None, svd_full_matrices: bool = True,
                             svd_driver: Optional[str] = None, density: Optional[float] = None,
                             majority_sign_method: str = "total") -> None:
        """Add adapter ``adapter_name`` combining ``adapters`` with ``weights`` (HF PEFT's method; not activated:
        ``set_adapter(adapter_name)`` to use it).

        Args:
            adapters: names of existing LoRA adapters.  weights: one number per adapter (negative subtracts).
            combination_type: ``"svd"`` (default), ``"cat"`` (exact, rank Σ r), ``"linear"``, ``"ties"``,
                ``"dare_linear"``, ``"dare_ties"``, ``"magnitude_prune"`` (the factors combined: same rank needed),
                or ``"ties_svd"`` / ``"dare_linear_svd"`` / ``"dare_ties_svd"`` / ``"magnitude_prune_svd"`` (the ΔW's
                combined by that rule, then SVD).  ``fastpeft/tuners/lora/weighted.py`` gives the math.
            svd_rank: the SVD rules' rank (default: the largest of the adapters').  svd_clamp: quantile to clamp the
                SVD factors to.  svd_full_matrices, svd_driver: passed to ``torch.linalg.svd``.
            density: fraction of values kept by the ties / dare / magnitude_prune rules (required there).
            majority_sign_method: ``"total"`` or ``"frequency"`` (ties rules).
        Raises ValueError naming the argument; the model is then unchanged.  An existing ``adapter_name`` is left
        as it is (a warning says so).
        """
        add_weighted_adapter(self, adapters, weights, adapter_name, combination_type, svd_rank, svd_clamp,
                             svd_full_matrices, svd_driver, density, majority_sign_method)

    def _check_new_adapter_config(self, config) -> None:
        super()._check_new_adapter_config(config)
        tp = set(getattr(config, "target_parameters", None) or [])
        if not tp:
            return
        # the nesting of parameter wrappers (and so the saved keys) is per parameter set: one set for every adapter
        for name, other in self.peft_config.items():
            otp = set(getattr(other, "target_parameters", None) or [])
            if otp and otp != tp:
                raise ValueError(f"all adapters that use target_parameters must target the same parameters: the new "
                                 f"adapter has {sorted(tp)}, adapter {name!r} has {sorted(otp)}")
        problem = param_target_problem(config)
        if problem is not None:
            raise ValueError(f"target_parameters cannot be combined with {problem}")

    def _find_param_targets(self, config) -> list[tuple[str, str, str]]:
        """[(path of the module holding it, its key, parameter name)] for every parameter ``target_parameters`` names
        (PEFT's rule: the key - module path without ``.base_layer`` segments, then the name - equals an entry or
        ends with ``"." + entry``), in module order and, within a module, in its registration order (the nesting
        order of the wrappers, as PEFT's).  Raises ValueError for a parameter of the top-level module or of a module
        that a LoRA layer of another kind wraps (targeted by target_modules too)."""
        names = sorted(set(getattr(config, "target_parameters", None) or []))
        if not names:
            return []
        module_targets = set(self._find_targets(config))
        found = []

        def matches(key: str) -> bool:
            return key in names or any(key.endswith(f".{t}") for t in names)

        def walk(module: nn.Module, path: str) -> None:
            if isinstance(module, ParamWrapper):
                walk(module.base_layer, f"{path}.base_layer")
                return
            if isinstance(module, ModulesToSaveWrapper):
                return  # modules_to_save copies are never adapted (PEFT's rule)
            key_path = strip_base_layer(path)
            if isinstance(module, BaseTunerLayer):  # a LoRA layer of another kind (target_modules)
                for pn, _ in module.base_layer.named_parameters(recurse=False):
                    if matches(f"{key_path}.{pn}"):
                        raise ValueError(f"target_parameters: parameter {key_path}.{pn!s} belongs to a module that a "
                                         f"{type(module).__name__} LoRA layer already wraps (target_modules); a "
                                         "module is adapted either as a layer or by its parameters")
                return
            for pn, _ in module.named_parameters(recurse=False):
                key = f"{key_path}.{pn}" if key_path else pn
                if not matches(key):
                    continue
                if not path:
                    raise ValueError(f"target_parameters: parameter {pn!r} belongs to the top-level module, which "
                                     "cannot be wrapped; target a submodule's parameter")
                if key_path in module_targets:
                    raise ValueError(f"target_parameters: parameter {key!r} belongs to {key_path!r}, which "
                                     "target_modules also targets; a module is adapted either as a layer or by its "
                                     "parameters - drop it from one of them")
                found.append((path, key, pn))
            for child_name, child in module.named_children():
                walk(child, f"{path}.{child_name}" if path else child_name)

        walk(self.model, "")
        return found

    def _inject_param_targets(self, config, adapter_name: str, found: list) -> None:
        for path, key, pn in found:
            r, alpha = _rank_alpha(config, key)
            # a wrapper of this parameter from an earlier adapter gets the new adapter; else a new (outermost) one
            holder = self.model.get_submodule(strip_base_layer(path))
            existing = holder
            while isinstance(existing, ParamWrapper) and existing.parameter_name != pn:
                existing = existing.base_layer
            if isinstance(existing, ParamWrapper):
                existing.update_layer(adapter_name, r, alpha, config)
                if adapter_name not in self.active_adapters:
                    existing.lora_A[adapter_name].requires_grad_(False)
                    existing.lora_B[adapter_name].requires_grad_(False)
            else:
                parent, target, target_name = get_submodules(self.model, path)
                new = ParamWrapper(target, adapter_name, pn, r, alpha, config)
                if adapter_name not in self.active_adapters:
                    new.requires_grad_(False)
                setattr(parent, target_name, new)
            if key not in self.targeted_parameter_names:
                self.targeted_parameter_names.append(key)

    def _mark_only_adapters_as_trainable(self) -> None:
        super()._mark_only_adapters_as_trainable()
        mark_token_deltas_trainable(self)

    def get_adapter_state_dict(self, adapter_name: str = "default") -> dict:
        return with_optional_keys(self, adapter_name, super().get_adapter_state_dict(adapter_name))

    def check_adapter_state_dict(self, adapter_name: str, state_dict: dict) -> None:
        super().check_adapter_state_dict(adapter_name, without_optional_keys(self, adapter_name, state_dict))

    def _apply_adapter_state_dict(self, adapter_name: str, state_dict: dict) -> None:
        super()._apply_adapter_state_dict(adapter_name, without_optional_keys(self, adapter_name, state_dict))
        apply_optional_keys(self, adapter_name, state_dict)

    def _create_and_replace(self, config, adapter_name, target, target_name, parent, current_key) -> None:
        r, alpha = _rank_alpha(config, current_key)
        if isinstance(target, LoraLayer):
            target.update_layer(adapter_name, r, alpha, config)
            return
        new = make_lora_layer(target, adapter_name, r, alpha, config)
        if new is None and isinstance(target, nn.Embedding):
            new = Embedding(target, adapter_name, r, alpha, config)
        if new is None and type(target) in CONV_TYPES:
            new = CONV_TYPES[type(target)](target, adapter_name, r, alpha, config)
        if new is None:
            self.conv1d_fan_in_fan_out_warning(target, config)
            new = Linear(target, adapter_name, r, alpha, config)
        if adapter_name not in self.active_adapters:
            new.requires_grad_(False)
        setattr(parent, target_name, new)

    def _validate_targets(self, config, adapter_name, targets) -> None:
        for key in targets:
            module = self.model.get_submodule(key)
            if isinstance(module, LoraLayer):
                module = module.base_layer
            r, _ = _rank_alpha(config, key)
            check_init_for_target(module, r, config.init_lora_weights, key)
            if type(module) in CONV_TYPES:
                check_conv_target(module, r, bool(config.use_dora), key)

    def _is_supported_target(self, module: nn.Module) -> bool:
        return (super()._is_supported_target(module) or isinstance(module, nn.Embedding)
                or type(module) in CONV_TYPES)

    def _adapter_key_map(self, adapter_name: str) -> dict[str, str]:
        # PEFT saves the DoRA magnitude as "...lora_magnitude_vector" (no ".weight", its pre-ModuleDict layout)
        suffix = ".lora_magnitude_vector.weight"

        keys = {(k[:-len(".weight")] if k.endswith(suffix) else k): v
                for k, v in super()._adapter_key_map(adapter_name).items()}
        return adapter_key_map(self, adapter_name, keys)
