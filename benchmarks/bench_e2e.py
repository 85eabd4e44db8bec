"""End-to-end training step: a Llama with Llama-3-8B dimensions and 4 layers (random init, no download), batch
4 x 2048, LoRA r=16 on all linear layers with dropout 0.05.

Providers:
* ``base``      the frozen model's forward + backward (input embeddings require grad so backward runs through every
                layer; no optimizer) - the floor;
* ``fastpeft``  fastpeft's model API (``fastpeft.get_peft_model``) when it exists, else HF PEFT's model with
                ``fastpeft.accelerate`` (its LoRA layers run the fused op); fwd + bwd + AdamW step;
* ``peft``      HF PEFT, eager, its defaults (fp32 adapters); fwd + bwd + AdamW step.

On a machine without CUDA the ``cpu-small-4l`` stand-in (same structure, 16x narrower, batch 2 x 128) is used.
"""

from __future__ import annotations

import gc
import statistics
import time
from dataclasses import dataclass

import torch

from ._utils import _quantile, peak_mem_mib, peft_or_none, rel_err, sync
from .shapes import E2E

LORA_R, LORA_ALPHA, LORA_DROPOUT = 16, 32, 0.05


@dataclass
class E2EResult:
    provider: str
    label: str
    p50: float
    p20: float
    p80: float
    tokens_per_s: float
    mem_mib: float
    mem_kind: str
    eval_loss: float


def _model(spec: dict, dtype: torch.dtype, device: torch.device):
    from transformers import LlamaConfig, LlamaForCausalLM
    cfg = LlamaConfig(**{k: v for k, v in spec.items() if k not in ("batch", "seq")}, attn_implementation="sdpa")
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(cfg).to(dtype)
    return model


def _lora_model(kind: str, spec: dict, dtype, device, backend):
    peft = peft_or_none()
    import fastpeft
    kwargs = dict(task_type="CAUSAL_LM", r=LORA_R, lora_alpha=LORA_ALPHA, lora_dropout=LORA_DROPOUT,
                  target_modules="all-linear")
    base = _model(spec, dtype, device)
    if kind == "fastpeft":
        try:
            get_peft_model, cfg_cls = fastpeft.get_peft_model, fastpeft.LoraConfig
        except (ImportError, AttributeError):
            get_peft_model = None
        if get_peft_model is not None:
            return get_peft_model(base, cfg_cls(**kwargs)), "fastpeft.get_peft_model"
        if peft is None:
            raise RuntimeError("neither fastpeft's model API nor HF PEFT (pip install peft) is available")
        m = fastpeft.accelerate(peft.get_peft_model(base, peft.LoraConfig(**kwargs)), backend=backend)
        return m, f"fastpeft.accelerate(peft model), backend {backend or 'auto'}"
    if peft is None:
        raise RuntimeError("HF PEFT is not installed: pip install peft")
    return peft.get_peft_model(base, peft.LoraConfig(**kwargs)), f"peft {peft.__version__} eager"


def run_e2e(name: str, dtype: torch.dtype, device: torch.device, providers: list[str], steps: int,
            backend=None) -> list[E2EResult]:
    """Time ``steps`` training steps (after one warm-up) per provider; returns one result per provider."""
    spec = E2E[name]
    b, s = spec["batch"], spec["seq"]
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, spec["vocab_size"], (b, s), generator=g).to(device)
    eval_ids = torch.randint(0, spec["vocab_size"], (b, s), generator=g).to(device)
    out = []
    for prov in providers:
        out.append(_run_one(prov, spec, dtype, device, ids, eval_ids, steps, backend))
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return out


def _run_one(prov: str, spec: dict, dtype, device, ids, eval_ids, steps: int, backend) -> E2EResult:
    if prov == "base":
        model, label = _model(spec, dtype, device), "frozen model fwd+bwd (no optimizer)"
        for p in model.parameters():
            p.requires_grad_(False)
        model.enable_input_require_grads()
        opt = None
    else:
        model, label = _lora_model(prov, spec, dtype, device, backend)
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    model.eval()
    with torch.no_grad():
        eval_loss = float(model(input_ids=eval_ids, labels=eval_ids).loss.float())
    model.train()

    def step():
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        if opt is not None:
            opt.step()
            opt.zero_grad(set_to_none=True)

    step()  # warm-up (and creates the optimizer state, so memory below is the steady state)
    mem, kind = peak_mem_mib(step, device, exclude=list(model.parameters()))
    times = []
    for _ in range(steps):
        sync(device)
        t0 = time.perf_counter()
        step()
        sync(device)
        times.append((time.perf_counter() - t0) * 1e3)
    times.sort()
    p50 = statistics.median(times)
    b, s = ids.shape
    return E2EResult(prov, label, p50, _quantile(times, 0.2), _quantile(times, 0.8), b * s / (p50 / 1e3), mem, kind,
                     eval_loss)


def loss_err(res: E2EResult, ref: E2EResult) -> float:
    return rel_err(torch.tensor(res.eval_loss), torch.tensor(ref.eval_loss))
