"""Adapter files on disk: HF PEFT's ``adapter_model.safetensors`` / ``adapter_config.json`` pair, written crash-safe.

Only safetensors files are read by default.  A pickled ``adapter_model.bin`` (PEFT's ``safe_serialization=False``)
is refused unless the caller passes ``allow_bin=True``, and even then it is read with ``torch.load(...,
weights_only=True)``.

Saving is crash-safe (``save_adapter_files``): both files are serialised in memory first, each file is written to a
temporary name in the same directory, flushed and renamed over the old one (``os.replace``), and a small save record
(``fastpeft_save.json``: sha256 of the weights file, fingerprint of the config) lets ``read_adapter_weights`` detect
a directory left with the new weights and the old config (``InterruptedSaveError``).  Whatever fails, the directory
loads as exactly the old adapter or exactly the new one, or refuses to load saying the save was interrupted.  The two
adapter files stay byte-for-byte what HF PEFT writes; PEFT ignores the record.

Nothing here knows about models or tuners (``fastpeft.save_load`` maps models to state dicts); ``fastpeft.config``
writes and reads its json through this module.
"""

from __future__ import annotations

import enum
import errno
import hashlib
import io
import json
import os
import pickle
import tempfile
from typing import Optional

import torch

from .constants import CONFIG_NAME, SAFETENSORS_WEIGHTS_NAME, SAVE_RECORD_NAME, WEIGHTS_NAME

__all__ = [
    "SAFETENSORS_WEIGHTS_NAME", "WEIGHTS_NAME", "SAVE_RECORD_NAME", "read_adapter_weights", "save_peft_weights",
    "save_adapter_files", "atomic_write_bytes", "make_adapter_dir", "read_json_object", "jsonable",
    "AdapterFileError", "InterruptedSaveError", "AdapterSaveError", "config_fingerprint",
]


def jsonable(v):
    """``v`` as plain JSON values: enums -> their value, sets -> sorted lists (adapter_config.json's layout)."""
    if isinstance(v, enum.Enum):
        return v.value
    if isinstance(v, (set, frozenset)):
        try:
            return sorted(v)
        except TypeError:
            return list(v)
    if isinstance(v, dict):
        return {k: jsonable(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [jsonable(x) for x in v]
    return v

class AdapterFileError(ValueError):
    """An adapter file cannot be read: damaged, not what its name says, or not from the same save as its neighbour.

    The message names the file, its directory and what to do.  Subclass of ValueError (the content is wrong)."""


class InterruptedSaveError(AdapterFileError):
    """``adapter_config.json`` and ``adapter_model.safetensors`` come from two different saves: a save into this
    directory was interrupted between its two files (or one file was replaced by hand)."""


class AdapterSaveError(OSError):
    """Writing an adapter file failed (read-only directory, full disk, ...).  The files that were in the directory
    before are unchanged; the message names the file, the directory and the cause."""


# adapter_config.json keys that describe where the adapter came from rather than what its weights mean; they are left
# out of the fingerprint so that editing them (e.g. base_model_name_or_path) does not make a directory unloadable.
_UNTIED_CONFIG_KEYS = frozenset({"base_model_name_or_path", "revision", "inference_mode", "auto_mapping",
                                 "peft_version"})


def config_fingerprint(config_dict: dict) -> str:
    """sha256 (hex) of the weight-relevant part of an adapter config dict (key order and JSON layout do not matter).

    Sets and tuples compare as sorted lists, as they are written to adapter_config.json."""
    d = {k: jsonable(v) for k, v in config_dict.items() if k not in _UNTIED_CONFIG_KEYS}
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


def read_adapter_weights(model_dir: str, device: Optional[str] = None, allow_bin: bool = False,
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

