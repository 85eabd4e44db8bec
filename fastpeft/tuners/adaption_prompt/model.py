"""The adaption-prompt tuner (LLaMA-Adapter): injects ``AdaptedAttention`` layers; generic ``BaseTuner`` state dict
keys ``base_model.model.<path>.<param>``."""

from __future__ import annotations

from torch import nn

from ...config import PeftType
from ..tuners_utils import BaseTuner, register_tuner
from .config import AdaptionPromptConfig
from .layer import SUPPORTED_MODEL_TYPES, AdaptedAttention

__all__ = ["AdaptionPromptTuner"]


@register_tuner(PeftType.ADAPTION_PROMPT)
class AdaptionPromptTuner(BaseTuner):
    """LLaMA-Adapter: the top ``adapter_layers`` attention modules named ``target_modules`` become
    :class:`AdaptedAttention` wrappers.  Supported model types: llama, mistral, qwen2, gpt2.

    One adapter is active at a time; adapters are added inactive (``set_adapter`` switches).
    """

    prefix = "adaption_"
    layer_cls = AdaptedAttention

    def _model_kind(self) -> tuple[str, str]:
        mt = getattr(getattr(self.model, "config", None), "model_type", None)
        if mt not in SUPPORTED_MODEL_TYPES:
            raise ValueError(f"Unsupported model type for adaption prompt: {mt!r}. Supported model types: "
                             f"{sorted(SUPPORTED_MODEL_TYPES)}")
        return mt, SUPPORTED_MODEL_TYPES[mt][1]

    def _prepare_adapter_config(self, config):
        mt, _ = self._model_kind()
        if config.target_modules is None:
            config.target_modules = SUPPORTED_MODEL_TYPES[mt][0]
        return config

    def _find_targets(self, config) -> list[str]:
        suffix = "." + config.target_modules
        keys = []
        for key, module in self.model.named_modules():
            if key.endswith(suffix) and not any(key.startswith(k + ".") for k in keys):
                keys.append(key)
        if len(keys) < config.adapter_layers:
            raise ValueError(f"adapter_layers={config.adapter_layers} but the model has only {len(keys)} modules "
                             f"named '*.{config.target_modules}'")
        return keys[-config.adapter_layers:]

    def _is_supported_target(self, module: nn.Module) -> bool:
        return True  # checked precisely in _validate_targets

    def _validate_targets(self, config, adapter_name, targets) -> None:
        if not isinstance(config, AdaptionPromptConfig):
            raise TypeError(f"AdaptionPromptTuner takes an AdaptionPromptConfig, got {type(config).__name__}")
        _, kind = self._model_kind()
        for key in targets:
            m = self.model.get_submodule(key)
            if not isinstance(m, AdaptedAttention):
                AdaptedAttention(m, kind)  # raises TypeError for an unsuitable module, before anything changes

    def _create_and_replace(self, config, adapter_name, target, target_name, parent, current_key) -> None:
        _, kind = self._model_kind()
        if not isinstance(target, AdaptedAttention):
            new = AdaptedAttention(target, kind)
            new._active_adapter = list(self.active_adapters)
            setattr(parent, target_name, new)
            target = new
        target.add_adapter(adapter_name, config.adapter_len)

    def _cast_adapter_dtype(self, adapter_name: str) -> None:
        """Kept in the attention weights' dtype (PEFT's choice; the prompt goes through k_proj/v_proj)."""

    def set_adapter(self, adapter_name, inference_mode: bool = False) -> None:
        names = [adapter_name] if isinstance(adapter_name, str) else list(adapter_name)
        if len(names) != 1:
            raise ValueError(f"adaption prompt can only have one active adapter, got {names}")
        super().set_adapter(names, inference_mode=inference_mode)
