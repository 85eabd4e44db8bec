"""Shared helpers of the LoRA-variant parity tests (DoRA, Conv2d, init variants) against HF PEFT 0.21.2.

A pair is one base model wrapped by PEFT and by fastpeft under the same seed; the helpers check equal parameter
names and initial values, give both the same random trainable values, and compare outputs and every gradient.
"""

from __future__ import annotations

import copy
import warnings

import torch

from _tolerances import PEFT_PARITY_RTOL, assert_close_rel

VOCAB = 128


def tiny_llama():
    import transformers

    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                   pad_token_id=0)
    return transformers.LlamaForCausalLM(cfg)


def tiny_gpt2():
    import transformers

    torch.manual_seed(0)
    cfg = transformers.GPT2Config(vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4, n_positions=64,
                                  bos_token_id=1, eos_token_id=2)
    return transformers.GPT2LMHeadModel(cfg)


MODELS = {"llama": tiny_llama, "gpt2": tiny_gpt2}


def wrap_pair(base, peft_cfg, fast_cfg, seed=1, check_init=True):
    """(peft_model, fastpeft_model) built from deep copies of ``base`` under the same seed."""
    import peft

    import fastpeft

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.manual_seed(seed)
        p = peft.get_peft_model(copy.deepcopy(base), peft_cfg)
        torch.manual_seed(seed)
        f = fastpeft.get_peft_model(copy.deepcopy(base), fast_cfg)
    sp, sf = dict(p.named_parameters()), dict(f.named_parameters())
    assert sorted(sp) == sorted(sf), f"parameter names differ: {sorted(set(sp) ^ set(sf))[:10]}"
    for k in sp:
        assert sp[k].requires_grad == sf[k].requires_grad, f"requires_grad differs for {k}"
        if check_init:
            assert torch.equal(sp[k], sf[k]), f"initial value differs for {k}"
    return p, f


def randomize_trainable(p, f, seed=5, scale=0.1):
    """The same random values for every trainable tensor of both models; a DoRA magnitude m becomes m·(1 + scale·z)
    so it stays near the weight norm (B = 0 would hide A's gradient)."""
    sp, sf = dict(p.named_parameters()), dict(f.named_parameters())
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for k in sorted(sp):
            if sp[k].requires_grad and sf[k].requires_grad:
                z = torch.randn(sp[k].shape, generator=g, dtype=sp[k].dtype)
                v = sp[k] * (1 + scale * z) if "magnitude" in k else z * scale
                sp[k].copy_(v)
                sf[k].copy_(v)


def inputs(batch=2, seq=7, seed=11):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, VOCAB, (batch, seq), generator=g)


def compare_grads(p, f, rtol=PEFT_PARITY_RTOL) -> int:
    sp, sf = dict(p.named_parameters()), dict(f.named_parameters())
    n = 0
    for k in sorted(sp):
        if sp[k].requires_grad:
            assert sf[k].grad is not None, f"no gradient for {k}"
            assert_close_rel(sf[k].grad, sp[k].grad, rtol, f"grad {k}")
            n += 1
    assert n > 0, "no trainable tensor compared"
    return n


def assert_lm_parity(p, f, train=False, ids=None, seed=3):
    """Same logits, loss and gradient of every trainable tensor (RNG reset before each forward)."""
    ids = inputs() if ids is None else ids
    p.train(train)
    f.train(train)
    torch.manual_seed(seed)
    op = p(input_ids=ids, labels=ids)
    torch.manual_seed(seed)
    of = f(input_ids=ids, labels=ids)
    assert_close_rel(of.logits, op.logits, PEFT_PARITY_RTOL, "logits")
    assert_close_rel(of.loss, op.loss, PEFT_PARITY_RTOL, "loss")
    op.loss.backward()
    of.loss.backward()
    compare_grads(p, f)
    p.zero_grad()
    f.zero_grad()
    return op, of


def assert_same_base_weights(p, f, rtol=PEFT_PARITY_RTOL):
    """Every non-adapter parameter (base weights, possibly modified by init/merge) agrees."""
    sp, sf = dict(p.named_parameters()), dict(f.named_parameters())
    for k in sp:
        if "lora_" not in k:
            assert_close_rel(sf[k], sp[k], rtol, f"param {k}")


def merged_state(model) -> dict:
    """``merge_and_unload`` of a deep copy -> its plain state dict."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return copy.deepcopy(model).merge_and_unload().state_dict()
