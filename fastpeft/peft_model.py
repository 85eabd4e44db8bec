"""``PeftModel``: HF PEFT's wrapper API over a fastpeft tuner.

``PeftModel`` is generic: it builds ``TUNER_CLASSES[config.peft_type]`` as ``self.base_model`` and forwards
``forward``/``generate`` (with every argument) to it, so any registered method - LoRA, AdaLoRA, IA3, or the prompt
methods of ``fastpeft.prompt`` - works through the same class.  Anything else is looked up on the tuner and then on
the user model (``config``, ``generate``'s helpers, ...).
"""

from __future__ import annotations

import os
import warnings
from contextlib import contextmanager
from typing import Any, Optional, Union

import torch.nn as nn

from .config import PeftConfig, TaskType
from .save_load import load_peft_weights, normalise_keys, save_adapter_files
from .tuners import get_tuner_class
from .tuners.base import SEQ_CLS_HEAD_NAMES

__all__ = [
    "PeftModel", "PeftModelForCausalLM", "PeftModelForSequenceClassification", "PeftModelForSeq2SeqLM",
    "PeftModelForTokenClassification", "PeftModelForQuestionAnswering", "PeftModelForFeatureExtraction",
    "MODEL_TYPE_TO_PEFT_MODEL_MAPPING",
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


class PeftModel(nn.Module):
    """Wraps ``model`` with the adapter described by ``peft_config`` (the model is modified in place).

    Args:
        model: the model to adapt (any nn.Module; HF transformers models get architecture defaults).
        peft_config: a registered config (``LoraConfig``, ``AdaLoraConfig``, ``IA3Config``, prompt configs ...).
        adapter_name: name of the first adapter ("default").
        autocast_adapter_dtype: upcast fp16/bf16 adapter weights to fp32 (HF PEFT's default).

    Parameter names are HF PEFT's: ``base_model.model.<module path>.lora_A.<adapter>.weight``.
    """

    def __init__(self, model: nn.Module, peft_config: PeftConfig, adapter_name: str = "default",
                 autocast_adapter_dtype: bool = True, low_cpu_mem_usage: bool = False) -> None:
        super().__init__()
        if not isinstance(peft_config, PeftConfig):
            raise TypeError(f"peft_config must be a fastpeft PeftConfig, got {type(peft_config).__name__}")
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        self.peft_type = peft_config.peft_type
        peft_config = self._prepare_config(peft_config)
        tuner_cls = get_tuner_class(peft_config.peft_type)
        self.base_model = tuner_cls(model, peft_config, adapter_name, autocast_adapter_dtype=autocast_adapter_dtype)
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
            yield

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
                        selected_adapters: Optional[list[str]] = None, save_embedding_layers="auto",
                        is_main_process: bool = True, **kwargs) -> None:
        """Write ``adapter_config.json`` + ``adapter_model.safetensors`` per adapter, exactly as HF PEFT does.

        The "default" adapter goes to ``save_directory``, any other to ``save_directory/<adapter_name>``.
        """
        if os.path.isfile(save_directory):
            raise ValueError(f"save_directory must be a directory, but {save_directory!r} is a file")
        names = list(self.peft_config) if selected_adapters is None else list(selected_adapters)
        unknown = [n for n in names if n not in self.peft_config]
        if unknown:
            raise ValueError(f"selected_adapters {unknown} do not exist; available: {sorted(self.peft_config)}")
        if not is_main_process:
            return
        for name in names:
            cfg = self.peft_config[name]
            sd = self.base_model.get_adapter_state_dict(name)  # before the config: AdaLoRA rewrites rank_pattern
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

    @classmethod
    def from_pretrained(cls, model: nn.Module, model_id: Union[str, os.PathLike], adapter_name: str = "default",
                        is_trainable: bool = False, config: Optional[PeftConfig] = None,
                        autocast_adapter_dtype: bool = True, allow_bin: bool = False, subfolder: Optional[str] = None,
                        **kwargs) -> "PeftModel":
        """Wrap ``model`` with the adapter saved in the local directory ``model_id`` (PEFT or fastpeft files).

        Args:
            is_trainable: False (default) loads the adapter frozen and puts the model in eval mode.
            config: use this config instead of the directory's adapter_config.json.
            allow_bin: opt in to reading a pickled adapter_model.bin (``weights_only=True``); safetensors otherwise.
        Raises ValueError/TypeError before anything is left changed if the config or any tensor shape does not fit:
        the model is then exactly as it was (modules, values, requires_grad).
        """
        if kwargs:
            unsupported = sorted(kwargs)
            warnings.warn(f"from_pretrained ignores the arguments {unsupported} (not supported by fastpeft)",
                          UserWarning, stacklevel=2)
        path = os.path.join(str(model_id), subfolder) if subfolder else str(model_id)
        if config is None:
            config = PeftConfig.from_pretrained(path)
        elif not isinstance(config, PeftConfig):
            raise TypeError(f"config must be a PeftConfig, got {type(config).__name__}")
        config.inference_mode = not is_trainable
        weights = load_peft_weights(path, allow_bin=allow_bin)
        snapshot = [(p, p.requires_grad) for p in model.parameters()]
        klass = MODEL_TYPE_TO_PEFT_MODEL_MAPPING.get(config.task_type, PeftModel) if cls is PeftModel else cls
        peft_model = klass(model, config, adapter_name, autocast_adapter_dtype=autocast_adapter_dtype)
        try:
            tuner = peft_model.base_model
            tuner.set_adapter_state_dict(adapter_name, normalise_keys(tuner, adapter_name, weights))
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
                     subfolder: Optional[str] = None, **kwargs):
        """Load another saved adapter under ``adapter_name`` (not activated).  Atomic: on error nothing changes."""
        path = os.path.join(str(model_id), subfolder) if subfolder else str(model_id)
        if adapter_name in self.peft_config:
            raise ValueError(f"an adapter named {adapter_name!r} already exists; delete it first or choose another "
                             "name")
        config = PeftConfig.from_pretrained(path)
        config.inference_mode = not is_trainable
        weights = load_peft_weights(path, device=torch_device, allow_bin=allow_bin)
        snapshot = [(p, p.requires_grad) for p in self.parameters()]
        self.add_adapter(adapter_name, config, autocast_adapter_dtype=autocast_adapter_dtype)
        try:
            tuner = self.base_model
            tuner.set_adapter_state_dict(adapter_name, normalise_keys(tuner, adapter_name, weights))
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


class PeftModelForCausalLM(PeftModel):
    """PeftModel for ``TaskType.CAUSAL_LM`` (same behaviour; the class exists for isinstance checks)."""


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


class PeftModelForSeq2SeqLM(PeftModel):
    """PeftModel for ``TaskType.SEQ_2_SEQ_LM``."""


class PeftModelForTokenClassification(PeftModel):
    """PeftModel for ``TaskType.TOKEN_CLS``."""


class PeftModelForQuestionAnswering(PeftModel):
    """PeftModel for ``TaskType.QUESTION_ANS``."""


class PeftModelForFeatureExtraction(PeftModel):
    """PeftModel for ``TaskType.FEATURE_EXTRACTION``."""


MODEL_TYPE_TO_PEFT_MODEL_MAPPING: dict[Any, type] = {
    TaskType.CAUSAL_LM: PeftModelForCausalLM,
    TaskType.SEQ_CLS: PeftModelForSequenceClassification,
    TaskType.SEQ_2_SEQ_LM: PeftModelForSeq2SeqLM,
    TaskType.TOKEN_CLS: PeftModelForTokenClassification,
    TaskType.QUESTION_ANS: PeftModelForQuestionAnswering,
    TaskType.FEATURE_EXTRACTION: PeftModelForFeatureExtraction,
}
