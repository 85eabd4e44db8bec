"""Prefix tuning (with and without the projection, GQA sizing): parity with HF PEFT's forward, files both ways,
generate (which HF PEFT 0.21.2 gets wrong with transformers 5.x), training, gradient checkpointing, bad input."""

from __future__ import annotations

import copy
import json
import warnings

import pytest
import torch

from testing_utils import GENERATE_SCORES_ATOL, PROMPT_EFFECT_MIN, PROMPT_FP32_ATOL, TRAIN_LOSS_RATIO
from testing_utils import PROMPT_MODELS as MODELS, batch, max_abs, tiny_qwen2, twin
from testing_utils import prompt_tiny_llama as tiny_llama

MODELS = dict(MODELS, qwen2=tiny_qwen2)

peft = pytest.importorskip("peft")
import fastpeft  # noqa: E402
from fastpeft.tuners._prompt_learning import build_prefix_cache  # noqa: E402

warnings.filterwarnings("ignore", category=FutureWarning)

VARIANTS = {"plain": {}, "projection": {"prefix_projection": True, "encoder_hidden_size": 24}}
N_VIRT = 4


def _cfgs(variant, **extra):
    kw = dict(VARIANTS[variant], task_type="CAUSAL_LM", num_virtual_tokens=N_VIRT, **extra)
    return peft.PrefixTuningConfig(**kw), fastpeft.PrefixTuningConfig(**kw)


def _pair(model_name, variant, **extra):
    m1, m2 = twin(MODELS[model_name])
    pristine = copy.deepcopy(m1)
    pcfg, fcfg = _cfgs(variant, **extra)
    pm = peft.get_peft_model(m1, pcfg)
    fm = fastpeft.get_peft_model(m2, fcfg)
    fm.base_model.prompt_encoder["default"].load_state_dict(pm.prompt_encoder["default"].state_dict())
    return pm, fm, pristine


def test_gqa_sizing_matches_peft():
    pm, fm, _ = _pair("llama", "plain")
    pc, fc = pm.peft_config["default"], fm.peft_config["default"]
    # tiny Llama: hidden 64, 4 query heads, 2 KV heads -> head_dim 16, KV width 32
    assert (fc.token_dim, fc.num_attention_heads, fc.num_layers, fc.encoder_hidden_size) == (32, 2, 2, 32)
    assert (pc.token_dim, pc.num_attention_heads, pc.num_layers) == (fc.token_dim, fc.num_attention_heads,
                                                                     fc.num_layers)
    w = fm.base_model.prompt_encoder["default"].embedding.weight
    assert w.shape == (N_VIRT, 2 * 2 * 32)


def test_prefix_cache_layout():
    """Layer i's key is columns [2i·d, (2i+1)·d) of the prefix and its value the next d columns, as (H, n, hd)."""
    n, layers, heads, hd = 3, 2, 2, 5
    prefix = torch.randn(n, layers * 2 * heads * hd)
    cache = build_prefix_cache(prefix, layers, heads, batch_size=2)
    d = heads * hd
    for i in range(layers):
        k_ref = prefix[:, 2 * i * d:(2 * i + 1) * d].view(n, heads, hd).transpose(0, 1)
        v_ref = prefix[:, (2 * i + 1) * d:(2 * i + 2) * d].view(n, heads, hd).transpose(0, 1)
        assert cache.layers[i].keys.shape == (2, heads, n, hd)
        assert torch.equal(cache.layers[i].keys[1], k_ref)
        assert torch.equal(cache.layers[i].values[0], v_ref)
    with pytest.raises(ValueError, match="does not split"):
        build_prefix_cache(torch.randn(n, 7), layers, heads, batch_size=1)


@pytest.mark.parametrize("model_name", ["llama", "gpt2", "qwen2"])
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_forward_loss_and_grads_match_peft(model_name, variant):
    pm, fm, _ = _pair(model_name, variant)
    pm.train()
    fm.train()
    ids, mask, labels = batch()
    o1 = pm(input_ids=ids, attention_mask=mask, labels=labels)
    o2 = fm(input_ids=ids, attention_mask=mask, labels=labels)
    assert o2.logits.shape == o1.logits.shape == (2, ids.shape[1], o1.logits.shape[-1])  # labels not extended
    assert max_abs(o1.logits, o2.logits) <= PROMPT_FP32_ATOL
    assert max_abs(o1.loss, o2.loss) <= PROMPT_FP32_ATOL
    o1.loss.backward()
    o2.loss.backward()
    g1 = dict(pm.prompt_encoder["default"].named_parameters())
    g2 = dict(fm.base_model.prompt_encoder["default"].named_parameters())
    assert set(g1) == set(g2)
    for k in g1:
        assert max_abs(g1[k].grad, g2[k].grad) <= PROMPT_FP32_ATOL, k
    assert all(p.grad is None for p in fm.get_base_model().parameters())
    assert fm.get_nb_trainable_parameters() == pm.get_nb_trainable_parameters()


@pytest.mark.parametrize("model_name", ["llama", "gpt2"])
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_files_load_both_ways(model_name, variant, tmp_path):
    pm, fm, pristine = _pair(model_name, variant)
    with torch.no_grad():
        for p in fm.base_model.prompt_encoder["default"].parameters():
            p.add_(0.1 * torch.randn_like(p))
    pm.eval()
    fm.eval()
    ids, mask, _ = batch()
    pdir, fdir = tmp_path / "peft", tmp_path / "fast"
    pm.save_pretrained(str(pdir))
    fm.save_pretrained(str(fdir))
    jp = json.loads((pdir / "adapter_config.json").read_text())
    jf = json.loads((fdir / "adapter_config.json").read_text())
    # peft_version: the installed PEFT's own (0.21.0 on the GPU machine), fastpeft writes the format it follows
    assert {k: v for k, v in jp.items() if k != "peft_version"} == {k: v for k, v in jf.items() if k != "peft_version"}
    from safetensors.torch import load_file

    sp, sf = load_file(str(pdir / "adapter_model.safetensors")), load_file(str(fdir / "adapter_model.safetensors"))
    assert set(sp) == set(sf) == {"prompt_embeddings"}
    assert sp["prompt_embeddings"].shape == sf["prompt_embeddings"].shape
    with torch.no_grad():
        ref_p = pm(input_ids=ids, attention_mask=mask).logits
        ref_f = fm(input_ids=ids, attention_mask=mask).logits
        f_loaded = fastpeft.PeftModel.from_pretrained(copy.deepcopy(pristine), str(pdir))
        assert max_abs(f_loaded(input_ids=ids, attention_mask=mask).logits, ref_p) <= PROMPT_FP32_ATOL
        p_loaded = peft.PeftModel.from_pretrained(copy.deepcopy(pristine), str(fdir))
        assert max_abs(p_loaded(input_ids=ids, attention_mask=mask).logits, ref_f) <= PROMPT_FP32_ATOL


@pytest.mark.parametrize("model_name", ["llama", "gpt2"])
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_generate_uses_the_prefix(model_name, variant):
    """generate() == a greedy loop over forward, and its first-step scores are the prefix-tuned logits.  (HF PEFT
    0.21.2 is no oracle here: with transformers >= 5.24 its generate() passes the prefix as the deprecated
    ``past_key_values`` next to a ``cache``, transformers ignores it, and the first logits are the base model's.)"""
    torch.manual_seed(0)
    base = MODELS[model_name]()
    fm = fastpeft.get_peft_model(base, _cfgs(variant)[1]).eval()
    ids, _, _ = batch(length=6)
    steps = 4
    out = fm.generate(input_ids=ids, max_new_tokens=steps, do_sample=False, output_scores=True,
                      return_dict_in_generate=True, pad_token_id=0, eos_token_id=None)
    seq = ids
    with torch.no_grad():
        for s in range(steps):
            logits = fm(input_ids=seq).logits[:, -1]
            assert max_abs(out.scores[s], logits) <= GENERATE_SCORES_ATOL, s
            seq = torch.cat([seq, logits.argmax(-1, keepdim=True)], dim=1)
        base_first = fm.get_base_model()(input_ids=ids).logits[:, -1]
    assert torch.equal(out.sequences, seq)
    assert max_abs(out.scores[0], base_first) >= PROMPT_EFFECT_MIN
    # with an attention mask (left padding), beams, and inputs_embeds
    ids2, mask2, _ = batch(length=6)
    # generate() numbers left-padded rows from their first real token (transformers' rule): same positions here
    pos2 = (mask2.cumsum(-1) - 1).masked_fill(mask2 == 0, 0)
    with torch.no_grad():
        ref = fm(input_ids=ids2, attention_mask=mask2, position_ids=pos2).logits[:, -1]
    g2 = fm.generate(input_ids=ids2, attention_mask=mask2, max_new_tokens=1, do_sample=False, output_scores=True,
                     return_dict_in_generate=True, pad_token_id=0, eos_token_id=None)
    assert max_abs(g2.scores[0], ref) <= GENERATE_SCORES_ATOL
    gb = fm.generate(input_ids=ids, max_new_tokens=2, num_beams=3, do_sample=False, pad_token_id=0,
                     eos_token_id=None)
    assert gb.shape == (2, 8)
    emb = fm.get_base_model().get_input_embeddings()(ids)
    ge = fm.generate(inputs_embeds=emb, max_new_tokens=1, do_sample=False, output_scores=True,
                     return_dict_in_generate=True, pad_token_id=0, eos_token_id=None)
    assert max_abs(ge.scores[0], out.scores[0]) <= GENERATE_SCORES_ATOL


def test_first_generate_step_matches_peft_forward():
    pm, fm, _ = _pair("llama", "plain")
    ids, mask, _ = batch(length=6)
    # the prefix keys carry no rotary embedding, so absolute positions matter: use generate()'s for padded rows
    pos = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 0)
    with torch.no_grad():
        ref = pm.eval()(input_ids=ids, attention_mask=mask, position_ids=pos).logits[:, -1]
    g = fm.eval().generate(input_ids=ids, attention_mask=mask, max_new_tokens=1, do_sample=False,
                           output_scores=True, return_dict_in_generate=True, pad_token_id=0, eos_token_id=None)
    assert max_abs(g.scores[0], ref) <= GENERATE_SCORES_ATOL


def test_cache_continuation_and_position_ids():
    torch.manual_seed(0)
    fm = fastpeft.get_peft_model(tiny_llama(), _cfgs("plain")[1]).eval()
    ids, mask, _ = batch()
    with torch.no_grad():
        full = fm(input_ids=ids, attention_mask=mask).logits
        first = fm(input_ids=ids[:, :-1], attention_mask=mask[:, :-1], use_cache=True)
        step = fm(input_ids=ids[:, -1:], attention_mask=mask, cache=first.cache, use_cache=True)
        assert max_abs(step.logits[:, -1], full[:, -1]) <= PROMPT_FP32_ATOL
        pos = torch.arange(ids.shape[1]).expand(2, -1)
        assert max_abs(fm(input_ids=ids, position_ids=pos).logits, fm(input_ids=ids).logits) <= PROMPT_FP32_ATOL


def test_qwen2_sliding_window_config_and_zero_init():
    torch.manual_seed(0)
    base = tiny_qwen2(use_sliding_window=True, sliding_window=64)
    cfg = fastpeft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3, init_weights="zero")
    fm = fastpeft.get_peft_model(base, cfg).eval()
    assert torch.count_nonzero(fm.base_model.prompt_encoder["default"].embedding.weight) == 0
    ids, mask, _ = batch()
    with torch.no_grad():
        y = fm(input_ids=ids, attention_mask=mask).logits
        with fm.disable_adapter():
            b = fm(input_ids=ids, attention_mask=mask).logits
    # zero keys/values are not a no-op: they still take attention mass (as in PEFT)
    assert max_abs(y, b) >= PROMPT_EFFECT_MIN


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_training_reduces_loss(variant):
    torch.manual_seed(0)
    fm = fastpeft.get_peft_model(tiny_llama(), _cfgs(variant)[1])
    fm.train()
    ids, mask, _ = batch(b=4, length=8)
    labels = torch.full_like(ids, 7)
    opt = torch.optim.Adam([p for p in fm.parameters() if p.requires_grad], lr=5e-2)
    losses = []
    for _ in range(20):
        loss = fm(input_ids=ids, attention_mask=mask, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < TRAIN_LOSS_RATIO * losses[0], losses


def test_gradient_checkpointing_is_refused_with_reason():
    torch.manual_seed(0)
    base = tiny_llama()
    base.gradient_checkpointing_enable()
    snapshot = [p.requires_grad for p in base.parameters()]
    with pytest.raises(ValueError, match="gradient checkpointing.*cache"):
        fastpeft.get_peft_model(base, _cfgs("plain")[1])
    assert [p.requires_grad for p in base.parameters()] == snapshot
    # enabled after the adapter was added: refused at the first training forward
    base2 = tiny_llama()
    fm = fastpeft.get_peft_model(base2, _cfgs("plain")[1])
    base2.gradient_checkpointing_enable()
    fm.train()
    ids, _, labels = batch()
    with pytest.raises(ValueError, match="gradient checkpointing"):
        fm(input_ids=ids, labels=labels)


def test_bad_input():
    torch.manual_seed(0)
    fm = fastpeft.get_peft_model(tiny_llama(), _cfgs("plain")[1])
    ids, mask, labels = batch()
    with pytest.raises(ValueError, match="attention_mask"):
        fm(input_ids=ids, attention_mask=torch.ones(2, ids.shape[1] + N_VIRT, dtype=torch.long))
    with pytest.raises(ValueError, match="labels"):
        fm(input_ids=ids, labels=labels[:, 1:])
    with pytest.raises(ValueError, match="init_weights"):
        fastpeft.PrefixTuningConfig(num_virtual_tokens=2, init_weights="ones")
    with pytest.raises(ValueError, match="cache"):
        fm.generate(input_ids=ids, cache=build_prefix_cache(torch.zeros(N_VIRT, 128), 2, 2, 2), max_new_tokens=1)
    with pytest.raises(ValueError, match="prompt_embeddings"):
        fm.base_model.set_adapter_state_dict("default", {"prompt_embeddings": torch.zeros(N_VIRT, 64)})


def test_seq_cls_llama():
    """HF PEFT 0.21.2's SEQ_CLS prefix tuning refuses Llama under transformers 5.x (it looks for a
    `past_key_values` argument, now `cache`); fastpeft runs it: logits equal the base model fed the prefix cache."""
    from transformers import LlamaConfig, LlamaForSequenceClassification

    torch.manual_seed(0)
    model = LlamaForSequenceClassification(LlamaConfig(
        vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, num_labels=3, pad_token_id=0)).eval()
    fm = fastpeft.get_peft_model(model, fastpeft.PrefixTuningConfig(task_type="SEQ_CLS", num_virtual_tokens=3))
    ids, mask, _ = batch()
    lab = torch.tensor([1, 2])
    out = fm(input_ids=ids, attention_mask=mask, labels=lab)
    c = fm.peft_config["default"]
    enc = fm.base_model.prompt_encoder["default"]
    cache = build_prefix_cache(enc.output(), c.num_layers, c.num_attention_heads, 2, model.config)
    with torch.no_grad():
        want = fm.get_base_model()(input_ids=ids, cache=cache,
                                   attention_mask=torch.cat([torch.ones(2, 3, dtype=mask.dtype), mask], 1)).logits
    assert out.logits.shape == (2, 3) and max_abs(out.logits, want) <= PROMPT_FP32_ATOL
    out.loss.backward()
    assert enc.embedding.weight.grad.abs().sum() > 0
    trainable = {n.split(".")[1] for n, p in fm.named_parameters() if p.requires_grad}
    assert trainable == {"prompt_encoder", "model"}  # the encoder and the score head copy (modules_to_save)


def test_empty_cache_from_caller_is_filled():
    from transformers import DynamicCache

    torch.manual_seed(0)
    fm = fastpeft.get_peft_model(tiny_llama(), _cfgs("plain")[1]).eval()
    ids, mask, _ = batch()
    cache = DynamicCache()
    with torch.no_grad():
        out = fm(input_ids=ids, attention_mask=mask, cache=cache, use_cache=True)
        ref = fm(input_ids=ids, attention_mask=mask).logits
    assert cache.get_seq_length() == N_VIRT + ids.shape[1]
    assert max_abs(out.logits, ref) <= PROMPT_FP32_ATOL
    with pytest.raises(ValueError, match="use_cache=True"):
        fm.generate(input_ids=ids, use_cache=False, max_new_tokens=1)
