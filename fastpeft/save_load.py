"""Adapter files (HF PEFT's ``adapter_model.safetensors`` layout) and the state-dict helpers.

Only safetensors files are read by default.  A pickled ``adapter_model.bin`` (PEFT's ``safe_serialization=False``)
is refused unless the caller passes ``allow_bin=True``, and even then it is read with ``torch.load(...,
weights_only=True)``.

Saving is crash-safe (``save_adapter_files``): both files are serialised in memory first, each file is written to a
temporary name in the same directory, flushed and renamed over the old one (``os.replace``), and a small save record
(``fastpeft_save.json``: sha256 of the weights file, fingerprint of the config) lets ``load_peft_weights`` detect
a directory left with the new weights and the old config (``InterruptedSaveError``).  Whatever fails, the directory
loads as exactly the old adapter or exactly the new one, or refuses to load saying the save was interrupted.  The two
adapter files stay byte-for-byte what HF PEFT writes; PEFT ignores the record.
"""

from __future__ import annotations

import errno
import hashlib
import io
import json
import os
import pickle
import tempfile
from collections import namedtuple
from typing import Optional

import torch

from .config import CONFIG_NAME

__all__ = [
    "SAFETENSORS_WEIGHTS_NAME", "WEIGHTS_NAME", "load_peft_weights", "save_peft_weights",
    "get_peft_model_state_dict", "set_peft_model_state_dict", "embedding_layer_state_dict",
    "split_embedding_weights", "save_adapter_files", "atomic_write_bytes",
    "AdapterFileError", "InterruptedSaveError", "AdapterSaveError", "SAVE_RECORD_NAME", "config_fingerprint",
]

SAFETENSORS_WEIGHTS_NAME = "adapter_model.safetensors"
WEIGHTS_NAME = "adapter_model.bin"

_LoadResult = namedtuple("_LoadResult", ["missing_keys", "unexpected_keys"])


class AdapterFileError(ValueError):
    """An adapter file cannot be read: damaged, not what its name says, or not from the same save as its neighbour.

    The message names the file, its directory and what to do.  Subclass of ValueError (the content is wrong)."""


class InterruptedSaveError(AdapterFileError):
    """``adapter_config.json`` and ``adapter_model.safetensors`` come from two different saves: a save into this
    directory was interrupted between its two files (or one file was replaced by hand)."""


class AdapterSaveError(OSError):
    """Writing an adapter file failed (read-only directory, full disk, ...).  The files that were in the directory
    before are unchanged; the message names the file, the directory and the cause."""


# Sidecar file tying adapter_model.safetensors to the adapter_config.json written with it.  It holds the sha256 of the
# weights file and a fingerprint of the config.  The weights file and the config stay byte-for-byte HF PEFT's (PEFT
# warns about unknown config keys, and its files carry only {"format": "pt"} as metadata), and PEFT ignores other
# files in the directory.
SAVE_RECORD_NAME = "fastpeft_save.json"
# adapter_config.json keys that describe where the adapter came from rather than what its weights mean; they are left
# out of the fingerprint so that editing them (e.g. base_model_name_or_path) does not make a directory unloadable.
_UNTIED_CONFIG_KEYS = frozenset({"base_model_name_or_path", "revision", "inference_mode", "auto_mapping",
                                 "peft_version"})


def config_fingerprint(config_dict: dict) -> str:
    """sha256 (hex) of the weight-relevant part of an adapter config dict (key order and JSON layout do not matter).

    Sets and tuples compare as sorted lists, as they are written to adapter_config.json."""
    from .config import _jsonable

    d = {k: _jsonable(v) for k, v in config_dict.items() if k not in _UNTIED_CONFIG_KEYS}
    blob = json.dumps(d, sort_keys=True, separators=(",", ":"), default=str).encode()
    return hashlib.sha256(blob).hexdigest()


def _dir_of(path: str) -> str:
    return os.path.dirname(os.path.abspath(path)) or "."


def atomic_write_bytes(path: str, data: bytes) -> None:
    """Write ``data`` to ``path`` so that ``path`` afterwards holds either its old content or all of ``data``.

    The bytes go to a temporary file in the same directory, are flushed to disk (fsync) and then renamed over
    ``path`` with ``os.replace`` (atomic on POSIX and Windows).  On failure the temporary file is removed and
    ``AdapterSaveError`` (an OSError) names the file, the directory and the cause."""
    directory = _dir_of(path)
    name = os.path.basename(path)
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{name}.", suffix=".tmp", dir=directory)
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
        tmp = None
    except OSError as e:
        raise AdapterSaveError(e.errno, f"could not write {name!r} in directory {directory!r}: "
                               f"{e.strerror or e}. The adapter files already in that directory (if any) are "
                               "unchanged; check that the directory is writable and the disk has space, then save "
                               "again") from e
    finally:
        if tmp is not None:
            try:
                os.unlink(tmp)
            except OSError:
                pass
    try:  # make the rename itself durable (POSIX; directories cannot be opened on Windows)
        dfd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(dfd)
    except OSError:
        pass
    finally:
        os.close(dfd)


def make_adapter_dir(directory: str) -> None:
    """``os.makedirs(directory, exist_ok=True)``; failure raises ``AdapterSaveError`` naming the directory."""
    try:
        os.makedirs(directory, exist_ok=True)
    except OSError as e:
        raise AdapterSaveError(e.errno, f"could not create the adapter directory {str(directory)!r}: "
                               f"{e.strerror or e}. Choose a writable directory (a path whose parts are not files) "
                               "and save again") from e


def read_json_object(path: str) -> dict:
    """Parse ``path`` as a JSON object; any failure raises ``AdapterFileError`` (a ValueError) naming the file."""
    directory = _dir_of(path)
    name = os.path.basename(path)
    try:
        with open(path, "rb") as fh:
            raw = fh.read()
        d = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        hint = " (the file is empty)" if not raw.strip() else ""
        raise AdapterFileError(f"{name!r} in directory {directory!r} is not valid JSON{hint}: {e}. The file is "
                               "damaged or was not completely written; save the adapter again or restore the file "
                               "from a backup") from e
    if not isinstance(d, dict):
        raise AdapterFileError(f"{name!r} in directory {directory!r} holds a JSON {type(d).__name__}, not an object "
                               "({...}), so it is not an adapter config; save the adapter again or restore the file "
                               "from a backup")
    return d


def _sha256_file(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 24), b""):
            h.update(chunk)
    return h.hexdigest()


def _check_save_record(weights_path: str) -> None:
    """Raise InterruptedSaveError when the weights file is the one a fastpeft save wrote but the adapter_config.json
    next to it is not the one that save wrote.

    States after a save (record, weights, config written in that order, each atomically) that was cut short: record
    new + weights old -> the weights do not match the record, so the old pair loads; record new + weights new +
    config old -> detected here.  A directory without a record (HF PEFT's) or whose weights another program rewrote
    is not checked."""
    directory = _dir_of(weights_path)
    rec_path = os.path.join(directory, SAVE_RECORD_NAME)
    cfg_path = os.path.join(directory, CONFIG_NAME)
    if not os.path.isfile(rec_path) or not os.path.isfile(cfg_path):
        return
    rec = read_json_object(rec_path)
    if rec.get("weights_file") != os.path.basename(weights_path):
        return
    if rec.get("weights_sha256") != _sha256_file(weights_path):
        return  # weights from another save than the record describes: the record is stale
    if rec.get("config_sha256") != config_fingerprint(read_json_object(cfg_path)):
        raise InterruptedSaveError(
            f"{os.path.basename(weights_path)!r} and {CONFIG_NAME!r} in directory {directory!r} come from two "
            "different saves: a save into this directory was interrupted between its two files (or "
            f"{CONFIG_NAME!r} was replaced or edited by hand afterwards). Loading them together would give neither "
            "the old nor the new adapter; save the adapter again, or restore both files from the same backup")


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
    Raises:
        AdapterFileError (ValueError) naming the file for a damaged file; InterruptedSaveError when the weights and
        the ``adapter_config.json`` next to them were written by two different saves.
    """
    path = os.path.join(str(model_dir), subfolder) if subfolder else str(model_dir)
    st = os.path.join(path, SAFETENSORS_WEIGHTS_NAME)
    binf = os.path.join(path, WEIGHTS_NAME)
    device = device or "cpu"
    if os.path.isfile(st):
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        _check_save_record(st)
        try:
            return load_file(st, device=str(device))
        except SafetensorError as e:
            raise AdapterFileError(f"{SAFETENSORS_WEIGHTS_NAME!r} in directory {_dir_of(st)!r} cannot be read "
                                   f"({e}). The file is damaged or was not completely written; save the adapter "
                                   "again or restore the file from a backup") from e
    if os.path.isfile(binf):
        if not allow_bin:
            raise ValueError(f"{binf!r} is a pickled adapter_model.bin; fastpeft loads only safetensors by default "
                             "because unpickling untrusted files can run code. Convert it to safetensors, or pass "
                             "allow_bin=True if you trust the file (it is then read with "
                             "torch.load(weights_only=True))")
        _check_save_record(binf)
        try:
            return torch.load(binf, map_location=device, weights_only=True)
        except (EOFError, RuntimeError, ValueError, pickle.UnpicklingError) as e:
            raise AdapterFileError(f"{WEIGHTS_NAME!r} in directory {_dir_of(binf)!r} cannot be read ({e}). The file "
                                   "is damaged or was not completely written; save the adapter again or restore the "
                                   "file from a backup") from e
    raise ValueError(f"no {SAFETENSORS_WEIGHTS_NAME!r} found in {path!r} (fastpeft loads adapters from local "
                     "directories only)")


def _serialise_weights(state_dict: dict[str, torch.Tensor], safe_serialization: bool) -> bytes:
    # CPU, contiguous and de-aliased (safetensors refuses shared storage)
    out = {k: v.detach().to("cpu").contiguous().clone() for k, v in state_dict.items()}
    if safe_serialization:
        from safetensors.torch import save

        return save(out, metadata={"format": "pt"})
    buf = io.BytesIO()
    torch.save(out, buf)
    return buf.getvalue()


def save_peft_weights(state_dict: dict[str, torch.Tensor], directory: str, safe_serialization: bool = True) -> str:
    """Write ``state_dict`` as ``adapter_model.safetensors`` (metadata {"format": "pt"}); returns the file path.

    Tensors are copied to CPU, made contiguous and de-aliased.  The file is serialised completely in memory first and
    then replaces the old one atomically (``atomic_write_bytes``).  Use ``save_adapter_files`` to write weights and
    config together.
    """
    data = _serialise_weights(state_dict, safe_serialization)
    make_adapter_dir(directory)
    path = os.path.join(directory, SAFETENSORS_WEIGHTS_NAME if safe_serialization else WEIGHTS_NAME)
    atomic_write_bytes(path, data)
    return path


def save_adapter_files(directory: str, state_dict: dict[str, torch.Tensor], config,
                       safe_serialization: bool = True, **config_kwargs) -> None:
    """Write one adapter directory so that it loads as exactly the old or exactly the new adapter, whatever fails.

    Both files are serialised before anything is written.  Then, each atomically (``atomic_write_bytes``): the save
    record ``fastpeft_save.json`` (sha256 of the weights, fingerprint of the config), the weights, the config.  An
    interruption after the weights and before the config leaves a directory that refuses to load
    (``InterruptedSaveError``) instead of a silent mix; see ``_check_save_record``.  ``config_kwargs`` go to the
    config's serialisation (e.g. ``auto_mapping_dict``).

    Args:
        directory: the adapter directory (created if missing).
        state_dict: {PEFT file key: tensor}, any device.
        config: the adapter's PeftConfig, written as adapter_config.json.
    """
    config_bytes = config._serialise(**config_kwargs)
    weights = _serialise_weights(state_dict, safe_serialization)
    weights_name = SAFETENSORS_WEIGHTS_NAME if safe_serialization else WEIGHTS_NAME
    record = {"weights_file": weights_name, "weights_sha256": hashlib.sha256(weights).hexdigest(),
              "config_sha256": config_fingerprint(json.loads(config_bytes))}
    config._check_save_directory(directory)
    make_adapter_dir(directory)
    for name in (SAVE_RECORD_NAME, weights_name, CONFIG_NAME):
        if os.path.isdir(os.path.join(directory, name)):  # os.replace would fail only after the first files landed
            raise AdapterSaveError(errno.EISDIR, f"cannot save the adapter: {name!r} in directory {str(directory)!r} "
                                   "is a directory; remove or rename it and save again (nothing was written)")
    atomic_write_bytes(os.path.join(directory, SAVE_RECORD_NAME), json.dumps(record, indent=2).encode())
    atomic_write_bytes(os.path.join(directory, weights_name), weights)
    atomic_write_bytes(os.path.join(directory, CONFIG_NAME), config_bytes)


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
        from .tuners.lora_embedding import optional_embedding_keys

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
