"""``LoraConfig(trainable_token_indices=...)``: only the listed embedding rows train; parity with HF PEFT 0.21.2 in
fp32 (outputs, every gradient, merged weights), PEFT's file keys, files both ways, tied input/output embeddings."""

import warnings

import pytest
import torch
import torch.nn as nn

from testing_utils import PEFT_PARITY_RTOL, rel_err

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")
from safetensors.torch import load_file  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

import fastpeft  # noqa: E402
from fastpeft.tuners.trainable_tokens import TrainableTokensLayer  # noqa: E402

V = 80


def _llama(tie=False):
    cfg = LlamaConfig(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=32, tie_word_embeddings=tie)
    torch.manual_seed(0)
    return LlamaForCausalLM(cfg)


def _pair(tti, tie=False, targets=("q_proj",)):
    out = []
    for lib in (peft, fastpeft):
        m = _llama(tie)
        torch.manual_seed(1)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            pm = lib.get_peft_model(m, lib.LoraConfig(r=4, lora_alpha=8, target_modules=list(targets),
                                                      init_lora_weights=False, trainable_token_indices=tti))
        with torch.no_grad():  # move the new rows away from their initial copy, identically in both
            for n, p in pm.named_parameters():
                if "trainable_tokens_delta" in n:
                    p.add_(0.1 * torch.sin(torch.arange(p.numel(), dtype=p.dtype).reshape(p.shape)))
        out.append(pm)
    return out


def _fwd_bwd(pm, ids):
    out = pm(input_ids=ids, labels=ids)
    out.loss.backward()
    grads = {n.replace(".token_adapter", ""): p.grad.detach().clone()
             for n, p in pm.named_parameters() if p.requires_grad}
    return out.logits.detach(), grads


CASES = {
    "list": ([3, 7, 70], False),
    "dict-embed-and-head": ({"embed_tokens": [3, 7], "lm_head": [5, 9]}, False),
    "tied-list": ([3, 7, 70], True),
    "tied-dict-mismatch": ({"embed_tokens": [3, 7], "lm_head": [5]}, True),
}


@pytest.mark.parametrize("case", list(CASES))
def test_parity_with_peft(case):
    tti, tie = CASES[case]
    pp, fp = _pair(tti, tie)
    ids = torch.randint(0, V, (2, 8))
    ids[0, :4] = torch.tensor([3, 7, 5, 70])
    (lp, gp), (lf, gf) = _fwd_bwd(pp, ids), _fwd_bwd(fp, ids)
    assert rel_err(lf, lp) <= PEFT_PARITY_RTOL
    assert sorted(gp) == sorted(gf) and any("trainable_tokens_delta" in k for k in gf)
    for k in gp:
        assert rel_err(gf[k], gp[k]) <= PEFT_PARITY_RTOL, k
    assert sorted(fastpeft.get_peft_model_state_dict(fp)) == sorted(peft.get_peft_model_state_dict(pp))
    if case == "tied-list":
        head = fp.base_model.model.lm_head
        assert isinstance(head, TrainableTokensLayer) and head.tied_to is fp.base_model.model.model.embed_tokens
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        mp, mf = pp.merge_and_unload(), fp.merge_and_unload()
    assert type(mf.model.embed_tokens) is nn.Embedding and type(mf.lm_head) is nn.Linear
    assert torch.equal(mf.model.embed_tokens.weight, mp.model.embed_tokens.weight)
    assert torch.equal(mf.lm_head.weight, mp.lm_head.weight)
    if tie:
        assert mf.lm_head.weight is mf.model.embed_tokens.weight


def test_only_listed_rows_train_and_unmerge_restores():
    _, fp = _pair([3, 7])
    emb = fp.base_model.model.model.embed_tokens
    w0 = emb.base_layer.weight.detach().clone()
    assert not emb.base_layer.weight.requires_grad
    trainable = [n for n, p in fp.named_parameters() if p.requires_grad]
    assert "base_model.model.model.embed_tokens.trainable_tokens_delta.default" in trainable
    opt = torch.optim.SGD([p for p in fp.parameters() if p.requires_grad], lr=0.5)
    ids = torch.tensor([[3, 7, 1, 2, 3]])
    for _ in range(2):
        fp(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()
    assert torch.equal(emb.base_layer.weight, w0)  # the frozen matrix never changes
    with torch.no_grad():
        out = emb(torch.tensor([[3, 7, 1]]))
    delta = emb.trainable_tokens_delta["default"]
    assert torch.equal(out[0, 0], delta[0]) and torch.equal(out[0, 1], delta[1]) and torch.equal(out[0, 2], w0[1])
    fp.merge_adapter()
    assert torch.equal(emb.base_layer.weight[[3, 7]], delta.detach())
    assert torch.equal(emb.base_layer.weight[1], w0[1])
    fp.unmerge_adapter()
    assert torch.equal(emb.base_layer.weight, w0)


@pytest.mark.parametrize("case", ["list", "tied-list"])
def test_files_both_ways(tmp_path, case):
    tti, tie = CASES[case]
    pp, fp = _pair(tti, tie)
    fp.save_pretrained(tmp_path / "fast")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pp.save_pretrained(tmp_path / "peft")
    kf = set(load_file(str(tmp_path / "fast" / "adapter_model.safetensors")))
    kp = set(load_file(str(tmp_path / "peft" / "adapter_model.safetensors")))
    assert kf == kp and "base_model.model.model.embed_tokens.token_adapter.trainable_tokens_delta" in kf
    ids = torch.randint(0, V, (2, 6))
    ids[:, 0] = 7
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        p_from_f = peft.PeftModel.from_pretrained(_llama(tie), str(tmp_path / "fast"))
        f_from_p = fastpeft.PeftModel.from_pretrained(_llama(tie), str(tmp_path / "peft"))
    with torch.no_grad():
        assert rel_err(p_from_f(input_ids=ids).logits, fp.eval()(input_ids=ids).logits) <= PEFT_PARITY_RTOL
        assert rel_err(f_from_p(input_ids=ids).logits, pp.eval()(input_ids=ids).logits) <= PEFT_PARITY_RTOL


def test_config_errors():
    with pytest.raises(ValueError, match="trainable_token_indices"):
        fastpeft.LoraConfig(trainable_token_indices=[1, "a"])
    with pytest.raises(ValueError, match="trainable_token_indices"):
        fastpeft.AdaLoraConfig(total_step=10, trainable_token_indices=[1])
    with pytest.raises(ValueError, match="not valid row indices"):
        fastpeft.get_peft_model(_llama(), fastpeft.LoraConfig(target_modules=["q_proj"],
                                                               trainable_token_indices=[V + 3]))
    with pytest.raises(ValueError, match="already marked to be trained fully"):
        fastpeft.get_peft_model(_llama(), fastpeft.LoraConfig(target_modules=["q_proj"], modules_to_save=["embed_tokens"],
                                                               trainable_token_indices=[1]))
    m = _llama()
    with pytest.raises(ValueError, match="both adapted by LoRA"):
        fastpeft.get_peft_model(m, fastpeft.LoraConfig(target_modules=["q_proj", "embed_tokens"],
                                                        trainable_token_indices=[1]))
    assert type(m.model.embed_tokens) is nn.Embedding  # rolled back


def test_several_adapters_and_mixed_batch():
    _, fp = _pair([3, 7])
    torch.manual_seed(4)
    fp.add_adapter("other", fastpeft.LoraConfig(r=4, target_modules=["q_proj"], init_lora_weights=False,
                                                trainable_token_indices=[3, 7]))
    with torch.no_grad():
        fp.base_model.model.model.embed_tokens.trainable_tokens_delta["other"].normal_()
    fp.eval()
    ids = torch.tensor([[3, 1, 7], [7, 3, 2], [1, 2, 3]])
    outs = {}
    with torch.no_grad():
        for a in ("default", "other"):
            fp.set_adapter(a)
            outs[a] = fp(input_ids=ids).logits
        with fp.disable_adapter():
            outs["__base__"] = fp(input_ids=ids).logits
        mixed = fp(input_ids=ids, adapter_names=["other", "__base__", "default"]).logits
    assert not torch.allclose(outs["default"], outs["other"])
    for i, a in enumerate(["other", "__base__", "default"]):
        torch.testing.assert_close(mixed[i], outs[a][i], rtol=1e-5, atol=1e-6)
    emb = fp.base_model.model.model.embed_tokens
    assert emb.trainable_tokens_delta["default"].requires_grad is False  # inactive adapters are frozen
    fp.delete_adapter("other")
    assert list(emb.trainable_tokens_delta) == ["default"] and "other" not in emb.token_indices
