"""Name -> implementation lookup shared by the ops (``fastpeft.ops.lora``, ``fastpeft.ops.ia3``)."""

from __future__ import annotations

import functools
import importlib
from typing import Callable


class ImplTable:
    """``table(name, backend)`` -> the implementation of op function ``name`` (e.g. ``"lora_fwd"``) on ``backend``.

    ``"torch"`` takes ``<name>_ref`` from ``refs`` (the op module's globals, read at call time); ``"triton"`` /
    ``"cuda"`` take ``<name>_<backend>`` from the module named in ``modules``, imported on first use;
    ``"<backend>:<variant>"`` passes ``variant=`` to that launcher.  Results are cached per (name, backend).
    """

    def __init__(self, refs: dict, modules: dict) -> None:
        self._refs = refs
        self._modules = modules
        self._cache: dict = {}

    def __call__(self, name: str, backend: str) -> Callable:
        key = (name, backend)
        fn = self._cache.get(key)
        if fn is None:
            base, _, variant = backend.partition(":")
            if base == "torch":
                fn = self._refs[f"{name}_ref"]
            else:
                fn = getattr(importlib.import_module(self._modules[base]), f"{name}_{base}")
                if variant:
                    fn = functools.partial(fn, variant=variant)
            self._cache[key] = fn
        return fn
