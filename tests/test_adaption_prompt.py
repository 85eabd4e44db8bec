"""Adaption prompt (LLaMA-Adapter): parity with HF PEFT on Llama (GQA) and GPT-2, Qwen2/Mistral against the math,
identity at init, files both ways, generate, training, several adapters, bad input."""

from __future__ import annotations

import copy
import json
import math
import warnings

import pytest
import torch

from testing_utils import GENERATE_SCORES_ATOL, PROMPT_EFFECT_MIN, PROMPT_FP32_ATOL, TRAIN_LOSS_RATIO
from testing_utils import PROMPT_MODELS as MODELS, batch, max_abs, tiny_bert, tiny_mistral, tiny_qwen2, twin
from testing_utils import prompt_tiny_llama as tiny_llama

peft = pytest.importorskip("peft")
import fastpeft  # noqa: E402
from fastpeft.tuners.adaption_prompt.layer import AdaptedAttention, adaption_attention_ref  # noqa: E402

warnings.filterwarnings("ignore", category=FutureWarning)

ALL_MODELS = dict(MODELS, qwen2=tiny_qwen2, mistral=tiny_mistral)


def _cfg(lib, **kw):
    kw = dict(dict(adapter_len=3, adapter_layers=2, task_type="CAUSAL_LM"), **kw)
    return lib.AdaptionPromptConfig(**kw)


def _randomise(fm, seed=3):
    """Nonzero gates (and fresh prompts) so the adapter matters."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in fm.named_parameters():
            if "adaption_gate" in n:
                p.copy_(torch.rand(p.shape, generator=g) + 0.5)
            elif "adaption_prompt" in n:
                p.copy_(torch.randn(p.shape, generator=g))


def _pair(model_name):
    m1, m2 = twin(MODELS[model_name])
    pristine = copy.deepcopy(m1)
    pm = peft.get_peft_model(m1, _cfg(peft))
    fm = fastpeft.get_peft_model(m2, _cfg(fastpeft))
    _randomise(pm)
    fm.base_model.set_adapter_state_dict("default", peft.get_peft_model_state_dict(pm))
    return pm, fm, pristine


@pytest.mark.parametrize("model_name", ["llama", "gpt2"])
def test_parity_with_peft(model_name):
    pm, fm, _ = _pair(model_name)
    pm.train()
    fm.train()
    ids, mask, labels = batch()
    o1 = pm(input_ids=ids, attention_mask=mask, labels=labels)
    o2 = fm(input_ids=ids, attention_mask=mask, labels=labels)
    assert max_abs(o1.logits, o2.logits) <= PROMPT_FP32_ATOL
    assert max_abs(o1.loss, o2.loss) <= PROMPT_FP32_ATOL
    o1.loss.backward()
    o2.loss.backward()
    g1 = {k: v for k, v in pm.named_parameters() if v.requires_grad}
    g2 = {k: v for k, v in fm.named_parameters() if v.requires_grad}
    assert len(g1) == len(g2) == 4  # a prompt and a gate in each of the 2 layers

    def key(name):  # PEFT: ...self_attn.adaption_gate ; fastpeft: ...self_attn.adaption_gate.default
        return name.rsplit(".", 1)[0] if name.endswith(".default") else name

    g2 = {key(k): v for k, v in g2.items()}
    assert set(g1) == set(g2)
    for k in g1:
        assert max_abs(g1[k].grad, g2[k].grad) <= PROMPT_FP32_ATOL, k
    assert fm.get_nb_trainable_parameters() == pm.get_nb_trainable_parameters()


@pytest.mark.parametrize("model_name", list(ALL_MODELS))
def test_identity_at_init_and_gradients_only_to_adapter(model_name):
    base, ref = twin(ALL_MODELS[model_name])
    fm = fastpeft.get_peft_model(base, _cfg(fastpeft))
    fm.train()
    ref.train()
    ids, mask, labels = batch()
    out = fm(input_ids=ids, attention_mask=mask, labels=labels)
    assert torch.equal(out.logits, ref(input_ids=ids, attention_mask=mask).logits)  # gate 0: exactly the base
    out.loss.backward()
    for n, p in fm.named_parameters():
        if "adaption_" in n:
            assert p.requires_grad and p.grad is not None, n
            if "adaption_prompt" in n:  # a zero gate blocks the prompt's gradient (PEFT's behaviour too)
                assert torch.count_nonzero(p.grad) == 0, n
            else:
                assert p.grad.abs().item() > 0, n
        else:
            assert not p.requires_grad and p.grad is None, n


def _manual_adapter_term(attn_wrapper, hidden, position_embeddings, name="default"):
    """fp64 reference of the adapter term, written head by head (no shared code with the implementation)."""
    attn = attn_wrapper.base_layer
    prompt = attn_wrapper.adaption_prompt[name].double()
    gate = attn_wrapper.adaption_gate[name].double()
    h = hidden.double()
    b, length, _ = h.shape
    hd = attn.head_dim
    wq, wk, wv, wo = (getattr(attn, f"{x}_proj").weight.double() for x in "qkvo")
    bq = attn.q_proj.bias.double() if attn.q_proj.bias is not None else 0
    bk = attn.k_proj.bias.double() if attn.k_proj.bias is not None else 0
    bv = attn.v_proj.bias.double() if attn.v_proj.bias is not None else 0
    q = h @ wq.T + bq  # (b, L, H*hd)
    kp = prompt[0] @ wk.T + bk  # (A, Hkv*hd), no rotary
    vp = prompt[0] @ wv.T + bv
    n_heads, n_kv = wq.shape[0] // hd, wk.shape[0] // hd
    cos, sin = (t.double() for t in position_embeddings)  # (b, L, hd)
    out = torch.zeros(b, length, n_heads * hd, dtype=torch.float64)
    for head in range(n_heads):
        kvh = head // (n_heads // n_kv)  # GQA: consecutive query heads share a KV head
        qh = q[..., head * hd:(head + 1) * hd]
        half = hd // 2
        rot = torch.cat([-qh[..., half:], qh[..., :half]], dim=-1)
        qh = qh * cos + rot * sin
        k = kp[:, kvh * hd:(kvh + 1) * hd]
        v = vp[:, kvh * hd:(kvh + 1) * hd]
        probs = torch.softmax(qh @ k.T / math.sqrt(hd), dim=-1)
        out[..., head * hd:(head + 1) * hd] = gate * probs @ v
    return out @ wo.T


@pytest.mark.parametrize("model_name", ["qwen2", "mistral", "llama"])
def test_llama_family_against_the_math(model_name):
    torch.manual_seed(0)
    model = ALL_MODELS[model_name]()
    fm = fastpeft.get_peft_model(model, _cfg(fastpeft, adapter_len=5, adapter_layers=1))
    _randomise(fm)
    wrapper = model.model.layers[-1].self_attn
    assert isinstance(wrapper, AdaptedAttention) and not isinstance(model.model.layers[0].self_attn, AdaptedAttention)
    hidden = torch.randn(2, 7, 64)
    pos = torch.arange(3, 10).expand(2, -1)  # offset positions: the query rotation must use them
    pe = model.model.rotary_emb(hidden, position_ids=pos)
    with torch.no_grad():
        y = wrapper(hidden_states=hidden, position_embeddings=pe, attention_mask=None)[0]
        y0 = wrapper.base_layer(hidden_states=hidden, position_embeddings=pe, attention_mask=None)[0]
        ref = _manual_adapter_term(wrapper, hidden, pe)
    assert max_abs(y - y0, ref) <= PROMPT_FP32_ATOL
    assert ref.abs().max() >= PROMPT_EFFECT_MIN


def test_attention_ref_gqa_and_gate():
    torch.manual_seed(0)
    q = torch.randn(2, 4, 5, 8, dtype=torch.float64)
    k = torch.randn(1, 2, 3, 8, dtype=torch.float64)
    v = torch.randn(1, 2, 3, 8, dtype=torch.float64)
    gate = torch.tensor([0.7], dtype=torch.float64)
    out = adaption_attention_ref(q, k, v, gate)
    assert out.shape == (2, 5, 32)
    for h in range(4):
        p = torch.softmax(q[:, h] @ k[0, h // 2].T / math.sqrt(8), dim=-1)
        assert torch.allclose(out[..., h * 8:(h + 1) * 8], 0.7 * p @ v[0, h // 2])
    assert torch.count_nonzero(adaption_attention_ref(q, k, v, torch.zeros(1, dtype=torch.float64))) == 0
    with pytest.raises(ValueError, match="multiple"):
        adaption_attention_ref(q, torch.randn(1, 3, 3, 8, dtype=torch.float64), v, gate)


@pytest.mark.parametrize("model_name", ["llama", "gpt2"])
def test_files_load_both_ways(model_name, tmp_path):
    pm, fm, pristine = _pair(model_name)
    _randomise(fm, seed=11)  # differ from the PEFT adapter
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
    assert set(sp) == set(sf)
    attn = "model.layers" if model_name == "llama" else "transformer.h"
    sub = "self_attn" if model_name == "llama" else "attn"
    assert f"base_model.model.{attn}.1.{sub}.adaption_prompt" in sf and sf[
        f"base_model.model.{attn}.1.{sub}.adaption_gate"].shape == (1,)
    with torch.no_grad():
        ref_p = pm(input_ids=ids, attention_mask=mask).logits
        ref_f = fm(input_ids=ids, attention_mask=mask).logits
        f_loaded = fastpeft.PeftModel.from_pretrained(copy.deepcopy(pristine), str(pdir))
        assert max_abs(f_loaded(input_ids=ids, attention_mask=mask).logits, ref_p) <= PROMPT_FP32_ATOL
        p_loaded = peft.PeftModel.from_pretrained(copy.deepcopy(pristine), str(fdir))
        assert max_abs(p_loaded(input_ids=ids, attention_mask=mask).logits, ref_f) <= PROMPT_FP32_ATOL


@pytest.mark.parametrize("model_name", list(ALL_MODELS))
def test_generate_equals_manual_greedy_loop(model_name):
    torch.manual_seed(0)
    fm = fastpeft.get_peft_model(ALL_MODELS[model_name](), _cfg(fastpeft)).eval()
    _randomise(fm)
    ids, _, _ = batch(length=5)
    out = fm.generate(input_ids=ids, max_new_tokens=4, do_sample=False, output_scores=True,
                      return_dict_in_generate=True, pad_token_id=0, eos_token_id=None)
    seq = ids
    with torch.no_grad():
        for s in range(4):
            logits = fm(input_ids=seq).logits[:, -1]
            assert max_abs(out.scores[s], logits) <= GENERATE_SCORES_ATOL, s
            seq = torch.cat([seq, logits.argmax(-1, keepdim=True)], dim=1)
        with fm.disable_adapter():
            base_first = fm(input_ids=ids).logits[:, -1]
    assert torch.equal(out.sequences, seq)
    assert max_abs(out.scores[0], base_first) >= PROMPT_EFFECT_MIN


@pytest.mark.parametrize("model_name", ["llama", "gpt2", "qwen2"])
def test_training_reduces_loss(model_name):
    torch.manual_seed(0)
    fm = fastpeft.get_peft_model(ALL_MODELS[model_name](), _cfg(fastpeft))
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


def test_multiple_adapters_and_unload(tmp_path):
    torch.manual_seed(0)
    base = tiny_llama()
    pristine = copy.deepcopy(base)
    fm = fastpeft.get_peft_model(base, _cfg(fastpeft))
    fm.add_adapter("deep", _cfg(fastpeft, adapter_len=2, adapter_layers=1))
    _randomise(fm)
    ids, mask, _ = batch()
    with torch.no_grad():
        a = fm(input_ids=ids, attention_mask=mask).logits
        fm.set_adapter("deep")
        d = fm(input_ids=ids, attention_mask=mask).logits
    assert max_abs(a, d) >= PROMPT_EFFECT_MIN
    trainable = sorted(n for n, p in fm.named_parameters() if p.requires_grad)
    assert trainable == ["base_model.model.model.layers.1.self_attn.adaption_gate.deep",
                         "base_model.model.model.layers.1.self_attn.adaption_prompt.deep"]
    with pytest.raises(ValueError, match="one active adapter"):
        fm.set_adapter(["default", "deep"])
    # both adapters saved; PEFT loads each and reproduces the outputs
    fm.save_pretrained(str(tmp_path))
    pm = peft.PeftModel.from_pretrained(copy.deepcopy(pristine), str(tmp_path))
    pm.load_adapter(str(tmp_path / "deep"), adapter_name="deep")
    with torch.no_grad():
        assert max_abs(pm(input_ids=ids, attention_mask=mask).logits, a) <= PROMPT_FP32_ATOL
        pm.set_adapter("deep")
        assert max_abs(pm(input_ids=ids, attention_mask=mask).logits, d) <= PROMPT_FP32_ATOL
    fm.delete_adapter("deep")
    assert list(fm.peft_config) == ["default"]
    with torch.no_grad():
        assert max_abs(fm(input_ids=ids, attention_mask=mask).logits, a) == 0.0
    plain = fm.unload()
    assert not any(isinstance(m, AdaptedAttention) for m in plain.modules())
    with torch.no_grad():
        assert torch.equal(plain(input_ids=ids, attention_mask=mask).logits,
                           pristine(input_ids=ids, attention_mask=mask).logits)


def test_bf16_model_keeps_adapter_dtype():
    torch.manual_seed(0)
    fm = fastpeft.get_peft_model(tiny_llama().to(torch.bfloat16), _cfg(fastpeft))
    dts = {p.dtype for n, p in fm.named_parameters() if "adaption_" in n}
    assert dts == {torch.bfloat16}  # as PEFT: the prompt goes through the bf16 k_proj/v_proj
    ids, mask, _ = batch()
    assert fm(input_ids=ids, attention_mask=mask).logits.dtype == torch.bfloat16


def test_bad_input():
    msg = "Unsupported model type for adaption prompt: 'bert'.*gpt2.*llama.*mistral.*qwen2"
    with pytest.raises(ValueError, match=msg):
        fastpeft.get_peft_model(tiny_bert(), _cfg(fastpeft, task_type=None))
    base = tiny_llama()
    snapshot = {n: type(m) for n, m in base.named_modules()}
    with pytest.raises(ValueError, match="adapter_layers=5"):
        fastpeft.get_peft_model(base, _cfg(fastpeft, adapter_layers=5))
    assert {n: type(m) for n, m in base.named_modules()} == snapshot  # nothing changed
    for field in ("adapter_len", "adapter_layers"):
        with pytest.raises(ValueError, match=field):
            fastpeft.AdaptionPromptConfig(**{**dict(adapter_len=2, adapter_layers=1), field: 0})
        with pytest.raises(ValueError, match=field):
            fastpeft.AdaptionPromptConfig(**{**dict(adapter_len=2, adapter_layers=1), field: None})
    fm = fastpeft.get_peft_model(tiny_llama(), _cfg(fastpeft))
    with pytest.raises(ValueError, match="adaption_prompt"):
        fm.base_model.set_adapter_state_dict("default", {
            "base_model.model.model.layers.0.self_attn.adaption_prompt": torch.zeros(1, 4, 64),
            "base_model.model.model.layers.0.self_attn.adaption_gate": torch.zeros(1),
            "base_model.model.model.layers.1.self_attn.adaption_prompt": torch.zeros(1, 3, 64),
            "base_model.model.model.layers.1.self_attn.adaption_gate": torch.zeros(1)})
    with pytest.raises(ValueError, match="cannot be merged"):
        fm.merge_and_unload()


def test_failed_load_leaves_the_model_unchanged(tmp_path):
    torch.manual_seed(0)
    fm = fastpeft.get_peft_model(tiny_llama(), _cfg(fastpeft))
    fm.save_pretrained(str(tmp_path))
    target = tiny_llama()
    before = {n: (type(m), id(m)) for n, m in target.named_modules()}
    grads = {n: p.requires_grad for n, p in target.named_parameters()}
    wrong = fastpeft.AdaptionPromptConfig(adapter_len=7, adapter_layers=2, task_type="CAUSAL_LM")
    with pytest.raises(ValueError, match="adaption_prompt"):
        fastpeft.PeftModel.from_pretrained(target, str(tmp_path), config=wrong)
    assert {n: (type(m), id(m)) for n, m in target.named_modules()} == before
    assert {n: p.requires_grad for n, p in target.named_parameters()} == grads
