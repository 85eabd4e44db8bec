"""HF PEFT's ``AutoPeftModel`` classes: an adapter and the base model it was trained on, loaded in one call.

``fastpeft.AutoPeftModelForCausalLM.from_pretrained("adapter dir or Hub id", torch_dtype=..., device_map=...)``
reads the adapter's ``adapter_config.json``, loads the base model it names (``base_model_name_or_path`` at the
config's ``revision``) with the transformers auto class of the adapter's task, grows the base's input embeddings when
the adapter carries a tokenizer with more tokens than the base has rows, and wraps the base in the task's
``PeftModel`` class with the adapter loaded (``PeftModel.from_pretrained``).  Names, arguments, the task check and
``AutoPeftModel``'s ``auto_mapping`` import allowlist are HF PEFT's (``peft/auto.py`` of 0.21).

Keyword arguments are routed by name: the Hub's (``token``, ``cache_dir``, ``local_files_only``, ...) go to every
download; the adapter's (``subfolder``, ``allow_bin``, ``autocast_adapter_dtype``, ``torch_device``,
``ephemeral_gpu_offload``) only to the adapter; the rest (``torch_dtype``, ``device_map``, ``quantization_config``,
``attn_implementation``, ``trust_remote_code``, ...) to the base model's ``from_pretrained``.  (HF PEFT passes every
keyword to the base model, including the adapter's ``subfolder``.)
"""

from __future__ import annotations

import importlib
import os
from typing import Optional

from .config import PeftConfig
from .hub import local_adapter_dir, optional_adapter_file, split_hub_kwargs
from .peft_model import (MODEL_TYPE_TO_PEFT_MODEL_MAPPING, PeftModel, PeftModelForCausalLM,
                         PeftModelForFeatureExtraction, PeftModelForQuestionAnswering, PeftModelForSeq2SeqLM,
                         PeftModelForSequenceClassification, PeftModelForTokenClassification)

__all__ = ["AutoPeftModel", "AutoPeftModelForCausalLM", "AutoPeftModelForSeq2SeqLM",
           "AutoPeftModelForSequenceClassification", "AutoPeftModelForTokenClassification",
           "AutoPeftModelForQuestionAnswering", "AutoPeftModelForFeatureExtraction", "get_default_import_allowlist"]

TOKENIZER_CONFIG_NAME = "tokenizer_config.json"
# keyword arguments that belong to the adapter's loading only (PeftModel.from_pretrained's own)
_ADAPTER_KWARGS = ("subfolder", "allow_bin", "autocast_adapter_dtype", "torch_device", "ephemeral_gpu_offload")


def get_default_import_allowlist() -> list[str]:
    """The libraries ``AutoPeftModel`` may import the base model class from (an adapter config's ``auto_mapping``
    names a module to import; HF PEFT's list)."""
    return ["diffusers", "lerobot", "megatron-core", "transformers"]


def _allowed(allowlist: list[str], library: str) -> bool:
    return any(library == name or library.startswith(name + ".") for name in allowlist)


class _BaseAutoPeftModel:
    """``from_pretrained`` of the auto classes; ``_target_class`` is the transformers auto class of the task (None for
    ``AutoPeftModel``, which takes the class from the adapter config's ``auto_mapping``), ``_target_peft_class`` the
    PeftModel class it returns."""

    _target_class: Optional[str] = None       # a transformers attribute name, imported when used
    _target_peft_class: type = PeftModel

    def __init__(self, *args, **kwargs):
        raise EnvironmentError(f"{type(self).__name__} is designed to be instantiated using "
                               f"`{type(self).__name__}.from_pretrained(pretrained_model_name_or_path)`")

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, adapter_name: str = "default",
                        is_trainable: bool = False, config: Optional[PeftConfig] = None,
                        revision: Optional[str] = None, import_allowlist: Optional[list[str]] = None,
                        **kwargs) -> PeftModel:
        """Load the base model an adapter names and the adapter on it.

        Args:
            pretrained_model_name_or_path: the adapter: a local directory or a Hub repository id.
            adapter_name, is_trainable, config, revision: as in ``PeftModel.from_pretrained`` (``revision`` is the
                adapter's; the base model is loaded at the revision its config records).
            import_allowlist: ``AutoPeftModel`` only - libraries the adapter config's ``auto_mapping`` may import
                the base class from (default ``get_default_import_allowlist()``).
            kwargs: routed by name (module docstring): Hub arguments to every download, the adapter's own to the
                adapter, the rest to the base model's ``from_pretrained`` (``torch_dtype``, ``device_map``, ...).
        Returns:
            the task's ``PeftModel`` class (``PeftModelForCausalLM`` for ``AutoPeftModelForCausalLM``), in eval mode
            unless ``is_trainable``.
        Raises:
            ValueError naming the adapter when its config names no base model, its task does not match this class,
            or its ``auto_mapping`` library is not allowed; the loaders' errors for a base or adapter that cannot be
            had.
        """
        model_id = str(pretrained_model_name_or_path)
        hub_kwargs, rest = split_hub_kwargs(kwargs)
        adapter_kwargs = {k: rest.pop(k) for k in _ADAPTER_KWARGS if k in rest}
        subfolder = adapter_kwargs.get("subfolder")
        adapter_hub = dict(hub_kwargs, **({"revision": revision} if revision is not None else {}))
        file_config = PeftConfig.from_pretrained(model_id, subfolder=subfolder, **adapter_hub)
        base_path = file_config.base_model_name_or_path
        if not base_path:
            raise ValueError(f"the adapter {model_id!r} does not name its base model (base_model_name_or_path is "
                             "empty in adapter_config.json): load the base model yourself and call "
                             f"{cls._target_peft_class.__name__}.from_pretrained(base_model, {model_id!r})")
        target = cls._base_class(file_config, model_id, import_allowlist)
        base_hub = {k: v for k, v in hub_kwargs.items() if k != "revision"}
        base = target.from_pretrained(base_path, revision=file_config.revision, **base_hub, **rest)
        _grow_embeddings_to_tokenizer(base, model_id, subfolder, adapter_hub, rest.get("trust_remote_code", False))
        return cls._target_peft_class.from_pretrained(base, model_id, adapter_name=adapter_name,
                                                      is_trainable=is_trainable, config=config, **adapter_hub,
                                                      **adapter_kwargs)

    @classmethod
    def _base_class(cls, file_config: PeftConfig, model_id: str, import_allowlist: Optional[list[str]]) -> type:
        """The class whose ``from_pretrained`` loads the base model (HF PEFT's rules)."""
        task = file_config.task_type
        if task is not None:
            if cls._target_class is None:
                raise ValueError("Cannot use `AutoPeftModel` with a task type, please use a specific class for your "
                                 f"task type (e.g. `AutoPeftModelForCausalLM` for task_type='CAUSAL_LM'); the adapter "
                                 f"{model_id!r} has task_type={str(task)!r}")
            expected = MODEL_TYPE_TO_PEFT_MODEL_MAPPING.get(task)
            if expected is None:
                raise ValueError(f"the adapter {model_id!r} has task_type={str(task)!r}, which no auto class loads "
                                 f"(known: {sorted(str(t) for t in MODEL_TYPE_TO_PEFT_MODEL_MAPPING)})")
            if expected is not cls._target_peft_class:
                raise ValueError(f"Expected target PEFT class: {expected.__name__}, but you have asked for: "
                                 f"{cls._target_peft_class.__name__} make sure that you are loading the correct model "
                                 f"for your task type (the adapter {model_id!r} has task_type={str(task)!r})")
            import transformers
            return getattr(transformers, cls._target_class)
        mapping = file_config.auto_mapping
        if not mapping:
            raise ValueError("Cannot infer the auto class from the config, please make sure that you are loading the "
                             f"correct model for your task type (the adapter {model_id!r} has no task_type and no "
                             "auto_mapping)")
        # (also for the task classes: an adapter without a task type names its base class itself, as in HF PEFT)
        library, name = mapping.get("parent_library"), mapping.get("base_model_class")
        if not isinstance(library, str) or not isinstance(name, str):
            raise ValueError(f"the adapter {model_id!r} has a malformed auto_mapping {mapping!r} (needs "
                             "'parent_library' and 'base_model_class')")
        allow = get_default_import_allowlist() if import_allowlist is None else list(import_allowlist)
        if not _allowed(allow, library):
            raise ValueError(f"The auto mapping wants to import '{library}' which is not in the import allowlist. If "
                             "you are sure that importing this library is safe, specify "
                             f"`import_allowlist=['{library}']` in `from_pretrained()`.")
        klass = getattr(importlib.import_module(library), name, None)
        if klass is None or not hasattr(klass, "from_pretrained"):
            raise ValueError(f"the adapter {model_id!r}'s auto_mapping names {library}.{name}, which is not a class "
                             "with from_pretrained")
        return klass


def _grow_embeddings_to_tokenizer(base, model_id: str, subfolder: Optional[str], hub_kwargs: dict,
                                  trust_remote_code: bool) -> None:
    """When the adapter carries a tokenizer (``tokenizer_config.json`` beside it) with more tokens than the base has
    input embedding rows - tokens added during fine-tuning - resize the base's embeddings to it before the adapter
    (which may hold those rows) is loaded."""
    if not hasattr(base, "get_input_embeddings") or not hasattr(base, "resize_token_embeddings"):
        return
    found = optional_adapter_file(model_id, TOKENIZER_CONFIG_NAME, subfolder, **hub_kwargs)
    if found is None:
        return
    from transformers import AutoTokenizer
    local = local_adapter_dir(model_id, subfolder) is not None
    src, kw = (os.path.dirname(found), {}) if local else (model_id, dict(hub_kwargs, subfolder=subfolder))
    tokenizer = AutoTokenizer.from_pretrained(src, trust_remote_code=trust_remote_code,
                                              **{k: v for k, v in kw.items() if v is not None})
    rows = base.get_input_embeddings().weight.shape[0]
    if len(tokenizer) > rows:
        base.resize_token_embeddings(len(tokenizer))


class AutoPeftModel(_BaseAutoPeftModel):
    """An adapter without a task type (``task_type=None``) on the base class its config's ``auto_mapping`` names."""
    _target_class = None
    _target_peft_class = PeftModel


class AutoPeftModelForCausalLM(_BaseAutoPeftModel):
    """task_type CAUSAL_LM: ``transformers.AutoModelForCausalLM`` + ``PeftModelForCausalLM``."""
    _target_class = "AutoModelForCausalLM"
    _target_peft_class = PeftModelForCausalLM


class AutoPeftModelForSeq2SeqLM(_BaseAutoPeftModel):
    """task_type SEQ_2_SEQ_LM: ``transformers.AutoModelForSeq2SeqLM`` + ``PeftModelForSeq2SeqLM``."""
    _target_class = "AutoModelForSeq2SeqLM"
    _target_peft_class = PeftModelForSeq2SeqLM


class AutoPeftModelForSequenceClassification(_BaseAutoPeftModel):
    """task_type SEQ_CLS: ``transformers.AutoModelForSequenceClassification`` + ``PeftModelForSequenceClassification``."""
    _target_class = "AutoModelForSequenceClassification"
    _target_peft_class = PeftModelForSequenceClassification


class AutoPeftModelForTokenClassification(_BaseAutoPeftModel):
    """task_type TOKEN_CLS: ``transformers.AutoModelForTokenClassification`` + ``PeftModelForTokenClassification``."""
    _target_class = "AutoModelForTokenClassification"
    _target_peft_class = PeftModelForTokenClassification


class AutoPeftModelForQuestionAnswering(_BaseAutoPeftModel):
    """task_type QUESTION_ANS: ``transformers.AutoModelForQuestionAnswering`` + ``PeftModelForQuestionAnswering``."""
    _target_class = "AutoModelForQuestionAnswering"
    _target_peft_class = PeftModelForQuestionAnswering


class AutoPeftModelForFeatureExtraction(_BaseAutoPeftModel):
    """task_type FEATURE_EXTRACTION: ``transformers.AutoModel`` + ``PeftModelForFeatureExtraction``."""
    _target_class = "AutoModel"
    _target_peft_class = PeftModelForFeatureExtraction
