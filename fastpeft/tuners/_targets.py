"""Which modules an adapter config targets (HF PEFT's matching rules), and the check that a model is not wrapped
twice."""

from __future__ import annotations

import re
import sys

import torch.nn as nn

from ..config import PeftConfig, TaskType
from ..utils.other import is_linear_like

__all__ = ["check_target_module_exists", "expand_all_linear", "check_not_wrapped"]


class _Excluded:
    """Marker for a module that matched exclude_modules / modules_to_save (falsy)."""

    def __bool__(self) -> bool:
        return False


def check_target_module_exists(config: PeftConfig, key: str):
    """Whether the module named ``key`` is targeted by ``config`` (True/a match, or a falsy value).

    str target_modules: ``re.fullmatch``; list/set: exact name or ``"." + entry`` suffix.  exclude_modules: the same
    rules.  Modules under a ``modules_to_save`` entry never match.  ``layers_to_transform`` keeps only matches whose
    first numeric path segment (after ``layers_pattern`` when given) is one of the listed layer indices.
    """
    excl = getattr(config, "exclude_modules", None)
    if excl:
        if isinstance(excl, str):
            if re.fullmatch(excl, key):
                return _Excluded()
        elif key in excl or any(key.endswith(f".{e}") for e in excl):
            return _Excluded()
    mts = getattr(config, "modules_to_save", None)
    if mts and any(re.match(rf"(^|.*\.){m}($|\..*)", key) for m in mts):
        return _Excluded()
    tm = getattr(config, "target_modules", None)
    if tm is None:
        return False
    if isinstance(tm, str):
        return re.fullmatch(tm, key)
    if key in tm:
        return True
    found = any(key.endswith(f".{t}") for t in tm)
    idx = getattr(config, "layers_to_transform", None)
    using_idx = idx is not None and (len(idx) != 0 if isinstance(idx, list) else True)
    if not (found and using_idx):
        return found
    pattern = getattr(config, "layers_pattern", None)
    m = None
    if not pattern:
        # the FIRST numbered segment is the layer index (MoE names have more numbers further right)
        m = re.match(r".*?\.[^.]*\.(?P<idx>\d+)\.", key)
    else:
        for p in ([pattern] if isinstance(pattern, str) else pattern):
            m = re.match(rf"(?:^|.*?\.){p}\.(?P<idx>\d+)\.", key)
            if m is not None:
                break
    if m is None:
        return False
    li = int(m.group("idx"))
    return li == idx if isinstance(idx, int) else li in idx


def _is_transformers_pretrained(model: nn.Module) -> bool:
    mod = sys.modules.get("transformers.modeling_utils")
    cls = getattr(mod, "PreTrainedModel", None) if mod is not None else None
    return cls is not None and isinstance(model, cls)


def expand_all_linear(config: PeftConfig, model: nn.Module, adapter_layer_types: tuple) -> None:
    """``target_modules="all-linear"`` -> the set of every Linear/Conv1D name but the output layer (PEFT's rule).

    Modules inside existing adapter layers (``adapter_layer_types``) are left out; the adapter layers are kept."""
    names = set()
    inside_tuner = set()
    for name, module in model.named_modules():
        if isinstance(module, adapter_layer_types):
            names.add(name)
            for sub, _ in module.named_modules():
                if sub:
                    inside_tuner.add(f"{name}.{sub}")
        elif is_linear_like(module):
            names.add(name)
    exclude = set(inside_tuner)
    if _is_transformers_pretrained(model):
        out = model.get_output_embeddings()
        if out is not None:
            exclude.update(n for n, m in model.named_modules() if m is out)
        elif config.task_type == TaskType.SEQ_CLS:
            for head in ("score", "classifier"):
                h = getattr(model, head, None)
                if h is not None:
                    exclude.update(n for n, m in model.named_modules() if m is h)
                    break
    config.target_modules = names - exclude


def _foreign_adapter_layer(module: nn.Module) -> bool:
    """An HF PEFT tuner layer or modules_to_save wrapper (recognised by class name; peft is never imported)."""
    return any(c.__module__.startswith("peft.") and c.__name__ in ("BaseTunerLayer", "AuxiliaryTrainingWrapper",
                                                                   "ModulesToSaveWrapper")
               for c in type(module).__mro__)


def check_not_wrapped(model: nn.Module, own_types: tuple) -> None:
    """ValueError when ``model`` already carries adapter layers (fastpeft's or HF PEFT's): wrapping it again would
    swap the first model's trained layers for new ones.  ``own_types``: fastpeft's layer and wrapper classes."""
    for name, m in model.named_modules():
        if isinstance(m, own_types):
            lib = __name__.partition(".")[0]   # this package's name
        elif _foreign_adapter_layer(m):
            lib = "HF PEFT"
        else:
            continue
        raise ValueError(f"the model already carries {lib} adapter layers (e.g. {name!r}: {type(m).__name__}), so "
                         "it is already wrapped by a PeftModel (an earlier get_peft_model / from_pretrained call). "
                         "To add another adapter use peft_model.add_adapter(name, config) (or load_adapter); to start "
                         "afresh call peft_model.unload() (or merge_and_unload()) and wrap the model it returns. The "
                         "existing PeftModel is unchanged.")
