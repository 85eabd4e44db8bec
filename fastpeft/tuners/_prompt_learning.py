"""What prompt tuning, P-tuning and prefix tuning share: the ``PromptLearningTuner`` base, the config preparation
from the model config, and the KV-cache helpers.  The method packages (``fastpeft.tuners.prompt_tuning``,
``p_tuning``, ``prefix_tuning``) hold the encoders and the registered tuners.

Prompt learning (PROMPT_TUNING, P_TUNING, PREFIX_TUNING) leaves the base model untouched: the tuner owns
``prompt_encoder[adapter]`` and rewrites the keyword arguments of every ``forward`` / ``generate`` call:

* prompt tuning / P-tuning: ``inputs_embeds = [P; embed(input_ids)]`` (P: (n, d), the same for every row),
  ``attention_mask = [1…1; mask]``, 2-D ``labels = [-100…; labels]``, ``position_ids = [0..n-1; position_ids + n]``,
  ``token_type_ids = [0…; token_type_ids]``.
* prefix tuning: a transformers ``DynamicCache`` pre-filled with the per-layer key/value prefixes is passed as the
  model's cache, ``attention_mask = [1…1; mask]``, ``position_ids + n``; labels unchanged.

``generate`` passes the same extended attention mask and a pre-filled cache to the model's own ``generate``: the
prefix KV for prefix tuning (HF PEFT 0.21.2 loses it with transformers 5.x), and for prompt tuning / P-tuning the KV
of the virtual tokens (one forward over the n prompt embeddings; the virtual tokens come first and attend only to
each other, so their keys/values do not depend on the input and are shared by all rows).  The output is
``[input_ids, new tokens]`` as with PEFT.

A forward call that passes a non-empty cache (incremental decoding by hand) is taken to continue a sequence whose
cache already holds the prompt: only the attention mask (and position ids) are extended.
"""

from __future__ import annotations

import inspect
from typing import Optional

import torch
from torch import nn

from ..config import PeftConfig, PeftType, TaskType
from .tuners_utils import BaseTuner

__all__ = ["PromptLearningTuner", "EmbeddingPromptTuner", "VirtualTokenEncoder", "prepare_prompt_learning_config",
           "build_prefix_cache"]


# ---------------------------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------------------------


def _cfg_get(model_config, *names):
    d = model_config.to_dict() if hasattr(model_config, "to_dict") else dict(vars(model_config))
    if "text_config" in d and isinstance(d["text_config"], dict):
        d = d["text_config"]
    for n in names:
        v = getattr(model_config, n, None)
        if v is None:
            v = d.get(n)
        if v is not None:
            return v
    return None


def prepare_prompt_learning_config(config: PeftConfig, model: nn.Module) -> PeftConfig:
    """Fill ``num_layers``, ``token_dim``, ``num_attention_heads``, ``encoder_hidden_size`` and
    ``num_transformer_submodules`` from the model config, in place (PEFT's rules).

    For prefix tuning on a model with ``num_key_value_heads`` (grouped-query attention) ``token_dim`` becomes
    ``head_dim · num_kv_heads`` and ``num_attention_heads`` the number of KV heads.
    """
    mc = getattr(model, "config", None)
    if mc is None:
        missing = [n for n in ("num_layers", "token_dim", "num_attention_heads") if getattr(config, n) is None]
        if missing:
            raise ValueError(f"the model has no `config`; please set {missing} in the {type(config).__name__}")
    if getattr(mc, "is_encoder_decoder", False):
        raise ValueError(f"{config.peft_type} is supported by fastpeft for decoder-only and encoder-only models; "
                         f"{type(model).__name__} is an encoder-decoder model")
    if config.num_transformer_submodules is None:
        config.num_transformer_submodules = 2 if config.task_type == TaskType.SEQ_2_SEQ_LM else 1
    if config.num_transformer_submodules != 1:
        raise ValueError(f"num_transformer_submodules={config.num_transformer_submodules} (encoder-decoder) is not "
                         "supported; fastpeft supports decoder-only and encoder-only models")
    if mc is not None:
        if config.num_layers is None:
            v = _cfg_get(mc, "num_hidden_layers", "num_layers", "n_layer")
            if v is None:
                raise ValueError("cannot find the number of layers in the model config; please set num_layers")
            config.num_layers = int(v)
        if config.token_dim is None:
            v = _cfg_get(mc, "hidden_size", "n_embd", "d_model")
            if v is None:
                raise ValueError("cannot find the hidden size in the model config; please set token_dim")
            config.token_dim = int(v)
        if config.num_attention_heads is None:
            v = _cfg_get(mc, "num_attention_heads", "n_head", "num_heads", "encoder_attention_heads")
            if v is None:
                raise ValueError("cannot find the number of attention heads in the model config; please set "
                                 "num_attention_heads")
            config.num_attention_heads = int(v)
        kv = _cfg_get(mc, "num_key_value_heads")
        if config.peft_type == PeftType.PREFIX_TUNING and kv is not None:
            head_dim = _cfg_get(mc, "head_dim") or config.token_dim // config.num_attention_heads
            config.token_dim = int(head_dim) * int(kv)
            config.num_attention_heads = int(kv)
    if hasattr(config, "encoder_hidden_size") and config.encoder_hidden_size is None:
        config.encoder_hidden_size = config.token_dim
    return config


def _cache_len(cache) -> int:
    if cache is None:
        return 0
    if hasattr(cache, "get_seq_length"):
        return int(cache.get_seq_length())
    if isinstance(cache, (tuple, list)) and cache and cache[0] is not None:
        return int(cache[0][0].shape[-2])
    return 0


def build_prefix_cache(prefix: torch.Tensor, num_layers: int, num_heads: int, batch_size: int, model_config=None):
    """A ``DynamicCache`` holding the prefix keys/values of every layer.

    Args:
        prefix: (n, num_layers·2·token_dim), PEFT's layout ``[layer][k|v][head][head_dim]`` along the last axis.
        num_heads: KV heads H; head_dim = token_dim / H.
        batch_size: B; every row gets the same prefix (expanded, not copied).
        model_config: passed to ``DynamicCache(config=...)`` so sliding-window layers get their cache type.
    Returns:
        DynamicCache with layer i holding keys/values (B, H, n, head_dim).
    """
    from transformers import DynamicCache

    n, width = prefix.shape
    td = width // (2 * num_layers)
    hd = td // num_heads
    if td * 2 * num_layers != width or hd * num_heads != td:
        raise ValueError(f"prefix width {width} does not split into {num_layers} layers x 2 x {num_heads} heads")
    kv = prefix.view(n, num_layers * 2, num_heads, hd).permute(1, 2, 0, 3)  # (2L, H, n, hd)
    cache = DynamicCache(config=model_config) if model_config is not None else DynamicCache()
    for i in range(num_layers):
        k = kv[2 * i].unsqueeze(0).expand(batch_size, -1, -1, -1)
        v = kv[2 * i + 1].unsqueeze(0).expand(batch_size, -1, -1, -1)
        cache.update(k, v, i)
    return cache


def _repeat_cache(cache, batch_size: int, model_config=None):
    """A new DynamicCache whose every layer is ``cache``'s single row expanded to ``batch_size`` rows."""
    from transformers import DynamicCache

    out = DynamicCache(config=model_config) if model_config is not None else DynamicCache()
    for i, layer in enumerate(cache.layers):
        k = layer.keys.expand(batch_size, -1, -1, -1)
        v = layer.values.expand(batch_size, -1, -1, -1)
        out.update(k, v, i)
    return out


_PARAM_NAMES: dict[type, frozenset] = {}


def _forward_param_names(model: nn.Module) -> frozenset:
    """Names of ``model.forward``'s parameters (cached per class: inspect.signature costs ~50 µs per call)."""
    cls = type(model)
    if cls not in _PARAM_NAMES:
        try:
            _PARAM_NAMES[cls] = frozenset(inspect.signature(model.forward).parameters)
        except (TypeError, ValueError):
            _PARAM_NAMES[cls] = frozenset()
    return _PARAM_NAMES[cls]


# ---------------------------------------------------------------------------------------------------------------
# prompt learning
# ---------------------------------------------------------------------------------------------------------------


class PromptLearningTuner(BaseTuner):
    """Common machinery of prompt tuning, P-tuning and prefix tuning (see the module docstring).

    Attributes:
        prompt_encoder: ``ModuleDict{adapter: encoder}``.
        word_embeddings: the model's input embedding module.
    """

    prefix = "prompt_encoder"
    config_cls: type = PeftConfig

    # -- injection -----------------------------------------------------------------------------------------------
    def inject_adapter(self, adapter_name: str, config: PeftConfig, autocast_adapter_dtype: bool = True) -> None:
        self._check_adapter_name(adapter_name)
        if "prompt_encoder" not in self._modules:
            self.prompt_encoder = nn.ModuleDict()
            self._disabled = False
        if not isinstance(config, self.config_cls):
            raise TypeError(f"{type(self).__name__} takes a {self.config_cls.__name__}, got {type(config).__name__}")
        self._check_new_adapter(adapter_name, config)
        emb = self.model.get_input_embeddings() if hasattr(self.model, "get_input_embeddings") else None
        if emb is None:
            raise ValueError(f"{config.peft_type} needs a model with input embeddings (get_input_embeddings()); "
                             f"{type(self.model).__name__} has none")
        # kept out of the module tree: it is the model's own embedding (already under self.model)
        self.__dict__["word_embeddings"] = emb
        prepare_prompt_learning_config(config, self.model)
        self._check_model(config)
        encoder = self._build_encoder(config)
        encoder.to(emb.weight.device)
        self.peft_config[adapter_name] = config
        try:
            self.prompt_encoder[adapter_name] = encoder
            self._set_modules_to_save(config, adapter_name)
        except BaseException:
            self._remove_adapter(adapter_name, unwrap_empty=True)
            raise
        for p in self.model.parameters():
            p.requires_grad_(False)
        self._mark_only_adapters_as_trainable()
        self.set_adapter(self.active_adapters[0] if self.active_adapters[0] in self.peft_config else adapter_name)

    def _check_model(self, config) -> None:
        """Per-method model checks (prefix tuning: gradient checkpointing)."""

    def _build_encoder(self, config) -> nn.Module:  # pragma: no cover - per method
        raise NotImplementedError

    # -- adapter management --------------------------------------------------------------------------------------
    def set_adapter(self, adapter_name, inference_mode: bool = False) -> None:
        """Activate one adapter (prompt learning allows one at a time); only its encoder requires grad."""
        names = [adapter_name] if isinstance(adapter_name, str) else list(adapter_name)
        if len(names) != 1:
            raise ValueError(f"prompt-learning methods can only have one active adapter, got {names}")
        name = names[0]
        if name not in self.peft_config:
            raise ValueError(f"adapter {name!r} not found; available: {sorted(self.peft_config)}")
        for key, enc in self.prompt_encoder.items():
            train = key == name and not inference_mode and not self.peft_config[key].inference_mode
            enc.requires_grad_(train)
        for _, w in self._wrappers():
            w.set_adapter(names, inference_mode=inference_mode)
        self.active_adapter = name

    def enable_adapter_layers(self) -> None:
        self._disabled = False
        for _, w in self._wrappers():
            w.enable_adapters(True)

    def disable_adapter_layers(self) -> None:
        self._disabled = True
        for _, w in self._wrappers():
            w.enable_adapters(False)

    def _remove_adapter(self, adapter_name: str, unwrap_empty: bool) -> None:
        if adapter_name in self.prompt_encoder:
            del self.prompt_encoder[adapter_name]
        super()._remove_adapter(adapter_name, unwrap_empty)
        if self.peft_config and self.active_adapter in self.peft_config:
            self.set_adapter(self.active_adapter)

    def _cast_adapter_dtype(self, adapter_name: str) -> None:
        """Encoders are created in fp32 already (PEFT's prompt encoders are never half precision)."""

    # -- state dict contract -------------------------------------------------------------------------------------
    def _adapter_key_map(self, adapter_name: str) -> dict[str, str]:
        # With prompt learning PEFT's PeftModel holds the user model directly as `base_model`, so modules_to_save
        # weights are saved as `base_model.<path>` (not `base_model.model.<path>` as for injected tuners).
        pre = "base_model.model."
        return {("base_model." + k[len(pre):]) if k.startswith(pre) else k: v
                for k, v in super()._adapter_key_map(adapter_name).items()}

    def _expected_adapter_shapes(self, adapter_name: str) -> dict[str, tuple[int, ...]]:
        shapes = super()._expected_adapter_shapes(adapter_name)
        enc = self.prompt_encoder[adapter_name]
        shapes["prompt_embeddings"] = (enc.num_tokens, enc.out_dim)
        return shapes

    def get_adapter_state_dict(self, adapter_name: str = "default") -> dict[str, torch.Tensor]:
        """``{"prompt_embeddings": P (n, dim)}`` (the encoder OUTPUT, as PEFT saves it) plus modules_to_save."""
        sd = super().get_adapter_state_dict(adapter_name)
        sd["prompt_embeddings"] = self.prompt_encoder[adapter_name].output().detach()
        return sd

    def _apply_adapter_state_dict(self, adapter_name: str, state_dict: dict[str, torch.Tensor]) -> None:
        rest = {k: v for k, v in state_dict.items() if k != "prompt_embeddings"}
        super()._apply_adapter_state_dict(adapter_name, rest)
        enc = self.prompt_encoder[adapter_name]
        prompt = state_dict["prompt_embeddings"]
        if enc.direct:
            with torch.no_grad():
                enc.embedding.weight.copy_(prompt.to(enc.embedding.weight))
        else:
            # P-tuning / projected prefix: the file holds the encoder output; the head cannot be recovered from it.
            enc.load_output(prompt)
            trainable = adapter_name == self.active_adapter and not self.peft_config[adapter_name].inference_mode
            enc.requires_grad_(trainable)

    # -- the prompt ------------------------------------------------------------------------------------------------
    def _active_config(self):
        if self._disabled or self.active_adapter not in self.peft_config:
            return None
        return self.peft_config[self.active_adapter]

    def _prompt(self) -> torch.Tensor:
        """The active adapter's encoder output P: (n, dim)."""
        return self.prompt_encoder[self.active_adapter].output()

    @property
    def _cache_kwarg(self) -> str:
        # transformers 5.x names the cache argument `cache` (`past_key_values` is its deprecated alias).
        names = _forward_param_names(self.model)
        return "cache" if "cache" in names or "past_key_values" not in names else "past_key_values"

    @staticmethod
    def _bind(args: tuple, kwargs: dict, what: str) -> dict:
        if len(args) > 1:
            raise TypeError(f"{what}() takes input_ids as its only positional argument; pass the others by keyword")
        if args:
            if "input_ids" in kwargs:
                raise TypeError(f"{what}() got input_ids both positionally and as a keyword")
            kwargs = dict(kwargs, input_ids=args[0])
        return dict(kwargs)

    @staticmethod
    def _pop_cache(kwargs: dict):
        cache = None
        for key in ("cache", "past_key_values"):
            v = kwargs.pop(key, None)
            if v is not None:
                cache = v
        return cache

    @staticmethod
    def _batch_and_len(input_ids, inputs_embeds) -> tuple[int, int]:
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids or inputs_embeds (got "
                             f"{'both' if input_ids is not None else 'neither'})")
        t = input_ids if input_ids is not None else inputs_embeds
        if input_ids is not None and input_ids.dim() != 2:
            raise ValueError(f"input_ids must be (batch, seq_len), got shape {tuple(input_ids.shape)}")
        if inputs_embeds is not None and inputs_embeds.dim() != 3:
            raise ValueError(f"inputs_embeds must be (batch, seq_len, hidden), got shape {tuple(inputs_embeds.shape)}")
        return int(t.shape[0]), int(t.shape[1])

    @staticmethod
    def _check_mask(mask, b: int, length: int, what: str = "attention_mask") -> None:
        if mask is None:
            return
        if not isinstance(mask, torch.Tensor):
            raise TypeError(f"{what} must be a tensor, got {type(mask).__name__}")
        if mask.dim() != 2 or tuple(mask.shape) != (b, length):
            raise ValueError(f"{what} must have shape (batch, seq_len) = {(b, length)} (a 2-D padding mask over the "
                             f"caller's tokens; the virtual tokens are added by fastpeft), got {tuple(mask.shape)}")

    @staticmethod
    def _extend_mask(mask, b: int, n: int):
        if mask is None:
            return None
        return torch.cat([mask.new_ones(b, n), mask], dim=1)

    def _check_labels(self, labels, b: int, length: int) -> None:
        if labels is None:
            return
        if not isinstance(labels, torch.Tensor):
            raise TypeError(f"labels must be a tensor, got {type(labels).__name__}")
        if labels.shape[0] != b:
            raise ValueError(f"labels has batch size {labels.shape[0]}, the input has {b}")
        if labels.dim() == 2 and labels.shape[1] != length:
            raise ValueError(f"labels must have shape (batch, seq_len) = {(b, length)} (token labels) or (batch,) "
                             f"(sequence labels), got {tuple(labels.shape)}")
        if labels.dim() > 2:
            raise ValueError(f"labels must be (batch, seq_len) or (batch,), got shape {tuple(labels.shape)}")

    # -- forward / generate -------------------------------------------------------------------------------------
    def forward(self, *args, **kwargs):
        """Run the model with the active adapter's prompt injected (see the module docstring).

        Args (keyword, as the model takes them): input_ids (B, L) or inputs_embeds (B, L, d); attention_mask (B, L)
        over the caller's tokens; labels (B, L) or (B,); position_ids (B, L); token_type_ids (B, L); anything else is
        passed through.  Returns the model's output (prompt tuning / P-tuning: logits of length n + L).
        """
        kwargs = self._bind(args, kwargs, "forward")
        cfg = self._active_config()
        if cfg is None:
            return self.model(**kwargs)
        self._check_forward_state()
        n = cfg.num_virtual_tokens
        input_ids, inputs_embeds = kwargs.pop("input_ids", None), kwargs.pop("inputs_embeds", None)
        b, length = self._batch_and_len(input_ids, inputs_embeds)
        cache = self._pop_cache(kwargs)
        past = _cache_len(cache)
        if past and past < n:
            raise ValueError(f"the cache passed in holds {past} positions, fewer than the {n} virtual tokens; a "
                             "non-empty cache must come from a previous call of this model")
        mask = kwargs.get("attention_mask")
        self._check_mask(mask, b, (past - n if past else 0) + length)
        if not past:
            self._check_labels(kwargs.get("labels"), b, length)
        if kwargs.get("attention_mask") is not None:
            kwargs["attention_mask"] = self._extend_mask(mask, b, n)
        if past:
            # continuing a sequence whose cache already holds the prompt
            if kwargs.get("position_ids") is not None:
                kwargs["position_ids"] = kwargs["position_ids"] + n
            kwargs[self._cache_kwarg] = cache
            return self.model(input_ids=input_ids, inputs_embeds=inputs_embeds, **kwargs)
        if cache is not None:
            kwargs[self._cache_kwarg] = cache  # an empty cache the caller wants filled
        return self._inject_forward(cfg, input_ids, inputs_embeds, b, length, kwargs)

    def _check_forward_state(self) -> None:
        pass

    def _inject_forward(self, cfg, input_ids, inputs_embeds, b, length, kwargs):  # pragma: no cover - per family
        raise NotImplementedError

    def generate(self, *args, **kwargs):
        """``model.generate`` with the active adapter's prompt (see the module docstring).

        Args: input_ids (B, L) (or inputs_embeds (B, L, d)), attention_mask (B, L), and any generation argument.
        Returns what the model's generate returns; sequences are ``[input_ids, new tokens]``.
        """
        kwargs = self._bind(args, kwargs, "generate")
        cfg = self._active_config()
        gen = getattr(self.model, "generate", None)
        if gen is None:
            raise AttributeError(f"{type(self.model).__name__} has no generate() method")
        if cfg is None:
            return gen(**kwargs)
        if self._pop_cache(dict(kwargs)) is not None:
            raise ValueError("generate() with a prompt-learning adapter builds the cache itself (it holds the "
                             "prompt); do not pass `cache` / `past_key_values`")
        for key in ("cache", "past_key_values"):
            kwargs.pop(key, None)
        n = cfg.num_virtual_tokens
        input_ids, inputs_embeds = kwargs.pop("input_ids", None), kwargs.pop("inputs_embeds", None)
        b, length = self._batch_and_len(input_ids, inputs_embeds)
        ref = input_ids if input_ids is not None else inputs_embeds
        mask = kwargs.pop("attention_mask", None)
        self._check_mask(mask, b, length)
        if mask is None:
            mask = torch.ones(b, length, dtype=torch.long, device=ref.device)
        kwargs["attention_mask"] = self._extend_mask(mask, b, n)
        if kwargs.get("position_ids") is not None:
            raise ValueError("generate() with a prompt-learning adapter computes position ids itself; do not pass "
                             "position_ids")
        if kwargs.get("use_cache") is False:
            raise ValueError("generate() with a prompt-learning adapter needs use_cache=True: the prompt is handed to "
                             "the model as its KV cache")
        rows = b * self._expand_size(kwargs)
        return self._generate(gen, cfg, input_ids, inputs_embeds, rows, kwargs)

    def _expand_size(self, kwargs: dict) -> int:
        """How many rows generate() makes of each input row (beams / returned sequences): the cache must match."""
        gc = kwargs.get("generation_config") or getattr(self.model, "generation_config", None)
        beams = kwargs.get("num_beams", getattr(gc, "num_beams", 1)) or 1
        nret = kwargs.get("num_return_sequences", getattr(gc, "num_return_sequences", 1)) or 1
        return max(int(beams), int(nret))

    def _generate(self, gen, cfg, input_ids, inputs_embeds, rows, kwargs):  # pragma: no cover - per family
        raise NotImplementedError


class EmbeddingPromptTuner(PromptLearningTuner):
    """Prompt tuning and P-tuning: prompts prepended to the input embeddings."""

    def _inject_forward(self, cfg, input_ids, inputs_embeds, b, length, kwargs):
        n = cfg.num_virtual_tokens
        if inputs_embeds is None:
            inputs_embeds = self.word_embeddings(input_ids)
        prompts = self._prompt().to(inputs_embeds.dtype)
        inputs_embeds = torch.cat([prompts.unsqueeze(0).expand(b, -1, -1), inputs_embeds], dim=1)
        labels = kwargs.get("labels")
        if labels is not None and labels.dim() == 2:
            kwargs["labels"] = torch.cat([labels.new_full((b, n), -100), labels], dim=1)
        pos = kwargs.get("position_ids")
        if pos is not None:
            virt = torch.arange(n, device=pos.device, dtype=pos.dtype).expand(pos.shape[0], n)
            kwargs["position_ids"] = torch.cat([virt, pos + n], dim=1)
        tt = kwargs.get("token_type_ids")
        if tt is not None:
            kwargs["token_type_ids"] = torch.cat([tt.new_zeros(b, n), tt], dim=1)
        return self.model(inputs_embeds=inputs_embeds, **kwargs)

    def _prompt_cache(self, rows: int, dtype: torch.dtype):
        """KV cache of the n virtual tokens (one forward of the model over P), expanded to ``rows`` rows."""
        prompts = self._prompt().to(dtype).unsqueeze(0)
        kw = {"inputs_embeds": prompts, "use_cache": True}
        out = self.model(**kw)
        cache = getattr(out, "cache", None)
        if cache is None:
            cache = getattr(out, "past_key_values", None)
        if cache is None or not hasattr(cache, "layers"):
            raise ValueError(f"{type(self.model).__name__} returned no transformers Cache; generate() with prompt "
                             "tuning needs a model that supports a KV cache")
        return _repeat_cache(cache, rows, getattr(self.model, "config", None))

    def _generate(self, gen, cfg, input_ids, inputs_embeds, rows, kwargs):
        if inputs_embeds is not None:
            # generate() treats inputs_embeds as the whole sequence: prepend the prompts, no cache
            b = inputs_embeds.shape[0]
            prompts = self._prompt().to(inputs_embeds.dtype).unsqueeze(0).expand(b, -1, -1)
            return gen(inputs_embeds=torch.cat([prompts, inputs_embeds], dim=1), **kwargs)
        with torch.no_grad():
            cache = self._prompt_cache(rows, self.word_embeddings.weight.dtype)
        kwargs[self._cache_kwarg] = cache
        return gen(input_ids=input_ids, **kwargs)


# ---------------------------------------------------------------------------------------------------------------
# virtual-token encoders (the per-method encoders derive from this)
# ---------------------------------------------------------------------------------------------------------------


class VirtualTokenEncoder(nn.Module):
    """Common part: an ``embedding`` table, an optional head, and the direct mode used after loading a file."""

    embedding: nn.Embedding

    def __init__(self) -> None:
        super().__init__()
        self.direct = False

    @property
    def num_tokens(self) -> int:
        return self.embedding.num_embeddings

    def head(self, x: torch.Tensor) -> torch.Tensor:  # overridden by encoders that have one
        return x

    def forward(self, indices: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Encode virtual tokens.

        Args:
            indices: (..., k) long tensor of virtual-token indices, or None for all tokens ``0..n-1``.
        Returns:
            (..., k, out_dim) (``(n, out_dim)`` when ``indices`` is None), in the encoder's parameter dtype.
        """
        if indices is None:
            emb = self.embedding.weight
        else:
            emb = self.embedding(indices)
        if self.direct:
            return emb
        return self.head(emb)

    def output(self) -> torch.Tensor:
        """The full prompt ``P``: (n, out_dim); what PEFT stores as ``prompt_embeddings``."""
        return self.forward(None)

    def load_output(self, prompt: torch.Tensor) -> None:
        """Switch to direct mode holding ``prompt`` (n, out_dim) as the encoder output (drops the head).

        The caller validates the shape first (so a failed load changes nothing); ``prompt`` is copied.
        """
        n, d = self.embedding.num_embeddings, self.out_dim
        if tuple(prompt.shape) != (n, d):
            raise ValueError(f"prompt_embeddings has shape {tuple(prompt.shape)}, expected {(n, d)}")
        weight = self.embedding.weight
        new = nn.Embedding(n, d, device=weight.device, dtype=weight.dtype)
        with torch.no_grad():
            new.weight.copy_(prompt.to(device=weight.device, dtype=weight.dtype))
        new.weight.requires_grad_(weight.requires_grad)
        self.embedding = new
        self._drop_head()
        self.direct = True

    def _drop_head(self) -> None:
        pass

    @property
    def out_dim(self) -> int:
        raise NotImplementedError


def _check_positive(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
