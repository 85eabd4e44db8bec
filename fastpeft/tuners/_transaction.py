"""All-or-nothing model changes: a tuner method that raises leaves the model and the tuner exactly as they were.

``all_or_nothing`` wraps ``BaseTuner``'s model-changing methods (and a subclass's overrides of them); the layers'
``merge``/``unmerge`` call ``current_transaction().backup(base_layer)`` before writing a base weight in place.
"""

from __future__ import annotations

import collections
import functools
import threading
from typing import Optional

import torch
import torch.nn as nn

__all__ = ["all_or_nothing", "current_transaction", "ALL_OR_NOTHING_METHODS"]

_txn_state = threading.local()


def current_transaction() -> Optional["_Transaction"]:
    return getattr(_txn_state, "txn", None)


def _copy_value(v):
    """(object, its contents) for the plain containers a module keeps in its __dict__ (``_modules``, ``_parameters``,
    per-adapter dicts, ``merged_adapters`` ...), so they can be refilled in place; other objects by reference."""
    if type(v) in (dict, collections.OrderedDict):
        return (v, list(v.items()))
    if type(v) in (list, set):
        return (v, list(v))
    return (v, None)


def _restore_value(saved):
    obj, contents = saved
    if contents is None:
        return obj
    if isinstance(obj, dict):
        obj.clear()
        obj.update(contents)
    elif isinstance(obj, list):
        obj[:] = contents
    else:
        obj.clear()
        obj.update(contents)
    return obj


class _Transaction:
    """What a model-changing tuner method may touch, recorded so that a failure can put it back exactly.

    Recorded up front (cheap, no tensor copies): every module's ``__dict__`` one level deep (the module tree,
    parameter/buffer registrations, per-adapter dicts, flags such as ``merged_adapters``/``training``), every
    parameter's ``requires_grad`` and ``.data`` tensor, and the adapter configs' fields.  Tensor *values* are copied
    only for the base layers a merge or unmerge is about to write (``BaseTunerLayer.merge/unmerge`` call
    ``backup``); the copies of CUDA tensors go to CPU memory.
    """

    def __init__(self, root: nn.Module) -> None:
        self.modules: dict[int, tuple[nn.Module, dict]] = {}
        for m in root.modules():
            self.modules[id(m)] = (m, {k: _copy_value(v) for k, v in m.__dict__.items()})
        self.params = [(p, p.requires_grad, p.data) for p in root.parameters()]
        cfgs = root.__dict__.get("peft_config", {})
        self.configs = [(c, dict(c.__dict__)) for c in (cfgs.values() if isinstance(cfgs, dict) else [])]
        self.values: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}

    def backup(self, module: nn.Module) -> None:
        """Copy the values of ``module``'s parameters and buffers before they are written in place."""
        for t in list(module.parameters()) + list(module.buffers()):
            if id(t) not in self.values:
                data = t.data
                copy_ = data.detach().to("cpu", copy=True) if data.device.type != "cpu" else data.detach().clone()
                self.values[id(t)] = (t, data, copy_)

    def rollback(self) -> None:
        for m, saved in self.modules.values():
            d = m.__dict__
            for k in [k for k in d if k not in saved]:
                del d[k]
            for k, v in saved.items():
                d[k] = _restore_value(v)
        with torch.no_grad():
            for p, rg, data in self.params:
                p.data = data
                p.requires_grad_(rg)
            for t, data, copy_ in self.values.values():
                t.data = data
                data.copy_(copy_)
        for c, fields in self.configs:
            c.__dict__.clear()
            c.__dict__.update(fields)


def all_or_nothing(fn):
    """Run a tuner method so that it either completes or leaves the model (and the tuner) exactly as it was."""
    if getattr(fn, "_fastpeft_all_or_nothing", False):
        return fn

    @functools.wraps(fn)
    def wrapper(self, *args, **kwargs):
        if current_transaction() is not None:  # nested call: the outer method owns the transaction
            return fn(self, *args, **kwargs)
        txn = _Transaction(self)
        _txn_state.txn = txn
        try:
            return fn(self, *args, **kwargs)
        except BaseException:
            txn.rollback()
            raise
        finally:
            _txn_state.txn = None

    wrapper._fastpeft_all_or_nothing = True
    return wrapper


# BaseTuner methods (and their overrides in subclasses, wrapped by BaseTuner.__init_subclass__) that change the model
ALL_OR_NOTHING_METHODS = ("inject_adapter", "add_adapter", "delete_adapter", "set_adapter", "merge_adapter",
                           "unmerge_adapter", "merge_and_unload", "unload", "add_weighted_adapter")
