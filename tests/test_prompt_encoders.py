"""The virtual-token encoders on their own: against HF PEFT's encoder modules and their own math, direct mode after
loading a saved prompt, the TEXT-init token rule, bad arguments."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F

from testing_utils import ELEMENTWISE, PROMPT_FP32_ATOL
from testing_utils import max_abs

from fastpeft.tuners.p_tuning import PromptEncoder
from fastpeft.tuners.prefix_tuning import PrefixEncoder
from fastpeft.tuners.prompt_tuning import PromptEmbedding, text_init_token_ids

peft = pytest.importorskip("peft")


def _peft_cfg(cls, **kw):
    base = dict(task_type="CAUSAL_LM", num_virtual_tokens=5, token_dim=12, num_transformer_submodules=1,
                num_attention_heads=2, num_layers=3)
    base.update(kw)
    return cls(**base)


def test_prompt_embedding():
    enc = PromptEmbedding(5, 12)
    assert torch.equal(enc(), enc.embedding.weight)
    idx = torch.tensor([[0, 2, 4], [1, 1, 3]])
    assert torch.equal(enc(idx), enc.embedding.weight[idx])
    init = torch.randn(5, 12, dtype=torch.float64)
    enc2 = PromptEmbedding(5, 12, init_weight=init)
    assert enc2.embedding.weight.dtype == torch.float32 and torch.equal(enc2(), init.float())
    with pytest.raises(ValueError, match="init_weight"):
        PromptEmbedding(5, 12, init_weight=torch.randn(4, 12))
    with pytest.raises(ValueError, match="num_tokens"):
        PromptEmbedding(0, 12)


@pytest.mark.parametrize("etype", ["MLP", "LSTM"])
def test_ptuning_encoder_matches_peft_and_math(etype):
    torch.manual_seed(0)
    pe = peft.tuners.p_tuning.PromptEncoder(_peft_cfg(peft.PromptEncoderConfig, encoder_hidden_size=7,
                                                      encoder_reparameterization_type=etype))
    fe = PromptEncoder(5, 12, 7, encoder_type=etype)
    fe.load_state_dict(pe.state_dict())  # same module names and shapes as PEFT's encoder
    idx = torch.arange(5).unsqueeze(0)
    assert torch.equal(fe(idx), pe(idx))
    assert torch.equal(fe(), pe(idx)[0])
    # against the written-out math
    e = fe.embedding.weight
    if etype == "MLP":
        l0, l1, l2 = fe.mlp_head[0], fe.mlp_head[2], fe.mlp_head[4]
        want = l2(F.relu(l1(F.relu(l0(e)))))
    else:
        h = fe.lstm_head(e.unsqueeze(0))[0][0]  # bidirectional: (n, 2h)
        assert h.shape == (5, 14)
        want = fe.mlp_head[2](F.relu(fe.mlp_head[0](h)))
    assert max_abs(fe(), want) <= ELEMENTWISE[torch.float32][0]


def test_ptuning_mlp_ignores_num_layers_with_warning():
    with pytest.warns(UserWarning, match="encoder_num_layers=3 is ignored"):
        PromptEncoder(4, 8, 8, encoder_type="MLP", num_layers=3)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        PromptEncoder(4, 8, 8, encoder_type="MLP")
    with pytest.raises(ValueError, match="encoder_reparameterization_type"):
        PromptEncoder(4, 8, 8, encoder_type="GRU")
    with pytest.raises(ValueError, match="encoder_dropout"):
        PromptEncoder(4, 8, 8, encoder_type="LSTM", dropout=1.0)
    with pytest.raises(ValueError, match="encoder_hidden_size"):
        PromptEncoder(4, 8, 0)


@pytest.mark.parametrize("projection", [False, True])
def test_prefix_encoder_matches_peft(projection):
    torch.manual_seed(0)
    pe = peft.tuners.prefix_tuning.PrefixEncoder(_peft_cfg(peft.PrefixTuningConfig, prefix_projection=projection,
                                                           encoder_hidden_size=9))
    fe = PrefixEncoder(5, 3, 12, prefix_projection=projection, hidden_size=9)
    fe.load_state_dict(pe.state_dict())
    idx = torch.arange(5).unsqueeze(0).expand(2, -1)
    assert torch.equal(fe(idx), pe(idx))
    assert fe().shape == (5, 3 * 2 * 12) and fe.out_dim == 72
    if projection:
        want = fe.transform[2](torch.tanh(fe.transform[0](fe.embedding.weight)))
        assert max_abs(fe(), want) <= ELEMENTWISE[torch.float32][0]


@pytest.mark.parametrize("projection", [False, True])
def test_prefix_zero_init(projection):
    fe = PrefixEncoder(4, 2, 6, prefix_projection=projection, hidden_size=5, zero_init=True)
    assert torch.count_nonzero(fe()) == 0


@pytest.mark.parametrize("make", [
    lambda: PromptEncoder(5, 12, 7, encoder_type="MLP"),
    lambda: PromptEncoder(5, 12, 7, encoder_type="LSTM"),
    lambda: PrefixEncoder(5, 3, 12, prefix_projection=True, hidden_size=9),
    lambda: PrefixEncoder(5, 3, 12),
    lambda: PromptEmbedding(5, 12),
])
def test_direct_mode_after_loading_an_output(make):
    enc = make()
    target = torch.randn(enc.num_tokens, enc.out_dim)
    with pytest.raises(ValueError, match="prompt_embeddings has shape"):
        enc.load_output(torch.randn(enc.num_tokens + 1, enc.out_dim))
    enc.load_output(target)
    assert enc.direct
    assert torch.equal(enc(), target)
    assert set(enc.state_dict()) == {"embedding.weight"}  # the head is gone
    assert max_abs(enc(torch.tensor([[3, 1]]))[0], target[[3, 1]]) <= PROMPT_FP32_ATOL


def test_text_init_token_rule():
    class Tok:
        def __call__(self, text):
            return {"input_ids": [ord(c) for c in text]}

    assert text_init_token_ids(Tok(), "abcdef", 3) == [97, 98, 99]  # cut
    assert text_init_token_ids(Tok(), "ab", 5) == [97, 98, 97, 98, 97]  # cycled
    with pytest.raises(ValueError, match="prompt_tuning_init_text"):
        text_init_token_ids(Tok(), "", 3)
