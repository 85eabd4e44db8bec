"""fastpeft.recompute composes with torch.compile's inductor backend: a compiled training step of a model whose
family the recompute knows gives the eager step's loss and adapter gradients (recompute off), up to inductor's
reordering of fp32 sums.  And the CPU handling of dropout under recompute: keep masks kept as bits, never re-drawn,
also for an input that needs no grad.  (FSDP2 is covered in tests/test_distributed.py, gradient checkpointing, the
eager and aot backends in tests/test_memory.py.)"""

from __future__ import annotations

import contextlib

import pytest
import torch

import fastpeft
from fastpeft import recompute as R
from testing_utils import inductor_cpu_problem, rel_err

transformers = pytest.importorskip("transformers")

# Inductor fuses and reorders fp32 reductions: relative error (norm-wise) of a few fp32 ulps times the reduction
# depth; measured 1.2e-6 on this model.
INDUCTOR_FP32_REL = 1e-5


def _model(dropout: float = 0.0):
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2)
    model = fastpeft.get_peft_model(transformers.LlamaForCausalLM(cfg), fastpeft.LoraConfig(
        r=8, lora_alpha=16, target_modules="all-linear", lora_dropout=dropout, init_lora_weights=False))
    model.train()
    return model


def _step(model, runner, ids):
    model.zero_grad(set_to_none=True)
    out = runner(input_ids=ids, labels=ids)
    out.loss.backward()
    return out.loss.detach(), {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def test_inductor_step_with_recompute_equals_eager():
    if inductor_cpu_problem():
        pytest.skip(inductor_cpu_problem())
    ids = torch.randint(1, 96, (2, 24), generator=torch.Generator().manual_seed(3))
    model = _model()
    assert R.is_enabled(model)
    R.set_enabled(model, False)
    loss0, g0 = _step(model, model, ids)
    R.set_enabled(model, True)
    loss1, g1 = _step(model, torch.compile(model, backend="inductor"), ids)
    assert rel_err(loss1, loss0) <= INDUCTOR_FP32_REL
    assert g1.keys() == g0.keys() and g0
    for n in g0:
        assert g0[n].abs().sum() > 0, n
        assert rel_err(g1[n], g0[n]) <= INDUCTOR_FP32_REL, (n, rel_err(g1[n], g0[n]))


def _recompute_step_bit_equal(model, ids, backward_ctx=contextlib.nullcontext):
    """One dropout step with recompute off, then the same step (same RNG) with it on: the loss is bit-equal and every
    adapter gradient equal up to summation order.  ``backward_ctx()`` wraps the second step's backward.  Returns the
    second step's ``saved_tensor_bytes`` record."""
    R.set_enabled(model, False)
    torch.manual_seed(11)
    loss0, g0 = _step(model, model, ids)
    R.set_enabled(model, True)
    torch.manual_seed(11)
    model.zero_grad(set_to_none=True)
    with R.saved_tensor_bytes(exclude=model) as acc:
        out = model(input_ids=ids, labels=ids)
    with backward_ctx():
        out.loss.backward()
    assert torch.equal(out.loss.detach(), loss0)
    for n, p in model.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(p.grad, g0[n], rtol=1e-6, atol=1e-7, msg=n)
    return acc


def test_cpu_dropout_is_not_redrawn_in_backward(monkeypatch):
    """On CPU a recomputed dropout does not draw again in backward (``bernoulli_`` is most of a CPU dropout's cost):
    its keep mask is kept as bits and the noise and the output are rebuilt from them, bit-equal to the step without
    recompute."""
    ids = torch.randint(1, 96, (2, 24), generator=torch.Generator().manual_seed(3))
    model = _model(dropout=0.1)
    model.base_model.model.enable_input_require_grads()   # every adapter input needs grad: noise is saved too
    draws = []
    real = torch.nn.functional.dropout

    @contextlib.contextmanager
    def count_draws():
        monkeypatch.setattr(torch.nn.functional, "dropout", lambda *a, **k: draws.append(1) or real(*a, **k))
        yield
        monkeypatch.undo()

    acc = _recompute_step_bit_equal(model, ids, count_draws)
    assert acc["mask_bytes"] > 0 and acc["recipes"] > 0
    assert len(draws) == 0, len(draws)


@pytest.mark.parametrize("chunk", [None, 16], ids=["one_chunk", "chunks_of_16"])
@pytest.mark.parametrize("shape", [(0,), (1,), (7,), (3, 5, 7), (2, 24, 64)])
def test_dropout_bits_round_trip(shape, chunk, monkeypatch):
    """The CPU keep-mask packing (8 elements per byte, zero-padded tail, worked in chunks) gives back the mask
    exactly, from a bool mask or from the dropout noise itself (its nonzero pattern)."""
    if chunk is not None:
        monkeypatch.setattr(R, "_BITS_CHUNK", chunk)
    g = torch.Generator().manual_seed(0)
    mask = torch.rand(shape, generator=g) < 0.7
    for src in (mask, mask.to(torch.bfloat16) * 1.25):
        bits = R._pack_bits(src)
        assert bits.dtype == torch.uint8 and bits.numel() == -(-mask.numel() // 8)
        assert torch.equal(R._unpack_bits(bits, mask.shape), mask)


def test_dropout_of_an_input_that_needs_no_grad_is_recomputed():
    """Layer 0's q/k/v/gate/up read the norm of frozen embeddings: their input needs no grad, so autograd links
    nothing to the dropout output lora_A keeps.  It is rebuilt all the same: every LoRA layer keeps only its
    dropout's keep-mask bits (one bit per input element), and the step is bit-equal to the one without recompute."""
    ids = torch.randint(1, 96, (2, 24), generator=torch.Generator().manual_seed(3))
    model = _model(dropout=0.1)
    acc = _recompute_step_bit_equal(model, ids)
    inputs = {n: 2 * 24 * (128 if n.endswith("down_proj") else 64) for n, m in model.named_modules()
              if hasattr(m, "lora_A") and len(m.lora_A)}
    assert len(inputs) == 14
    assert acc["mask_bytes"] == sum(-(-n // 8) for n in inputs.values())   # every layer's dropout, as bits
