"""The state-dict contract of a tuner (used by ``fastpeft.save_load`` and ``PeftModel``).

``get_adapter_state_dict(adapter_name) -> {saved_key: tensor}`` with keys exactly as in PEFT's
``adapter_model.safetensors`` (adapter name stripped, ``base_model.model.`` prefix for injected tuners, bare
``"prompt_embeddings"`` for prompt learning), and ``set_adapter_state_dict(adapter_name, sd)``, which checks every
key and shape (``check_adapter_state_dict``) before changing anything and raises ``ValueError`` listing the
problems.  The default implementations enumerate ``BaseTunerLayer.adapter_layer_names`` of every tuner layer, the
``ModulesToSaveWrapper`` copies and the trainable biases (``bias="all"/"lora_only"``).
"""

from __future__ import annotations

import torch
import torch.nn as nn

__all__ = ["AdapterStateDictMixin"]


class AdapterStateDictMixin:
    """State-dict methods of ``BaseTuner`` (they use its ``tuner_layers()``, ``_wrappers()``, ``peft_config``,
    ``prefix`` and ``model``)."""

    def _adapter_key_map(self, adapter_name: str) -> dict[str, str]:
        """{saved key (PEFT's file key): attribute path relative to this tuner} for one adapter."""
        out: dict[str, str] = {}
        for key, layer in self.tuner_layers():
            for attr in layer.adapter_layer_names:
                container = getattr(layer, attr)
                if adapter_name not in container:
                    continue
                item = container[adapter_name]
                if isinstance(item, nn.Parameter):
                    out[f"base_model.model.{key}.{attr}"] = f"model.{key}.{attr}.{adapter_name}"
                else:
                    for pn, _ in item.named_parameters():
                        out[f"base_model.model.{key}.{attr}.{pn}"] = f"model.{key}.{attr}.{adapter_name}.{pn}"
        for key, w in self._wrappers():
            if adapter_name in w.modules_to_save:
                for pn, _ in w.modules_to_save[adapter_name].named_parameters():
                    out[f"base_model.model.{key}.{pn}"] = f"model.{key}.modules_to_save.{adapter_name}.{pn}"
        bias = getattr(self.peft_config.get(adapter_name), "bias", "none")
        if bias == "all":
            for n, _ in self.model.named_parameters():
                if (n == "bias" or n.endswith(".bias")) and ".modules_to_save." not in n \
                        and ".original_module." not in n and not (self.prefix and self.prefix in n):
                    out[f"base_model.model.{n}"] = f"model.{n}"
        elif bias.endswith("_only"):
            for key, layer in self.tuner_layers():
                if getattr(layer.base_layer, "bias", None) is not None:
                    out[f"base_model.model.{key}.base_layer.bias"] = f"model.{key}.base_layer.bias"
        return out

    def _expected_adapter_shapes(self, adapter_name: str) -> dict[str, tuple[int, ...]]:
        """{saved key: shape} that ``set_adapter_state_dict`` accepts (AdaLoRA overrides: sliced ranks)."""
        return {k: tuple(self.get_parameter(p).shape) for k, p in self._adapter_key_map(adapter_name).items()}

    def get_adapter_state_dict(self, adapter_name: str = "default") -> dict[str, torch.Tensor]:
        """The adapter's tensors keyed exactly as in PEFT's adapter_model.safetensors (live tensors, not copies)."""
        if adapter_name not in self.peft_config:
            raise ValueError(f"adapter {adapter_name!r} does not exist; available: {sorted(self.peft_config)}")
        return {k: self.get_parameter(p) for k, p in self._adapter_key_map(adapter_name).items()}

    def check_adapter_state_dict(self, adapter_name: str, state_dict: dict[str, torch.Tensor]) -> None:
        """Raise ValueError listing every missing/unexpected key and shape mismatch; changes nothing."""
        expected = self._expected_adapter_shapes(adapter_name)
        problems = []
        missing = sorted(set(expected) - set(state_dict))
        unexpected = sorted(set(state_dict) - set(expected))
        if missing:
            problems.append(f"missing keys {missing[:8]}{' ...' if len(missing) > 8 else ''} ({len(missing)})")
        if unexpected:
            problems.append(f"unexpected keys {unexpected[:8]}{' ...' if len(unexpected) > 8 else ''} "
                            f"({len(unexpected)})")
        for k in sorted(set(expected) & set(state_dict)):
            v = state_dict[k]
            if not isinstance(v, torch.Tensor):
                problems.append(f"{k}: not a tensor ({type(v).__name__})")
            elif tuple(v.shape) != tuple(expected[k]):
                problems.append(f"{k}: shape {tuple(v.shape)} in the checkpoint, {tuple(expected[k])} in the model")
            elif not v.is_floating_point():
                problems.append(f"{k}: dtype {v.dtype} is not floating point")
        if problems:
            raise ValueError(f"the state dict does not fit adapter {adapter_name!r} of this model: "
                             + "; ".join(problems))

    def set_adapter_state_dict(self, adapter_name: str, state_dict: dict[str, torch.Tensor]) -> None:
        """Load ``state_dict`` (PEFT file keys) into the adapter; validates everything first (ValueError)."""
        if adapter_name not in self.peft_config:
            raise ValueError(f"adapter {adapter_name!r} does not exist; available: {sorted(self.peft_config)}")
        self.check_adapter_state_dict(adapter_name, state_dict)
        self._apply_adapter_state_dict(adapter_name, state_dict)

    def _apply_adapter_state_dict(self, adapter_name: str, state_dict: dict[str, torch.Tensor]) -> None:
        keymap = self._adapter_key_map(adapter_name)
        with torch.no_grad():
            for k, path in keymap.items():
                p = self.get_parameter(path)
                p.copy_(state_dict[k].to(device=p.device, dtype=p.dtype))
