"""Adapter files (HF PEFT's ``adapter_model.safetensors`` layout) and the state-dict helpers.

Only safetensors files are read by default.  A pickled ``adapter_model.bin`` (PEFT's ``safe_serialization=False``)
is refused unless the caller passes ``allow_bin=True``, and even then it is read with ``torch.load(...,
weights_only=True)``.
"""

from __future__ import annotations

import os
from collections import namedtuple
from typing import Optional

import torch

__all__ = [
    "SAFETENSORS_WEIGHTS_NAME", "WEIGHTS_NAME", "load_peft_weights", "save_peft_weights",
    "get_peft_model_state_dict", "set_peft_model_state_dict",
]

SAFETENSORS_WEIGHTS_NAME = "adapter_model.safetensors"
WEIGHTS_NAME = "adapter_model.bin"

_LoadResult = namedtuple("_LoadResult", ["missing_keys", "unexpected_keys"])


def load_peft_weights(model_dir: str, device: Optional[str] = None, allow_bin: bool = False,
                      subfolder: Optional[str] = None) -> dict[str, torch.Tensor]:
    """Read the adapter tensors of a local adapter directory.

    Args:
        model_dir: directory holding ``adapter_model.safetensors`` (or ``adapter_model.bin``, see ``allow_bin``).
        device: where to put the tensors (default "cpu").
        allow_bin: opt in to reading a pickled ``adapter_model.bin`` (with ``weights_only=True``).
        subfolder: optional sub-directory (PEFT saves non-default adapters in ``<dir>/<adapter_name>``).
    Returns:
        {PEFT file key: tensor}.
    """
    path = os.path.join(str(model_dir), subfolder) if subfolder else str(model_dir)
    st = os.path.join(path, SAFETENSORS_WEIGHTS_NAME)
    binf = os.path.join(path, WEIGHTS_NAME)
    device = device or "cpu"
    if os.path.isfile(st):
        from safetensors.torch import load_file

        return load_file(st, device=str(device))
    if os.path.isfile(binf):
        if not allow_bin:
            raise ValueError(f"{binf!r} is a pickled adapter_model.bin; fastpeft loads only safetensors by default "
                             "because unpickling untrusted files can run code. Convert it to safetensors, or pass "
                             "allow_bin=True if you trust the file (it is then read with "
                             "torch.load(weights_only=True))")
        return torch.load(binf, map_location=device, weights_only=True)
    raise ValueError(f"no {SAFETENSORS_WEIGHTS_NAME!r} found in {path!r} (fastpeft loads adapters from local "
                     "directories only)")


def save_peft_weights(state_dict: dict[str, torch.Tensor], directory: str, safe_serialization: bool = True) -> str:
    """Write ``state_dict`` as ``adapter_model.safetensors`` (metadata {"format": "pt"}); returns the file path.

    Tensors are copied to CPU, made contiguous and de-aliased (safetensors refuses shared storage).
    """
    os.makedirs(directory, exist_ok=True)
    out = {k: v.detach().to("cpu").contiguous().clone() for k, v in state_dict.items()}
    if safe_serialization:
        from safetensors.torch import save_file

        path = os.path.join(directory, SAFETENSORS_WEIGHTS_NAME)
        save_file(out, path, metadata={"format": "pt"})
    else:
        path = os.path.join(directory, WEIGHTS_NAME)
        torch.save(out, path)
    return path


def _tuner(model):
    base = getattr(model, "base_model", None)
    from .tuners.base import BaseTuner

    if isinstance(base, BaseTuner):
        return base
    if isinstance(model, BaseTuner):
        return model
    raise TypeError(f"expected a fastpeft PeftModel, got {type(model).__name__}")


def get_peft_model_state_dict(model, state_dict: Optional[dict] = None, adapter_name: str = "default",
                              unwrap_compiled: bool = False,
                              save_embedding_layers="auto") -> dict[str, torch.Tensor]:
    """The adapter's tensors keyed as in PEFT's adapter_model.safetensors (adapter name removed).

    ``state_dict`` (optional) is a full ``model.state_dict()`` to take the values from instead of the live model.
    """
    if unwrap_compiled:
        model = getattr(model, "_orig_mod", model)
    tuner = _tuner(model)
    sd = tuner.get_adapter_state_dict(adapter_name)
    if save_embedding_layers is False:
        # leave out the targeted embedding layers' base weights that LoRA adds to the file (PEFT's "auto")
        from .tuners.lora_embedding import optional_embedding_keys

        extra = optional_embedding_keys(tuner, adapter_name)
        sd = {k: v for k, v in sd.items() if k not in extra}
    if state_dict is not None and hasattr(tuner, "_adapter_key_map"):
        keymap = tuner._adapter_key_map(adapter_name)
        if set(keymap) == set(sd):
            sd = {k: state_dict[f"base_model.{path}"] for k, path in keymap.items()}
    return sd


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
