"""LoRA on ``nn.Embedding`` with HF PEFT's layout (``lora_embedding_A`` / ``lora_embedding_B`` ParameterDicts) and math.

``y = E[x] + scaling · A[:, x]ᵀ Bᵀ`` (times the base layer's ``embed_scale`` when it has one, e.g. Gemma's scaled
embedding): A is (r, num_embeddings), B is (embedding_dim, r).  The A term is a row lookup
(``F.embedding(x, Aᵀ)``, the base layer's padding_idx / max_norm options included), never a one-hot matmul.
PEFT's init: A zeros, B normal (any ``init_lora_weights`` but False); ``lora_dropout`` is not applied to token ids.
Merge adds ``(B A)ᵀ · scaling`` (num_embeddings, embedding_dim) to the embedding matrix.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..trainable_tokens.layer import TrainableTokensLayer, saved_key
from ..tuners_utils import BaseTunerLayer
from .config import LoraConfig
from .layer import LoraLayer

__all__ = ["Embedding"]


class Embedding(LoraLayer):
    """LoRA around an ``nn.Embedding`` (HF PEFT's ``lora.Embedding``).

    Input x: integer ids (...); output (..., embedding_dim) in the base output's dtype.
    """

    _fused_capable = False

    adapter_layer_names = ("lora_embedding_A", "lora_embedding_B")

    def __init__(self, base_layer: nn.Embedding, adapter_name: str, r: int, lora_alpha: float,
                 config: LoraConfig) -> None:
        BaseTunerLayer.__init__(self, base_layer)
        # lora_A/lora_B/lora_magnitude_vector stay empty (PEFT's LoraLayer has them on every layer; DoRA is refused)
        self._init_lora_state()
        self.lora_embedding_A = nn.ParameterDict({})
        self.lora_embedding_B = nn.ParameterDict({})
        self.in_features, self.out_features = base_layer.num_embeddings, base_layer.embedding_dim
        self.fan_in_fan_out = False
        self._active_adapter = [adapter_name]
        self.update_layer(adapter_name, r, lora_alpha, config)

    def update_layer(self, adapter_name: str, r: int, lora_alpha: float, config: LoraConfig) -> None:
        """Create adapter ``adapter_name``: A (r, num_embeddings), B (embedding_dim, r); PEFT's draws and init."""
        if config.lora_bias:
            raise ValueError("lora_bias=True is not supported for Embedding layers")
        if getattr(config, "use_dora", False):
            raise ValueError("use_dora=True on an nn.Embedding is not supported by fastpeft yet")
        self._set_adapter_hparams(adapter_name, r, lora_alpha, config)
        # drawn like PEFT (randn A, then randn B) so a model built under the same seed gets the same weights
        self.lora_embedding_A[adapter_name] = nn.Parameter(torch.randn(r, self.in_features))
        self.lora_embedding_B[adapter_name] = nn.Parameter(torch.randn(self.out_features, r))
        self.lora_bias[adapter_name] = False
        if config.init_lora_weights is not False:
            with torch.no_grad():
                nn.init.zeros_(self.lora_embedding_A[adapter_name])
                nn.init.normal_(self.lora_embedding_B[adapter_name])
        w = self.base_layer.weight
        dtype = w.dtype if w.is_floating_point() else None
        for container in (self.lora_embedding_A, self.lora_embedding_B):
            par = container[adapter_name]
            par.data = par.data.to(device=w.device, dtype=dtype)

    def get_delta_weight(self, adapter_name: str) -> torch.Tensor:
        """``(B @ A)ᵀ * scaling`` (num_embeddings, embedding_dim); fp32 math for half on CPU, as PEFT does."""
        A = self.lora_embedding_A[adapter_name]
        B = self.lora_embedding_B[adapter_name]
        dtype = A.dtype
        cast = B.device.type == "cpu" and dtype in (torch.float16, torch.bfloat16)
        if cast:
            A, B = A.float(), B.float()
        delta = (B @ A).T * self.scaling[adapter_name]
        return delta.to(dtype) if cast else delta

    def _embed_scale(self) -> Optional[torch.Tensor]:
        base = self.base_layer
        s = getattr(base, "embed_scale", None)
        if s is None:
            return None
        if isinstance(s, (int, float)):
            return torch.tensor(s, device=base.weight.device, dtype=base.weight.dtype)
        if isinstance(s, torch.Tensor) and s.numel() == 1:
            return s
        raise ValueError(f"embed_scale of the base embedding must be a scalar, got shape {tuple(s.shape)}")

    def _lookup(self, x: torch.Tensor, a: str) -> torch.Tensor:
        """``scaling · A[:, x]ᵀ Bᵀ`` (× embed_scale): the rows of Aᵀ picked by the ids, then B."""
        base = self.base_layer
        rows = F.embedding(x, self.lora_embedding_A[a].T, padding_idx=base.padding_idx, max_norm=base.max_norm,
                           norm_type=base.norm_type, scale_grad_by_freq=base.scale_grad_by_freq, sparse=base.sparse)
        out = (rows @ self.lora_embedding_B[a].T) * self.scaling[a]
        scale = self._embed_scale()
        if scale is not None:
            out = out * scale.to(out.dtype)
        return out

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if self._base_only():
            return self.base_layer(x, *args, **kwargs)
        if self._batch_adapter_names is not None:
            return self._mixed_batch_forward(x, self._batch_adapter_names, *args, **kwargs)
        result = self.base_layer(x, *args, **kwargs)
        out_dtype = result.dtype
        for a in self._present_active():
            result = result + self._lookup(x, a)
        return result.to(out_dtype)

    def _mixed_batch_forward(self, x: torch.Tensor, names: list[str], *args, **kwargs) -> torch.Tensor:
        """Row i uses adapter names[i] ("__base__" or an adapter this layer lacks: base only)."""
        if len(names) != len(x):
            raise ValueError(f"adapter_names has {len(names)} entries but the batch has {len(x)} rows")
        result = self.base_layer(x, *args, **kwargs)
        for a in dict.fromkeys(names):
            if a == "__base__" or a not in self.lora_embedding_A:
                continue
            idx = [i for i, n in enumerate(names) if n == a]
            result[idx] += self._lookup(x[idx], a)
        return result

    def extra_repr(self) -> str:
        return (f"num_embeddings={self.in_features}, embedding_dim={self.out_features}, "
                f"adapters={self.adapter_names()}")


# ---------------------------------------------------------------------------------------------------------------
# the LoRA tuner's state-dict hooks for embeddings (PEFT's file layout)
# ---------------------------------------------------------------------------------------------------------------

_EMBEDDING_LAYER_NAMES = ("embed_tokens", "lm_head")  # PEFT's EMBEDDING_LAYER_NAMES


def mark_token_deltas_trainable(tuner) -> None:
    """Give the active adapters' ``trainable_tokens_delta`` requires_grad back after the tuner froze every
    parameter without its ``lora_`` prefix (inference-mode adapters stay frozen)."""

    for _, layer in tuner.tuner_layers():
        if isinstance(layer, TrainableTokensLayer) and layer.tied_to is None:
            for a, p in layer.trainable_tokens_delta.items():
                cfg = tuner.peft_config.get(a)
                p.requires_grad_(a in layer.active_adapters and not getattr(cfg, "inference_mode", False))


def adapter_key_map(tuner, adapter_name: str, keymap: dict[str, str]) -> dict[str, str]:
    """Rename the trainable-token keys to PEFT's (``<path>.token_adapter.trainable_tokens_delta``)."""

    renames = {}
    for key, layer in tuner.tuner_layers():
        if isinstance(layer, TrainableTokensLayer):
            renames[f"base_model.model.{key}.trainable_tokens_delta"] = saved_key(key)
    if not renames:
        return keymap
    return {renames.get(k, k): v for k, v in keymap.items()}


def _embedding_targeted(tuner, config) -> bool:
    import re

    tm = getattr(config, "target_modules", None)
    if not tm:
        return False
    if isinstance(tm, str):
        if tm == "all-linear":
            return False
        return any(re.fullmatch(tm, n) for n, _ in tuner.model.named_modules()
                   if any(re.match(rf"(.*\.)?{e}$", n) for e in _EMBEDDING_LAYER_NAMES))
    return any(e in tm for e in _EMBEDDING_LAYER_NAMES)


def optional_embedding_keys(tuner, adapter_name: str) -> dict[str, str]:
    """{saved key: parameter path} of the embedding layers' base weights that PEFT adds to the file
    (``save_embedding_layers="auto"``) when ``embed_tokens``/``lm_head`` is among the target modules and the layer is
    a LoRA layer: they are written on save and read (if present) on load, never required."""
    config = tuner.peft_config.get(adapter_name)
    if config is None or getattr(config, "trainable_token_indices", None) is not None:
        return {}
    if not _embedding_targeted(tuner, config):
        return {}
    model = tuner.model
    layers = []
    for getter in ("get_input_embeddings", "get_output_embeddings"):
        fn = getattr(model, getter, None)
        try:
            layer = fn() if fn is not None else None
        except (AttributeError, NotImplementedError):
            layer = None
        if layer is not None and isinstance(layer, BaseTunerLayer) and adapter_name in layer.adapter_names() \
                and isinstance(layer.base_layer, (nn.Linear, nn.Embedding)):
            layers.append(layer)
    out = {}
    for name, mod in model.named_modules():
        if any(mod is l for l in layers):
            for pn, _ in mod.base_layer.named_parameters():
                out[f"base_model.model.{name}.base_layer.{pn}"] = f"model.{name}.base_layer.{pn}"
    return out


def with_optional_keys(tuner, adapter_name: str, sd: dict) -> dict:
    extra = optional_embedding_keys(tuner, adapter_name)
    if extra:
        sd = dict(sd)
        for k, path in extra.items():
            sd[k] = tuner.get_parameter(path)
    return sd


def without_optional_keys(tuner, adapter_name: str, state_dict: dict) -> dict:
    """``state_dict`` without PEFT's optional embedding base weights (their shapes are checked here: ValueError)."""
    extra = optional_embedding_keys(tuner, adapter_name)
    found = [k for k in state_dict if k in extra]
    if not found:
        return state_dict
    for k in found:
        want = tuple(tuner.get_parameter(extra[k]).shape)
        if tuple(state_dict[k].shape) != want:
            raise ValueError(f"{k}: shape {tuple(state_dict[k].shape)} in the checkpoint, {want} in the model")
    return {k: v for k, v in state_dict.items() if k not in found}


def apply_optional_keys(tuner, adapter_name: str, state_dict: dict) -> None:
    """Copy the optional embedding base weights present in ``state_dict`` into the model (after validation)."""
    extra = optional_embedding_keys(tuner, adapter_name)
    with torch.no_grad():
        for k, path in extra.items():
            if k in state_dict:
                p = tuner.get_parameter(path)
                p.copy_(state_dict[k].to(device=p.device, dtype=p.dtype))
