"""Adapter configurations with Hugging Face PEFT 0.21.2's names, defaults and file format.

Extension points (for methods implemented outside this file, e.g. ``fastpeft.prompt``):

* ``register_config(peft_type)`` is a class decorator.  It records the class in ``CONFIG_CLASSES`` (so
  ``PeftConfig.from_pretrained(dir)`` / ``PeftConfig.from_dict(d)`` dispatch on the ``"peft_type"`` key of a file) and
  sets ``cls.PEFT_TYPE``, which ``PeftConfig.__post_init__`` copies into ``self.peft_type``.  A subclass is a plain
  ``@dataclass`` deriving from ``PeftConfig``; if it defines ``__post_init__`` it must call ``super().__post_init__()``
  first.  Validation goes there, raising ``ValueError``/``TypeError`` that name the field and the value.
* ``is_prompt_learning`` (property, False here) tells ``PeftModel`` / ``get_peft_model_state_dict`` that the adapter
  weights are not named after the adapter (HF PEFT's prompt-learning layout).  Override it in a subclass.
* Keys of a json file that the class does not know (written by a newer PEFT) are dropped with one warning; keys that
  the class knows but whose *value* fastpeft cannot honour are rejected by the class's own validation.

The file written by ``save_pretrained`` is HF PEFT's ``adapter_config.json``: ``json.dumps(to_dict(), indent=2,
sort_keys=True)`` with sets written as (sorted) lists.  ``PeftModel.save_pretrained`` sets ``inference_mode=True`` in
the file, as PEFT does.
"""

from __future__ import annotations

import dataclasses
import enum
import json
import os
import warnings
from dataclasses import dataclass, field
from typing import Any, Optional, Union

from ._peft_compat import CONFIG_BASES

__all__ = [
    "PeftType", "TaskType", "PeftConfig", "LoraConfig", "AdaLoraConfig", "IA3Config", "LoraRuntimeConfig",
    "register_config", "CONFIG_CLASSES", "CONFIG_NAME", "PEFT_FORMAT_VERSION",
]

CONFIG_NAME = "adapter_config.json"
# The HF PEFT release whose file format fastpeft writes; it goes into the file's "peft_version" key so that PEFT sees
# a version it knows.
PEFT_FORMAT_VERSION = "0.21.2"


class PeftType(str, enum.Enum):
    """PEFT method identifiers (the ``"peft_type"`` value in adapter_config.json); the values are HF PEFT's.

    Only LORA, ADALORA, IA3, PROMPT_TUNING, P_TUNING, PREFIX_TUNING, ADAPTION_PROMPT and BOTTLENECK (fastpeft only; PEFT
    has no Houlsby adapter) are implemented; the other values exist so that a file of another method is rejected with a
    clear message rather than an enum error.
    """

    PROMPT_TUNING = "PROMPT_TUNING"
    MULTITASK_PROMPT_TUNING = "MULTITASK_PROMPT_TUNING"
    P_TUNING = "P_TUNING"
    PREFIX_TUNING = "PREFIX_TUNING"
    LORA = "LORA"
    ADALORA = "ADALORA"
    BOFT = "BOFT"
    ADAPTION_PROMPT = "ADAPTION_PROMPT"
    IA3 = "IA3"
    LOHA = "LOHA"
    LOKR = "LOKR"
    OFT = "OFT"
    POLY = "POLY"
    LN_TUNING = "LN_TUNING"
    VERA = "VERA"
    FOURIERFT = "FOURIERFT"
    XLORA = "XLORA"
    HRA = "HRA"
    VBLORA = "VBLORA"
    CPT = "CPT"
    BONE = "BONE"
    MISS = "MISS"
    RANDLORA = "RANDLORA"
    TRAINABLE_TOKENS = "TRAINABLE_TOKENS"
    SHIRA = "SHIRA"
    C3A = "C3A"
    # fastpeft only: Houlsby/Pfeiffer bottleneck adapters (fastpeft.prompt.BottleneckConfig)
    BOTTLENECK = "BOTTLENECK"

    def __str__(self) -> str:  # "LORA", not "PeftType.LORA", in messages
        return self.value


class TaskType(str, enum.Enum):
    """Task types (``"task_type"`` in adapter_config.json), with HF PEFT's values."""

    SEQ_CLS = "SEQ_CLS"
    SEQ_2_SEQ_LM = "SEQ_2_SEQ_LM"
    CAUSAL_LM = "CAUSAL_LM"
    TOKEN_CLS = "TOKEN_CLS"
    QUESTION_ANS = "QUESTION_ANS"
    FEATURE_EXTRACTION = "FEATURE_EXTRACTION"

    def __str__(self) -> str:
        return self.value


# peft_type value -> config class.  Filled by @register_config.
CONFIG_CLASSES: dict[str, type] = {}


def register_config(peft_type: Union[str, PeftType]):
    """Class decorator registering a ``PeftConfig`` subclass for ``peft_type`` (see the module docstring)."""
    key = str(PeftType(peft_type).value) if peft_type in PeftType._value2member_map_ else str(peft_type)

    def deco(cls):
        if not (isinstance(cls, type) and issubclass(cls, PeftConfig)):
            raise TypeError(f"register_config expects a PeftConfig subclass, got {cls!r}")
        cls.PEFT_TYPE = key
        CONFIG_CLASSES[key] = cls
        return cls

    return deco


def _peft_type_value(v) -> Optional[str]:
    if v is None:
        return None
    return v.value if isinstance(v, enum.Enum) else str(v)


def _jsonable(v):
    if isinstance(v, enum.Enum):
        return v.value
    if isinstance(v, (set, frozenset)):
        try:
            return sorted(v)
        except TypeError:
            return list(v)
    if isinstance(v, dict):
        return {k: _jsonable(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    return v


# Keys every adapter_config.json has; a dict without them is not a PEFT config.
_MIN_KEYS = {"peft_type"}


@dataclass
class PeftConfig(*CONFIG_BASES):
    """Base configuration shared by every method (HF PEFT's ``PeftConfig`` fields).

    When HF PEFT is installed this class derives from ``peft.PeftConfig`` (``fastpeft._peft_compat``), so TRL and
    transformers accept fastpeft configs wherever they take a PEFT config; every method below is fastpeft's own.

    Args:
        task_type: a ``TaskType`` (or its string) or None.  ``get_peft_model`` uses it to choose the wrapper and, for
            ``SEQ_CLS``, to add the classification head to ``modules_to_save``.
        peft_type: set by the subclass (from ``register_config``); a value passed in must agree.
        base_model_name_or_path, revision: informational, written to the file.
        inference_mode: if True the adapter is loaded frozen.
        auto_mapping: PEFT's custom-model mapping (stored and written back untouched).
        peft_version: written as the PEFT format version fastpeft is compatible with.
    """

    task_type: Optional[Union[str, TaskType]] = field(default=None)
    peft_type: Optional[Union[str, PeftType]] = field(default=None)
    auto_mapping: Optional[dict] = field(default=None)
    peft_version: Optional[str] = field(default=None)
    base_model_name_or_path: Optional[str] = field(default=None)
    revision: Optional[str] = field(default=None)
    inference_mode: bool = field(default=False)

    PEFT_TYPE = None  # class attribute (not a field), set by register_config

    def __init_subclass__(cls, **kwargs):
        # Every config class gets the shared value checks (_validate_config_values) once its own __post_init__ has
        # run, whatever fields it adds: wrap the subclass's __post_init__ so the outermost call ends with them.
        super().__init_subclass__(**kwargs)
        own = cls.__dict__.get("__post_init__")
        if own is None or getattr(own, "_fastpeft_validated", False):
            return

        def __post_init__(self, _own=own):
            outer = not self.__dict__.get("_in_post_init", False)
            self.__dict__["_in_post_init"] = True
            try:
                _own(self)
            finally:
                if outer:
                    self.__dict__.pop("_in_post_init", None)
            if outer:
                _validate_config_values(self)

        __post_init__._fastpeft_validated = True
        __post_init__.__doc__ = own.__doc__
        cls.__post_init__ = __post_init__

    def __post_init__(self):
        own = type(self).PEFT_TYPE
        given = _peft_type_value(self.peft_type)
        if own is not None:
            if given is not None and given != own:
                raise ValueError(f"peft_type={given!r} does not match {type(self).__name__} (peft_type {own!r})")
            given = own
        self.peft_type = PeftType(given) if given in PeftType._value2member_map_ else given
        if self.task_type is not None:
            tt = _peft_type_value(self.task_type)
            if tt not in TaskType._value2member_map_:
                raise ValueError(f"task_type must be one of {[t.value for t in TaskType]} or None, got {tt!r}")
            self.task_type = TaskType(tt)
        if not isinstance(self.inference_mode, bool):
            raise TypeError(f"inference_mode must be a bool, got {type(self.inference_mode).__name__}")
        if self.peft_version is None:
            self.peft_version = PEFT_FORMAT_VERSION

    # -- properties used by PeftModel --------------------------------------------------------------------------
    @property
    def is_prompt_learning(self) -> bool:
        """True for methods whose weights are not named after the adapter (prompt/prefix/P-tuning)."""
        return False

    @property
    def is_adaption_prompt(self) -> bool:
        return False

    # -- (de)serialisation ---------------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """All fields as plain JSON-able values (enums -> str, sets -> sorted lists)."""
        return {f.name: _jsonable(getattr(self, f.name)) for f in dataclasses.fields(self)}

    def save_pretrained(self, save_directory: str, **kwargs) -> None:
        """Write ``save_directory/adapter_config.json`` exactly as HF PEFT writes it (sorted keys, indent 2).

        ``auto_mapping_dict`` (kwarg) overrides ``auto_mapping`` in the file, as in PEFT.  The JSON is built in full
        before the file is touched and replaces the old file atomically (a failure leaves the old file as it was).
        """
        from .save_load import atomic_write_bytes, make_adapter_dir

        data = self._serialise(**kwargs)
        self._check_save_directory(save_directory)
        make_adapter_dir(save_directory)
        atomic_write_bytes(os.path.join(save_directory, CONFIG_NAME), data)

    def _serialise(self, **kwargs) -> bytes:
        """The bytes of adapter_config.json (see ``save_pretrained`` for the kwargs)."""
        d = self.to_dict()
        auto = kwargs.pop("auto_mapping_dict", None)
        if auto is not None:
            d["auto_mapping"] = auto
        if kwargs:
            raise TypeError(f"save_pretrained got unexpected keyword arguments {sorted(kwargs)}")
        return json.dumps(d, indent=2, sort_keys=True).encode("utf-8")

    @staticmethod
    def _check_save_directory(save_directory) -> None:
        if os.path.isfile(save_directory):
            raise ValueError(f"save_directory must be a directory, but {save_directory!r} is a file")

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "PeftConfig":
        """Build the config class registered for ``d["peft_type"]`` (or ``cls`` if it has none).

        Unknown keys (from a newer PEFT) are dropped with a warning; ``runtime_config`` is dropped silently (PEFT never
        writes it).  Raises ValueError for a peft_type that fastpeft does not implement.
        """
        if not isinstance(d, dict):
            raise TypeError(f"config must be a dict, got {type(d).__name__}")
        d = dict(d)
        d.pop("runtime_config", None)
        pt = _peft_type_value(d.get("peft_type"))
        if pt is not None:
            target = CONFIG_CLASSES.get(pt)
            if target is None:
                _ensure_builtin_registrations()
                target = CONFIG_CLASSES.get(pt)
            if target is None:
                raise ValueError(f"peft_type {pt!r} is not supported by fastpeft (supported: "
                                 f"{sorted(CONFIG_CLASSES)})")
            if not issubclass(target, cls):
                raise ValueError(f"peft_type {pt!r} is a {target.__name__}, not a {cls.__name__}")
        else:
            target = cls
            if cls.PEFT_TYPE is None:
                raise ValueError("the config has no 'peft_type' key; cannot tell which method it describes")
        names = {f.name for f in dataclasses.fields(target) if f.init}
        unknown = sorted(k for k in d if k not in names)
        if unknown:
            warnings.warn(f"Unexpected keys {unknown} for {target.__name__} are ignored (the configuration was "
                          "probably written by a newer PEFT version).", UserWarning, stacklevel=2)
        return target(**{k: v for k, v in d.items() if k in names})

    @classmethod
    def from_json_file(cls, path: str) -> dict[str, Any]:
        """The JSON object in ``path``; a damaged file raises ``fastpeft.save_load.AdapterFileError`` (ValueError)
        naming it."""
        from .save_load import read_json_object

        return read_json_object(path)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str, subfolder: Optional[str] = None,
                        **kwargs) -> "PeftConfig":
        """Load ``adapter_config.json`` from a local directory or a Hub repository id (through huggingface_hub's
        cache; ``HF_HUB_OFFLINE`` honoured).

        Keyword arguments that are config fields override the file's values (e.g. ``inference_mode=False``).
        """
        path = str(pretrained_model_name_or_path)
        if subfolder:
            path = os.path.join(path, subfolder)
        if not os.path.isdir(path) and not os.path.exists(str(pretrained_model_name_or_path)):
            # a Hub id: through huggingface_hub's cache (fastpeft.hub)
            from .hub import resolve_adapter_dir, split_hub_kwargs

            hub, kwargs = split_hub_kwargs(kwargs)
            path = resolve_adapter_dir(str(pretrained_model_name_or_path), subfolder=subfolder, need_weights=False,
                                       **hub)
        else:
            kwargs = {k: v for k, v in kwargs.items() if k not in ("revision", "cache_dir", "token", "force_download",
                                                                    "local_files_only", "proxies")}
        file = os.path.join(path, CONFIG_NAME)
        if not os.path.isfile(file):
            raise ValueError(f"cannot find {CONFIG_NAME!r} in {path!r} (fastpeft loads adapters from local "
                             "directories only)")
        d = cls.from_json_file(file)
        d.update(kwargs)
        try:
            return cls.from_dict(d)
        except (ValueError, TypeError) as e:
            if type(e) not in (ValueError, TypeError):
                raise
            raise type(e)(f"{CONFIG_NAME!r} in directory {path!r}: {e}") from e

    def copy(self) -> "PeftConfig":
        return dataclasses.replace(self)

    @classmethod
    def from_peft_type(cls, **kwargs) -> "PeftConfig":
        """Build the config class registered for ``kwargs["peft_type"]`` (``cls`` when absent) from keyword
        arguments, as HF PEFT's ``PeftConfig.from_peft_type``: keys unknown to the class (written by a newer PEFT)
        are dropped with a warning."""
        return cls.from_dict(kwargs)

    @classmethod
    def check_kwargs(cls, **kwargs) -> dict[str, Any]:
        """Hook checking keyword arguments before a config is built (PEFT's ``check_kwargs``); returns them as they
        are.  Subclasses may override it to reject or rewrite values."""
        return kwargs


def _ensure_builtin_registrations() -> None:
    """Import the modules that register the other methods' configs (prompt methods live in fastpeft.prompt)."""
    try:
        import importlib

        importlib.import_module("fastpeft.prompt")
    except ImportError:  # the prompt methods are optional for loading LoRA-family files
        pass


# ---------------------------------------------------------------------------------------------------------------
# Value checks shared by every config class (run after the class's own __post_init__, see
# PeftConfig.__init_subclass__): finite numbers, module-name lists and regexes, informational strings.  The messages
# are the layer modules' (fastpeft.modules) where both check the same value.
# ---------------------------------------------------------------------------------------------------------------

# numeric fields that must be finite when present (NaN/inf would reach the weights through scaling or merging)
_FINITE_FIELDS = ("lora_alpha", "lora_dropout", "beta1", "beta2", "orth_reg_weight", "reduction_factor",
                  "adapter_dropout", "encoder_dropout")
# fields naming modules: a str is a regex (must compile), a list/set holds non-empty names
_MODULE_NAME_FIELDS = ("target_modules", "exclude_modules", "feedforward_modules", "modules_to_save")


def _check_finite(name: str, v) -> None:
    import math

    if isinstance(v, (int, float)) and not isinstance(v, bool) and not math.isfinite(v):
        raise ValueError(f"{name} must be finite, got {v}")


def _check_module_names(name: str, v) -> None:
    import re

    if isinstance(v, str):
        try:
            re.compile(v)
        except re.error as e:
            raise ValueError(f"{name}={v!r} is not a valid regular expression ({e}); pass a list of module names "
                             "or a valid regex") from e
        return
    if isinstance(v, (list, tuple, set, frozenset)):
        bad = [t for t in v if isinstance(t, str) and not t.strip()]
        if bad:
            raise ValueError(f"{name} entries must be non-empty module names, got {bad[0]!r} in {name}")


def _validate_config_values(cfg) -> None:
    """The checks every config class shares; raises ValueError/TypeError naming the field and the value."""
    for name in ("base_model_name_or_path", "revision"):
        v = getattr(cfg, name, None)
        if v is not None and not isinstance(v, (str, os.PathLike)):
            raise TypeError(f"{name} must be a str or None, got {v!r} ({type(v).__name__})")
    for name in _FINITE_FIELDS:
        _check_finite(name, getattr(cfg, name, None))
    for key, v in (getattr(cfg, "alpha_pattern", None) or {}).items():
        _check_finite(f"alpha_pattern[{key!r}]", v)
    for name in _MODULE_NAME_FIELDS:
        _check_module_names(name, getattr(cfg, name, None))
    lp = getattr(cfg, "layers_pattern", None)
    if lp is not None and not isinstance(lp, str) and not (
            isinstance(lp, (list, tuple)) and all(isinstance(p, str) and p for p in lp)):
        raise TypeError(f"layers_pattern must be a str, a list of str or None, got {lp!r}")


# ---------------------------------------------------------------------------------------------------------------
# LoRA family
# ---------------------------------------------------------------------------------------------------------------


def _to_set(v):
    return set(v) if isinstance(v, (list, tuple)) else v


def _check_module_spec(name: str, v, allow_str=True) -> None:
    if v is None:
        return
    if isinstance(v, str):
        if not allow_str:
            raise TypeError(f"{name} must be a list of module names or None, got a str {v!r}")
        return
    if isinstance(v, (set, frozenset, list, tuple)):
        for t in v:
            if not isinstance(t, str):
                raise TypeError(f"{name} must contain str module names, got {t!r} ({type(t).__name__})")
        return
    raise TypeError(f"{name} must be a str (regex), a list of str or None, got {type(v).__name__}")


def _check_pos_int(name: str, v) -> None:
    if isinstance(v, bool) or not isinstance(v, int):
        raise TypeError(f"{name} must be an int, got {v!r} ({type(v).__name__})")
    if v <= 0:
        raise ValueError(f"{name} must be a positive int, got {v}")


def _check_number(name: str, v) -> None:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise TypeError(f"{name} must be a number, got {v!r} ({type(v).__name__})")


# LoRA fields that HF PEFT 0.21.2 has but fastpeft does not implement: (field, value meaning "off")
_LORA_UNSUPPORTED_OFF = {
    "use_qalora": False, "megatron_config": None,
    "eva_config": None, "corda_config": None, "lora_ga_config": None,
    "velora_config": None, "alora_invocation_tokens": None, "monteclora_config": None, "layer_replication": None,
    "target_parameters": None, "use_bdlora": None, "arrow_config": None, "kasa_config": None,
    "ensure_weight_tying": False,
}


def _check_trainable_token_indices(cfg) -> None:
    """``trainable_token_indices``: None, a list of token ids, or {module name: list of ids} (LoRA only)."""
    v = cfg.trainable_token_indices
    if v is None:
        return
    if isinstance(cfg, AdaLoraConfig):
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
    if cfg.peft_type == PeftType.LORA:  # the variants of fastpeft.tuners.lora_init
        from .tuners.lora_init import check_init_lora_weights

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
    ``fastpeft.tuners.lora_init``), ``use_dora`` (``fastpeft.tuners.lora_dora``), ``layers_to_transform``,
    ``layers_pattern``, ``rank_pattern``, ``alpha_pattern``, ``lora_bias`` (a bias on ``lora_B``),
    ``trainable_token_indices`` (list of token ids for the input embedding, or ``{module name: ids}``).
    ``nn.Embedding`` targets get LoRA embeddings and bitsandbytes 4/8-bit linear targets their quantized-base layers
    (``fastpeft.tuners.lora_embedding`` / ``lora_bnb``).  The remaining PEFT fields are accepted so that PEFT files
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
            from .integrations import peft_custom_modules

            self._custom_modules = peft_custom_modules()
        _check_pos_int("r", self.r)
        for k, v in (self.rank_pattern or {}).items():
            _check_pos_int(f"rank_pattern[{k!r}]", v)
        _common_lora_checks(self)


@register_config(PeftType.ADALORA)
@dataclass
class AdaLoraConfig(LoraConfig):
    """AdaLoRA configuration (HF PEFT's ``AdaLoraConfig``): every ``LoraConfig`` field plus the rank budget schedule.

    ``init_r`` is the initial rank of every adapted matrix (``r`` is ignored), ``target_r`` the average final rank,
    ``tinit``/``tfinal`` the warm-up / final fine-tuning steps, ``deltaT`` the masking interval, ``beta1``/``beta2``
    the EMA factors of importance/uncertainty, ``orth_reg_weight`` the weight of the orthogonal regularisation,
    ``total_step`` (required, > 0) the number of training steps.  ``rank_pattern`` (None by default) is filled by the
    rank allocator: ``{module_name: [bool] * init_r}``.
    """

    target_r: int = 8
    init_r: int = 12
    tinit: int = 0
    tfinal: int = 0
    deltaT: int = 1
    beta1: float = 0.85
    beta2: float = 0.85
    orth_reg_weight: float = 0.5
    total_step: Optional[int] = None
    rank_pattern: Optional[dict] = None

    def __post_init__(self):
        PeftConfig.__post_init__(self)
        _check_pos_int("init_r", self.init_r)
        _check_pos_int("target_r", self.target_r)
        _check_pos_int("deltaT", self.deltaT)
        if self.r != 8:
            warnings.warn("r is not used by AdaLoRA and is ignored; set init_r for the initial rank", UserWarning,
                          stacklevel=3)
        if self.use_dora:
            raise ValueError("use_dora=True is not supported by AdaLoRA")
        if self.total_step is None or isinstance(self.total_step, bool) or not isinstance(self.total_step, int) \
                or self.total_step <= 0:
            raise ValueError(f"AdaLoRA needs total_step > 0 (an int), got total_step={self.total_step!r}")
        for name in ("tinit", "tfinal"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise ValueError(f"{name} must be a non-negative int, got {v!r}")
        if self.tinit >= self.total_step - self.tfinal:
            raise ValueError(f"tinit={self.tinit} must be < total_step - tfinal = {self.total_step - self.tfinal}: "
                             "the schedule leaves no budgeting phase")
        for name in ("beta1", "beta2"):
            v = getattr(self, name)
            _check_number(name, v)
            if not 0.0 <= v <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {v}")
        _check_number("orth_reg_weight", self.orth_reg_weight)
        if self.orth_reg_weight < 0:
            raise ValueError(f"orth_reg_weight must be >= 0, got {self.orth_reg_weight}")
        if self.rank_pattern is not None:
            if not isinstance(self.rank_pattern, dict):
                raise TypeError(f"rank_pattern must be a dict or None, got {type(self.rank_pattern).__name__}")
            for k, v in self.rank_pattern.items():
                if not isinstance(v, (list, tuple)) or not all(isinstance(b, (bool, int)) for b in v):
                    raise TypeError(f"AdaLoRA rank_pattern[{k!r}] must be a list of bools, got {v!r}")
        _common_lora_checks(self)


@register_config(PeftType.IA3)
@dataclass
class IA3Config(PeftConfig):
    """(IA)³ configuration (HF PEFT's ``IA3Config``).

    ``target_modules`` / ``exclude_modules`` match as in LoRA.  ``feedforward_modules`` are the targets whose *input*
    is scaled (str: regex fullmatch; list: ``name.endswith(entry)``, PEFT's rule); they must be a subset of
    ``target_modules`` when both are lists.  ``init_ia3_weights=True`` initialises the vectors to ones.
    """

    target_modules: Optional[Union[list, set, str]] = None
    exclude_modules: Optional[Union[list, set, str]] = None
    feedforward_modules: Optional[Union[list, set, str]] = None
    fan_in_fan_out: bool = False
    modules_to_save: Optional[list] = None
    init_ia3_weights: bool = True

    def __post_init__(self):
        super().__post_init__()
        _check_module_spec("target_modules", self.target_modules)
        _check_module_spec("exclude_modules", self.exclude_modules)
        _check_module_spec("feedforward_modules", self.feedforward_modules)
        _check_module_spec("modules_to_save", self.modules_to_save, allow_str=False)
        self.target_modules = _to_set(self.target_modules)
        self.exclude_modules = _to_set(self.exclude_modules)
        self.feedforward_modules = _to_set(self.feedforward_modules)
        if isinstance(self.feedforward_modules, set) and isinstance(self.target_modules, set):
            extra = self.feedforward_modules - self.target_modules
            if extra:
                raise ValueError(f"feedforward_modules must be a subset of target_modules; {sorted(extra)} are not "
                                 f"in target_modules={sorted(self.target_modules)}")
        if not isinstance(self.fan_in_fan_out, bool):
            raise TypeError(f"fan_in_fan_out must be a bool, got {self.fan_in_fan_out!r}")
        if not isinstance(self.init_ia3_weights, bool):
            raise TypeError(f"init_ia3_weights must be a bool, got {self.init_ia3_weights!r}")


def _adopt_peft_metadata() -> None:
    # When HF PEFT builds a model from a fastpeft config (TRL's SFTTrainer(peft_config=...)), it reads tags from the
    # config's field metadata; the fields carry PEFT's.
    from ._peft_compat import adopt_field_metadata

    for cls in (LoraConfig, AdaLoraConfig, IA3Config):
        adopt_field_metadata(cls, cls.__name__)


_adopt_peft_metadata()
