"""Prefix tuning: the ``PrefixEncoder`` (per-layer key/value prefixes, optionally through a projection MLP) and its
tuner, which hands the prefixes to the model as its key/value cache."""

from __future__ import annotations

import warnings
from typing import Optional

import torch
from torch import nn

from ...config import PeftType
from .._prompt_learning import PromptLearningTuner, VirtualTokenEncoder, _check_positive, build_prefix_cache
from ..tuners_utils import register_tuner
from .config import PrefixTuningConfig

__all__ = ["PrefixEncoder", "PrefixTuningTuner"]

_GC_MESSAGE = ("PREFIX_TUNING does not work with gradient checkpointing: the prefixes are handed to the model as its "
               "key/value cache, and transformers' gradient-checkpointed layers drop the cache (`cache=None`) because "
               "the backward pass replays each layer, which would write the cache a second time; the prefix would be "
               "lost (in transformers 5.x the forward then fails with a mask/key length mismatch).  Disable gradient "
               "checkpointing (model.gradient_checkpointing_disable()) or use prompt tuning / P-tuning / LoRA.")


class PrefixEncoder(VirtualTokenEncoder):
    """Prefix tuning: per-layer key and value prefixes for every virtual token.

    Args:
        num_tokens: n.   num_layers: L.   token_dim: the KV width per layer, ``num_kv_heads · head_dim`` (already sized
            for grouped-query attention by the tuner).
        prefix_projection: reparameterise through ``Linear(d, h) → tanh → Linear(h, L·2·d)`` from an (n, d) table.
        hidden_size: h (``encoder_hidden_size``), only used with the projection.
        zero_init: ``init_weights="zero"``: zero the last layer (or the table).  Note that zero prefixes are not a
            no-op: zero keys still take attention mass (as in PEFT).

    Output of ``forward()``: (n, L·2·d) laid out as ``[layer][k|v][head][head_dim]`` along the last axis.
    """

    def __init__(self, num_tokens: int, num_layers: int, token_dim: int, prefix_projection: bool = False,
                 hidden_size: Optional[int] = None, zero_init: bool = False, device=None, dtype=None) -> None:
        super().__init__()
        _check_positive("num_tokens", num_tokens)
        _check_positive("num_layers", num_layers)
        _check_positive("token_dim", token_dim)
        fk = {"device": device, "dtype": dtype}
        self.num_layers = num_layers
        self._token_dim = token_dim
        self.prefix_projection = bool(prefix_projection)
        width = num_layers * 2 * token_dim
        if self.prefix_projection:
            hidden_size = token_dim if hidden_size is None else hidden_size
            _check_positive("encoder_hidden_size", hidden_size)
            self.embedding = nn.Embedding(num_tokens, token_dim, **fk)
            self.transform = nn.Sequential(nn.Linear(token_dim, hidden_size, **fk), nn.Tanh(),
                                           nn.Linear(hidden_size, width, **fk))
            if zero_init:
                nn.init.zeros_(self.transform[-1].weight)
                nn.init.zeros_(self.transform[-1].bias)
        else:
            self.embedding = nn.Embedding(num_tokens, width, **fk)
            if zero_init:
                nn.init.zeros_(self.embedding.weight)
            self.direct = True

    @property
    def out_dim(self) -> int:
        return self.num_layers * 2 * self._token_dim

    def head(self, x: torch.Tensor) -> torch.Tensor:
        return self.transform(x)

    def _drop_head(self) -> None:
        if hasattr(self, "transform"):
            del self.transform


@register_tuner(PeftType.PREFIX_TUNING)
class PrefixTuningTuner(PromptLearningTuner):
    """Prefix tuning: ``prompt_encoder[adapter]`` is a :class:`PrefixEncoder`; prefixes go in the model's cache."""

    config_cls = PrefixTuningConfig

    def _gradient_checkpointing(self) -> bool:
        with warnings.catch_warnings():  # transformers 5 deprecates is_gradient_checkpointing
            warnings.simplefilter("ignore")
            for attr in ("is_activation_checkpointing", "is_gradient_checkpointing"):
                try:
                    v = getattr(self.model, attr)
                except Exception:
                    continue
                if v is True:
                    return True
        return any(getattr(m, "gradient_checkpointing", False) is True for m in self.model.modules())

    def _check_model(self, config) -> None:
        if self._gradient_checkpointing():
            raise ValueError(_GC_MESSAGE)

    def _check_forward_state(self) -> None:
        if self.training and torch.is_grad_enabled() and self._gradient_checkpointing():
            raise ValueError(_GC_MESSAGE)

    def _build_encoder(self, config: PrefixTuningConfig) -> nn.Module:
        return PrefixEncoder(config.num_virtual_tokens, config.num_layers, config.token_dim,
                             prefix_projection=config.prefix_projection and not config.inference_mode,
                             hidden_size=config.encoder_hidden_size, zero_init=config.init_weights == "zero")

    def _prefix_cache(self, cfg, rows: int, into=None):
        dtype = getattr(self.model, "dtype", None) or self.word_embeddings.weight.dtype
        prefix = self._prompt().to(dtype)
        cache = build_prefix_cache(prefix, cfg.num_layers, cfg.num_attention_heads, rows,
                                   getattr(self.model, "config", None))
        if into is not None and hasattr(into, "update"):
            # an empty cache object passed by the caller is filled in place (they may hold on to it)
            for i, layer in enumerate(cache.layers):
                into.update(layer.keys, layer.values, i)
            return into
        return cache

    def _inject_forward(self, cfg, input_ids, inputs_embeds, b, length, kwargs):
        if kwargs.get("position_ids") is not None:
            kwargs["position_ids"] = kwargs["position_ids"] + cfg.num_virtual_tokens
        kwargs[self._cache_kwarg] = self._prefix_cache(cfg, b, into=kwargs.get(self._cache_kwarg))
        return self.model(input_ids=input_ids, inputs_embeds=inputs_embeds, **kwargs)

    def _generate(self, gen, cfg, input_ids, inputs_embeds, rows, kwargs):
        kwargs[self._cache_kwarg] = self._prefix_cache(cfg, rows)
        if inputs_embeds is not None:
            # generate() slices inputs_embeds by the cache length; n placeholder rows in front are cut off again
            pad = inputs_embeds.new_zeros(inputs_embeds.shape[0], cfg.num_virtual_tokens, inputs_embeds.shape[2])
            return gen(inputs_embeds=torch.cat([pad, inputs_embeds], dim=1), **kwargs)
        return gen(input_ids=input_ids, **kwargs)
