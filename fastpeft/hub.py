"""Hugging Face Hub conventions for adapters: resolving Hub ids to local files, model cards, uploads.

Everything goes through ``huggingface_hub`` (imported lazily), so its cache, ``HF_HUB_OFFLINE``, tokens and
``revision``/``subfolder`` behave as everywhere else in the HF stack.
"""

from __future__ import annotations

import os
import tempfile
from typing import Any, Optional

__all__ = ["resolve_adapter_dir", "local_adapter_dir", "optional_adapter_file", "write_model_card", "push_adapter_to_hub", "split_hub_kwargs"]

CONFIG_NAME = "adapter_config.json"
SAFETENSORS_WEIGHTS_NAME = "adapter_model.safetensors"
WEIGHTS_NAME = "adapter_model.bin"

# keyword arguments of from_pretrained/load_adapter that are passed on to huggingface_hub.hf_hub_download
HUB_KWARGS = ("revision", "cache_dir", "force_download", "token", "local_files_only", "proxies", "user_agent",
              "etag_timeout", "repo_type", "use_auth_token")


def split_hub_kwargs(kwargs: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(hub download keyword arguments, the rest)."""
    hub = {k: v for k, v in kwargs.items() if k in HUB_KWARGS}
    if "use_auth_token" in hub:  # transformers' old name
        hub.setdefault("token", hub.pop("use_auth_token"))
    rest = {k: v for k, v in kwargs.items() if k not in HUB_KWARGS}
    return hub, rest


def local_adapter_dir(model_id: str, subfolder: Optional[str] = None) -> Optional[str]:
    """``model_id`` (joined with `subfolder`) when it is a local directory, else None (then it names a Hub
    repository)."""
    local = os.path.join(str(model_id), subfolder) if subfolder else str(model_id)
    return local if os.path.isdir(local) else None


def resolve_adapter_dir(model_id: str, subfolder: Optional[str] = None, allow_bin: bool = False,
                        need_weights: bool = True, **hub_kwargs) -> str:
    """The local directory holding ``adapter_config.json`` (and the weights) of ``model_id``.

    Args:
        model_id: a local directory, or a Hub repository id ("user/adapter").
        subfolder: a sub-directory inside ``model_id``.
        allow_bin: also fetch ``adapter_model.bin`` when the repository has no safetensors file.
        need_weights: fetch the weights too (False: only the config).
        hub_kwargs: ``revision``, ``cache_dir``, ``token``, ``local_files_only``, ``force_download``, ...
    Returns:
        a directory (for a Hub id: the snapshot directory in the HF cache).
    Raises:
        ValueError naming ``model_id`` when it is neither a local adapter directory nor obtainable from the Hub
        (offline and not cached, missing repository or file).
    """
    local = local_adapter_dir(model_id, subfolder)
    if local is not None:
        return local
    local = os.path.join(str(model_id), subfolder) if subfolder else str(model_id)
    try:
        import huggingface_hub as hf
        from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError
    except ImportError as e:
        raise ValueError(f"{model_id!r} is not a local directory, and loading from the Hub needs huggingface_hub "
                         "(pip install huggingface_hub)") from e
    try:
        from huggingface_hub.utils import validate_repo_id

        validate_repo_id(str(model_id))
    except Exception as e:  # HFValidationError: a path that does not exist rather than a Hub id
        raise ValueError(f"cannot find the adapter {local!r}: no such local directory, and {str(model_id)!r} is not "
                         "a Hub repository id ('name' or 'namespace/name')") from e
    kw = dict(hub_kwargs)
    kw.pop("subfolder", None)
    sub = subfolder or None

    def fetch(filename: str) -> str:
        return hf.hf_hub_download(str(model_id), filename, subfolder=sub, **kw)

    offline = bool(getattr(hf.constants, "HF_HUB_OFFLINE", False)) or bool(kw.get("local_files_only"))
    where = f"{model_id!r}" + (f" (subfolder {subfolder!r})" if subfolder else "") + \
            (f" at revision {kw['revision']!r}" if kw.get("revision") else "")
    try:
        cfg_path = fetch(CONFIG_NAME)
        if need_weights:
            try:
                fetch(SAFETENSORS_WEIGHTS_NAME)
            except EntryNotFoundError:
                if not allow_bin:
                    raise
                fetch(WEIGHTS_NAME)
    except LocalEntryNotFoundError as e:
        hint = ("offline mode is on (HF_HUB_OFFLINE=1 or local_files_only=True) and the adapter is not in the "
                "Hugging Face cache" if offline else "it could not be downloaded and is not in the cache")
        raise ValueError(f"cannot load the adapter {where}: it is not a local directory, and {hint} "
                         f"(cache: {kw.get('cache_dir') or hf.constants.HF_HUB_CACHE})") from e
    except EntryNotFoundError as e:
        raise ValueError(f"cannot load the adapter {where}: the repository has no {e.args[0] if e.args else 'file'}; "
                         f"an adapter needs {CONFIG_NAME} and {SAFETENSORS_WEIGHTS_NAME}") from e
    except Exception as e:  # RepositoryNotFoundError, RevisionNotFoundError, HTTP errors, bad repo ids
        raise ValueError(f"cannot load the adapter {where}: it is not a local directory and the Hub lookup failed "
                         f"({type(e).__name__}: {e})") from e
    return os.path.dirname(cfg_path)


def optional_adapter_file(model_id: str, filename: str, subfolder: Optional[str] = None,
                          **hub_kwargs) -> Optional[str]:
    """The local path of `filename` next to the adapter `model_id` (a local directory or a Hub repository id, as in
    ``resolve_adapter_dir``), or None when the directory / repository has no such file or it cannot be had (offline
    and not cached, no network).  For files an adapter may carry besides its own two, e.g. its tokenizer's."""
    local = local_adapter_dir(model_id, subfolder)
    if local is not None:
        path = os.path.join(local, filename)
        return path if os.path.isfile(path) else None
    try:
        import huggingface_hub as hf
    except ImportError:
        return None
    kw = {k: v for k, v in hub_kwargs.items() if k != "subfolder"}
    try:
        return hf.hf_hub_download(str(model_id), filename, subfolder=subfolder or None, **kw)
    except Exception:  # EntryNotFoundError, LocalEntryNotFoundError (offline), network errors: no such file to use
        return None


def write_model_card(peft_model, output_dir: str) -> None:
    """Create or update ``output_dir/README.md`` as HF PEFT's ``create_or_update_model_card`` does: metadata
    ``library_name: peft``, tags (the base model's ``model_tags``, "transformers", "lora", ``base_model:adapter:...``),
    ``pipeline_tag: text-generation`` for causal LMs, ``base_model``, the quantization config if any, and a
    "Framework versions" line (PEFT's format version and fastpeft's version)."""
    from huggingface_hub import ModelCard, ModelCardData

    from ._version import __version__
    from .utils.constants import PEFT_FORMAT_VERSION

    filename = os.path.join(output_dir, "README.md")
    card = ModelCard.load(filename) if os.path.exists(filename) else ModelCard.from_template(ModelCardData())
    card.data["library_name"] = "peft"
    base = peft_model.get_base_model()
    tags = set(getattr(base, "model_tags", None) or [])
    tags.update(peft_model._model_card_tags())
    if tags:
        card.data["tags"] = sorted(tags)
    if not card.data.pipeline_tag and peft_model._is_causal_lm():
        card.data.pipeline_tag = "text-generation"
    cfg = getattr(base, "config", None)
    model_config = cfg.to_dict() if hasattr(cfg, "to_dict") else None
    if model_config is not None and "_name_or_path" in model_config:
        card.data["base_model"] = model_config["_name_or_path"]
    lines = card.text.splitlines()
    qcfg = getattr(cfg, "quantization_config", None)
    if qcfg is not None:
        qd = qcfg.to_dict() if hasattr(qcfg, "to_dict") else dict(qcfg)
        prefix = "The following `bitsandbytes` quantization config was used during training:"
        if prefix not in lines:
            text = f"\n{prefix}\n" + "\n".join(f"- {k}: {v}" for k, v in qd.items()) + "\n"
            heading = "## Training procedure"
            if heading in lines:
                lines.insert(lines.index(heading) + 2, text)
            else:
                lines.append(f"{heading}\n{text}")
    heading = "### Framework versions"
    for entry in (f"- PEFT {PEFT_FORMAT_VERSION}", f"- fastpeft {__version__}"):
        if entry not in lines:
            if heading in lines:
                lines.insert(lines.index(heading) + 2, entry)
            else:
                lines.append(f"{heading}\n\n{entry}")
                lines = "\n".join(lines).splitlines()
    card.text = "\n".join(lines)
    card.save(filename)


def push_adapter_to_hub(peft_model, repo_id: str, *, commit_message: Optional[str] = None,
                        commit_description: Optional[str] = None, private: Optional[bool] = None,
                        token=None, revision: Optional[str] = None, create_pr: bool = False,
                        **save_kwargs):
    """Upload the adapter files (``save_pretrained`` output: adapter_config.json, adapter_model.safetensors,
    README.md, one sub-folder per non-default adapter) to ``repo_id`` in one commit; returns the commit info.

    The repository is created if needed (``private``); ``revision`` names a branch (created if needed).
    """
    from huggingface_hub import CommitOperationAdd, HfApi

    api = HfApi()
    repo_id = api.create_repo(repo_id, private=private, token=token, exist_ok=True).repo_id
    with tempfile.TemporaryDirectory() as tmp:
        peft_model.save_pretrained(tmp, **save_kwargs)
        ops = []
        for root, _, files in os.walk(tmp):
            for f in sorted(files):
                full = os.path.join(root, f)
                ops.append(CommitOperationAdd(path_in_repo=os.path.relpath(full, tmp).replace(os.sep, "/"),
                                              path_or_fileobj=full))
        if revision is not None and not revision.startswith("refs/pr"):
            api.create_branch(repo_id=repo_id, branch=revision, token=token, exist_ok=True)
        return api.create_commit(repo_id=repo_id, operations=ops,
                                 commit_message=commit_message or f"Upload {type(peft_model).__name__}",
                                 commit_description=commit_description, token=token, create_pr=create_pr,
                                 revision=revision)
