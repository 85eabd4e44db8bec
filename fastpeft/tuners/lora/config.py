"""``LoraConfig`` (HF PEFT 0.21.2's fields and defaults) and the checks it shares with ``AdaLoraConfig``."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional, Union

from ..._peft_compat import CONFIG_BASES, adopt_field_metadata
from ...config import (PeftConfig, PeftType, _check_module_spec, _check_number, _check_pos_int, _to_set,
                       register_config)
from ...integrations import peft_custom_modules
from .init import check_init_lora_weights

__all__ = ["LoraConfig", "LoraRuntimeConfig"]

# LoRA fields that HF PEFT 0.21.2 has but fastpeft does not implement: (field, value meaning "off")
_LORA_UNSUPPORTED_OFF = {
    "use_qalora": False, "megatron_config": None,
    "eva_config": None, "corda_config": None, "lora_ga_config": None,
    "velora_config": None, "alora_invocation_tokens": None, "monteclora_config": None, "layer_replication": None,
    "use_bdlora": None, "arrow_config": None, "kasa_config": None,
    "ensure_weight_tying": False,
}


def _check_trainable_token_indices(cfg) -> None:
    """``trainable_token_indices``: None, a list of token ids, or {module name: list of ids} (LoRA only)."""
    v = cfg.trainable_token_indices
    if v is None:
        return
    if cfg.peft_type != PeftType.LORA:
        raise ValueError(f"trainable_token_indices={v!r} is not supported by fastpeft for {type(cfg).__name__} "
                         "(only LoraConfig)")
    groups = v.items() if isinstance(v, dict) else [("trainable_token_indices", v)]
    if not isinstance(v, (dict, list, tuple)):
        raise TypeError(f"trainable_token_indices must be a list of token ids or a dict {{module name: ids}}, got "
                        f"{type(v).__name__}")
    for name, ids in groups:
        if not isinstance(name, str):
            raise TypeError(f"trainable_token_indices keys must be module names (str), got {name!r}")
        if not isinstance(ids, (list, tuple)) or not ids or \
                any(isinstance(i, bool) or not isinstance(i, int) for i in ids):
            raise ValueError(f"trainable_token_indices[{name!r}] must be a non-empty list of int token ids, got "
                             f"{ids!r}")


def _check_target_parameters(cfg) -> None:
    """``target_parameters``: None or a list of parameter names ("experts.gate_up_proj"), LoRA only (the parameter
    wrappers of ``fastpeft/tuners/lora/param.py``; what else a wrapper refuses is checked when it is built)."""
    tp = getattr(cfg, "target_parameters", None)
    if tp is None:
        return
    if isinstance(tp, str) or not isinstance(tp, (list, tuple, set, frozenset)) or \
            any(not isinstance(t, str) or not t for t in tp):
        raise TypeError(f"target_parameters must be a list of parameter names (str) or None, got {tp!r}")
    if tp and cfg.peft_type != PeftType.LORA:
        raise ValueError(f"target_parameters={tp!r} is not supported by fastpeft for {type(cfg).__name__} (only "
                         "LoraConfig)")
    # a set of names, as PEFT holds it once injected (its file then lists them in set order; fastpeft's sorted)
    cfg.target_parameters = sorted(set(tp))


def _common_lora_checks(cfg) -> None:
    _check_module_spec("target_modules", cfg.target_modules)
    _check_module_spec("exclude_modules", cfg.exclude_modules)
    _check_module_spec("modules_to_save", cfg.modules_to_save, allow_str=False)
    cfg.target_modules = _to_set(cfg.target_modules)
    cfg.exclude_modules = _to_set(cfg.exclude_modules)
    _check_number("lora_alpha", cfg.lora_alpha)
    _check_number("lora_dropout", cfg.lora_dropout)
    if not 0.0 <= float(cfg.lora_dropout) < 1.0:
        raise ValueError(f"lora_dropout must be in [0, 1), got {cfg.lora_dropout}")
    if cfg.bias not in ("none", "all", "lora_only"):
        raise ValueError(f"bias must be 'none', 'all' or 'lora_only', got {cfg.bias!r}")
    if not isinstance(cfg.fan_in_fan_out, bool):
        raise TypeError(f"fan_in_fan_out must be a bool, got {cfg.fan_in_fan_out!r}")
    if not isinstance(cfg.use_rslora, bool):
        raise TypeError(f"use_rslora must be a bool, got {cfg.use_rslora!r}")
    if cfg.peft_type == PeftType.LORA:  # the variants of fastpeft.tuners.lora.init
        check_init_lora_weights(cfg.init_lora_weights)
    elif cfg.init_lora_weights not in (True, False, "gaussian"):
        raise ValueError(f"init_lora_weights={cfg.init_lora_weights!r} is not supported by fastpeft (supported: "
                         "True, False, 'gaussian')")
    if not isinstance(cfg.use_dora, bool):
        raise TypeError(f"use_dora must be a bool, got {cfg.use_dora!r}")
    if isinstance(cfg.target_modules, str) and cfg.layers_to_transform is not None:
        raise ValueError("layers_to_transform cannot be used when target_modules is a str (regex); got "
                         f"target_modules={cfg.target_modules!r}, layers_to_transform={cfg.layers_to_transform!r}")
    if isinstance(cfg.target_modules, str) and cfg.layers_pattern is not None:
        raise ValueError("layers_pattern cannot be used when target_modules is a str (regex); got "
                         f"target_modules={cfg.target_modules!r}, layers_pattern={cfg.layers_pattern!r}")
    if cfg.layers_pattern and cfg.layers_to_transform is None:
        raise ValueError(f"layers_pattern={cfg.layers_pattern!r} needs layers_to_transform to be set")
    ltt = cfg.layers_to_transform
    if ltt is not None:
        items = [ltt] if isinstance(ltt, int) else ltt
        if not isinstance(items, (list, tuple)) or any(isinstance(i, bool) or not isinstance(i, int) for i in items):
            raise TypeError(f"layers_to_transform must be an int or a list of ints, got {ltt!r}")
    for name in ("rank_pattern", "alpha_pattern"):
        pat = getattr(cfg, name)
        if pat is not None and not isinstance(pat, dict):
            raise TypeError(f"{name} must be a dict, got {type(pat).__name__}")
    for k, v in (cfg.alpha_pattern or {}).items():
        _check_number(f"alpha_pattern[{k!r}]", v)
    for fname, off in _LORA_UNSUPPORTED_OFF.items():
        v = getattr(cfg, fname, off)
        if v != off and not (off is None and v in ({}, [])):
            raise ValueError(f"{fname}={v!r} is not supported by fastpeft (only {fname}={off!r})")
    _check_trainable_token_indices(cfg)
    _check_target_parameters(cfg)
    if cfg.loftq_config:
        raise ValueError(f"loftq_config={cfg.loftq_config!r} is not supported by fastpeft")
    if not isinstance(cfg.lora_bias, bool):
        raise TypeError(f"lora_bias must be a bool, got {cfg.lora_bias!r}")
    if cfg.lora_bias and cfg.init_lora_weights not in (True, False):
        raise ValueError(f"lora_bias=True needs init_lora_weights=True or False, got {cfg.init_lora_weights!r}")
    if cfg.lora_bias and cfg.use_dora:
        raise ValueError("lora_bias=True is not supported for DoRA, please pass use_dora=False")


@dataclass
class LoraRuntimeConfig:
    """Settings that affect how a LoRA model runs but are never saved (HF PEFT's ``LoraRuntimeConfig``).

    Args:
        ephemeral_gpu_offload: PEFT uses it for DoRA initialisation of CPU-offloaded layers; fastpeft accepts and
            stores it (it changes no result).
    """

    ephemeral_gpu_offload: bool = False


@register_config(PeftType.LORA)
@dataclass
class LoraConfig(PeftConfig):
    """LoRA configuration; field names and defaults are HF PEFT 0.21.2's ``LoraConfig``.

    The fields fastpeft implements: ``r``, ``target_modules`` (list: exact name or ``.``-suffix; str: regex
    fullmatch; ``"all-linear"``; None: architecture default), ``exclude_modules``, ``lora_alpha``, ``lora_dropout``,
    ``fan_in_fan_out``, ``bias`` ("none"/"all"/"lora_only"), ``use_rslora``, ``modules_to_save``,
    ``init_lora_weights`` (True, False, "gaussian", "pissa", "pissa_niter_<N>", "olora", "orthogonal";
    ``fastpeft.tuners.lora.init``), ``use_dora`` (``fastpeft.tuners.lora.dora``), ``layers_to_transform``,
    ``layers_pattern``, ``rank_pattern``, ``alpha_pattern``, ``lora_bias`` (a bias on ``lora_B``),
    ``trainable_token_indices`` (list of token ids for the input embedding, or ``{module name: ids}``).
    ``nn.Embedding`` targets get LoRA embeddings and bitsandbytes 4/8-bit linear targets their quantized-base layers
    (``fastpeft.tuners.lora.embedding`` / ``lora.bnb``).  The remaining PEFT fields are accepted so that PEFT files
    load, but must keep their default ("off") value; anything else raises ValueError naming the field (README, "LoRA
    options fastpeft refuses").
    """

    r: int = 8
    target_modules: Optional[Union[list, set, str]] = None
    exclude_modules: Optional[Union[list, set, str]] = None
    lora_alpha: int = 8
    lora_dropout: float = 0.0
    fan_in_fan_out: bool = False
    bias: str = "none"
    use_rslora: bool = False
    modules_to_save: Optional[list] = None
    init_lora_weights: Union[bool, str] = True
    layers_to_transform: Optional[Union[list, int]] = None
    layers_pattern: Optional[Union[list, str]] = None
    rank_pattern: Optional[dict] = field(default_factory=dict)
    alpha_pattern: Optional[dict] = field(default_factory=dict)
    megatron_config: Optional[dict] = None
    megatron_core: Optional[str] = "megatron.core"
    trainable_token_indices: Optional[Union[list, dict]] = None
    loftq_config: Union[dict, Any] = field(default_factory=dict)
    eva_config: Optional[Any] = None
    corda_config: Optional[Any] = None
    lora_ga_config: Optional[Any] = None
    use_dora: bool = False
    velora_config: Optional[Any] = None
    alora_invocation_tokens: Optional[list] = None
    use_qalora: bool = False
    qalora_group_size: int = 16
    monteclora_config: Optional[Any] = None
    layer_replication: Optional[list] = None
    lora_bias: bool = False
    target_parameters: Optional[list] = None
    use_bdlora: Optional[Any] = None
    arrow_config: Optional[Any] = None
    kasa_config: Optional[Any] = None
    ensure_weight_tying: bool = False
    runtime_config: LoraRuntimeConfig = field(default_factory=LoraRuntimeConfig)

    def to_dict(self) -> dict[str, Any]:
        """As ``PeftConfig.to_dict`` without ``runtime_config`` (never saved, as in PEFT)."""
        d = super().to_dict()
        d.pop("runtime_config", None)
        return d

    def __post_init__(self):
        super().__post_init__()
        if isinstance(self.runtime_config, dict):
            self.runtime_config = LoraRuntimeConfig(**self.runtime_config)
        if CONFIG_BASES:  # HF PEFT building a model from this config uses fastpeft's ops (fastpeft.integrations)
            self._custom_modules = peft_custom_modules()
        _check_pos_int("r", self.r)
        for k, v in (self.rank_pattern or {}).items():
            _check_pos_int(f"rank_pattern[{k!r}]", v)
        _common_lora_checks(self)


# HF PEFT building a model from this config reads its field metadata (LoRA-variant tags): the fields carry PEFT's.
adopt_field_metadata(LoraConfig, "LoraConfig")
