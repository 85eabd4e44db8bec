"""Sibling LoRA layers sharing one shrink (``fastpeft/tuners/lora/siblings.py``): when groups form, that a model's loss
and every adapter gradient stay within the accuracy rule against fp64, under activation checkpointing, when the
call pattern changes, and the switch."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

import fastpeft
from fastpeft.ops import lora_group as G

from testing_utils import GRAD_FACTOR, MATMUL_FACTOR, assert_fa_rule

pytest.importorskip("triton")
transformers = pytest.importorskip("transformers")

F64 = torch.float64


@pytest.fixture
def group_calls(monkeypatch):
    """The member counts of every lora_group forward."""
    calls = []
    orig = G.LoRAGroupFunction.forward

    def spy(ctx, backend, g, *args):
        calls.append(g)
        return orig(ctx, backend, g, *args)
    monkeypatch.setattr(G.LoRAGroupFunction, "forward", staticmethod(spy))
    return calls


def _llama(dtype, backend, monkeypatch, checkpointing=False, dropout=0.0):
    monkeypatch.setenv("FASTPEFT_BACKEND", backend)
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2)
    base = transformers.LlamaForCausalLM(cfg).to(dtype)
    if checkpointing:
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model = fastpeft.get_peft_model(base, fastpeft.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear",
                                                              init_lora_weights=False, lora_dropout=dropout))
    model.train()
    return model


def _step(model, ids):
    model.zero_grad(set_to_none=True)
    out = model(input_ids=ids, labels=ids)
    out.loss.backward()
    grads = {n: p.grad.detach().double().clone() for n, p in model.named_parameters() if p.requires_grad}
    return out.loss.detach().double(), grads


IDS = torch.randint(0, 64, (2, 7), generator=torch.Generator().manual_seed(3))


@pytest.mark.interpreter
@pytest.mark.parametrize("checkpointing", [False, True])
def test_llama_groups_qkv_and_gate_up_within_the_accuracy_rule(monkeypatch, group_calls, checkpointing):
    """The first step learns the bursts (no group yet); from the second, each decoder layer runs q/k/v as one group
    and gate/up as another - also inside a checkpointed block's recomputation, which must make the forward's
    decisions (else checkpointing raises on the changed saved tensors) - and the loss and every adapter gradient
    stay within 2x / 3x the fp32 torch path's error against fp64."""
    ref = _step(_llama(F64, "torch", monkeypatch), IDS)
    same = _step(_llama(torch.float32, "torch", monkeypatch), IDS)
    model = _llama(torch.float32, "triton", monkeypatch, checkpointing)
    _step(model, IDS)
    assert group_calls == []
    for _ in range(2):
        group_calls.clear()
        loss, grads = _step(model, IDS)
        fwd = [3, 2, 3, 2]
        assert group_calls == (fwd + fwd if checkpointing else fwd), group_calls
        assert_fa_rule(loss, ref[0], same[0], MATMUL_FACTOR, "loss", dtype=torch.float32)
        assert grads.keys() == ref[1].keys()
        for name, want in ref[1].items():
            assert_fa_rule(grads[name], want, same[1][name], GRAD_FACTOR, name, dtype=torch.float32)


@pytest.mark.interpreter
def test_no_group_with_dropout_or_when_switched_off(monkeypatch, group_calls):
    model = _llama(torch.float32, "triton", monkeypatch, dropout=0.1)
    for _ in range(2):
        _step(model, IDS)
    assert group_calls == []
    model.eval()   # dropout inactive: the groups form
    with torch.no_grad():
        for _ in range(2):
            model(input_ids=IDS)
    assert group_calls == [3, 2, 3, 2]
    group_calls.clear()
    monkeypatch.setenv("FASTPEFT_SHARED_SHRINK", "0")
    with torch.no_grad():
        model(input_ids=IDS)
    assert group_calls == []


class _Attn(nn.Module):
    def __init__(self):
        super().__init__()
        self.q, self.k, self.v = nn.Linear(12, 8), nn.Linear(12, 6), nn.Linear(12, 6)

    def forward(self, x, kv=None):
        kv = x if kv is None else kv
        return self.q(x).sum(-1) + self.k(kv).sum(-1) * self.v(kv).sum(-1)


@pytest.mark.interpreter
def test_changed_call_pattern_runs_members_alone(monkeypatch, group_calls):
    """Learned on self-attention (q, k, v on one x), then called as cross-attention (k, v on another tensor): the
    leader's group precomputes k and v for the wrong x, k and v see a different input and run alone, and the output
    and every gradient stay within the accuracy rule against fp64."""
    torch.manual_seed(0)
    x = torch.randn(5, 12, dtype=F64)
    kv = torch.randn(5, 12, dtype=F64)

    def run(backend, dtype):
        monkeypatch.setenv("FASTPEFT_BACKEND", backend)
        torch.manual_seed(1)
        model = fastpeft.get_peft_model(_Attn().to(dtype), fastpeft.LoraConfig(r=2, target_modules=["q", "k", "v"],
                                                                                init_lora_weights=False))
        for _ in range(2):
            model(x.to(dtype)).sum().backward()
        model.zero_grad(set_to_none=True)
        out = model(x.to(dtype), kv.to(dtype))
        out.sum().backward()
        return {"out": out.detach().double(),
                **{n: p.grad.double() for n, p in model.named_parameters() if p.requires_grad}}

    got = run("triton", torch.float32)
    assert group_calls == [3, 3]   # the second self-attention call and the cross-attention call's precompute
    ref, same = run("torch", F64), run("torch", torch.float32)
    assert got.keys() == ref.keys()
    for n, want in ref.items():
        assert_fa_rule(got[n], want, same[n], MATMUL_FACTOR if n == "out" else GRAD_FACTOR, n, dtype=torch.float32)
