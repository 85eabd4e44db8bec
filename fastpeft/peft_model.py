"""``PeftModel``: HF PEFT's wrapper API over a fastpeft tuner.

``PeftModel`` is generic: it builds ``TUNER_CLASSES[config.peft_type]`` as ``self.base_model`` and forwards
``forward``/``generate`` (with every argument) to it, so any registered method (a package ``fastpeft.tuners.<method>``:
LoRA, AdaLoRA, IA3, the prompt methods, bottleneck adapters) works through the same class.  Anything else is looked up
on the tuner and then on the user model (``config``, ``generate``'s helpers, ...).
"""

from __future__ import annotations

import dataclasses
import os
import sys
import warnings
from contextlib import contextmanager
from typing import Any, Literal, Optional, Sequence, Union

import torch
import torch.nn as nn

from .hub import push_adapter_to_hub, resolve_adapter_dir, split_hub_kwargs, write_model_card
from ._peft_compat import MODEL_BASES, register_state_dict_functions
from .config import PeftConfig, TaskType
from .save_load import (get_peft_model_state_dict, make_adapter_dir, normalise_keys,
                        read_adapter_weights, save_adapter_files, set_peft_model_state_dict,
                        split_embedding_weights)
from .tuners import BaseTunerLayer, ModulesToSaveWrapper, get_tuner_class
from .tuners.lora.init import convert_for_save
from .utils.constants import SEQ_CLS_HEAD_NAMES

__all__ = [
    "PeftModel", "PeftModelForCausalLM", "PeftModelForSequenceClassification", "PeftModelForSeq2SeqLM",
    "PeftModelForTokenClassification", "PeftModelForQuestionAnswering", "PeftModelForFeatureExtraction",
    "MODEL_TYPE_TO_PEFT_MODEL_MAPPING", "TunerLayerStatus", "TunerModelStatus", "get_layer_status", "get_model_status",
]


def _is_checkpointing(model: nn.Module) -> bool:
    with warnings.catch_warnings():  # transformers 5 deprecates is_gradient_checkpointing
        warnings.simplefilter("ignore")
        for attr in ("is_activation_checkpointing", "is_gradient_checkpointing"):
            try:
                v = getattr(model, attr)
            except Exception:
                continue
            if isinstance(v, bool):
                return v
    return False


@dataclasses.dataclass
class TunerLayerStatus:
    """One adapter layer's state (``PeftModel.get_layer_status``; HF PEFT's fields)."""

    name: str
    module_type: str
    enabled: bool
    active_adapters: list[str]
    merged_adapters: list[str]
    requires_grad: dict[str, Union[bool, Literal["irregular"]]]
    available_adapters: list[str]
    devices: dict[str, list[str]]
    quantization_backend: Optional[str] = None


@dataclasses.dataclass
class TunerModelStatus:
    """The whole model's adapter state (``PeftModel.get_model_status``; HF PEFT's fields).  A value that differs
    between layers is ``"irregular"``."""

    base_model_type: str
    adapter_model_type: str
    peft_types: dict[str, str]
    trainable_params: int
    total_params: int
    num_adapter_layers: int
    enabled: Union[bool, Literal["irregular"]]
    active_adapters: Union[list[str], Literal["irregular"]]
    merged_adapters: Union[list[str], Literal["irregular"]]
    requires_grad: dict[str, Union[bool, Literal["irregular"]]]
    available_adapters: list[str]
    devices: dict[str, list[str]]
    quantization_backend: Union[Optional[str], Literal["irregular"]] = None


def _irregular(vals):
    return "irregular" if len({repr(v) for v in vals}) > 1 else (vals[0] if vals else None)


def _method_of(cls: type) -> str:
    """The method a layer class belongs to, as PEFT names it in ``module_type`` ("lora" for
    ``fastpeft.tuners.lora.layer.Linear``): the package under ``fastpeft.tuners``, else the module's last name."""
    parts = cls.__module__.split(".")
    if "tuners" in parts[:-1]:
        return parts[parts.index("tuners") + 1]
    return parts[-1]


class PeftModel(*MODEL_BASES):
    """Wraps ``model`` with the adapter described by ``peft_config`` (the model is modified in place).

    With HF PEFT installed this class derives from ``peft.PeftModel`` (see ``fastpeft._peft_compat``), so
    transformers' ``Trainer``, TRL and accelerate treat it as a PEFT model; all its methods are fastpeft's own.

    Args:
        model: the model to adapt (any nn.Module; HF transformers models get architecture defaults).
        peft_config: a registered config (``LoraConfig``, ``AdaLoraConfig``, ``IA3Config``, prompt configs ...).
        adapter_name: name of the first adapter ("default").
        autocast_adapter_dtype: upcast fp16/bf16 adapter weights to fp32 (HF PEFT's default).

    Parameter names are HF PEFT's: ``base_model.model.<module path>.lora_A.<adapter>.weight``.
    """

    def __init__(self, model: nn.Module, peft_config: PeftConfig, adapter_name: str = "default",
                 autocast_adapter_dtype: bool = True, low_cpu_mem_usage: bool = False) -> None:
        nn.Module.__init__(self)  # not peft.PeftModel.__init__: the tuner is fastpeft's
        if not isinstance(peft_config, PeftConfig):
            raise TypeError(f"peft_config must be a fastpeft PeftConfig, got {type(peft_config).__name__}")
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        self.peft_type = peft_config.peft_type
        # keyword arguments of forward()/generate() that fastpeft consumes (PEFT's attribute)
        self.special_peft_forward_args = {"adapter_names"}
        self._adapters_disabled = False
        peft_config = self._prepare_config(peft_config)
        tuner_cls = get_tuner_class(peft_config.peft_type)
        self.base_model = tuner_cls(model, peft_config, adapter_name, autocast_adapter_dtype=autocast_adapter_dtype)
        cfg = getattr(model, "config", None)
        if cfg is not None and hasattr(cfg, "pretraining_tp"):
            # PEFT does the same: the pretraining_tp split of the linear layers would bypass the adapter layers
            cfg.pretraining_tp = 1
        if _is_checkpointing(model) and hasattr(model, "enable_input_require_grads"):
            # frozen embeddings would otherwise cut the graph at the first checkpointed block (PEFT does the same)
            model.enable_input_require_grads()

    def _prepare_config(self, config: PeftConfig) -> PeftConfig:
        """Task-specific config adjustments (SEQ_CLS adds the classification head to modules_to_save)."""
        return config

    # -- attribute access ----------------------------------------------------------------------------------------
    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "base_model":
                raise
            return getattr(self.base_model, name)

    @property
    def peft_config(self) -> dict[str, PeftConfig]:
        return self.base_model.peft_config

    @peft_config.setter
    def peft_config(self, value: dict[str, PeftConfig]) -> None:
        self.base_model.peft_config = value

    @property
    def active_adapter(self) -> Union[str, list[str]]:
        return self.base_model.active_adapter

    @property
    def active_adapters(self) -> list[str]:
        return self.base_model.active_adapters

    @property
    def active_peft_config(self) -> PeftConfig:
        return self.peft_config[self.active_adapters[0]]

    def get_base_model(self) -> nn.Module:
        """The user model (with the tuner layers in it)."""
        return self.base_model.model

    # -- running ---------------------------------------------------------------------------------------------------
    def forward(self, *args, **kwargs):
        """Everything is passed to the tuner (``self.base_model``), which runs the model.

        ``adapter_names=[...]`` (one name per batch row, "__base__" for none) runs a mixed batch (inference only,
        tuners with ``supports_mixed_batch``, i.e. LoRA).
        """
        adapter_names = kwargs.pop("adapter_names", None)
        if adapter_names is None:
            return self.base_model(*args, **kwargs)
        with self.base_model.mixed_batch(adapter_names):
            return self.base_model(*args, **kwargs)

    def generate(self, *args, **kwargs):
        """HF ``generate`` through the tuner (prompt methods hook in there); ``adapter_names`` as in forward."""
        adapter_names = kwargs.pop("adapter_names", None)
        if adapter_names is None:
            return self.base_model.generate(*args, **kwargs)
        with self.base_model.mixed_batch(adapter_names, num_beams=int(kwargs.get("num_beams", 1) or 1)):
            return self.base_model.generate(*args, **kwargs)

    @contextmanager
    def disable_adapter(self):
        """Context manager running the base model (adapters bypassed, merged ones unmerged)."""
        with self.base_model._adapters_disabled():  # restores every requires_grad flag afterwards
            self._adapters_disabled = True
            try:
                yield
            finally:
                self._adapters_disabled = False

    # -- parameters --------------------------------------------------------------------------------------------------
    def get_nb_trainable_parameters(self) -> tuple[int, int]:
        """(trainable, all) parameter counts over ``self.named_parameters()`` (base model included)."""
        trainable = total = 0
        for _, p in self.named_parameters():
            n = p.numel()
            if n == 0 and hasattr(p, "ds_numel"):
                n = p.ds_numel
            total += n
            if p.requires_grad:
                trainable += n
        return trainable, total

    def print_trainable_parameters(self) -> None:
        """Print HF PEFT's line: ``trainable params: T || all params: A || trainable%: P``."""
        t, a = self.get_nb_trainable_parameters()
        pct = 100 * t / a if a else 0.0
        print(f"trainable params: {t:,d} || all params: {a:,d} || trainable%: {pct:.4f}")

    # -- adapters -------------------------------------------------------------------------------------------------
    def add_adapter(self, adapter_name: str, peft_config: PeftConfig, low_cpu_mem_usage: bool = False,
                    autocast_adapter_dtype: bool = True) -> None:
        """Add another adapter of the same peft_type (not activated; see ``set_adapter``)."""
        if str(peft_config.peft_type) != str(self.peft_type):
            raise ValueError(f"cannot add a {peft_config.peft_type} adapter to a {self.peft_type} PeftModel")
        peft_config = self._prepare_config(peft_config)
        self.base_model.add_adapter(adapter_name, peft_config, autocast_adapter_dtype=autocast_adapter_dtype)

    def set_adapter(self, adapter_name: Union[str, list[str]], inference_mode: bool = False) -> None:
        """Activate an adapter (a list activates several, their outputs summed); only it becomes trainable."""
        names = [adapter_name] if isinstance(adapter_name, str) else list(adapter_name)
        for n in names:
            if n not in self.peft_config:
                raise ValueError(f"adapter {n!r} not found; available: {sorted(self.peft_config)}")
        self.base_model.set_adapter(adapter_name, inference_mode=inference_mode)

    def delete_adapter(self, adapter_name: str) -> None:
        self.base_model.delete_adapter(adapter_name)

    def merge_and_unload(self, progressbar: bool = False, safe_merge: bool = False,
                         adapter_names: Optional[list[str]] = None) -> nn.Module:
        """Merge the active adapters into the base weights; return the plain model."""
        return self.base_model.merge_and_unload(progressbar=progressbar, safe_merge=safe_merge,
                                                adapter_names=adapter_names)

    def unload(self) -> nn.Module:
        """Remove the adapters (no merge); return the original model."""
        return self.base_model.unload()

    # -- files --------------------------------------------------------------------------------------------------------
    def save_pretrained(self, save_directory: str, safe_serialization: bool = True,
                        selected_adapters: Optional[list[str]] = None, save_embedding_layers: Union[str, bool] = "auto",
                        is_main_process: bool = True, path_initial_model_for_weight_conversion: Optional[str] = None,
                        **kwargs: Any) -> None:
        """Write each adapter as HF PEFT does: ``adapter_config.json`` + ``adapter_model.safetensors`` (or
        ``adapter_model.bin`` with ``safe_serialization=False``) and PEFT's model card ``README.md``.

        The "default" adapter goes to ``save_directory``, any other to ``save_directory/<adapter_name>``.

        Args:
            selected_adapters: adapters to save (default: all).
            save_embedding_layers: True also saves the input/output embedding weights (PEFT's keys); "auto" does so
                when an embedding layer ("embed_tokens", "lm_head") is in ``target_modules``.
            is_main_process: False writes no file (the other ranks of a distributed run).
            state_dict (kwarg): a full ``self.state_dict()``-keyed dict to take the values from (what FSDP / ZeRO-3
                saves pass) instead of the live parameters.
            path_initial_model_for_weight_conversion: the directory where a PiSSA/OLoRA adapter was saved right
                after initialisation; the adapter is then written as a plain LoRA of twice the rank that applies to
                the original (unmodified) base model (``fastpeft.tuners.lora.init.convert_for_save``).
        Other keyword arguments (e.g. ``max_shard_size`` from ``push_to_hub``) are accepted and ignored, as in PEFT.
        """
        if os.path.isfile(save_directory):
            raise ValueError(f"save_directory must be a directory, but {save_directory!r} is a file")
        names = list(self.peft_config) if selected_adapters is None else list(selected_adapters)
        unknown = [n for n in names if n not in self.peft_config]
        if unknown:
            raise ValueError(f"selected_adapters {unknown} do not exist; available: {sorted(self.peft_config)}")
        if not is_main_process:
            # PEFT still creates the adapters' directories (empty) on the other ranks
            for name in names:
                os.makedirs(save_directory if name == "default" else os.path.join(save_directory, name),
                            exist_ok=True)
            return
        state_dict = kwargs.get("state_dict", None)
        make_adapter_dir(save_directory)
        self.create_or_update_model_card(save_directory)
        for name in names:
            cfg = self.peft_config[name]
            # before the config: AdaLoRA rewrites rank_pattern
            sd = self._adapter_state_dict_for_save(name, state_dict=state_dict,
                                                      save_embedding_layers=save_embedding_layers)
            if path_initial_model_for_weight_conversion is not None:
                sd, cfg = convert_for_save(cfg, sd, str(path_initial_model_for_weight_conversion))
            out_dir = save_directory if name == "default" else os.path.join(save_directory, name)
            if cfg.base_model_name_or_path is None:
                cfg.base_model_name_or_path = self.get_base_model().__dict__.get("name_or_path", None) or None
            auto = None
            if cfg.task_type is None:
                klass = type(self.base_model) if cfg.is_prompt_learning else type(self.get_base_model())
                auto = {"base_model_class": klass.__name__, "parent_library": klass.__module__}
            was = cfg.inference_mode
            cfg.inference_mode = True
            try:
                save_adapter_files(out_dir, sd, cfg, safe_serialization=safe_serialization, auto_mapping_dict=auto)
            finally:
                cfg.inference_mode = was

    def _adapter_state_dict_for_save(self, adapter_name: str, state_dict: Optional[dict] = None,
                                        save_embedding_layers: Union[str, bool] = "auto") -> dict[str, torch.Tensor]:
        """What ``save_pretrained`` writes for ``adapter_name``: PEFT's file keys -> tensors (see
        ``fastpeft.get_peft_model_state_dict``)."""
        return get_peft_model_state_dict(self, state_dict=state_dict, adapter_name=adapter_name,
                                         save_embedding_layers=save_embedding_layers)

    def create_or_update_model_card(self, output_dir: str) -> None:
        """Create or update ``output_dir/README.md`` with PEFT's model-card metadata (``fastpeft.hub``)."""
        try:
            import huggingface_hub  # noqa: F401
        except ImportError:
            warnings.warn("huggingface_hub is not installed: no model card (README.md) is written", UserWarning,
                          stacklevel=2)
            return
        write_model_card(self, output_dir)

    def _model_card_tags(self) -> list[str]:
        tags = []
        base = self.get_base_model()
        import sys

        mu = sys.modules.get("transformers.modeling_utils")
        if not self.active_peft_config.is_prompt_learning and mu is not None \
                and isinstance(base, mu.PreTrainedModel):
            tags.append("transformers")
        if str(self.active_peft_config.peft_type) == "LORA":
            tags.append("lora")
        holder = base if self.active_peft_config.is_prompt_learning else self.base_model
        if hasattr(holder, "name_or_path"):
            tags.append(f"base_model:adapter:{holder.name_or_path}")
        return tags

    def _is_causal_lm(self) -> bool:
        return isinstance(self, PeftModelForCausalLM)

    def push_to_hub(self, repo_id: str, *, commit_message: Optional[str] = None,
                    commit_description: Optional[str] = None, private: Optional[bool] = None, token=None,
                    revision: Optional[str] = None, create_pr: bool = False, **kwargs):
        """Upload the adapter (the files ``save_pretrained`` writes, never the base model) to the Hub repository
        ``repo_id`` in one commit, creating the repository if needed.  Extra keyword arguments go to
        ``save_pretrained`` (``selected_adapters``, ``safe_serialization``, ...).  Returns huggingface_hub's
        ``CommitInfo``."""

        kwargs.pop("max_shard_size", None)
        kwargs.pop("tags", None)
        return push_adapter_to_hub(self, repo_id, commit_message=commit_message,
                                       commit_description=commit_description, private=private, token=token,
                                       revision=revision, create_pr=create_pr, **kwargs)

    @classmethod
    def from_pretrained(cls, model: nn.Module, model_id: Union[str, os.PathLike], adapter_name: str = "default",
                        is_trainable: bool = False, config: Optional[PeftConfig] = None,
                        autocast_adapter_dtype: bool = True, allow_bin: bool = False, subfolder: Optional[str] = None,
                        revision: Optional[str] = None, **kwargs) -> "PeftModel":
        """Wrap ``model`` with the adapter saved in ``model_id`` (PEFT or fastpeft files).

        Args:
            model_id: a local directory or a Hub repository id (downloaded through huggingface_hub, which uses its
                cache and honours ``HF_HUB_OFFLINE``; ``revision``, ``cache_dir``, ``token``, ``local_files_only``,
                ``force_download`` are passed on).
            subfolder: a sub-directory of ``model_id``.
            is_trainable: False (default) loads the adapter frozen and puts the model in eval mode.
            config: use this config instead of the directory's adapter_config.json.
            allow_bin: opt in to reading a pickled adapter_model.bin (``weights_only=True``); safetensors otherwise.
        Raises ValueError/TypeError before anything is left changed if the config or any tensor shape does not fit:
        the model is then exactly as it was (modules, values, requires_grad).
        """

        hub_kwargs, kwargs = split_hub_kwargs(kwargs)
        if revision is not None:
            hub_kwargs["revision"] = revision
        torch_device = kwargs.pop("torch_device", None)
        kwargs.pop("low_cpu_mem_usage", None)
        kwargs.pop("ephemeral_gpu_offload", None)
        if kwargs:
            warnings.warn(f"from_pretrained ignores the arguments {sorted(kwargs)} (not supported by fastpeft)",
                          UserWarning, stacklevel=2)
        path = resolve_adapter_dir(str(model_id), subfolder=subfolder, allow_bin=allow_bin, **hub_kwargs)
        if config is None:
            config = PeftConfig.from_pretrained(path)
        elif not isinstance(config, PeftConfig):
            raise TypeError(f"config must be a PeftConfig, got {type(config).__name__}")
        config.inference_mode = not is_trainable
        weights = read_adapter_weights(path, device=torch_device, allow_bin=allow_bin)
        snapshot = [(p, p.requires_grad) for p in model.parameters()]
        klass = MODEL_TYPE_TO_PEFT_MODEL_MAPPING.get(config.task_type, PeftModel) if cls is PeftModel else cls
        peft_model = klass(model, config, adapter_name, autocast_adapter_dtype=autocast_adapter_dtype)
        try:
            tuner = peft_model.base_model
            adapter_sd, apply_emb = split_embedding_weights(peft_model, adapter_name,
                                                            normalise_keys(tuner, adapter_name, weights))
            tuner.set_adapter_state_dict(adapter_name, adapter_sd)
            apply_emb()
        except BaseException:
            peft_model.base_model._remove_adapter(adapter_name, unwrap_empty=True)
            for p, rg in snapshot:
                p.requires_grad_(rg)
            raise
        if not is_trainable:
            peft_model.eval()
        return peft_model

    def load_adapter(self, model_id: Union[str, os.PathLike], adapter_name: str, is_trainable: bool = False,
                     torch_device: Optional[str] = None, autocast_adapter_dtype: bool = True, allow_bin: bool = False,
                     subfolder: Optional[str] = None, revision: Optional[str] = None, **kwargs):
        """Load a saved adapter (local directory or Hub id, as ``from_pretrained``) under ``adapter_name``.

        A new name adds the adapter (not activated; trainable only with ``is_trainable=True``).  An existing name
        gets the file's weights loaded into it (its config and trainability stay), which is how ``Trainer`` resumes
        from a checkpoint and loads the best one (PEFT's behaviour).  ``is_trainable=False`` puts the model in eval
        mode.  Atomic: on any error (keys, shapes, files) nothing changes.
        """

        hub_kwargs, kwargs = split_hub_kwargs(kwargs)
        if revision is not None:
            hub_kwargs["revision"] = revision
        path = resolve_adapter_dir(str(model_id), subfolder=subfolder, allow_bin=allow_bin, **hub_kwargs)
        if adapter_name in self.peft_config:
            weights = read_adapter_weights(path, device=torch_device, allow_bin=allow_bin)
            tuner = self.base_model
            adapter_sd, apply_emb = split_embedding_weights(self, adapter_name,
                                                            normalise_keys(tuner, adapter_name, weights))
            tuner.set_adapter_state_dict(adapter_name, adapter_sd)
            apply_emb()
            if not is_trainable:
                self.eval()
            return None
        config = PeftConfig.from_pretrained(path)
        config.inference_mode = not is_trainable
        weights = read_adapter_weights(path, device=torch_device, allow_bin=allow_bin)
        snapshot = [(p, p.requires_grad) for p in self.parameters()]
        self.add_adapter(adapter_name, config, autocast_adapter_dtype=autocast_adapter_dtype)
        try:
            tuner = self.base_model
            adapter_sd, apply_emb = split_embedding_weights(self, adapter_name,
                                                            normalise_keys(tuner, adapter_name, weights))
            tuner.set_adapter_state_dict(adapter_name, adapter_sd)
            apply_emb()
        except BaseException:
            self.base_model._remove_adapter(adapter_name, unwrap_empty=True)
            for p, rg in snapshot:
                p.requires_grad_(rg)
            raise
        if is_trainable:
            # a loaded trainable adapter is trainable even though it is not active (PEFT's behaviour)
            prefix = self.base_model.prefix
            for n, p in self.named_parameters():
                if f".{adapter_name}." in n or n.endswith(f".{adapter_name}"):
                    if (prefix and prefix in n) or ".modules_to_save." in n:
                        p.requires_grad_(True)
        else:
            self.eval()
        return None

    # -- PEFT's remaining public API ----------------------------------------------------------------------------------
    @property
    def has_active_enabled_adapter(self) -> bool:
        """False while the adapters are disabled by ``disable_adapter`` (PEFT's expression, kept as is: a model
        with no active adapter also reports True)."""
        if self.active_peft_config.is_prompt_learning:
            return not self._adapters_disabled
        return not self._adapters_disabled or not self.active_adapters

    @property
    def modules_to_save(self) -> Optional[set[str]]:
        """Union of every adapter config's ``modules_to_save`` (None when empty), as in PEFT."""
        mods: set[str] = set()
        for cfg in self.peft_config.values():
            if getattr(cfg, "modules_to_save", None) is not None:
                mods.update(cfg.modules_to_save)
        return mods or None

    @property
    def base_model_torch_dtype(self) -> Optional[torch.dtype]:
        """The wrapped model's dtype (``model.dtype``), None when it has none."""
        return getattr(self.base_model, "dtype", None)

    def supports_lora_conversion(self, adapter_name: str = "default") -> bool:
        """Whether the adapter is additive (W' = W + delta) and could be expressed as LoRA: LoRA and AdaLoRA."""
        cfg = self.peft_config.get(adapter_name, self.active_peft_config)
        return not cfg.is_prompt_learning and str(cfg.peft_type) in ("LORA", "ADALORA")

    def prepare_model_for_gradient_checkpointing(self, model: nn.Module) -> nn.Module:
        """Make the input embeddings' output require grad (so checkpointed blocks see a graph) unless the model is
        quantized; returns ``model``."""
        if not (getattr(model, "is_loaded_in_8bit", False) or getattr(model, "is_loaded_in_4bit", False)
                or getattr(model, "is_quantized", False)):
            if hasattr(model, "enable_input_require_grads"):
                model.enable_input_require_grads()
            elif hasattr(model, "get_input_embeddings"):
                model.get_input_embeddings().register_forward_hook(lambda mod, inp, out: out.requires_grad_(True))
        return model

    def set_requires_grad(self, adapter_names: Union[str, Sequence[str]], requires_grad: bool = True) -> None:
        """Switch gradients of the named adapters' weights (and their modules_to_save copies) on or off, leaving
        everything else as it is.  TypeError for prompt-learning methods (as in PEFT)."""
        if self.active_peft_config.is_prompt_learning:
            raise TypeError("Setting requires_grad is not supported for prompt learning methods like "
                            f"{self.active_peft_config.peft_type}")
        names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
        unknown = [n for n in names if n not in self.peft_config]
        if unknown:
            raise ValueError(f"adapter_names {unknown} do not exist; available: {sorted(self.peft_config)}")
        for _, layer in self.base_model.tuner_layers():
            for attr in layer.adapter_layer_names:
                container = getattr(layer, attr)
                for n in names:
                    if n in container:
                        container[n].requires_grad_(requires_grad)
        for _, w in self.base_model._wrappers():
            for n in names:
                if n in w.modules_to_save:
                    w.modules_to_save[n].requires_grad_(requires_grad)

    def get_prompt_embedding_to_save(self, adapter_name: str) -> torch.Tensor:
        """Prompt-learning methods: the prompt embedding saved in the file, (num_tokens, dim) on CPU."""
        if not self.peft_config[adapter_name].is_prompt_learning:
            raise ValueError(f"adapter {adapter_name!r} is not a prompt-learning adapter")
        return self.base_model.get_adapter_state_dict(adapter_name)["prompt_embeddings"].detach().cpu()

    def get_prompt(self, batch_size: int, task_ids: Optional[torch.Tensor] = None,
                   max_cache_len: Optional[int] = None) -> torch.Tensor:
        """Prompt tuning / P-tuning: the active prompt expanded to (batch_size, num_tokens, dim).  Prefix tuning's
        key/value cache is built by the tuner inside forward/generate (ValueError here)."""
        cfg = self.active_peft_config
        if not cfg.is_prompt_learning or str(cfg.peft_type) == "PREFIX_TUNING":
            raise ValueError(f"get_prompt is available for prompt tuning and P-tuning, not {cfg.peft_type}")
        p = self.base_model._prompt()
        return p.unsqueeze(0).expand(batch_size, -1, -1)

    def get_layer_status(self) -> list[TunerLayerStatus]:
        """One ``TunerLayerStatus`` per adapter layer and modules_to_save wrapper, in module order (PEFT's fields and
        values; ``get_layer_status``).  ValueError for prompt-learning models, which have no adapter layers."""
        return get_layer_status(self)

    def get_model_status(self) -> TunerModelStatus:
        """The model-wide summary (``TunerModelStatus``; ``get_model_status``); a value that differs between layers
        is "irregular"."""
        return get_model_status(self)

def _named_forward(self, named: dict, kwargs: dict):
    """Call ``PeftModel.forward`` with the named arguments that were given (None means not given)."""
    kwargs.pop("task_ids", None)  # only multitask prompt tuning uses task ids; fastpeft has none
    for k, v in named.items():
        if v is not None:
            kwargs[k] = v
    return PeftModel.forward(self, **kwargs)


class PeftModelForCausalLM(PeftModel):
    """PeftModel for ``TaskType.CAUSAL_LM``.  ``forward`` names PEFT's arguments, so transformers' ``Trainer`` finds
    ``labels`` (``eval_loss``, label smoothing with shifted labels) exactly as for a PEFT model."""

    def __init__(self, model: nn.Module, peft_config: PeftConfig, adapter_name: str = "default", **kwargs) -> None:
        super().__init__(model, peft_config, adapter_name, **kwargs)
        prep = getattr(self.base_model, "prepare_inputs_for_generation", None)
        if prep is not None:
            self.base_model_prepare_inputs_for_generation = prep

    def forward(self, input_ids=None, attention_mask=None, inputs_embeds=None, labels=None, output_attentions=None,
                output_hidden_states=None, return_dict=None, task_ids=None, **kwargs):
        """input_ids (batch, seq), attention_mask (batch, seq), labels (batch, seq); the model's output."""
        return _named_forward(self, dict(input_ids=input_ids, attention_mask=attention_mask,
                                         inputs_embeds=inputs_embeds, labels=labels,
                                         output_attentions=output_attentions,
                                         output_hidden_states=output_hidden_states, return_dict=return_dict),
                              dict(kwargs, task_ids=task_ids))


class PeftModelForSequenceClassification(PeftModel):
    """PeftModel for ``TaskType.SEQ_CLS``: the ``classifier``/``score`` head is added to ``modules_to_save``."""

    def _prepare_config(self, config: PeftConfig) -> PeftConfig:
        if hasattr(config, "modules_to_save"):
            mts = list(config.modules_to_save or [])
            for name in SEQ_CLS_HEAD_NAMES:
                if name not in mts:
                    mts.append(name)
            config.modules_to_save = mts
        return config

    def forward(self, input_ids=None, attention_mask=None, inputs_embeds=None, labels=None, output_attentions=None,
                output_hidden_states=None, return_dict=None, task_ids=None, **kwargs):
        """input_ids (batch, seq), labels (batch,); the model's output."""
        return _named_forward(self, dict(input_ids=input_ids, attention_mask=attention_mask,
                                         inputs_embeds=inputs_embeds, labels=labels,
                                         output_attentions=output_attentions,
                                         output_hidden_states=output_hidden_states, return_dict=return_dict),
                              dict(kwargs, task_ids=task_ids))


class PeftModelForSeq2SeqLM(PeftModel):
    """PeftModel for ``TaskType.SEQ_2_SEQ_LM``."""

    def __init__(self, model: nn.Module, peft_config: PeftConfig, adapter_name: str = "default", **kwargs) -> None:
        super().__init__(model, peft_config, adapter_name, **kwargs)
        for name in ("prepare_inputs_for_generation", "_prepare_encoder_decoder_kwargs_for_generation"):
            fn = getattr(self.base_model, name, None)
            if fn is not None:
                setattr(self, f"base_model{name if name.startswith('_') else '_' + name}", fn)

    def forward(self, input_ids=None, attention_mask=None, inputs_embeds=None, decoder_input_ids=None,
                decoder_attention_mask=None, decoder_inputs_embeds=None, labels=None, output_attentions=None,
                output_hidden_states=None, return_dict=None, task_ids=None, **kwargs):
        """Encoder input_ids (batch, src), decoder ids / labels (batch, tgt); the model's output."""
        return _named_forward(self, dict(input_ids=input_ids, attention_mask=attention_mask,
                                         inputs_embeds=inputs_embeds, decoder_input_ids=decoder_input_ids,
                                         decoder_attention_mask=decoder_attention_mask,
                                         decoder_inputs_embeds=decoder_inputs_embeds, labels=labels,
                                         output_attentions=output_attentions,
                                         output_hidden_states=output_hidden_states, return_dict=return_dict),
                              dict(kwargs, task_ids=task_ids))


class PeftModelForTokenClassification(PeftModel):
    """PeftModel for ``TaskType.TOKEN_CLS``."""

    def forward(self, input_ids=None, attention_mask=None, inputs_embeds=None, labels=None, output_attentions=None,
                output_hidden_states=None, return_dict=None, task_ids=None, **kwargs):
        """input_ids (batch, seq), labels (batch, seq); the model's output."""
        return _named_forward(self, dict(input_ids=input_ids, attention_mask=attention_mask,
                                         inputs_embeds=inputs_embeds, labels=labels,
                                         output_attentions=output_attentions,
                                         output_hidden_states=output_hidden_states, return_dict=return_dict),
                              dict(kwargs, task_ids=task_ids))


class PeftModelForQuestionAnswering(PeftModel):
    """PeftModel for ``TaskType.QUESTION_ANS``."""

    def forward(self, input_ids=None, attention_mask=None, token_type_ids=None, position_ids=None,
                inputs_embeds=None, start_positions=None, end_positions=None, output_attentions=None,
                output_hidden_states=None, return_dict=None, task_ids=None, **kwargs):
        """input_ids (batch, seq), start/end_positions (batch,); the model's output."""
        return _named_forward(self, dict(input_ids=input_ids, attention_mask=attention_mask,
                                         token_type_ids=token_type_ids, position_ids=position_ids,
                                         inputs_embeds=inputs_embeds, start_positions=start_positions,
                                         end_positions=end_positions, output_attentions=output_attentions,
                                         output_hidden_states=output_hidden_states, return_dict=return_dict),
                              dict(kwargs, task_ids=task_ids))


class PeftModelForFeatureExtraction(PeftModel):
    """PeftModel for ``TaskType.FEATURE_EXTRACTION``."""

    def forward(self, input_ids=None, attention_mask=None, inputs_embeds=None, output_attentions=None,
                output_hidden_states=None, return_dict=None, task_ids=None, **kwargs):
        """input_ids (batch, seq); the model's output."""
        return _named_forward(self, dict(input_ids=input_ids, attention_mask=attention_mask,
                                         inputs_embeds=inputs_embeds, output_attentions=output_attentions,
                                         output_hidden_states=output_hidden_states, return_dict=return_dict),
                              dict(kwargs, task_ids=task_ids))


MODEL_TYPE_TO_PEFT_MODEL_MAPPING: dict[Any, type] = {
    TaskType.CAUSAL_LM: PeftModelForCausalLM,
    TaskType.SEQ_CLS: PeftModelForSequenceClassification,
    TaskType.SEQ_2_SEQ_LM: PeftModelForSeq2SeqLM,
    TaskType.TOKEN_CLS: PeftModelForTokenClassification,
    TaskType.QUESTION_ANS: PeftModelForQuestionAnswering,
    TaskType.FEATURE_EXTRACTION: PeftModelForFeatureExtraction,
}

# PEFT's get/set_peft_model_state_dict called on a fastpeft model (accelerate, TRL) use fastpeft's (_peft_compat).
register_state_dict_functions(PeftModel, get_peft_model_state_dict, set_peft_model_state_dict)


def get_layer_status(model: nn.Module) -> list[TunerLayerStatus]:
    """One ``TunerLayerStatus`` per adapter layer and modules_to_save wrapper of `model` - a ``PeftModel`` (names
    start with "model.", as PEFT's) or a model with adapter layers put in by ``inject_adapter_in_model`` - in module
    order, with HF PEFT's fields and values.  ValueError when it has none (prompt-learning models)."""
    if isinstance(model, PeftModel):
        if model.active_peft_config.is_prompt_learning or model.active_peft_config.is_adaption_prompt:
            raise TypeError("get_layer_status() got an invalid PeftModel instance; prefix tuning and adaption prompt "
                            "are not supported.")
        root, prefix = model.base_model.model, "model."
    else:
        root, prefix = model, ""
    out = []
    for key, mod in root.named_modules():
        if isinstance(mod, BaseTunerLayer):
            containers = {a: getattr(mod, a) for a in mod.adapter_layer_names}
            dev_containers = {a: getattr(mod, a, None) for a in mod.adapter_layer_names + mod.other_param_names}
            module_type = f"{_method_of(type(mod))}.{type(mod).__name__}"
            enabled, active, merged = not mod.disable_adapters, list(mod.active_adapters), list(mod.merged_adapters)
            available = sorted(mod.adapter_names())
        elif isinstance(mod, ModulesToSaveWrapper):
            containers = dev_containers = {"modules_to_save": mod.modules_to_save}
            module_type = type(mod).__name__
            enabled, active, merged = not mod.disable_adapters, list(mod._active_adapter), []
            available = sorted(mod.modules_to_save.keys())
        else:
            continue
        grads: dict[str, list[bool]] = {}
        for c in containers.values():
            for name, item in c.items():
                ps = [item] if isinstance(item, nn.Parameter) else list(item.parameters())
                grads.setdefault(name, []).extend(p.requires_grad for p in ps)
        devices: dict[str, set] = {}
        for c in dev_containers.values():
            if isinstance(c, (nn.ModuleDict, nn.ParameterDict)):
                for name, item in c.items():
                    ps = [item] if isinstance(item, nn.Parameter) else list(item.parameters())
                    devices.setdefault(name, set()).update(p.device.type for p in ps)
        qb = getattr(mod, "quantization_backend", None)
        out.append(TunerLayerStatus(
            name=f"{prefix}{key}", module_type=module_type, enabled=enabled, active_adapters=active,
            merged_adapters=merged,
            requires_grad={k: True if all(v) else (False if not any(v) else "irregular") for k, v in grads.items()},
            available_adapters=available, devices={k: sorted(v) for k, v in devices.items()},
            quantization_backend=getattr(qb, "backend_name", qb)))
    if not out:
        raise ValueError("No adapter layers found in the model (prompt-learning methods have none)")
    return out


def get_model_status(model: nn.Module) -> TunerModelStatus:
    """The model-wide summary of `model`'s adapters (``TunerModelStatus``, HF PEFT's fields): a ``PeftModel`` or a
    model with injected adapter layers (whose ``base_model_type`` is its class name for a transformers model, "other"
    else, and ``adapter_model_type`` "None", as in PEFT).  A value that differs between layers is "irregular"."""
    layers = get_layer_status(model)
    if isinstance(model, PeftModel):
        base_type, adapter_type = type(model.get_base_model()).__name__, type(model.base_model).__name__
        peft_types = {k: str(c.peft_type) for k, c in model.peft_config.items()}
        disabled, default_active = model._adapters_disabled, list(model.active_adapters)
        configured = sorted(model.peft_config)
    else:
        mu = sys.modules.get("transformers.modeling_utils")
        pretrained = mu is not None and isinstance(model, mu.PreTrainedModel)
        base_type, adapter_type = (type(model).__name__ if pretrained else "other"), "None"
        peft_types, disabled, default_active, configured = {}, False, [], []
    trainable, total = PeftModel.get_nb_trainable_parameters(model)
    grads: dict[str, Any] = {}
    devices: dict[str, list[str]] = {}
    for st in layers:
        for k, v in st.requires_grad.items():
            grads[k] = v if k not in grads or grads[k] == v else "irregular"
        for k, v in st.devices.items():
            devices.setdefault(k, [])
            devices[k] += [d for d in v if d not in devices[k]]
    available = sorted({a for st in layers for a in st.available_adapters}) or configured
    return TunerModelStatus(
        base_model_type=base_type, adapter_model_type=adapter_type, peft_types=peft_types,
        trainable_params=trainable, total_params=total, num_adapter_layers=len(layers),
        enabled=_irregular([st.enabled for st in layers]) if layers else not disabled,
        active_adapters=_irregular([sorted(st.active_adapters) for st in layers]) if layers else default_active,
        merged_adapters=_irregular([sorted(st.merged_adapters) for st in layers]) if layers else [],
        requires_grad=grads, available_adapters=available, devices=devices,
        quantization_backend=_irregular([st.quantization_backend for st in layers]) if layers else None)
