"""``LoraConfig(trainable_token_indices=...)``: train only some rows of an embedding (new tokens), as HF PEFT does.

Per adapter the layer holds ``trainable_tokens_delta[adapter]`` ((n_tokens, dim), initialised to the current rows)
and a frozen copy of the original rows (to unmerge).  The rows of the token ids listed in ``token_indices`` are
*replaced* by the delta; every other row stays the frozen base row.  Saved as PEFT saves it:
``base_model.model.<embedding path>.token_adapter.trainable_tokens_delta`` (PEFT wraps the layer in a
``TrainableTokensWrapper`` whose ``token_adapter`` holds the parameter; fastpeft puts the layer in place of the
embedding and maps the key).

``trainable_token_indices`` is a list of ids (applied to the input embedding) or ``{module name: ids}``.  With tied
input/output embeddings (``tie_word_embeddings``) the output layer gets a tied layer sharing the input layer's delta
(its logits of those tokens use the new rows too); the tied layer saves nothing, like PEFT's.

The forward never materialises the merged matrix (PEFT copies the whole (vocab, dim) matrix each call): the embedding
looks the ids up in the base matrix and replaces the positions whose id is trainable with rows of the delta; the
output layer computes the logits and replaces the columns of the trainable ids.
"""

from __future__ import annotations

import warnings
from typing import Optional, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from ...utils.other import ModulesToSaveWrapper, get_submodules
from ..tuners_utils import BaseTunerLayer

__all__ = ["TrainableTokensLayer", "inject_trainable_tokens", "token_target_layers", "SAVED_ATTR"]

SAVED_ATTR = "token_adapter.trainable_tokens_delta"  # the attribute path PEFT's file keys use


class TrainableTokensLayer(BaseTunerLayer):
    """Replaces rows ``token_indices`` of an ``nn.Embedding`` (or an output ``nn.Linear``) by trainable rows.

    Embedding input: integer ids (...) -> (..., dim).  Linear input: (..., in_features) -> (..., vocab).
    ``tied_to``: the layer whose delta this (output) layer shares; it owns no parameter and saves nothing.
    """

    _fused_capable = False

    adapter_layer_names = ("trainable_tokens_delta",)
    other_param_names = ("token_indices", "trainable_tokens_original")

    def __init__(self, base_layer: nn.Module, adapter_name: str, token_indices: list[int],
                 tied_to: Optional["TrainableTokensLayer"] = None) -> None:
        super().__init__(base_layer)
        if not isinstance(base_layer, (nn.Embedding, nn.Linear)):
            raise TypeError(f"trainable_token_indices needs an nn.Embedding or nn.Linear layer, got "
                            f"{type(base_layer).__name__}")
        self._tied = [tied_to] if tied_to is not None else []  # a list: not registered as a submodule
        if tied_to is None:
            self.trainable_tokens_delta = nn.ParameterDict({})
            self.trainable_tokens_original: dict[str, torch.Tensor] = {}
            self.token_indices: dict[str, list[int]] = {}
        else:
            self.adapter_layer_names = ()  # the source layer owns (and saves) the parameters
        self._active_adapter = [adapter_name]
        self.update_layer(adapter_name, token_indices)

    @property
    def tied_to(self) -> Optional["TrainableTokensLayer"]:
        return self._tied[0] if self._tied else None

    def _owner(self) -> "TrainableTokensLayer":
        return self._tied[0] if self._tied else self

    def update_layer(self, adapter_name: str, token_indices: list[int], init_weights: bool = True) -> None:
        """Add adapter ``adapter_name`` training rows ``token_indices`` (the delta starts as the current rows)."""
        if self._tied:
            return
        w = self.base_layer.weight
        n = w.shape[0]
        bad = [i for i in token_indices if isinstance(i, bool) or not isinstance(i, int) or not -n <= i < n]
        if bad:
            raise ValueError(f"trainable_token_indices {bad[:8]} are not valid row indices of a layer with {n} rows")
        idx = [i % n for i in token_indices]
        if len(set(idx)) != len(idx):
            raise ValueError(f"trainable_token_indices contains duplicates: {token_indices}")
        self.token_indices[adapter_name] = list(token_indices)
        rows = w.detach()[torch.tensor(idx, dtype=torch.long, device=w.device)]
        values = rows if init_weights else torch.randn(rows.shape, dtype=w.dtype, device=w.device)
        self.trainable_tokens_delta[adapter_name] = nn.Parameter(values.clone())
        self.trainable_tokens_original[adapter_name] = rows.clone()

    # -- adapter bookkeeping of a tied layer follows its owner ---------------------------------------------------
    def adapter_names(self) -> list[str]:
        return list(self._owner().trainable_tokens_delta.keys())

    def _present_active(self) -> list[str]:
        have = self._owner().trainable_tokens_delta
        return [a for a in self._active_adapter if a in have]

    def delete_adapter(self, adapter_name: str) -> None:
        if not self._tied:
            self.trainable_tokens_original.pop(adapter_name, None)
            self.token_indices.pop(adapter_name, None)
        super().delete_adapter(adapter_name)

    def _index(self, adapter_name: str, device) -> torch.Tensor:
        n = self.base_layer.weight.shape[0]
        return torch.tensor([i % n for i in self._owner().token_indices[adapter_name]], dtype=torch.long,
                            device=device)

    def _check_disjoint(self, names: list[str]) -> None:
        seen: set[int] = set()
        for a in dict.fromkeys(list(self.merged_adapters) + list(names)):
            s = set(self._index(a, "cpu").tolist())
            if seen & s:
                raise ValueError(f"Token indices of adapter {a} overlap those of another active or merged adapter; "
                                 "only disjoint token indices can be combined")
            seen |= s

    # -- merging: write the rows into the base weight (the originals are kept to unmerge) ------------------------
    def merge(self, safe_merge: bool = False, adapter_names: Optional[list[str]] = None) -> None:
        if self._tied:
            # the owner writes the rows into the shared weight; record the state so forward uses the base layer
            names = self._adapters_to_merge(adapter_names)
            self.merged_adapters.extend(names)
            return
        names = self._adapters_to_merge(adapter_names)
        self._check_disjoint(names)
        w = self.base_layer.weight
        merged = w.data
        for a in names:
            merged = merged.index_copy(0, self._index(a, w.device), self.trainable_tokens_delta[a].detach().to(merged))
            if safe_merge and not torch.isfinite(merged).all():
                raise ValueError(f"NaNs detected in the merged weights. The adapter {a} seems to be broken (the "
                                 "weights were not modified)")
        w.data = merged
        self.merged_adapters.extend(names)

    def unmerge(self) -> None:
        if not self.merged:
            warnings.warn("Already unmerged. Nothing to do.", UserWarning, stacklevel=2)
            return
        while self.merged_adapters:
            a = self.merged_adapters.pop()
            if self._tied:
                continue
            w = self.base_layer.weight
            w.data.index_copy_(0, self._index(a, w.device), self.trainable_tokens_original[a].to(w))

    def get_merged_weights(self, names: list[str]) -> torch.Tensor:
        """The base weight with the adapters' rows replaced (a new tensor; differentiable w.r.t. the deltas)."""
        owner = self._owner()
        W = self.base_layer.weight
        for a in names:
            W = W.index_copy(0, self._index(a, W.device), owner.trainable_tokens_delta[a].to(W))
        return W

    # -- forward -------------------------------------------------------------------------------------------------
    def _base_only(self) -> bool:
        owner = self._owner()
        if self._tied and (owner._disable_adapters or owner.merged):
            return True
        return super()._base_only()

    def _replace_rows(self, x: torch.Tensor, names: list[str], *args, **kwargs) -> torch.Tensor:
        owner = self._owner()
        base = self.base_layer
        if len(names) > 1:
            self._check_disjoint(names)
        if isinstance(base, nn.Embedding):
            if (base.max_norm is not None or base.scale_grad_by_freq or base.sparse or type(base) is not nn.Embedding
                    or args or kwargs):
                # the general case: PEFT's full merged matrix through the layer's own lookup options
                out = F.embedding(x, self.get_merged_weights(names), padding_idx=base.padding_idx,
                                  max_norm=base.max_norm, norm_type=base.norm_type,
                                  scale_grad_by_freq=base.scale_grad_by_freq, sparse=base.sparse)
                scale = getattr(base, "embed_scale", None)
                if scale is not None:
                    out = out * (scale.to(out.dtype) if isinstance(scale, torch.Tensor) else scale)
                return out
            result = base(x)
            n = base.num_embeddings
            for a in names:
                idx = self._index(a, x.device)
                pos = torch.full((n,), -1, dtype=torch.long, device=x.device)
                pos[idx] = torch.arange(len(idx), device=x.device)
                p = pos[x]  # position of each id in the delta, -1 if not trainable
                rows = F.embedding(p.clamp(min=0), owner.trainable_tokens_delta[a].to(result.dtype))
                result = torch.where((p >= 0).unsqueeze(-1), rows, result)
            return result
        # output layer: logits of every token, then the columns of the trainable tokens from the delta rows
        result = base(x, *args, **kwargs)
        for a in names:
            idx = self._index(a, x.device)
            delta = owner.trainable_tokens_delta[a].to(result.dtype)
            b = base.bias[idx] if base.bias is not None else None
            result = result.index_copy(result.dim() - 1, idx, F.linear(x.to(delta.dtype), delta, b))
        return result

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if self._base_only():
            return self.base_layer(x, *args, **kwargs)
        names = self._batch_adapter_names
        if names is not None:
            if len(names) != len(x):
                raise ValueError(f"adapter_names has {len(names)} entries but the batch has {len(x)} rows")
            result = self.base_layer(x, *args, **kwargs)
            have = self._owner().trainable_tokens_delta
            for a in dict.fromkeys(names):
                if a == "__base__" or a not in have:
                    continue
                idx = [i for i, n in enumerate(names) if n == a]
                result[idx] = self._replace_rows(x[idx], [a], *args, **kwargs)
            return result
        active = self._present_active()
        if not active:
            return self.base_layer(x, *args, **kwargs)
        return self._replace_rows(x, active, *args, **kwargs)

    def extra_repr(self) -> str:
        return f"tied={self.tied_to is not None}, adapters={self.adapter_names()}"


# ---------------------------------------------------------------------------------------------------------------
# injection (called by LoraModel after its layers exist)
# ---------------------------------------------------------------------------------------------------------------


def token_target_layers(model: nn.Module, spec: Union[list, dict]) -> dict[str, list[int]]:
    """``trainable_token_indices`` as ``{module name suffix: ids}`` (a list applies to the input embedding)."""
    if isinstance(spec, dict):
        return dict(spec)
    name = "embed_tokens"
    get = getattr(model, "get_input_embeddings", None)
    emb = get() if get is not None else None
    if emb is not None:
        for n, m in model.named_modules():
            if m is emb:
                name = n.split(".")[-1]
                break
    return {name: list(spec)}


def _find(model: nn.Module, suffix: str) -> list[str]:
    return [n for n, _ in model.named_modules() if n == suffix or n.endswith("." + suffix)]


def _input_embedding_name(model: nn.Module) -> Optional[str]:
    get = getattr(model, "get_input_embeddings", None)
    emb = get() if get is not None else None
    if emb is None:
        return None
    return next((n for n, m in model.named_modules() if m is emb), None)


def _tied_with(model: nn.Module, weight: torch.Tensor) -> list[str]:
    """Names of the Linear/Embedding modules (outside tuner layers) whose weight is ``weight`` (tied to it)."""
    cfg = getattr(model, "config", None)
    tie = getattr(cfg, "tie_word_embeddings", None)
    if tie is None and cfg is not None and hasattr(cfg, "get_text_config"):
        tie = getattr(cfg.get_text_config(), "tie_word_embeddings", None)
    if tie is False:
        return []
    out = []
    for n, m in model.named_modules():
        if isinstance(m, (nn.Linear, nn.Embedding)) and not isinstance(m, BaseTunerLayer) and m.weight is weight \
                and ".base_layer" not in n:
            out.append(n)
    return out


def inject_trainable_tokens(tuner, adapter_name: str, config) -> None:
    """Wrap the layers named by ``config.trainable_token_indices`` (no-op when it is None)."""
    spec = getattr(config, "trainable_token_indices", None)
    if spec is None:
        return

    model = tuner.model
    targets = token_target_layers(model, spec)
    mts = list(getattr(config, "modules_to_save", None) or [])
    both = [t for t in targets if t in mts]
    if both:
        raise ValueError(f"The embedding layer is already marked to be trained fully, either specify "
                         f"modules_to_save=[..., {both[0]!r}, ...] or trainable_token_indices={{{both[0]!r}: x}} "
                         "but not both.")
    emb_name = _input_embedding_name(model)
    resolved: dict[str, list[int]] = {}
    for suffix, ids in targets.items():
        names = _find(model, suffix)
        names = [n for n in names if not any(n.startswith(o + ".") for o in names if o != n)]
        if not names:
            raise ValueError(f"trainable_token_indices names module {suffix!r}, which the model does not have")
        for n in names:
            resolved[n] = list(ids)
    # tied output layers of the input embedding: share its delta when the ids agree (PEFT's rule)
    tied_names: list[str] = []
    if emb_name is not None and emb_name in resolved:
        emb_mod = model.get_submodule(emb_name)
        weight = emb_mod.base_layer.weight if isinstance(emb_mod, BaseTunerLayer) else emb_mod.weight
        tied_names = [n for n in _tied_with(model, weight) if n != emb_name]
        tied_names = [n for n in tied_names if n not in resolved or resolved[n] == resolved[emb_name]]
        for n in tied_names:
            resolved.pop(n, None)
    created: dict[str, TrainableTokensLayer] = {}
    for name, ids in resolved.items():
        parent, target, attr = get_submodules(model, name)
        if isinstance(target, TrainableTokensLayer):
            target.update_layer(adapter_name, ids)
            created[name] = target
            continue
        if isinstance(target, (BaseTunerLayer, ModulesToSaveWrapper)):
            raise ValueError(f"module {name!r} is both adapted by LoRA (or in modules_to_save) and listed in "
                             "trainable_token_indices; choose one")
        layer = TrainableTokensLayer(target, adapter_name, ids)
        setattr(parent, attr, layer)
        created[name] = layer
    if emb_name in created:
        owner = created[emb_name]
        for name in tied_names:
            parent, target, attr = get_submodules(model, name)
            if isinstance(target, TrainableTokensLayer):
                continue
            if isinstance(target, (BaseTunerLayer, ModulesToSaveWrapper)):
                raise ValueError(f"module {name!r} is tied to the input embedding and adapted by LoRA; "
                                 "trainable_token_indices cannot tie it")
            setattr(parent, attr, TrainableTokensLayer(target, adapter_name, [], tied_to=owner))


def saved_key(key: str) -> str:
    """PEFT's file key for the delta of the layer at ``key`` (it sits one module deeper there)."""
    return f"base_model.model.{key}.{SAVED_ATTR}"
