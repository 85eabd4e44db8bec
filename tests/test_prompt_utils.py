"""Shared builders for the prompt-method tests (tiny models from configs, no downloads), plus their own checks."""

from __future__ import annotations

import copy
import os
import warnings

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
transformers = pytest.importorskip("transformers")

VOCAB = 128


def tiny_llama(**kw):
    """2-layer Llama with grouped-query attention (4 query heads, 2 KV heads), fp32, eval mode."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, max_position_embeddings=128, pad_token_id=0)
    cfg.update(kw)
    return LlamaForCausalLM(LlamaConfig(**cfg)).eval()


def tiny_gpt2(**kw):
    """2-layer GPT-2 (Conv1D projections), dropout off so train-mode losses are deterministic."""
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = dict(vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4, n_positions=64, pad_token_id=0, bos_token_id=1,
               eos_token_id=2, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    cfg.update(kw)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return GPT2LMHeadModel(GPT2Config(**cfg)).eval()


def tiny_qwen2(**kw):
    """2-layer Qwen2 (q/k/v biases) with GQA."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    cfg = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, max_position_embeddings=128, pad_token_id=0)
    cfg.update(kw)
    return Qwen2ForCausalLM(Qwen2Config(**cfg)).eval()


def tiny_mistral(**kw):
    from transformers import MistralConfig, MistralForCausalLM

    cfg = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, max_position_embeddings=128, pad_token_id=0)
    cfg.update(kw)
    return MistralForCausalLM(MistralConfig(**cfg)).eval()


def tiny_bert(**kw):
    from transformers import BertConfig, BertModel

    cfg = dict(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
               max_position_embeddings=64, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    cfg.update(kw)
    return BertModel(BertConfig(**cfg)).eval()


MODELS = {"llama": tiny_llama, "gpt2": tiny_gpt2}


def twin(builder, seed: int = 0):
    """Two identical copies of a tiny model."""
    torch.manual_seed(seed)
    m = builder()
    return m, copy.deepcopy(m)


def batch(b: int = 2, length: int = 7, seed: int = 1, pad_first: int = 2):
    """input_ids (b, length) in [3, VOCAB), an attention mask with `pad_first` left-padded positions in row 0, and
    labels equal to the ids with -100 on the padded positions."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (b, length), generator=g)
    mask = torch.ones(b, length, dtype=torch.long)
    mask[0, :pad_first] = 0
    labels = ids.clone()
    labels[0, :pad_first] = -100
    return ids, mask, labels


def max_abs(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.detach().double() - b.detach().double()).abs().max().item()


def test_builders_are_deterministic_and_gqa():
    a, b = twin(tiny_llama)
    assert a.config.num_key_value_heads * 2 == a.config.num_attention_heads
    ids, mask, _ = batch()
    assert torch.equal(a(input_ids=ids, attention_mask=mask).logits, b(input_ids=ids, attention_mask=mask).logits)
