"""Model <-> adapter state dict (HF PEFT's key layout), and the adapter file API re-exported from
``fastpeft.utils.adapter_files`` (where the crash-safe file writing and reading lives).
"""

from __future__ import annotations

import os
from collections import namedtuple
from typing import Optional

import torch

from ._peft_compat import register_state_dict_functions
from .tuners.lora.embedding import optional_embedding_keys
from .hub import resolve_adapter_dir, split_hub_kwargs
from .tuners.tuners_utils import BaseTuner
from .utils.adapter_files import (  # noqa: F401  (public names of fastpeft.save_load)
    SAFETENSORS_WEIGHTS_NAME, SAVE_RECORD_NAME, WEIGHTS_NAME, AdapterFileError, AdapterSaveError,
    InterruptedSaveError, atomic_write_bytes, config_fingerprint, make_adapter_dir, read_adapter_weights,
    read_json_object, save_adapter_files, save_peft_weights)
from .utils.constants import CONFIG_NAME  # noqa: F401

__all__ = [
    "SAFETENSORS_WEIGHTS_NAME", "WEIGHTS_NAME", "load_peft_weights", "save_peft_weights",
    "get_peft_model_state_dict", "set_peft_model_state_dict", "embedding_layer_state_dict",
    "split_embedding_weights", "save_adapter_files", "atomic_write_bytes",
    "AdapterFileError", "InterruptedSaveError", "AdapterSaveError", "SAVE_RECORD_NAME", "config_fingerprint",
]

_LoadResult = namedtuple("_LoadResult", ["missing_keys", "unexpected_keys"])


def load_peft_weights(model_id: str, device: Optional[str] = None, key_mapping: Optional[dict] = None,
                      **kwargs) -> dict[str, torch.Tensor]:
    """The tensors of a saved adapter, keyed as in its file (HF PEFT's ``load_peft_weights``).

    Args:
        model_id: a local adapter directory or a Hub repository id (through huggingface_hub's cache, as in
            ``PeftModel.from_pretrained``).
        device: where to put the tensors (default "cpu"; HF PEFT's default is the available accelerator - the
            values are the same, and ``set_peft_model_state_dict`` copies them to the model's devices either way).
        key_mapping: HF PEFT's key renaming hook; not supported (must be None).
        kwargs: ``subfolder``, ``allow_bin`` (opt in to a pickled adapter_model.bin, read with
            ``weights_only=True``), and huggingface_hub's download arguments (``revision``, ``cache_dir``, ``token``,
            ``local_files_only``, ...).
    Returns:
        {key: tensor} with the file's keys (``base_model.model....lora_A.weight``).
    Raises:
        ValueError naming ``model_id`` when it cannot be found or read; TypeError for an unknown keyword.
    """
    if key_mapping is not None:
        raise ValueError("load_peft_weights: key_mapping is not supported by fastpeft (pass None)")
    subfolder = kwargs.pop("subfolder", None)
    allow_bin = bool(kwargs.pop("allow_bin", False))
    hub_kwargs, unknown = split_hub_kwargs(kwargs)
    if unknown:
        raise TypeError(f"load_peft_weights got unexpected keyword arguments {sorted(unknown)}")
    path = resolve_adapter_dir(str(model_id), subfolder=subfolder, allow_bin=allow_bin, **hub_kwargs)
    return read_adapter_weights(path, device=device, allow_bin=allow_bin)


def _tuner(model):
    base = getattr(model, "base_model", None)
    if isinstance(base, BaseTuner):
        return base
    if isinstance(model, BaseTuner):
        return model
    raise TypeError(f"expected a fastpeft PeftModel, got {type(model).__name__}")


def get_peft_model_state_dict(model, state_dict: Optional[dict] = None, adapter_name: str = "default",
                              unwrap_compiled: bool = False,
                              save_embedding_layers="auto") -> dict[str, torch.Tensor]:
    """The adapter's tensors keyed as in PEFT's adapter_model.safetensors (adapter name removed).

    Args:
        model: a fastpeft PeftModel (or its tuner).
        state_dict: optional full ``model.state_dict()`` (PeftModel keys) to take the values from instead of the
            live parameters (FSDP / ZeRO-3 saves gather it first).
        save_embedding_layers: True adds the input/output embedding weights under their PeftModel keys; "auto" does
            so when "embed_tokens"/"lm_head" is targeted, or when the vocabulary differs from the base model's
            config.json found in the local directory ``base_model_name_or_path`` (HF PEFT's rule; fastpeft does not
            ask the Hub).
    """
    if unwrap_compiled:
        model = getattr(model, "_orig_mod", model)
    tuner = _tuner(model)
    sd = tuner.get_adapter_state_dict(adapter_name)
    if save_embedding_layers is False:
        # leave out the targeted embedding layers' base weights that LoRA adds to the file (PEFT's "auto")
        extra = optional_embedding_keys(tuner, adapter_name)
        sd = {k: v for k, v in sd.items() if k not in extra}
    if state_dict is not None and hasattr(tuner, "_adapter_key_map"):
        keymap = tuner._adapter_key_map(adapter_name)
        if set(keymap) == set(sd):
            missing = [f"base_model.{p}" for p in keymap.values() if f"base_model.{p}" not in state_dict]
            if missing:
                raise ValueError(f"state_dict lacks the adapter's keys {missing[:4]} (it must be keyed like "
                                 "PeftModel.state_dict())")
            sd = {k: state_dict[f"base_model.{path}"] for k, path in keymap.items()}
    if tuner is not model:
        sd.update(embedding_layer_state_dict(model, adapter_name, state_dict, save_embedding_layers))
    return sd


EMBEDDING_LAYER_NAMES = ["embed_tokens", "lm_head"]


def _embedding_targeted(model, config) -> bool:
    import re

    tm = getattr(config, "target_modules", None)
    if isinstance(tm, str) and tm != "all-linear":
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        return any(re.fullmatch(tm, k) for k, _ in base.named_modules()
                   if any(re.match(rf"(.*\.)?{e}$", k) for e in EMBEDDING_LAYER_NAMES))
    return bool(tm) and not isinstance(tm, str) and any(e in tm for e in EMBEDDING_LAYER_NAMES)


def _vocab_resized(model, config) -> bool:
    vocab = getattr(getattr(model, "config", None), "vocab_size", None)
    base_id = getattr(config, "base_model_name_or_path", None)
    if not (vocab and base_id and os.path.isfile(os.path.join(str(base_id), "config.json"))):
        return False
    return vocab != model.config.__class__.from_pretrained(base_id).vocab_size


def embedding_layer_state_dict(peft_model, adapter_name: str, state_dict: Optional[dict] = None,
                               save_embedding_layers="auto") -> dict[str, torch.Tensor]:
    """The embedding weights ``save_pretrained(save_embedding_layers=...)`` adds, keyed as PEFT saves them
    (PeftModel parameter names, e.g. ``base_model.model.model.embed_tokens.weight``); {} when not saved."""
    import warnings

    if save_embedding_layers not in (True, False, "auto"):
        raise ValueError(f"save_embedding_layers must be True, False or 'auto', got {save_embedding_layers!r}")
    config = peft_model.peft_config[adapter_name]
    targeted = _embedding_targeted(peft_model, config)
    if save_embedding_layers == "auto":
        trainable_tokens = getattr(config, "trainable_token_indices", None) is not None
        if targeted and not trainable_tokens:
            warnings.warn("Setting `save_embedding_layers` to `True` as embedding layers found in `target_modules`.",
                          UserWarning, stacklevel=3)
            save_embedding_layers = True
        elif _vocab_resized(peft_model, config):
            warnings.warn("Setting `save_embedding_layers` to `True` as the embedding layer has been resized during "
                          "finetuning.", UserWarning, stacklevel=3)
            save_embedding_layers = True
        else:
            save_embedding_layers = False
    if not save_embedding_layers:
        return {}
    base = peft_model.get_base_model()
    if not hasattr(base, "get_input_embeddings"):
        warnings.warn("Could not identify embedding layer(s) because the model is not a 🤗 transformers model.",
                      UserWarning, stacklevel=3)
        return {}
    if state_dict is None:
        state_dict = peft_model.state_dict()
    out: dict[str, torch.Tensor] = {}
    for layer in (base.get_input_embeddings(), base.get_output_embeddings()):
        if layer is None:
            continue
        inner = getattr(layer, "base_layer", None)
        if targeted and not isinstance(inner, (torch.nn.Linear, torch.nn.Embedding)):
            continue
        want = inner if targeted else layer
        name = next((n for n, m in peft_model.named_modules() if m is want), None)
        if name:
            out.update({k: v for k, v in state_dict.items() if k.startswith(name + ".")})
    return out


def split_embedding_weights(peft_model, adapter_name: str, weights: dict[str, torch.Tensor]):
    """Separate the embedding weights saved with ``save_embedding_layers`` from the adapter's tensors.

    Returns ``(adapter_weights, apply)``: ``apply()`` copies the embedding weights into the model.  Keys that are
    neither adapter keys nor parameters of the model's input/output embeddings stay in ``adapter_weights`` (the
    strict adapter check then reports them).  Raises ValueError for an embedding weight of the wrong shape, before
    anything is changed.
    """
    tuner = _tuner(peft_model)
    base = peft_model.get_base_model() if hasattr(peft_model, "get_base_model") else None
    expected = tuner._expected_adapter_shapes(adapter_name) if hasattr(tuner, "_expected_adapter_shapes") else {}
    if base is None or not hasattr(base, "get_input_embeddings") or not weights:
        return weights, (lambda: None)
    emb_params = {}
    for layer in (base.get_input_embeddings(), base.get_output_embeddings()):
        if layer is None:
            continue
        for mname, m in peft_model.named_modules():
            if m is layer or m is getattr(layer, "base_layer", None):
                for pn, p in m.named_parameters(recurse=False):
                    emb_params[f"{mname}.{pn}"] = p
    adapter, emb = {}, {}
    for k, v in weights.items():
        (emb if k not in expected and k in emb_params else adapter)[k] = v
    bad = [f"{k}: {tuple(v.shape)} in the file, {tuple(emb_params[k].shape)} in the model"
           for k, v in emb.items() if tuple(v.shape) != tuple(emb_params[k].shape)]
    if bad:
        raise ValueError("the saved embedding weights do not fit the model: " + "; ".join(bad))

    def apply():
        with torch.no_grad():
            for k, v in emb.items():
                emb_params[k].copy_(v.to(device=emb_params[k].device, dtype=emb_params[k].dtype))

    return adapter, apply


def set_peft_model_state_dict(model, peft_model_state_dict: dict[str, torch.Tensor], adapter_name: str = "default",
                              ignore_mismatched_sizes: bool = False, low_cpu_mem_usage: bool = False):
    """Load PEFT-keyed adapter tensors into adapter ``adapter_name``.

    Every key and shape is checked first; on any mismatch a ValueError lists them and nothing is changed.
    Returns ``(missing_keys=[], unexpected_keys=[])`` like torch's load_state_dict.
    """
    if ignore_mismatched_sizes:
        raise ValueError("ignore_mismatched_sizes=True is not supported by fastpeft (loading is strict)")
    tuner = _tuner(model)
    tuner.set_adapter_state_dict(adapter_name, normalise_keys(tuner, adapter_name, peft_model_state_dict))
    return _LoadResult([], [])


def normalise_keys(tuner, adapter_name: str, sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Accept files written without the PeftModel prefix (PEFT's ``inject_adapter_in_model`` layout): when the tuner
    expects ``base_model.model.``-prefixed keys and none of the file's keys has the prefix, add it."""
    pre = "base_model.model."
    expected = getattr(tuner, "_expected_adapter_shapes", None)
    if not sd or expected is None or any(k.startswith(pre) for k in sd):
        return sd
    try:
        want = expected(adapter_name)
    except Exception:  # a tuner whose expectations cannot be listed: leave the keys alone
        return sd
    if want and all(k.startswith(pre) for k in want):
        return {pre + k: v for k, v in sd.items()}
    return sd


# PEFT's get/set_peft_model_state_dict called on a fastpeft tuner use these (see fastpeft._peft_compat).
register_state_dict_functions(BaseTuner, get_peft_model_state_dict, set_peft_model_state_dict)
