"""LoRA on nn.Embedding (``lora_embedding_A`` / ``lora_embedding_B``): parity with HF PEFT 0.21.2 in fp32 (outputs,
every gradient, merged weights), merge/unmerge, mixed batches, embed_scale, and files both ways (PEFT also writes the
targeted embedding's base weight into the file; fastpeft writes and reads it the same way)."""

import warnings

import pytest
import torch
import torch.nn as nn

from testing_utils import PEFT_PARITY_RTOL, rel_err

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

import fastpeft  # noqa: E402
from fastpeft.tuners.lora.embedding import Embedding  # noqa: E402


def _llama(tie=False, seed=0):
    cfg = LlamaConfig(vocab_size=80, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=32, tie_word_embeddings=tie)
    torch.manual_seed(seed)
    return LlamaForCausalLM(cfg)


def _pair(cfg_fn, tie=False):
    base = _llama(tie)
    sd = base.state_dict()
    out = []
    for lib in (peft, fastpeft):
        m = _llama(tie)
        m.load_state_dict(sd)
        torch.manual_seed(1)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            out.append(lib.get_peft_model(m, cfg_fn(lib)))
    return out


def _fwd_bwd(pm, ids):
    out = pm(input_ids=ids, labels=ids)
    out.loss.backward()
    return out.logits.detach(), {n: p.grad.detach().clone() for n, p in pm.named_parameters() if p.requires_grad}


def _cfg(lib, **kw):
    return lib.LoraConfig(r=4, lora_alpha=8, target_modules=["embed_tokens", "q_proj"], init_lora_weights=False, **kw)


@pytest.mark.parametrize("tie", [False, True])
def test_parity_forward_backward_merge(tie):
    pp, fp = _pair(_cfg, tie)
    emb = fp.base_model.model.model.embed_tokens
    assert isinstance(emb, Embedding) and emb.lora_embedding_A["default"].shape == (4, 80)
    assert emb.lora_embedding_B["default"].shape == (32, 4)
    ids = torch.randint(0, 80, (2, 7))
    (lp, gp), (lf, gf) = _fwd_bwd(pp, ids), _fwd_bwd(fp, ids)
    assert rel_err(lf, lp) <= PEFT_PARITY_RTOL
    assert sorted(gp) == sorted(gf) and any("lora_embedding_A" in k for k in gf)
    for k in gp:
        assert rel_err(gf[k], gp[k]) <= PEFT_PARITY_RTOL, k
    # merge: W_emb + (B A)^T * s, exactly PEFT's; unmerge restores to rounding
    w0 = emb.base_layer.weight.detach().clone()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pp.merge_adapter()
    fp.merge_adapter()
    pe = pp.base_model.model.model.embed_tokens.base_layer.weight
    assert torch.equal(emb.base_layer.weight, pe)
    with torch.no_grad():
        # with tied embeddings the merge changes the output layer too, in PEFT as well
        assert rel_err(fp(input_ids=ids).logits, pp(input_ids=ids).logits) <= PEFT_PARITY_RTOL
        if not tie:
            assert rel_err(fp(input_ids=ids).logits, lf) <= PEFT_PARITY_RTOL
    fp.unmerge_adapter()
    torch.testing.assert_close(emb.base_layer.weight, w0, rtol=0, atol=1e-6)
    merged = fp.merge_and_unload()
    assert type(merged.model.embed_tokens) is nn.Embedding


def test_init_like_peft():
    """Default init: A zeros, B normal (the adapter starts as a no-op); same RNG draws as PEFT."""
    pp, fp = _pair(lambda lib: lib.LoraConfig(r=4, target_modules=["embed_tokens"]))
    a = fp.base_model.model.model.embed_tokens
    b = pp.base_model.model.model.embed_tokens
    assert torch.count_nonzero(a.lora_embedding_A["default"]) == 0
    assert torch.equal(a.lora_embedding_B["default"], b.lora_embedding_B["default"])


def test_files_both_ways(tmp_path):
    pp, fp = _pair(_cfg)
    with torch.no_grad():
        fp.base_model.model.model.embed_tokens.lora_embedding_A["default"].normal_()
    fp.save_pretrained(tmp_path / "fast")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pp.save_pretrained(tmp_path / "peft")
    from safetensors.torch import load_file

    kf = set(load_file(str(tmp_path / "fast" / "adapter_model.safetensors")))
    kp = set(load_file(str(tmp_path / "peft" / "adapter_model.safetensors")))
    assert kf == kp and "base_model.model.model.embed_tokens.base_layer.weight" in kf
    without = set(fastpeft.get_peft_model_state_dict(fp, save_embedding_layers=False))
    assert without == set(peft.get_peft_model_state_dict(pp, save_embedding_layers=False)) == kf - {
        "base_model.model.model.embed_tokens.base_layer.weight"}
    ids = torch.randint(0, 80, (2, 6))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        p_from_f = peft.PeftModel.from_pretrained(_llama(), str(tmp_path / "fast"))
        f_from_p = fastpeft.PeftModel.from_pretrained(_llama(), str(tmp_path / "peft"))
    with torch.no_grad():
        assert torch.equal(p_from_f(input_ids=ids).logits, fp.eval()(input_ids=ids).logits)
        assert torch.equal(f_from_p(input_ids=ids).logits, pp.eval()(input_ids=ids).logits)


def test_bad_file_leaves_model_unchanged(tmp_path):
    _, fp = _pair(_cfg)
    fp.save_pretrained(tmp_path / "a")
    from safetensors.torch import load_file, save_file

    sd = load_file(str(tmp_path / "a" / "adapter_model.safetensors"))
    sd["base_model.model.model.embed_tokens.base_layer.weight"] = torch.zeros(81, 32)
    save_file(sd, str(tmp_path / "a" / "adapter_model.safetensors"))
    base = _llama()
    before = {n: p.detach().clone() for n, p in base.named_parameters()}
    with pytest.raises(ValueError, match="embed_tokens.base_layer.weight"):
        fastpeft.PeftModel.from_pretrained(base, str(tmp_path / "a"))
    assert type(base.model.embed_tokens) is nn.Embedding
    for n, p in base.named_parameters():
        assert torch.equal(p, before[n]), n


def test_mixed_batch_and_several_adapters():
    _, fp = _pair(_cfg)
    torch.manual_seed(3)
    fp.add_adapter("other", _cfg(fastpeft))
    for n, p in fp.named_parameters():
        if "lora_embedding" in n:
            with torch.no_grad():
                p.normal_()
    fp.eval()
    ids = torch.randint(0, 80, (3, 5))
    outs = {}
    with torch.no_grad():
        for a in ("default", "other"):
            fp.set_adapter(a)
            outs[a] = fp(input_ids=ids).logits
        with fp.disable_adapter():
            outs["__base__"] = fp(input_ids=ids).logits
        mixed = fp(input_ids=ids, adapter_names=["other", "__base__", "default"]).logits
    for i, a in enumerate(["other", "__base__", "default"]):
        torch.testing.assert_close(mixed[i], outs[a][i], rtol=1e-5, atol=1e-6)


class _ScaledEmbedding(nn.Embedding):
    def __init__(self, n, d, scale):
        super().__init__(n, d)
        self.embed_scale = torch.tensor(scale)

    def forward(self, x):
        return super().forward(x) * self.embed_scale


class _Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = _ScaledEmbedding(20, 8, 3.0)
        self.out = nn.Linear(8, 5)

    def forward(self, x):
        return self.out(self.emb(x))


def test_embed_scale_like_peft():
    torch.manual_seed(0)
    base = _Tiny()
    sd = base.state_dict()
    outs = []
    for lib in (peft, fastpeft):
        m = _Tiny()
        m.load_state_dict(sd)
        torch.manual_seed(2)
        pm = lib.get_peft_model(m, lib.LoraConfig(r=2, target_modules=["emb"], init_lora_weights=False))
        ids = torch.randint(0, 20, (3, 4))
        y = pm(ids)
        y.sum().backward()
        outs.append((y.detach(), pm.base_model.model.emb.lora_embedding_A["default"].grad.clone()))
    assert rel_err(outs[1][0], outs[0][0]) <= PEFT_PARITY_RTOL
    assert rel_err(outs[1][1], outs[0][1]) <= PEFT_PARITY_RTOL


def test_lora_bias_refused_on_embedding():
    with pytest.raises(ValueError, match="lora_bias=True is not supported for Embedding"):
        fastpeft.get_peft_model(_llama(), fastpeft.LoraConfig(r=2, target_modules=["embed_tokens"], lora_bias=True))
