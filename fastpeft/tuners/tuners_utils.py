"""The tuner machinery behind ``get_peft_model``: ``BaseTuner``, ``BaseTunerLayer`` and the tuner registry.

The jobs around them live next door: target matching in ``_targets``, the all-or-nothing transactions in
``_transaction``, the state-dict contract in ``_state_dict``, ``ModulesToSaveWrapper`` in ``fastpeft.utils.other``.

Layout (HF PEFT's, so parameter names and saved keys are identical)::

    PeftModel
      .base_model  = <Tuner>(BaseTuner)         # one per PeftModel; registered in TUNER_CLASSES by peft_type
          .model   = the user's model            # modified in place: targets swapped for tuner layers
              ...q_proj = lora.Linear(BaseTunerLayer)
                    .base_layer = the original nn.Linear / Conv1D (same object, frozen)
                    .lora_A = ModuleDict{adapter_name: nn.Linear}   # per-adapter containers

so a parameter is ``base_model.model.<path>.lora_A.<adapter>.weight`` and is saved as
``base_model.model.<path>.lora_A.weight``.

Extension points (every method package under ``fastpeft.tuners`` uses them; nothing here needs editing to add a
method):

* ``@register_tuner(peft_type)`` on a ``BaseTuner`` subclass puts it in ``TUNER_CLASSES``; ``PeftModel`` builds
  ``TUNER_CLASSES[config.peft_type](model, config, adapter_name, autocast_adapter_dtype=...)`` and never looks at the
  method otherwise.  Register the config class with ``fastpeft.config.register_config`` under the same peft_type.
* ``BaseTuner.__init__`` calls ``self.inject_adapter(adapter_name, config, ...)``.  The default implementation does
  PEFT's target matching and calls the per-method hooks ``_create_and_replace(config, adapter_name, target,
  target_name, parent, current_key)`` and ``_is_supported_target(module)``; a method that does not swap modules
  (prompt tuning, ...) overrides ``inject_adapter`` itself and must record the config in ``self.peft_config``.
  ``_prepare_adapter_config(config)`` fills architecture defaults (``target_module_defaults`` table).
* ``forward(*args, **kwargs)`` / ``generate(*args, **kwargs)`` receive exactly what the user passed to
  ``PeftModel.forward`` / ``PeftModel.generate`` (input_ids, attention_mask, labels, inputs_embeds, ...); the defaults
  call ``self.model``.  Prompt methods override them to prepend prompts; AdaLoRA adds its regulariser.
* State dict contract, used by save/load: see ``fastpeft.tuners._state_dict``.
* ``_mark_only_adapters_as_trainable()`` freezes every parameter except adapter ones (``prefix`` in the name) and
  the biases selected by ``config.bias``; ``set_adapter`` then gives ``requires_grad`` to the active adapters only.
* ``_remove_adapter(adapter_name, unwrap_empty=True)`` undoes an injection (used to roll back a failed load).
* All or nothing: ``inject_adapter``, ``add_adapter``, ``delete_adapter``, ``set_adapter``, ``merge_adapter``,
  ``unmerge_adapter``, ``merge_and_unload`` and ``unload`` (and a subclass's overrides of them, wrapped by
  ``__init_subclass__``) run inside a transaction (``_transaction``): if they raise (KeyboardInterrupt included) the
  module tree, every module attribute, ``requires_grad`` flag, adapter config and merged base weight is put back
  exactly.  A layer
  type with its own merge arithmetic can implement ``_check_merge_finite`` so that ``safe_merge`` checks it before
  any layer is written; otherwise its merge is checked as it runs and rolled back.
* A model that already carries adapter layers (fastpeft's or HF PEFT's) cannot be wrapped again (ValueError
  pointing to ``add_adapter`` / ``unload()``).
* A layer's forward calls the fused op (``fastpeft.functional``) only when ``_fused_reason(x, args, kwargs)`` is
  None (``fastpeft.utils.fused``, checked in every call); otherwise it runs HF PEFT's unfused sequence, which calls
  ``base_layer`` (and so its hooks).  Layer types without a fused path set ``_fused_capable = False``.
"""

from __future__ import annotations

import math
import warnings
from contextlib import contextmanager
from typing import Any, Iterable, Optional, Union

import torch
import torch.nn as nn

from .._peft_compat import register_tuner_layer_class
from ..config import PeftConfig, PeftType
from ..recompute import install as recompute_install
from ..recompute import register_adapter_layer_type
from ..utils.fused import base_layer_reason, fused_base_operands
from ..utils.other import (ModulesToSaveWrapper, active_list, get_submodules, is_conv1d, is_linear_like,
                           strip_base_layer)
from ._state_dict import AdapterStateDictMixin
from ._targets import check_not_wrapped, check_target_module_exists, expand_all_linear
from ._transaction import ALL_OR_NOTHING_METHODS, all_or_nothing, current_transaction

__all__ = [
    "BaseTuner", "BaseTunerLayer", "ModulesToSaveWrapper", "register_tuner", "TUNER_CLASSES",
    "check_target_module_exists", "union_module_specs",
]

# peft_type value -> BaseTuner subclass.  Filled by @register_tuner.
TUNER_CLASSES: dict[str, type] = {}


def register_tuner(peft_type: Union[str, PeftType]):
    """Class decorator registering a ``BaseTuner`` subclass for ``peft_type`` (see the module docstring)."""
    key = peft_type.value if isinstance(peft_type, PeftType) else str(peft_type)

    def deco(cls):
        if not (isinstance(cls, type) and issubclass(cls, BaseTuner)):
            raise TypeError(f"register_tuner expects a BaseTuner subclass, got {cls!r}")
        cls.peft_type = key
        TUNER_CLASSES[key] = cls
        return cls

    return deco


# ---------------------------------------------------------------------------------------------------------------
# layers
# ---------------------------------------------------------------------------------------------------------------


def union_module_specs(specs: list, field: str):
    """The union of several adapters' module specs (``target_modules``, ``feedforward_modules``): sets -> their union,
    regex strings -> ``"(a)|(b)"`` (HF PEFT's rule for combined adapters).  A mix of the two raises ValueError."""
    kinds = {type(v) for v in specs}
    if len(kinds) > 1:
        raise ValueError(f"all adapter configs should follow the same {field} type. Combining adapters with {field} "
                         "of type list/set and string is not supported.")
    if isinstance(specs[0], str):
        return "|".join(f"({v})" for v in specs)
    if not isinstance(specs[0], (set, frozenset, list, tuple)):
        raise TypeError(f"Invalid type {type(specs[0])} found in {field}")
    return set().union(*(set(v) for v in specs))


class BaseTunerLayer(nn.Module):
    """A wrapper that holds the original layer as ``base_layer`` and per-adapter weights in name-keyed containers.

    Subclasses set ``adapter_layer_names`` (attributes that are ``nn.ModuleDict``/``nn.ParameterDict`` of trainable
    per-adapter weights, saved) and ``other_param_names`` (attributes that are plain per-adapter dicts or
    ParameterDicts that are not saved, e.g. ``scaling``, ``r``, ``ranknum``), and implement ``_merge_one(name,
    safe_merge)`` / ``_unmerge_one(name)`` and ``forward``.
    """

    adapter_layer_names: tuple[str, ...] = ()
    other_param_names: tuple[str, ...] = ()
    # False for layer types whose forward is never "base layer + one fused op" (quantized bases, embeddings, tokens)
    _fused_capable: bool = True

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__()
        self.base_layer = base_layer
        self._active_adapter: list[str] = []
        self._disable_adapters = False
        self.merged_adapters: list[str] = []
        # per-row adapter names of the current batch; set only inside BaseTuner.mixed_batch() (layers that support
        # mixed batches read it in forward)
        self._batch_adapter_names: Optional[list[str]] = None

    # -- the fused path -----------------------------------------------------------------------------------------------
    @property
    def _fusable(self) -> bool:
        """True when a fused op may stand in for the base layer's forward right now (``fastpeft.utils.fused``)."""
        return self._fused_capable and base_layer_reason(self.base_layer) is None

    def _fused_reason(self, x: Any, args: tuple, kwargs: dict) -> Optional[str]:
        """Why this call cannot go through the fused op (None when it can)."""
        ops = self._fused_base(x, args, kwargs)
        return ops if isinstance(ops, str) else None

    def _fused_base(self, x: Any, args: tuple, kwargs: dict) -> Union[tuple, str]:
        """``(weight (N, K), bias)`` for the fused op when this call can go through it, else why not (a str).
        Evaluated in every forward, so hooks added to the base layer after injection (accelerate offloading) and
        DTensor weights are seen."""
        if not self._fused_capable:
            return f"{type(self).__name__} has no fused path"
        return fused_base_operands(self.base_layer, x, args, kwargs)

    # -- base layer passthroughs ---------------------------------------------------------------------------------
    def get_base_layer(self) -> nn.Module:
        return self.base_layer

    @property
    def weight(self) -> torch.Tensor:
        return self.base_layer.weight

    @property
    def bias(self) -> Optional[torch.Tensor]:
        return self.base_layer.bias

    # -- adapter state -------------------------------------------------------------------------------------------
    @property
    def merged(self) -> bool:
        return bool(self.merged_adapters)

    @property
    def disable_adapters(self) -> bool:
        return self._disable_adapters

    @property
    def active_adapters(self) -> list[str]:
        return list(self._active_adapter)

    @property
    def active_adapter(self) -> Union[str, list[str]]:
        return self._active_adapter[0] if len(self._active_adapter) == 1 else list(self._active_adapter)

    def adapter_names(self) -> list[str]:
        names: list[str] = []
        for attr in self.adapter_layer_names:
            for k in getattr(self, attr).keys():
                if k not in names:
                    names.append(k)
        return names

    def _base_only(self) -> bool:
        """True when the forward is just the base layer: adapters disabled (a merged adapter is unmerged first, as
        PEFT does) or merged into the base weight."""
        if self._disable_adapters and self.merged:
            self.unmerge()
        return self._disable_adapters or self.merged

    def _present_active(self) -> list[str]:
        """Active adapters that this layer actually holds (another adapter may target other modules)."""
        # every adapter has an entry in the first container, so one membership test per active adapter suffices
        # (this runs in every forward)
        first = getattr(self, self.adapter_layer_names[0]) if self.adapter_layer_names else {}
        return [a for a in self._active_adapter if a in first]

    def enable_adapters(self, enabled: bool) -> None:
        """Enable (the active adapters become trainable) or disable (all adapter weights frozen) this layer."""
        if enabled:
            self.set_adapter(self._active_adapter)
            self._disable_adapters = False
        else:
            for attr in self.adapter_layer_names:
                for p in getattr(self, attr).parameters():
                    p.requires_grad_(False)
            self._disable_adapters = True

    def set_adapter(self, adapter_names: Union[str, list[str]], inference_mode: bool = False) -> None:
        """Make ``adapter_names`` active: they require grad (unless inference_mode), the other adapters do not."""
        names = active_list(adapter_names)
        for attr in self.adapter_layer_names:
            container = getattr(self, attr)
            for key, item in container.items():  # item: an nn.Parameter or an nn.Module
                item.requires_grad_(key in names and not inference_mode)
        self._active_adapter = names

    def delete_adapter(self, adapter_name: str) -> None:
        for attr in self.adapter_layer_names + self.other_param_names:
            container = getattr(self, attr, None)
            if container is not None and adapter_name in container:
                del container[adapter_name]
        if adapter_name in self._active_adapter:
            rest = [a for a in self._active_adapter if a != adapter_name]
            if not rest:
                remaining = self.adapter_names()
                rest = remaining[:1]
            self._active_adapter = rest

    # -- merging -------------------------------------------------------------------------------------------------
    def _adapters_to_merge(self, adapter_names: Optional[list[str]]) -> list[str]:
        names = self._present_active() if adapter_names is None else active_list(adapter_names)
        already = [a for a in names if a in self.merged_adapters]
        if already:
            raise ValueError(f"adapter(s) {already} are already merged into this layer; call unmerge() before merging "
                             "again")
        unknown = [a for a in names if a not in self.adapter_names()]
        if unknown:
            raise ValueError(f"adapter(s) {unknown} do not exist in this layer (it has {self.adapter_names()})")
        return names

    def merge(self, safe_merge: bool = False, adapter_names: Optional[list[str]] = None) -> None:
        """Add the active (or the given) adapters' weight delta to the base weight, in place.

        Raises ValueError if one of them is already merged.  ``safe_merge=True`` checks the merged weight for
        NaN/inf before writing it (ValueError, weights untouched).
        """
        names = self._adapters_to_merge(adapter_names)
        txn = current_transaction()
        if txn is not None and names:
            txn.backup(self.base_layer)
        for name in names:
            self._merge_one(name, safe_merge)
            self.merged_adapters.append(name)

    def _check_merge_finite(self, adapter_names: list[str]) -> None:
        """Raise ValueError if merging ``adapter_names`` (in order) would write a NaN/inf; writes nothing.

        Hook for ``safe_merge`` (the tuner checks every layer before merging any).  Layer types that do not
        implement it are checked by their merge itself, and a failure there is rolled back."""

    def unmerge(self) -> None:
        """Undo the merges, last merged first.  Does nothing (with a warning) when nothing is merged."""
        if not self.merged:
            warnings.warn("Already unmerged. Nothing to do.", UserWarning, stacklevel=2)
            return
        txn = current_transaction()
        if txn is not None:
            txn.backup(self.base_layer)
        while self.merged_adapters:
            self._unmerge_one(self.merged_adapters[-1])
            self.merged_adapters.pop()

    def _merge_one(self, adapter_name: str, safe_merge: bool) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    def _unmerge_one(self, adapter_name: str) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    @staticmethod
    def _write_base_weight(weight: nn.Parameter, new: torch.Tensor, safe_merge: bool, adapter_name: str) -> None:
        if safe_merge and not torch.isfinite(new).all():
            raise ValueError(f"NaNs or infs detected in the merged weights; adapter {adapter_name!r} seems to be "
                             "broken (the weights were not modified)")
        with torch.no_grad():
            weight.data.copy_(new.to(weight.dtype))

    def _cast_input_dtype(self, x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        return x if x.dtype == dtype else x.to(dtype)


register_adapter_layer_type(BaseTunerLayer)  # fastpeft.recompute hooks every tuner layer's forward


register_tuner_layer_class(BaseTunerLayer)   # TRL's and transformers' isinstance checks (``_peft_compat``)


# ---------------------------------------------------------------------------------------------------------------
# the tuner
# ---------------------------------------------------------------------------------------------------------------


class BaseTuner(AdapterStateDictMixin, nn.Module):
    """Owns the user model (``self.model``) and the adapters injected into it.  See the module docstring.

    Class attributes for subclasses:
        prefix: substring of every adapter parameter name (``"lora_"``, ``"ia3_"``); used to decide trainability.
        layer_cls: the ``BaseTunerLayer`` subclass(es) this tuner injects.
        target_module_defaults: ``{model_type: [module names]}`` used when ``config.target_modules`` is None.
    """

    prefix: str = ""
    layer_cls: Union[type, tuple] = BaseTunerLayer

    def __init_subclass__(cls, **kwargs):
        # a subclass's override of a model-changing method is all-or-nothing too (see all_or_nothing)
        super().__init_subclass__(**kwargs)
        for name in ALL_OR_NOTHING_METHODS:
            fn = cls.__dict__.get(name)
            if callable(fn):
                setattr(cls, name, all_or_nothing(fn))
    target_module_defaults: dict[str, list[str]] = {}
    peft_type: Optional[str] = None

    def __init__(self, model: nn.Module, peft_config: Union[PeftConfig, dict[str, PeftConfig]],
                 adapter_name: str = "default", autocast_adapter_dtype: bool = True) -> None:
        check_not_wrapped(model, (BaseTunerLayer, ModulesToSaveWrapper))
        super().__init__()
        self.model = model
        self.peft_config: dict[str, PeftConfig] = {}
        self.active_adapter: Union[str, list[str]] = adapter_name
        self.targeted_module_names: list[str] = []
        self.targeted_parameter_names: list[str] = []  # LoRA's target_parameters ("...experts.gate_up_proj")
        if isinstance(peft_config, dict):
            if len(peft_config) != 1:
                raise ValueError("BaseTuner takes one adapter config (add more with add_adapter)")
            (adapter_name, peft_config), = peft_config.items()
            self.active_adapter = adapter_name
        self.inject_adapter(adapter_name, peft_config, autocast_adapter_dtype=autocast_adapter_dtype)
        recompute_install(model)  # adapters' saved inputs rebuilt in backward (fastpeft.recompute)

    # -- attribute forwarding / forward -------------------------------------------------------------------------
    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "model":  # not initialised yet; avoid infinite recursion
                raise
            return getattr(self.model, name)

    def forward(self, *args, **kwargs):
        """Run the wrapped model with everything the caller passed (overridable, e.g. prompt methods)."""
        return self.model(*args, **kwargs)

    def generate(self, *args, **kwargs):
        """Forward to the wrapped model's ``generate`` (HF models); overridable."""
        gen = getattr(self.model, "generate", None)
        if gen is None:
            raise AttributeError(f"{type(self.model).__name__} has no generate() method")
        return gen(*args, **kwargs)

    # -- mixed batches --------------------------------------------------------------------------------------------
    supports_mixed_batch: bool = False

    @contextmanager
    def mixed_batch(self, adapter_names: list[str], num_beams: int = 1):
        """Context in which row i of the batch uses adapter ``adapter_names[i]`` ("__base__": no adapter).

        Inference only (ValueError in training mode, for unknown names, or when an adapter is merged).  With beam
        search each name is repeated ``num_beams`` times, as in PEFT.  Tuners that support it set
        ``supports_mixed_batch = True`` and read ``layer._batch_adapter_names`` in their layers' forward.
        """
        if not self.supports_mixed_batch:
            raise ValueError(f"{type(self).__name__} does not support adapter_names (mixed-batch inference)")
        if not isinstance(adapter_names, (list, tuple)) or not all(isinstance(a, str) for a in adapter_names):
            raise TypeError(f"adapter_names must be a list of str, got {adapter_names!r}")
        if self.training:
            raise ValueError("adapter_names (mixed-batch inference) cannot be used in training mode; call .eval()")
        unknown = sorted(set(adapter_names) - set(self.peft_config) - {"__base__"})
        if unknown:
            raise ValueError(f"adapter_names contains unknown adapters {unknown}; available: "
                             f"{sorted(self.peft_config)} and '__base__'")
        if any(layer.merged for _, layer in self.tuner_layers()):
            raise ValueError("adapter_names cannot be used while an adapter is merged; unmerge first")
        if isinstance(num_beams, bool) or not isinstance(num_beams, int) or num_beams < 1:
            raise ValueError(f"num_beams must be a positive int, got {num_beams!r}")
        names = [a for a in adapter_names for _ in range(num_beams)]
        mods = [m for _, m in self.tuner_layers()] + [w for _, w in self._wrappers()]
        for m in mods:
            m._batch_adapter_names = names
        try:
            yield
        finally:
            for m in mods:
                m._batch_adapter_names = None

    # -- adapters ------------------------------------------------------------------------------------------------
    @property
    def active_adapters(self) -> list[str]:
        return active_list(self.active_adapter)

    def tuner_layers(self) -> Iterable[tuple[str, BaseTunerLayer]]:
        """(name relative to self.model, layer) for every tuner layer."""
        for name, module in self.model.named_modules():
            if isinstance(module, BaseTunerLayer):
                yield name, module

    def _wrappers(self) -> Iterable[tuple[str, ModulesToSaveWrapper]]:
        for name, module in self.model.named_modules():
            if isinstance(module, ModulesToSaveWrapper):
                yield name, module

    def _check_new_adapter(self, adapter_name: str, config: PeftConfig) -> None:
        """Refuse a bad or taken ``adapter_name`` and a ``config`` of another peft_type than the adapters present
        (before anything is changed)."""
        self._check_adapter_name(adapter_name)
        if adapter_name in self.peft_config:
            raise ValueError(f"an adapter named {adapter_name!r} already exists; delete it first or choose another "
                             "name")
        if self.peft_config:
            first = next(iter(self.peft_config.values()))
            if str(first.peft_type) != str(config.peft_type):
                raise ValueError(f"cannot add a {config.peft_type} adapter to a {first.peft_type} model; all "
                                 "adapters of a PeftModel must have the same peft_type")

    @staticmethod
    def _check_adapter_name(adapter_name: str) -> None:
        if not isinstance(adapter_name, str) or not adapter_name.strip():
            raise ValueError(f"adapter_name must be a non-empty str, got {adapter_name!r}")
        if any(sep in adapter_name for sep in ("/", "\\", "\0")) or ".." in adapter_name:
            # save_pretrained writes a non-default adapter to <directory>/<adapter_name>
            raise ValueError(f"adapter_name must not contain path separators ('/', '\\') or '..', got "
                             f"{adapter_name!r} (save_pretrained uses it as a directory name)")
        if "." in adapter_name:
            raise ValueError(f"adapter_name must not contain '.', got {adapter_name!r}")
        if hasattr(nn.ModuleDict(), adapter_name) or hasattr(nn.ParameterDict(), adapter_name):
            # per-adapter weights live in ModuleDict/ParameterDict keyed by the name, which refuse attribute names
            raise ValueError(f"adapter_name {adapter_name!r} clashes with an nn.Module attribute; choose another name")

    def _prepare_adapter_config(self, config: PeftConfig) -> PeftConfig:
        """Fill ``target_modules`` from ``target_module_defaults`` when it is None (per model_type)."""
        if hasattr(config, "target_modules") and config.target_modules is None:
            model_type = getattr(getattr(self.model, "config", None), "model_type", None)
            default = self.target_module_defaults.get(model_type)
            if default is None and getattr(config, "target_parameters", None):
                config.target_modules = set()  # parameters only (PEFT's config then says [] too)
                return config
            if default is None:
                raise ValueError(f"target_modules is None and fastpeft has no default for model_type={model_type!r} "
                                 f"(defaults exist for {sorted(self.target_module_defaults)}); please specify "
                                 "target_modules")
            config.target_modules = default if isinstance(default, str) else set(default)  # a str: a regex
        return config

    def _check_new_adapter_config(self, config: PeftConfig) -> None:
        """Only one adapter may train biases (PEFT's rule)."""
        if getattr(config, "bias", "none") != "none":
            others = [n for n, c in self.peft_config.items() if getattr(c, "bias", "none") != "none"]
            if others:
                raise ValueError(f"only one adapter can have bias != 'none'; adapter(s) {others} already do")

    def _is_supported_target(self, module: nn.Module) -> bool:
        """Whether ``module`` can be wrapped by this tuner (default: Linear, Conv1D or an existing tuner layer)."""
        return is_linear_like(module) or isinstance(module, self.layer_cls)

    def _create_and_replace(self, config, adapter_name, target, target_name, parent, current_key) -> None:
        raise NotImplementedError  # pragma: no cover - per method

    def _find_targets(self, config: PeftConfig) -> list[str]:
        """Names of the modules ``config`` targets, skipping modules inside tuner layers and wrappers."""
        if isinstance(getattr(config, "target_modules", None), str) and config.target_modules.lower() == "all-linear":
            expand_all_linear(config, self.model, (BaseTunerLayer,))
        skip: list[str] = []
        found = []
        for key, module in self.model.named_modules():
            if not key or any(key.startswith(s) for s in skip):
                continue
            if isinstance(module, (BaseTunerLayer, ModulesToSaveWrapper)):
                skip.append(key + ".")
            if isinstance(module, ModulesToSaveWrapper):
                continue
            if check_target_module_exists(config, key):
                found.append(key)
        return found

    def _find_param_targets(self, config: PeftConfig) -> list:
        """The parameters ``config`` targets directly (LoRA's ``target_parameters``), as the tuner's
        ``_inject_param_targets`` takes them; [] for a tuner without parameter targets (hook)."""
        return []

    def _inject_param_targets(self, config: PeftConfig, adapter_name: str, found: list) -> None:
        """Wrap the parameters ``_find_param_targets`` found (hook; runs after the module targets)."""

    def _no_match_message(self, config: PeftConfig) -> str:
        tp = getattr(config, "target_parameters", None)
        if tp and not config.target_modules:
            params = [n for n, _ in self.model.named_parameters()]
            return (f"target_parameters={tp!r} matched no parameter of the model (a name matches when it equals a "
                    f"parameter's full name or is a dotted suffix of it); some of its parameters: {params[:8]}")
        linear = [n for n, m in self.model.named_modules() if is_linear_like(m) or isinstance(m, BaseTunerLayer)]
        suffixes = sorted({n.split(".")[-1] for n in linear})
        tm = config.target_modules
        tm_show = sorted(tm) if isinstance(tm, (set, frozenset, list, tuple)) else tm
        msg = f"target_modules={tm_show!r} matched no module of the model."
        if suffixes:
            msg += f" Linear-like modules it has (by last name component): {suffixes[:20]}; for example " \
                   f"{linear[:5]}."
        else:
            some = [n for n, _ in self.model.named_modules() if n][:10]
            msg += f" It has no Linear/Conv1D modules; some of its modules: {some}."
        if getattr(config, "layers_to_transform", None) is not None:
            msg += f" (layers_to_transform={config.layers_to_transform!r}, " \
                   f"layers_pattern={getattr(config, 'layers_pattern', None)!r} also filter.)"
        return msg

    @all_or_nothing
    def inject_adapter(self, adapter_name: str, config: PeftConfig, autocast_adapter_dtype: bool = True) -> None:
        """Add adapter ``adapter_name`` described by ``config`` to the model.

        Every check (name, config, matches, module types) runs before the model is touched; if creating a layer
        fails half way, what was added is removed again.
        """
        self._check_new_adapter(adapter_name, config)
        user_targets = getattr(config, "target_modules", None)
        user_targets = sorted(user_targets) if isinstance(user_targets, (set, frozenset, list, tuple)) else None
        config = self._prepare_adapter_config(config)
        self._check_new_adapter_config(config)
        targets = self._find_targets(config)
        param_targets = self._find_param_targets(config)
        if not targets and not param_targets:
            raise ValueError(self._no_match_message(config))
        if user_targets:
            self._warn_unmatched_targets(user_targets)
        if getattr(config, "target_parameters", None) and not param_targets:
            warnings.warn(f"target_parameters={config.target_parameters} were set but no parameter was matched.",
                          RuntimeWarning, stacklevel=3)
        for key in targets:
            module = self.model.get_submodule(key)
            if not self._is_supported_target(module):
                raise TypeError(f"target module {key!r} is a {type(module).__name__}, which "
                                f"{type(self).__name__} does not support (supported: torch.nn.Linear and "
                                "transformers' Conv1D)")
        self._validate_targets(config, adapter_name, targets)
        self.peft_config[adapter_name] = config
        try:
            for key in targets:
                parent, target, target_name = get_submodules(self.model, key)
                self._create_and_replace(config, adapter_name, target, target_name, parent, current_key=key)
            for key in targets:
                if key not in self.targeted_module_names:
                    self.targeted_module_names.append(key)
            self._inject_param_targets(config, adapter_name, param_targets)
            self._set_modules_to_save(config, adapter_name)
            if autocast_adapter_dtype:
                self._cast_adapter_dtype(adapter_name)
            self._finish_injection(adapter_name)
        except BaseException:
            self._remove_adapter(adapter_name, unwrap_empty=True)
            raise
        self.set_adapter(self.active_adapters, inference_mode=config.inference_mode)
        self._mark_only_adapters_as_trainable()

    def _warn_unmatched_targets(self, entries: list[str]) -> None:
        """Warn about target_modules list entries that name no module at all (typos such as "v_prj")."""
        names = [n for n, _ in self.model.named_modules() if n]
        unmatched = [t for t in entries if not any(n == t or n.endswith(f".{t}") for n in names)]
        if unmatched:
            warnings.warn(f"target_modules entries {unmatched} match no module of the model and are ignored (a typo?); "
                          f"the other entries were applied. Module names end in e.g. "
                          f"{sorted({n.split('.')[-1] for n in names})[:20]}", UserWarning, stacklevel=4)

    def _validate_targets(self, config, adapter_name, targets) -> None:
        """Per-method checks of the matched modules that must run before anything is modified (hook)."""

    def _finish_injection(self, adapter_name: str) -> None:
        """Hook run after the layers of a new adapter exist (e.g. AdaLoRA builds its rank allocator)."""

    @all_or_nothing
    def add_adapter(self, adapter_name: str, config: PeftConfig, autocast_adapter_dtype: bool = True) -> None:
        """Add another adapter (not activated; use ``set_adapter``)."""
        self.inject_adapter(adapter_name, config, autocast_adapter_dtype=autocast_adapter_dtype)

    def _set_modules_to_save(self, config: PeftConfig, adapter_name: str) -> None:
        names = list(getattr(config, "modules_to_save", None) or [])
        if not names:
            return
        skip: list[str] = []
        keys = []
        for key, module in self.model.named_modules():
            if not key or any(key.startswith(s) for s in skip):
                continue
            if isinstance(module, (ModulesToSaveWrapper, BaseTunerLayer)):
                skip.append(key + ".")
            if any(key.endswith(t) for t in names):
                keys.append(key)
        for key in keys:
            parent, target, target_name = get_submodules(self.model, key)
            if isinstance(target, ModulesToSaveWrapper):
                target.update(adapter_name)
                target.set_adapter(target._active_adapter)
            elif isinstance(target, BaseTunerLayer):
                raise ValueError(f"module {key!r} is both targeted by the adapter and listed in modules_to_save")
            else:
                wrapper = ModulesToSaveWrapper(target, adapter_name)
                wrapper._active_adapter = self.active_adapters
                setattr(parent, target_name, wrapper)

    def _cast_adapter_dtype(self, adapter_name: str) -> None:
        """Upcast this adapter's fp16/bf16 weights to fp32 (HF PEFT's ``autocast_adapter_dtype=True`` default)."""
        for _, layer in self.tuner_layers():
            for attr in layer.adapter_layer_names + layer.other_param_names:
                container = getattr(layer, attr, None)
                # every per-adapter ModuleDict/ParameterDict, frozen ones (AdaLoRA's ranknum) included, like PEFT
                if not isinstance(container, (nn.ModuleDict, nn.ParameterDict)) or adapter_name not in container:
                    continue
                item = container[adapter_name]
                params = [item] if isinstance(item, nn.Parameter) else list(item.parameters())
                for p in params:
                    if p.dtype in (torch.float16, torch.bfloat16):
                        p.data = p.data.float()

    def _mark_only_adapters_as_trainable(self) -> None:
        """Freeze everything but adapter weights and wrapper copies; then unfreeze biases per ``config.bias``."""
        for n, p in self.model.named_parameters():
            if self.prefix and self.prefix in n:
                continue
            if ".modules_to_save." in n or n.startswith("modules_to_save."):
                continue
            p.requires_grad_(False)
        for name in self.active_adapters:
            cfg = self.peft_config.get(name)
            bias = getattr(cfg, "bias", "none")
            if bias == "all":
                for n, p in self.model.named_parameters():
                    if (n == "bias" or n.endswith(".bias")) and ".original_module." not in n:
                        p.requires_grad_(True)
            elif bias.endswith("_only"):
                for _, layer in self.tuner_layers():
                    b = getattr(layer.base_layer, "bias", None)
                    if b is not None:
                        b.requires_grad_(True)

    @all_or_nothing
    def set_adapter(self, adapter_name: Union[str, list[str]], inference_mode: bool = False) -> None:
        """Activate one adapter or several (their outputs are summed), making only them trainable."""
        names = active_list(adapter_name)
        unknown = [a for a in names if a not in self.peft_config]
        if unknown:
            raise ValueError(f"adapter(s) {unknown} not found; available: {sorted(self.peft_config)}")
        for _, layer in self.tuner_layers():
            if layer.merged:
                warnings.warn("Adapter cannot be set when the model is merged. Unmerging the model first.",
                              UserWarning, stacklevel=2)
                layer.unmerge()
            layer.set_adapter(names, inference_mode=inference_mode)
        for _, w in self._wrappers():
            w.set_adapter(names, inference_mode=inference_mode)
        self.active_adapter = names[0] if len(names) == 1 else names

    def enable_adapter_layers(self) -> None:
        for _, layer in self.tuner_layers():
            layer.enable_adapters(True)
        for _, w in self._wrappers():
            w.enable_adapters(True)

    def disable_adapter_layers(self) -> None:
        for name in self.active_adapters:
            bias = getattr(self.peft_config.get(name), "bias", "none")
            if bias != "none":
                warnings.warn(f"Careful, disabling adapter layers with bias configured to be '{bias}' does not "
                              "produce the same output as the base model would without adaption.", UserWarning,
                              stacklevel=2)
        for _, layer in self.tuner_layers():
            layer.enable_adapters(False)
        for _, w in self._wrappers():
            w.enable_adapters(False)

    @contextmanager
    def _adapters_disabled(self):
        """Run the base model inside; afterwards every ``requires_grad`` flag is what it was before (re-enabling
        alone would make an adapter loaded for inference trainable)."""
        flags = [(p, p.requires_grad) for p in self.parameters()]
        self.disable_adapter_layers()
        try:
            yield
        finally:
            self.enable_adapter_layers()
            for p, rg in flags:
                p.requires_grad_(rg)

    # -- add_weighted_adapter's shared parts (LoRA: lora/weighted.py; IA3: ia3/model.py) ------------------------------
    def _weighted_adapter_args(self, adapters, weights, adapter_name: str) -> bool:
        """Check the arguments every ``add_weighted_adapter`` takes (ValueError naming them): existing adapter names,
        one finite number per adapter, no module that two of them save in full (``modules_to_save``).  Returns False,
        with a warning, when ``adapter_name`` exists already (nothing is to be done; HF PEFT returns silently)."""
        if adapter_name in self.peft_config:
            warnings.warn(f"add_weighted_adapter: adapter {adapter_name!r} exists already; nothing was done",
                          UserWarning, stacklevel=3)
            return False
        if isinstance(adapters, str) or not isinstance(adapters, (list, tuple)) or not adapters:
            raise ValueError(f"adapters must be a non-empty list of adapter names, got {adapters!r}")
        for a in adapters:
            if a not in self.peft_config:
                raise ValueError(f"Adapter {a} does not exist (adapters: {sorted(self.peft_config)})")
        if not isinstance(weights, (list, tuple)) or len(weights) != len(adapters):
            raise ValueError(f"weights must be a list with one number per adapter ({len(adapters)} adapters, one per "
                             f"adapter name), got {weights!r}")
        if any(isinstance(w, bool) or not isinstance(w, (int, float)) or not math.isfinite(w) for w in weights):
            raise ValueError(f"weights must be finite numbers, got {weights!r}")
        shared = [w for w in self.model.modules() if isinstance(w, ModulesToSaveWrapper)
                  and sum(a in w.modules_to_save for a in adapters) > 1]
        if shared:
            raise ValueError("Cannot add weighted adapters if they target the same module with modules_to_save, but "
                             f"found {len(shared)} such instance(s).")
        return True

    def _freeze_adapter(self, adapter_name: str) -> None:
        """requires_grad False for every parameter of adapter ``adapter_name`` (a whole component of its name; HF
        PEFT's ``_freeze_adapter`` matches any substring)."""
        for n, p in self.model.named_parameters():
            if f".{adapter_name}." in f".{n}.":
                p.requires_grad_(False)

    @all_or_nothing
    def delete_adapter(self, adapter_name: str) -> None:
        """Remove an adapter everywhere.  Another adapter becomes active if the deleted one was."""
        if adapter_name not in self.peft_config:
            raise ValueError(f"adapter {adapter_name!r} does not exist; available: {sorted(self.peft_config)}")
        self._remove_adapter(adapter_name, unwrap_empty=False)

    def _remove_adapter(self, adapter_name: str, unwrap_empty: bool) -> None:
        """Delete ``adapter_name`` from every layer; with ``unwrap_empty`` put the original module back where no adapter
        is left (used to roll back a failed injection or load, restoring the model's exact module tree)."""
        self.peft_config.pop(adapter_name, None)
        # innermost first: a nested wrapper (LoRA's parameter wrappers) is unwrapped before the one around it
        for key, layer in reversed(list(self.tuner_layers())):
            layer.delete_adapter(adapter_name)
            if unwrap_empty and not layer.adapter_names():
                parent, _, name = get_submodules(self.model, key)
                setattr(parent, name, layer.base_layer)
                if key in self.targeted_module_names:
                    self.targeted_module_names.remove(key)
                pn = getattr(layer, "parameter_name", None)  # a parameter wrapper: its entry by parameter
                if pn is not None:
                    pkey = f"{strip_base_layer(key)}.{pn}"
                    if pkey in self.targeted_parameter_names:
                        self.targeted_parameter_names.remove(pkey)
        for key, w in list(self._wrappers()):
            w.delete_adapter(adapter_name)
            if unwrap_empty and len(w.modules_to_save) == 0:
                parent, _, name = get_submodules(self.model, key)
                setattr(parent, name, w.original_module)
        remaining = [a for a in self.active_adapters if a != adapter_name]
        if not remaining and self.peft_config:
            remaining = [next(iter(self.peft_config))]
        if remaining:
            self.active_adapter = remaining[0] if len(remaining) == 1 else remaining
            for _, layer in self.tuner_layers():
                layer._active_adapter = list(remaining)
            for _, w in self._wrappers():
                w._active_adapter = list(remaining)

    # -- merging -------------------------------------------------------------------------------------------------
    def _merge_plan(self, adapter_names: Optional[list[str]],
                    unloading: bool) -> list[tuple[str, BaseTunerLayer, list]]:
        """[(key, layer, adapters to merge)] for every tuner layer; validates every layer (unknown / already merged
        adapters raise ValueError) before anything is written."""
        if adapter_names is not None:
            unknown = [a for a in active_list(adapter_names) if a not in self.peft_config]
            if unknown:
                raise ValueError(f"adapter_names {unknown} do not exist; available: {sorted(self.peft_config)}")
        plan = []
        for key, layer in list(self.tuner_layers()):
            if unloading and layer.merged:
                # already merged adapters stay merged; merge the remaining requested ones (that this layer has)
                want = [a for a in (active_list(adapter_names) if adapter_names is not None
                                    else layer._present_active())
                        if a not in layer.merged_adapters and a in layer.adapter_names()]
                names = layer._adapters_to_merge(want) if want else []
            else:
                names = adapter_names
                if names is not None:
                    names = [a for a in active_list(names) if a in layer.adapter_names()]
                names = layer._adapters_to_merge(names)
            plan.append((key, layer, names))
        return plan

    @staticmethod
    def _check_plan_finite(plan) -> None:
        """safe_merge: check every layer's merged values before any layer is written."""
        for key, layer, names in plan:
            if names:
                try:
                    layer._check_merge_finite(names)
                except ValueError as e:
                    raise ValueError(f"{e} [layer {key!r}; no layer was merged]") from None

    @all_or_nothing
    def merge_adapter(self, adapter_names: Optional[list[str]] = None, safe_merge: bool = False) -> None:
        """Merge the active (or given) adapters into the base weights of every tuner layer.

        All or nothing: every layer is validated (and with ``safe_merge`` checked for NaN/inf) before any is merged,
        and a failure part way restores every weight and flag."""
        plan = self._merge_plan(adapter_names, unloading=False)
        if safe_merge:
            self._check_plan_finite(plan)
        for _, layer, names in plan:
            layer.merge(safe_merge=safe_merge, adapter_names=names)

    @all_or_nothing
    def unmerge_adapter(self) -> None:
        for _, layer in self.tuner_layers():
            if layer.merged:
                layer.unmerge()

    def _unload(self, merge: bool, safe_merge: bool = False, adapter_names: Optional[list[str]] = None) -> nn.Module:
        plan = self._merge_plan(adapter_names, unloading=True) if merge else \
            [(key, layer, []) for key, layer in list(self.tuner_layers())]
        if merge and safe_merge:
            self._check_plan_finite(plan)
        for key, layer, names in reversed(plan):  # innermost first (see _remove_adapter)
            if names:
                layer.merge(safe_merge=safe_merge, adapter_names=names)
            parent, _, name = get_submodules(self.model, key)
            setattr(parent, name, layer.base_layer)
        for key, w in list(self._wrappers()):
            parent, _, name = get_submodules(self.model, key)
            active = [a for a in w._active_adapter if a in w.modules_to_save]
            setattr(parent, name, w.modules_to_save[active[0]] if active else w.original_module)
        return self.model

    @all_or_nothing
    def merge_and_unload(self, progressbar: bool = False, safe_merge: bool = False,
                         adapter_names: Optional[list[str]] = None) -> nn.Module:
        """Merge the adapters into the base weights and return the plain model (the tuner layers are removed)."""
        return self._unload(merge=True, safe_merge=safe_merge, adapter_names=adapter_names)

    @all_or_nothing
    def unload(self) -> nn.Module:
        """Remove every adapter without merging and return the original model."""
        return self._unload(merge=False)

    # -- misc -----------------------------------------------------------------------------------------------------
    @staticmethod
    def conv1d_fan_in_fan_out_warning(module: nn.Module, config) -> bool:
        """PEFT sets fan_in_fan_out=True for Conv1D targets (with a warning) and False for nn.Linear."""
        if is_conv1d(module):
            if not getattr(config, "fan_in_fan_out", False):
                warnings.warn("fan_in_fan_out is set to False but the target module is `Conv1D`. Setting "
                              "fan_in_fan_out to True.", UserWarning, stacklevel=3)
                config.fan_in_fan_out = True
            return True
        if getattr(config, "fan_in_fan_out", False):
            warnings.warn("fan_in_fan_out is set to True but the target module is `torch.nn.Linear`. Setting "
                          "fan_in_fan_out to False.", UserWarning, stacklevel=3)
            config.fan_in_fan_out = False
        return False
