"""The configuration base class and the registry: ``PeftConfig``, ``PeftType``, ``TaskType``, ``register_config``.

Each method's config lives in its package (``fastpeft.tuners.lora.LoraConfig``, ``fastpeft.tuners.ia3.IA3Config``,
...) and registers itself here when imported; this module imports no method (the registry is filled from above:
``fastpeft.<Name>``, ``fastpeft.tuners``, ``get_peft_model`` and ``PeftModel`` load every method package).

Extension points (for methods implemented outside this file):

* ``register_config(peft_type)`` is a class decorator.  It records the class in ``CONFIG_CLASSES`` (so
  ``PeftConfig.from_pretrained(dir)`` / ``PeftConfig.from_dict(d)`` dispatch on the ``"peft_type"`` key of a file) and
  sets ``cls.PEFT_TYPE``, which ``PeftConfig.__post_init__`` copies into ``self.peft_type``.  A subclass is a plain
  ``@dataclass`` deriving from ``PeftConfig``; if it defines ``__post_init__`` it must call ``super().__post_init__()``
  first.  Validation goes there, raising ``ValueError``/``TypeError`` that name the field and the value.
* ``is_prompt_learning`` (property, False here) tells ``PeftModel`` / ``get_peft_model_state_dict`` that the adapter
  weights are not named after the adapter (HF PEFT's prompt-learning layout).  Override it in a subclass
  (``PromptLearningConfig`` below does).
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
import math
import os
import re
import warnings
from dataclasses import dataclass, field
from typing import Any, Optional, Union

from .hub import resolve_adapter_dir, split_hub_kwargs
from ._peft_compat import CONFIG_BASES, PROMPT_CONFIG_BASES
from .utils.adapter_files import atomic_write_bytes, jsonable, make_adapter_dir, read_json_object
from .utils.constants import CONFIG_NAME, PEFT_FORMAT_VERSION

__all__ = [
    "PeftType", "TaskType", "PeftConfig", "PromptLearningConfig", "register_config", "CONFIG_CLASSES", "CONFIG_NAME",
    "PEFT_FORMAT_VERSION",
]


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
    # fastpeft only: Houlsby/Pfeiffer bottleneck adapters (fastpeft.tuners.bottleneck.BottleneckConfig)
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
        return {f.name: jsonable(getattr(self, f.name)) for f in dataclasses.fields(self)}

    def save_pretrained(self, save_directory: str, **kwargs) -> None:
        """Write ``save_directory/adapter_config.json`` exactly as HF PEFT writes it (sorted keys, indent 2).

        ``auto_mapping_dict`` (kwarg) overrides ``auto_mapping`` in the file, as in PEFT.  The JSON is built in full
        before the file is touched and replaces the old file atomically (a failure leaves the old file as it was).
        """
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
                # The method packages register their configs when imported (the registry is filled from above);
                # every public entry point (fastpeft.<Name>, fastpeft.tuners, get_peft_model, PeftModel) loads them.
                hint = "" if CONFIG_CLASSES else "; no method is registered yet: import fastpeft.tuners first"
                raise ValueError(f"peft_type {pt!r} is not supported by fastpeft (supported: "
                                 f"{sorted(CONFIG_CLASSES)}){hint}")
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
            hub_kwargs, kwargs = split_hub_kwargs(kwargs)
            path = resolve_adapter_dir(str(pretrained_model_name_or_path), subfolder=subfolder,
                                           need_weights=False, **hub_kwargs)
        else:   # a local directory: the Hub's download arguments do not apply
            _, kwargs = split_hub_kwargs(kwargs)
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
    if isinstance(v, (int, float)) and not isinstance(v, bool) and not math.isfinite(v):
        raise ValueError(f"{name} must be finite, got {v}")


def _check_module_names(name: str, v) -> None:
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
# Field checks the method configs share
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


def _check_opt_pos_int(name: str, v, required: bool = False) -> None:
    if v is None:
        if required:
            raise ValueError(f"{name} is required (a positive int), got None")
        return
    if isinstance(v, bool) or not isinstance(v, int):
        raise TypeError(f"{name} must be an int, got {v!r} ({type(v).__name__})")
    if v <= 0:
        raise ValueError(f"{name} must be a positive int, got {v}")


@dataclass
class PromptLearningConfig(PeftConfig, *PROMPT_CONFIG_BASES):
    """Fields shared by prompt tuning, P-tuning and prefix tuning (HF PEFT's ``PromptLearningConfig``).

    Args:
        num_virtual_tokens: number of virtual tokens n (required, > 0).
        token_dim: the model's embedding width (prefix tuning: ``num_kv_heads · head_dim``); filled from the model
            config when None.
        num_transformer_submodules: 1 (2 for encoder-decoder; fastpeft supports decoder-only and encoder models).
        num_attention_heads, num_layers: filled from the model config when None (prefix tuning: KV heads).
        modules_to_save: extra modules trained and saved in full.
    """

    num_virtual_tokens: int = None
    token_dim: int = None
    num_transformer_submodules: Optional[int] = None
    num_attention_heads: Optional[int] = None
    num_layers: Optional[int] = None
    modules_to_save: Optional[list] = None

    def __post_init__(self):
        super().__post_init__()
        _check_opt_pos_int("num_virtual_tokens", self.num_virtual_tokens, required=True)
        for name in ("token_dim", "num_attention_heads", "num_layers"):
            _check_opt_pos_int(name, getattr(self, name))
        if self.num_transformer_submodules not in (None, 1, 2):
            raise ValueError("num_transformer_submodules must be 1, 2 or None, got "
                             f"{self.num_transformer_submodules!r}")
        if self.modules_to_save is not None and (isinstance(self.modules_to_save, str)
                                                 or not all(isinstance(m, str) for m in self.modules_to_save)):
            raise TypeError(f"modules_to_save must be a list of module names, got {self.modules_to_save!r}")

    @property
    def is_prompt_learning(self) -> bool:
        return True
