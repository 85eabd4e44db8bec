"""Small helpers shared by the tuners: module lookup, transformers' Conv1D detection, pattern matching."""

from __future__ import annotations

import importlib
import re
import sys
from typing import Optional

import torch.nn as nn


def conv1d_class() -> Optional[type]:
    """transformers' ``Conv1D`` class if transformers is importable (imported lazily, never at fastpeft import)."""
    mod = sys.modules.get("transformers.pytorch_utils")
    if mod is None:
        if "transformers" not in sys.modules:
            # A model containing a Conv1D has imported transformers already; nothing to find otherwise.
            return None
        try:
            mod = importlib.import_module("transformers.pytorch_utils")
        except ImportError:
            return None
    return getattr(mod, "Conv1D", None)


def is_conv1d(module: nn.Module) -> bool:
    cls = conv1d_class()
    return cls is not None and isinstance(module, cls)


def is_linear_like(module: nn.Module) -> bool:
    """nn.Linear or transformers' Conv1D (weight (in, out))."""
    return isinstance(module, nn.Linear) or is_conv1d(module)


def linear_weight_oi(module: nn.Module):
    """The base weight as (out_features, in_features): Conv1D stores (in, out), so this is a transposed *view*."""
    w = module.weight
    return w.t() if is_conv1d(module) else w


def in_out_features(module: nn.Module) -> tuple[int, int]:
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features
    if is_conv1d(module):
        k, n = module.weight.shape
        return k, n
    if isinstance(module, nn.modules.conv._ConvNd):
        return module.in_channels, module.out_channels
    raise TypeError(f"unsupported base layer {type(module).__name__}")


def get_submodules(model: nn.Module, key: str) -> tuple[nn.Module, nn.Module, str]:
    """(parent, target, target_name) for a dotted module name."""
    parent = model.get_submodule(".".join(key.split(".")[:-1])) if "." in key else model
    target_name = key.split(".")[-1]
    return parent, model.get_submodule(key), target_name


def pattern_key(pattern_keys, module_name: str) -> Optional[str]:
    """The first key of rank_pattern/alpha_pattern that matches ``module_name`` (PEFT's rule: the key, as a regex, must
    match a dotted suffix of the name: ``re.match(rf"(.*\\.)?({key})$", name)``)."""
    for key in pattern_keys:
        if re.match(rf"(.*\.)?({key})$", module_name):
            return key
    return None


def transpose(w, fan_in_fan_out: bool):
    return w.T if fan_in_fan_out else w
