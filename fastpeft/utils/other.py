"""Helpers shared by the tuners and the model API: module lookup, transformers' Conv1D detection, pattern matching,
and ``ModulesToSaveWrapper`` (the trainable full copies of ``modules_to_save``; HF PEFT keeps it in the same place)."""

from __future__ import annotations

import copy
import importlib
import re
import sys
from typing import Optional, Union

import torch
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


def strip_base_layer(path: str) -> str:
    """A module path without its ``base_layer`` segments: the name the module had before tuner layers wrapped it
    (``"mlp.experts.base_layer"`` -> ``"mlp.experts"``)."""
    return ".".join(p for p in path.split(".") if p != "base_layer")


def pattern_key(pattern_keys, module_name: str) -> Optional[str]:
    """The first key of rank_pattern/alpha_pattern that matches ``module_name`` (PEFT's rule: the key, as a regex, must
    match a dotted suffix of the name: ``re.match(rf"(.*\\.)?({key})$", name)``)."""
    for key in pattern_keys:
        if re.match(rf"(.*\.)?({key})$", module_name):
            return key
    return None


def transpose(w, fan_in_fan_out: bool):
    return w.T if fan_in_fan_out else w


def active_list(names: Union[str, list[str]]) -> list[str]:
    """An adapter name or a list of names, as a list."""
    return [names] if isinstance(names, str) else list(names)


class ModulesToSaveWrapper(nn.Module):
    """Keeps a frozen ``original_module`` and a trainable deep copy per adapter in ``modules_to_save[adapter]``.

    The forward runs the active adapter's copy (the original when adapters are disabled or the active adapter has no
    copy).  Saved keys have the wrapper stripped: ``<path>.weight`` rather than ``<path>.modules_to_save.<a>.weight``.
    """

    def __init__(self, module_to_save: nn.Module, adapter_name: str) -> None:
        super().__init__()
        self.original_module = module_to_save
        self.modules_to_save = nn.ModuleDict({})
        self._active_adapter: list[str] = [adapter_name]
        self._disable_adapters = False
        self._batch_adapter_names: Optional[list[str]] = None  # set only inside BaseTuner.mixed_batch()
        self.update(adapter_name)
        self.original_module.requires_grad_(False)

    @property
    def active_adapter(self) -> str:
        return self._active_adapter[0]

    @property
    def disable_adapters(self) -> bool:
        return self._disable_adapters

    def update(self, adapter_name: str) -> None:
        self.modules_to_save[adapter_name] = copy.deepcopy(self.original_module)
        self.modules_to_save[adapter_name].requires_grad_(True)

    def _current(self) -> nn.Module:
        names = [a for a in self._active_adapter if a in self.modules_to_save]
        if self._disable_adapters or not names:
            return self.original_module
        if len(names) > 1:
            raise ValueError(f"modules_to_save cannot be used with several active adapters at once, got {names}")
        return self.modules_to_save[names[0]]

    def forward(self, *args, **kwargs):
        names = self._batch_adapter_names
        if names is not None and not self._disable_adapters and args:
            return self._mixed_batch_forward(names, *args, **kwargs)
        return self._current()(*args, **kwargs)

    def _mixed_batch_forward(self, names: list[str], x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        """Row i of x goes through ``modules_to_save[names[i]]`` ("__base__" or no copy: the original)."""
        if len(names) != len(x):
            raise ValueError(f"adapter_names has {len(names)} entries but the batch has {len(x)} rows")
        outs = [None] * len(x)
        for name in dict.fromkeys(names):
            idx = [i for i, n in enumerate(names) if n == name]
            mod = self.modules_to_save[name] if name in self.modules_to_save else self.original_module
            y = mod(x[idx], *args, **kwargs)
            for j, i in enumerate(idx):
                outs[i] = y[j]
        return torch.stack(outs)

    def enable_adapters(self, enabled: bool) -> None:
        if enabled:
            self.set_adapter(self._active_adapter)
            self._disable_adapters = False
        else:
            self.modules_to_save.requires_grad_(False)
            self._disable_adapters = True

    def set_adapter(self, adapter_names, inference_mode: bool = False) -> None:
        names = active_list(adapter_names)
        present = [a for a in names if a in self.modules_to_save]
        if len(present) > 1:
            raise ValueError(f"modules_to_save cannot be used with several active adapters at once, got {present}")
        for key, mod in self.modules_to_save.items():
            mod.requires_grad_(key in present and not inference_mode)
        self.original_module.requires_grad_(False)
        self._active_adapter = names

    def delete_adapter(self, adapter_name: str) -> None:
        if adapter_name in self.modules_to_save:
            del self.modules_to_save[adapter_name]
        if adapter_name in self._active_adapter:
            rest = [a for a in self._active_adapter if a != adapter_name] or list(self.modules_to_save.keys())[:1]
            self._active_adapter = rest or self._active_adapter

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name in ("original_module", "modules_to_save"):
                raise
            return getattr(self._current(), name)
