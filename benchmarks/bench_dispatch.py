"""What the custom-op dispatcher costs per call: why ``lora_apply`` / ``ia3_apply`` run eager calls through an
``autograd.Function`` and only ``torch.compile`` through the ``fastpeft::*`` custom ops.

Both entry points call the same implementation with the same saved tensors and the same backward formula
(``fastpeft/ops/lora.py: _lora_grads``); they differ only in the Python wrapping around it.  Per case, one
interleaved timing of a training step (forward + backward) through:

* ``base``: ``F.linear`` on the frozen weight (the floor);
* ``custom-op``: ``torch.ops.fastpeft.lora_fwd`` / ``ia3_fwd`` with their registered autograd;
* ``autograd-function``: ``LoRALinearFunction`` / ``IA3LinearFunction`` (what eager code runs).

The note of each custom-op row gives the difference in microseconds per step.  The small shapes are the ones where
the wrapping is a large share of a layer (decode, small models); at large M it disappears into the GEMMs.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

import fastpeft.ops.ia3 as _ia3
import fastpeft.ops.lora as _lora

from . import _utils as U

# (M, K, N, r): a single decode token on a small layer (wrapping-dominated), a short prompt on a mid-size layer
CASES = {"cpu": [(1, 64, 64, 8), (64, 512, 512, 16)], "cuda": [(1, 4096, 4096, 16), (2048, 4096, 4096, 16)]}


def _backend(device: torch.device) -> str:
    """The backend the op runs on here: the best available fused one on CUDA, else torch."""
    backends = U.available_fastpeft_backends(device)
    return "triton" if "triton" in backends else backends[-1]


def _step(fn):
    def run():
        y = fn()
        y.sum().backward()
    return run


def measure(device: torch.device, dt: str, quick: bool = False) -> list[dict]:
    """Rows (benchmarks/run.py's columns) for every case of ``CASES`` on ``device`` in dtype ``dt`` (bf16, fp16,
    fp32)."""
    dtype = U.DTYPES[dt]
    backend = _backend(device)
    rows = []
    for M, K, N, r in CASES["cuda" if device.type == "cuda" else "cpu"]:
        g = torch.Generator(device="cpu").manual_seed(0)

        def rand(*shape, scale=1.0, grad=False):
            t = (torch.randn(*shape, generator=g) * scale).to(device=device, dtype=dtype)
            return t.requires_grad_(grad)
        x = rand(M, K, grad=True)
        W = rand(N, K, scale=K ** -0.5)
        A, B = rand(r, K, scale=K ** -0.5, grad=True), rand(N, r, scale=r ** -0.5, grad=True)
        ll = rand(N, grad=True)
        lora_args = (x, W, None, A, None, B, 0.5, 0.0, 0, backend)
        ia3_args = (x, W, None, ll, False, backend)
        for op, fns in (
            ("lora", {"base": lambda: F.linear(x, W),
                      "custom-op": lambda: _lora.lora_fwd(*lora_args)[0],
                      "autograd-function": lambda: _lora.LoRALinearFunction.apply(*lora_args)}),
            ("ia3", {"base": lambda: F.linear(x, W),
                     "custom-op": lambda: _ia3.ia3_fwd(*ia3_args)[0],
                     "autograd-function": lambda: _ia3.IA3LinearFunction.apply(*ia3_args)}),
        ):
            timings = U.bench_interleaved({k: _step(f) for k, f in fns.items()}, device, quick)
            base = timings["base"].p50
            extra_us = (timings["custom-op"].p50 - timings["autograd-function"].p50) * 1e3
            for prov, t in timings.items():
                note = f"backend={backend}"
                if prov == "custom-op":
                    note += f"; custom-op - autograd-function = {extra_us:+.1f} us/step"
                rows.append({"op": f"dispatch_{op}", "provider": prov, "mode": "fwd+bwd",
                             "shape": f"M{M} K{K} N{N}" + (f" r{r}" if op == "lora" else ""), "M": M, "K": K,
                             "N": N, "r": r if op == "lora" else None, "dtype": dt, "p50_ms": t.p50,
                             "p20_ms": t.p20, "p80_ms": t.p80, "spread": t.spread, "ratio_to_base": t.p50 / base,
                             "note": note})
    return rows
