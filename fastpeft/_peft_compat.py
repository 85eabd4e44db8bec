"""Where fastpeft meets an installed HF PEFT: the base classes that make fastpeft objects PEFT objects.

transformers (``trainer_utils._is_peft_model``, ``Trainer._save``), accelerate (``utils.modeling.is_peft_model``) and
TRL (``SFTTrainer``) recognise a PEFT model or config with ``isinstance(obj, peft.PeftModel)`` /
``isinstance(cfg, peft.PeftConfig)``.  When peft is importable, fastpeft's ``PeftModel`` derives from
``peft.PeftModel`` and fastpeft's ``PeftConfig`` from ``peft.PeftConfig``, so those checks see a PEFT model and
take their PEFT code paths (adapter-only checkpoints, ``load_adapter`` on resume, label handling ...).  fastpeft
defines every public method itself (a test checks that none of PEFT's own implementations is reachable on a fastpeft
model), so behaviour is the same with or without peft installed; only ``isinstance`` answers differ.
PEFT's module-level ``get_peft_model_state_dict`` / ``set_peft_model_state_dict`` are routed to fastpeft's own for
fastpeft models (see ``_install_state_dict_routing``).

Without peft (or with ``FASTPEFT_PEFT_INTEROP=0``) the bases are ``torch.nn.Module`` / ``object`` and nothing from
peft is imported.  Importing peft imports transformers, so this module is only imported by the model API (never by
``import fastpeft``).
"""

from __future__ import annotations

import os
import warnings

import torch.nn as nn

__all__ = ["peft", "MODEL_BASES", "CONFIG_BASES", "PROMPT_CONFIG_BASES", "interop_enabled", "peft_layer_classes",
           "register_state_dict_functions", "register_tuner_layer_class"]


def _load_peft():
    if os.environ.get("FASTPEFT_PEFT_INTEROP", "1").strip().lower() in ("0", "false", "no", "off"):
        return None
    try:
        import peft as _peft

        _peft.PeftModel, _peft.PeftConfig  # noqa: B018 - both must exist
        return _peft
    except ImportError:
        return None
    except Exception as e:  # a broken peft install must not break fastpeft
        warnings.warn(f"peft is installed but could not be imported ({type(e).__name__}: {e}); fastpeft models will "
                      "not be recognised as PEFT models by transformers/TRL/accelerate", UserWarning, stacklevel=2)
        return None


peft = _load_peft()

# Bases of fastpeft.PeftModel and fastpeft.PeftConfig.
MODEL_BASES: tuple = (peft.PeftModel,) if peft is not None else (nn.Module,)
CONFIG_BASES: tuple = (peft.PeftConfig,) if peft is not None else ()
# Extra base of fastpeft.PromptLearningConfig (the same six fields, none of PEFT's methods reached before fastpeft's):
# TRL's distillation trainer refuses prompt learning, whose virtual tokens its loss bypasses, by
# isinstance(cfg, peft.PromptLearningConfig).
PROMPT_CONFIG_BASES: tuple = (peft.PromptLearningConfig,) \
    if peft is not None and hasattr(peft, "PromptLearningConfig") else ()


def interop_enabled() -> bool:
    """True when fastpeft models/configs are also ``peft.PeftModel`` / ``peft.PeftConfig`` instances."""
    return peft is not None


def register_tuner_layer_class(cls: type) -> None:
    """Make ``isinstance(layer, peft.tuners.tuners_utils.BaseTunerLayer)`` true for fastpeft's adapter layers (PEFT's
    class is an ABC: a virtual subclass gets none of its code).  TRL asks exactly that to refuse an adapter on
    ``lm_head`` where its losses read ``lm_head.weight`` directly (SFT, GRPO, RLOO, KTO, distillation: the adapter
    would silently never train), and transformers when it freezes loaded adapters.  Does nothing without peft."""
    if peft is None:
        return
    try:
        from peft.tuners.tuners_utils import BaseTunerLayer
    except ImportError:
        return
    if hasattr(BaseTunerLayer, "register"):
        BaseTunerLayer.register(cls)


def adopt_field_metadata(ours: type, peft_name: str) -> None:
    """Give the dataclass fields of fastpeft config class ``ours`` the ``metadata`` of the same-named fields of
    ``peft.<peft_name>`` (HF PEFT reads e.g. the LoRA-variant tags from them when it builds a model from a config).
    Does nothing without peft."""
    if peft is None:
        return
    import dataclasses

    theirs = getattr(peft, peft_name, None)
    if theirs is None or not dataclasses.is_dataclass(theirs):
        return
    meta = {f.name: f.metadata for f in dataclasses.fields(theirs)}
    for f in dataclasses.fields(ours):
        if f.name in meta and not f.metadata:
            f.metadata = meta[f.name]


# HF PEFT's ``get_peft_model_state_dict`` / ``set_peft_model_state_dict`` pick a model's adapter tensors
# structurally: they walk ``named_modules()`` and keep what sits on instances of PEFT's own ``BaseTunerLayer``,
# ``BaseTuner``, ``AuxiliaryTrainingWrapper`` and ``BasePromptEncoder`` classes.  fastpeft's layers are not instances
# of those (deriving from them would put PEFT's layer implementations into fastpeft's layers), so on a fastpeft model
# PEFT's functions returned {} and loaded nothing, silently - and accelerate's FSDP adapter-only checkpoints and TRL's
# teacher sync call exactly those functions (``from peft import ...`` at call time).  The wrappers below route a
# fastpeft model to fastpeft's functions (same keys and tensors, strict loading) and every other model to PEFT's own
# function unchanged.  They are installed on the three public names PEFT exports the functions under.
#
# This module sits below the rest of fastpeft: the model API registers what the routing needs
# (``register_state_dict_functions``, called by ``fastpeft.save_load`` and ``fastpeft.peft_model`` on import).
_FASTPEFT_MODEL_TYPES: list[type] = []
_STATE_DICT_FUNCTIONS: dict = {}


def register_state_dict_functions(model_type: type, get_fn=None, set_fn=None) -> None:
    """Route PEFT's get/set_peft_model_state_dict to ``get_fn``/``set_fn`` for instances of ``model_type``."""
    if model_type not in _FASTPEFT_MODEL_TYPES:
        _FASTPEFT_MODEL_TYPES.append(model_type)
    if get_fn is not None:
        _STATE_DICT_FUNCTIONS["get"] = get_fn
    if set_fn is not None:
        _STATE_DICT_FUNCTIONS["set"] = set_fn


def _is_fastpeft_model(model) -> bool:
    model = getattr(model, "_orig_mod", model)
    return bool(_STATE_DICT_FUNCTIONS) and isinstance(model, tuple(_FASTPEFT_MODEL_TYPES))


def _install_state_dict_routing() -> None:
    if peft is None:
        return
    import functools
    import importlib

    sl = importlib.import_module("peft.utils.save_and_load")
    if getattr(sl.get_peft_model_state_dict, "_fastpeft_routed", False):
        return
    orig_get, orig_set = sl.get_peft_model_state_dict, sl.set_peft_model_state_dict

    @functools.wraps(orig_get)
    def get_peft_model_state_dict(model, *args, **kwargs):
        if _is_fastpeft_model(model):
            return _STATE_DICT_FUNCTIONS["get"](model, *args, **kwargs)
        return orig_get(model, *args, **kwargs)

    @functools.wraps(orig_set)
    def set_peft_model_state_dict(model, *args, **kwargs):
        if _is_fastpeft_model(model):
            return _STATE_DICT_FUNCTIONS["set"](model, *args, **kwargs)
        return orig_set(model, *args, **kwargs)

    get_peft_model_state_dict._fastpeft_routed = set_peft_model_state_dict._fastpeft_routed = True
    for modname in ("peft", "peft.utils", "peft.utils.save_and_load"):
        mod = importlib.import_module(modname)
        if getattr(mod, "get_peft_model_state_dict", None) is orig_get:
            mod.get_peft_model_state_dict = get_peft_model_state_dict
        if getattr(mod, "set_peft_model_state_dict", None) is orig_set:
            mod.set_peft_model_state_dict = set_peft_model_state_dict


try:
    _install_state_dict_routing()
except Exception as _e:  # a PEFT layout we do not know must not break fastpeft; say so instead
    warnings.warn(f"could not route peft.get/set_peft_model_state_dict to fastpeft ({type(_e).__name__}: {_e}); "
                  "PEFT's functions will not see fastpeft adapters", UserWarning, stacklevel=2)


def peft_layer_classes() -> dict[type, str]:
    """HF PEFT layer classes fastpeft can accelerate -> kind ("lora", "adalora", "ia3").  Empty if peft is missing.

    Looked up whether or not PEFT interop is on (``fastpeft.accelerate`` works on PEFT models either way)."""
    classes: dict[type, str] = {}
    try:
        from peft.tuners.lora.layer import Linear as LoraLinear
        classes[LoraLinear] = "lora"
    except ImportError:
        pass
    try:
        from peft.tuners.adalora.layer import SVDLinear
        classes[SVDLinear] = "adalora"
    except ImportError:
        pass
    try:
        from peft.tuners.ia3.layer import Linear as IA3Linear
        classes[IA3Linear] = "ia3"
    except ImportError:
        pass
    return classes
