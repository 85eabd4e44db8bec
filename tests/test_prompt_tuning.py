"""Prompt tuning and P-tuning (MLP, LSTM): parity with HF PEFT, files both ways, generate, training, bad input."""

from __future__ import annotations

import copy
import json
import warnings

import pytest
import torch

from testing_utils import GENERATE_SCORES_ATOL, PROMPT_EFFECT_MIN, PROMPT_FP32_ATOL, TRAIN_LOSS_RATIO
from testing_utils import PROMPT_MODELS as MODELS, VOCAB, batch, max_abs, tiny_qwen2, twin
from testing_utils import prompt_tiny_llama as tiny_llama

MODELS = dict(MODELS, qwen2=tiny_qwen2)

peft = pytest.importorskip("peft")
import fastpeft  # noqa: E402

warnings.filterwarnings("ignore", category=FutureWarning)

METHODS = {
    "prompt": ("PromptTuningConfig", {}),
    "ptuning_mlp": ("PromptEncoderConfig", {"encoder_hidden_size": 24}),
    "ptuning_lstm": ("PromptEncoderConfig", {"encoder_hidden_size": 24, "encoder_reparameterization_type": "LSTM"}),
}
N_VIRT = 5


def _configs(method, **extra):
    cname, kw = METHODS[method]
    kw = dict(kw, task_type="CAUSAL_LM", num_virtual_tokens=N_VIRT, **extra)
    return getattr(peft, cname)(**kw), getattr(fastpeft, cname)(**kw)


def _pair(model_name, method, **extra):
    """(HF PEFT model, fastpeft model, pristine base copy) with the same base weights and the same encoder weights."""
    m1, m2 = twin(MODELS[model_name])
    pristine = copy.deepcopy(m1)
    pcfg, fcfg = _configs(method, **extra)
    pm = peft.get_peft_model(m1, pcfg)
    fm = fastpeft.get_peft_model(m2, fcfg)
    fm.base_model.prompt_encoder["default"].load_state_dict(pm.prompt_encoder["default"].state_dict())
    return pm, fm, pristine


@pytest.mark.parametrize("model_name", ["llama", "gpt2", "qwen2"])
@pytest.mark.parametrize("method", list(METHODS))
def test_forward_loss_and_grads_match_peft(model_name, method):
    pm, fm, _ = _pair(model_name, method)
    pm.train()
    fm.train()
    ids, mask, labels = batch()
    o1 = pm(input_ids=ids, attention_mask=mask, labels=labels)
    o2 = fm(input_ids=ids, attention_mask=mask, labels=labels)
    assert o2.logits.shape == (2, ids.shape[1] + N_VIRT, VOCAB)
    assert max_abs(o1.logits, o2.logits) <= PROMPT_FP32_ATOL
    assert max_abs(o1.loss, o2.loss) <= PROMPT_FP32_ATOL
    o1.loss.backward()
    o2.loss.backward()
    g1 = dict(pm.prompt_encoder["default"].named_parameters())
    g2 = dict(fm.base_model.prompt_encoder["default"].named_parameters())
    assert set(g1) == set(g2)
    for k in g1:
        assert g2[k].grad is not None, k
        assert max_abs(g1[k].grad, g2[k].grad) <= PROMPT_FP32_ATOL, k
    # only the encoder is trainable, and the base model got no gradient
    assert all(p.grad is None for p in fm.get_base_model().parameters())
    assert fm.get_nb_trainable_parameters() == pm.get_nb_trainable_parameters()


@pytest.mark.parametrize("model_name", ["llama", "gpt2"])
@pytest.mark.parametrize("method", list(METHODS))
def test_files_load_both_ways(model_name, method, tmp_path):
    pm, fm, pristine = _pair(model_name, method)
    # make the fastpeft adapter differ from the PEFT one so that each direction is a real check
    with torch.no_grad():
        for p in fm.base_model.prompt_encoder["default"].parameters():
            p.add_(0.1 * torch.randn_like(p))
    ids, mask, _ = batch()
    pm.eval()
    fm.eval()
    pdir, fdir = tmp_path / "peft", tmp_path / "fast"
    pm.save_pretrained(str(pdir))
    fm.save_pretrained(str(fdir))
    # same config file keys and values
    jp = json.loads((pdir / "adapter_config.json").read_text())
    jf = json.loads((fdir / "adapter_config.json").read_text())
    assert jp == jf or {k for k in jp if jp[k] != jf.get(k)} <= {"base_model_name_or_path", "peft_version"}
    from safetensors.torch import load_file

    sp, sf = load_file(str(pdir / "adapter_model.safetensors")), load_file(str(fdir / "adapter_model.safetensors"))
    assert set(sp) == set(sf) == {"prompt_embeddings"}
    assert sp["prompt_embeddings"].shape == sf["prompt_embeddings"].shape == (N_VIRT, 64)

    with torch.no_grad():
        ref_p = pm(input_ids=ids, attention_mask=mask).logits
        ref_f = fm(input_ids=ids, attention_mask=mask).logits
        # PEFT file -> fastpeft
        f_loaded = fastpeft.PeftModel.from_pretrained(copy.deepcopy(pristine), str(pdir))
        assert max_abs(f_loaded(input_ids=ids, attention_mask=mask).logits, ref_p) <= PROMPT_FP32_ATOL
        # fastpeft file -> PEFT
        p_loaded = peft.PeftModel.from_pretrained(copy.deepcopy(pristine), str(fdir))
        assert max_abs(p_loaded(input_ids=ids, attention_mask=mask).logits, ref_f) <= PROMPT_FP32_ATOL
        # fastpeft file -> fastpeft
        f2 = fastpeft.PeftModel.from_pretrained(copy.deepcopy(pristine), str(fdir))
        assert max_abs(f2(input_ids=ids, attention_mask=mask).logits, ref_f) <= PROMPT_FP32_ATOL
    assert not any(p.requires_grad for p in f2.parameters())


def test_ptuning_loaded_trainable_keeps_the_saved_prompt(tmp_path):
    """PEFT would push the saved encoder OUTPUT through a freshly initialised MLP when loading trainable; fastpeft
    keeps the saved prompt (the head cannot be recovered from its output) and trains it directly."""
    _, fm, pristine = _pair("llama", "ptuning_mlp")
    ids, mask, labels = batch()
    fm.eval()
    fm.save_pretrained(str(tmp_path))
    with torch.no_grad():
        ref = fm(input_ids=ids, attention_mask=mask).logits
    loaded = fastpeft.PeftModel.from_pretrained(copy.deepcopy(pristine), str(tmp_path), is_trainable=True)
    assert max_abs(loaded(input_ids=ids, attention_mask=mask).logits, ref) <= PROMPT_FP32_ATOL
    trainable = [n for n, p in loaded.named_parameters() if p.requires_grad]
    assert trainable == ["base_model.prompt_encoder.default.embedding.weight"]
    loaded(input_ids=ids, attention_mask=mask, labels=labels).loss.backward()
    assert loaded.base_model.prompt_encoder["default"].embedding.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("model_name", ["llama", "gpt2"])
@pytest.mark.parametrize("method", list(METHODS))
def test_generate_equals_manual_greedy_loop(model_name, method):
    torch.manual_seed(0)
    base = MODELS[model_name]()
    _, fcfg = _configs(method)
    fm = fastpeft.get_peft_model(base, fcfg).eval()
    ids, _, _ = batch(length=6)
    steps = 4
    out = fm.generate(input_ids=ids, max_new_tokens=steps, do_sample=False, output_scores=True,
                      return_dict_in_generate=True, pad_token_id=0, eos_token_id=None)
    seq = ids
    with torch.no_grad():
        for s in range(steps):
            logits = fm(input_ids=seq).logits[:, -1]
            if s == 0:
                first = logits
            seq = torch.cat([seq, logits.argmax(-1, keepdim=True)], dim=1)
        base_first = fm.get_base_model()(input_ids=ids).logits[:, -1]
    assert torch.equal(out.sequences, seq)
    assert max_abs(out.scores[0], first) <= GENERATE_SCORES_ATOL
    assert max_abs(out.scores[0], base_first) >= PROMPT_EFFECT_MIN  # the prompt is really in play
    # left-padded batch with an attention mask: same tokens as the per-row unpadded runs
    ids2, mask2, _ = batch(length=6, pad_first=2)
    # generate() numbers left-padded rows from their first real token (transformers' rule): same positions here
    pos2 = (mask2.cumsum(-1) - 1).masked_fill(mask2 == 0, 0)
    with torch.no_grad():
        ref2 = fm(input_ids=ids2, attention_mask=mask2, position_ids=pos2).logits[:, -1]
    g2 = fm.generate(input_ids=ids2, attention_mask=mask2, max_new_tokens=2, do_sample=False, pad_token_id=0,
                     eos_token_id=None, output_scores=True, return_dict_in_generate=True)
    assert g2.sequences.shape == (2, 8)
    assert max_abs(g2.scores[0], ref2) <= GENERATE_SCORES_ATOL
    # beam search needs the prompt cache expanded per beam
    gb = fm.generate(input_ids=ids, max_new_tokens=2, num_beams=2, do_sample=False, pad_token_id=0,
                     eos_token_id=None)
    assert gb.shape == (2, 8)
    with fm.disable_adapter():
        gd = fm.generate(input_ids=ids, max_new_tokens=1, do_sample=False, output_scores=True,
                         return_dict_in_generate=True, pad_token_id=0, eos_token_id=None)
    assert max_abs(gd.scores[0], base_first) <= GENERATE_SCORES_ATOL


def test_generate_against_peft_forward():
    """PEFT's own prompt-tuning generate() is right only at the first step with transformers 5.x (later steps drift
    from its forward by ~0.1-0.3 here), so the oracle is PEFT's *forward* re-run on the generated prefix."""
    pm, fm, _ = _pair("llama", "prompt")
    pm.eval()
    fm.eval()
    ids, _, _ = batch(length=6)
    kw = dict(max_new_tokens=4, do_sample=False, pad_token_id=0, eos_token_id=None, output_scores=True,
              return_dict_in_generate=True)
    a = pm.generate(input_ids=ids, **kw)
    b = fm.generate(input_ids=ids, **kw)
    assert max_abs(a.scores[0], b.scores[0]) <= GENERATE_SCORES_ATOL
    with torch.no_grad():
        for s, score in enumerate(b.scores):
            ref = pm(input_ids=b.sequences[:, : ids.shape[1] + s]).logits[:, -1]
            assert max_abs(score, ref) <= GENERATE_SCORES_ATOL, s


def test_inputs_embeds_and_cache_continuation():
    torch.manual_seed(0)
    fm = fastpeft.get_peft_model(tiny_llama(), _configs("ptuning_mlp")[1]).eval()
    ids, mask, _ = batch()
    with torch.no_grad():
        full = fm(input_ids=ids, attention_mask=mask)
        emb = fm.get_base_model().get_input_embeddings()(ids)
        via_embeds = fm(inputs_embeds=emb, attention_mask=mask)
        assert max_abs(full.logits, via_embeds.logits) <= PROMPT_FP32_ATOL
        # incremental decoding by hand: the cache of the first call already holds the prompt
        first = fm(input_ids=ids[:, :-1], attention_mask=mask[:, :-1], use_cache=True)
        step = fm(input_ids=ids[:, -1:], attention_mask=mask, cache=first.cache, use_cache=True)
        assert max_abs(step.logits[:, -1], full.logits[:, -1]) <= PROMPT_FP32_ATOL
        # position_ids are shifted past the virtual tokens
        pos = torch.arange(ids.shape[1]).expand(2, -1)
        with_pos = fm(input_ids=ids, position_ids=pos)
        assert max_abs(with_pos.logits, fm(input_ids=ids).logits) <= PROMPT_FP32_ATOL


@pytest.mark.parametrize("method", list(METHODS))
def test_training_reduces_loss(method):
    torch.manual_seed(0)
    fm = fastpeft.get_peft_model(tiny_llama(), _configs(method)[1])
    fm.train()
    ids, mask, _ = batch(b=4, length=8)
    labels = torch.full_like(ids, 7)  # a task a prompt can learn: always continue with token 7
    base_before = {n: p.detach().clone() for n, p in fm.get_base_model().named_parameters()}
    opt = torch.optim.Adam([p for p in fm.parameters() if p.requires_grad], lr=5e-2)
    losses = []
    for _ in range(12 if method == "ptuning_lstm" else 20):
        loss = fm(input_ids=ids, attention_mask=mask, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < TRAIN_LOSS_RATIO * losses[0], losses
    for n, p in fm.get_base_model().named_parameters():
        assert torch.equal(p, base_before[n]), n


def test_init_sample_vocab_and_text(tmp_path):
    torch.manual_seed(0)
    base = tiny_llama()
    emb = base.get_input_embeddings().weight.detach().clone()
    cfg = fastpeft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=6, prompt_tuning_init="SAMPLE_VOCAB")
    fm = fastpeft.get_peft_model(base, cfg)
    w = fm.base_model.prompt_encoder["default"].embedding.weight
    assert w.dtype == torch.float32
    for row in w:
        assert any(torch.equal(row, e) for e in emb), "SAMPLE_VOCAB rows must be word-embedding rows"

    class Tok:  # any callable returning {"input_ids": [...]} is accepted as a tokenizer object
        name_or_path = None

        def __call__(self, text):
            return {"input_ids": [3 + (ord(c) % 100) for c in text]}

    cfg = fastpeft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=5, prompt_tuning_init="TEXT",
                                      prompt_tuning_init_text="abc", tokenizer_name_or_path=Tok())
    fm2 = fastpeft.get_peft_model(copy.deepcopy(tiny_llama()), cfg)
    e2 = fm2.get_base_model().get_input_embeddings().weight
    ids = [3 + (ord(c) % 100) for c in "abcab"]  # cycled to 5 tokens (PEFT's rule)
    assert torch.equal(fm2.base_model.prompt_encoder["default"].embedding.weight, e2[ids].detach())
    assert cfg.to_dict()["tokenizer_name_or_path"] is None  # the object never reaches the json file

    # a local tokenizer directory (built here; nothing is downloaded)
    tokenizers = pytest.importorskip("tokenizers")
    from transformers import PreTrainedTokenizerFast

    vocab = {"[UNK]": 0, "hello": 10, "world": 11}
    tk = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="[UNK]"))
    tk.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="[UNK]").save_pretrained(str(tmp_path / "tok"))
    cfg = fastpeft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3, prompt_tuning_init="TEXT",
                                      prompt_tuning_init_text="hello world",
                                      tokenizer_name_or_path=str(tmp_path / "tok"))
    fm3 = fastpeft.get_peft_model(copy.deepcopy(tiny_llama()), cfg)
    e3 = fm3.get_base_model().get_input_embeddings().weight
    assert torch.equal(fm3.base_model.prompt_encoder["default"].embedding.weight, e3[[10, 11, 10]].detach())
    with pytest.raises(ValueError, match="tokenizer_name_or_path"):
        fastpeft.get_peft_model(tiny_llama(), fastpeft.PromptTuningConfig(
            task_type="CAUSAL_LM", num_virtual_tokens=3, prompt_tuning_init="TEXT", prompt_tuning_init_text="x",
            tokenizer_name_or_path="no/such/local/dir"))


def test_multiple_adapters():
    torch.manual_seed(0)
    base = tiny_llama()
    pristine = copy.deepcopy(base)
    fm = fastpeft.get_peft_model(base, _configs("prompt")[1])
    fm.add_adapter("other", fastpeft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3))
    ids, mask, _ = batch()
    enc = fm.base_model.prompt_encoder
    assert fm.active_adapter == "default"
    assert all(p.requires_grad for p in enc["default"].parameters())
    assert not any(p.requires_grad for p in enc["other"].parameters())
    with torch.no_grad():
        d = fm(input_ids=ids, attention_mask=mask).logits
        fm.set_adapter("other")
        o = fm(input_ids=ids, attention_mask=mask).logits
    assert d.shape[1] == ids.shape[1] + N_VIRT and o.shape[1] == ids.shape[1] + 3
    assert all(p.requires_grad for p in enc["other"].parameters())
    assert not any(p.requires_grad for p in enc["default"].parameters())
    # each adapter alone gives the same output
    single = fastpeft.get_peft_model(copy.deepcopy(pristine), fastpeft.PromptTuningConfig(
        task_type="CAUSAL_LM", num_virtual_tokens=3))
    single.base_model.prompt_encoder["default"].load_state_dict(enc["other"].state_dict())
    with torch.no_grad():
        assert max_abs(single(input_ids=ids, attention_mask=mask).logits, o) <= PROMPT_FP32_ATOL
    with pytest.raises(ValueError, match="one active adapter"):
        fm.set_adapter(["default", "other"])
    with pytest.raises(ValueError, match="P_TUNING"):
        fm.add_adapter("x", fastpeft.PromptEncoderConfig(task_type="CAUSAL_LM", num_virtual_tokens=3))
    fm.delete_adapter("other")
    assert list(fm.peft_config) == ["default"] and "other" not in enc
    with torch.no_grad():
        assert max_abs(fm(input_ids=ids, attention_mask=mask).logits, d) == 0.0


def test_several_named_adapters_save_and_load(tmp_path):
    torch.manual_seed(0)
    base = tiny_llama()
    pristine = copy.deepcopy(base)
    fm = fastpeft.get_peft_model(base, _configs("prompt")[1])
    fm.add_adapter("second", fastpeft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=2))
    fm.save_pretrained(str(tmp_path))
    assert (tmp_path / "second" / "adapter_model.safetensors").is_file()
    ids, mask, _ = batch()
    pm = peft.PeftModel.from_pretrained(copy.deepcopy(pristine), str(tmp_path))
    pm.load_adapter(str(tmp_path / "second"), adapter_name="second")
    pm.set_adapter("second")
    fm.set_adapter("second")
    with torch.no_grad():
        assert max_abs(pm(input_ids=ids, attention_mask=mask).logits,
                       fm(input_ids=ids, attention_mask=mask).logits) <= PROMPT_FP32_ATOL
    f2 = fastpeft.PeftModel.from_pretrained(copy.deepcopy(pristine), str(tmp_path))
    f2.load_adapter(str(tmp_path / "second"), adapter_name="second")
    f2.set_adapter("second")
    with torch.no_grad():
        assert max_abs(f2(input_ids=ids, attention_mask=mask).logits,
                       fm(input_ids=ids, attention_mask=mask).logits) <= PROMPT_FP32_ATOL


@pytest.mark.parametrize("n", [0, -3, None])
def test_bad_num_virtual_tokens(n):
    for cname in ("PromptTuningConfig", "PromptEncoderConfig", "PrefixTuningConfig"):
        with pytest.raises(ValueError, match="num_virtual_tokens"):
            getattr(fastpeft, cname)(task_type="CAUSAL_LM", num_virtual_tokens=n)
    with pytest.raises(TypeError, match="num_virtual_tokens"):
        fastpeft.PromptTuningConfig(num_virtual_tokens=2.5)


def test_bad_shapes_and_options():
    torch.manual_seed(0)
    fm = fastpeft.get_peft_model(tiny_llama(), _configs("prompt")[1])
    ids, mask, labels = batch()
    with pytest.raises(ValueError, match="attention_mask"):
        fm(input_ids=ids, attention_mask=mask[:, :-1])
    with pytest.raises(ValueError, match="attention_mask"):
        fm(input_ids=ids, attention_mask=mask[:1])
    with pytest.raises(ValueError, match="attention_mask"):
        fm(input_ids=ids, attention_mask=mask[:, None, None, :])
    with pytest.raises(ValueError, match="labels"):
        fm(input_ids=ids, labels=labels[:, :-2])
    with pytest.raises(ValueError, match="labels"):
        fm(input_ids=ids, labels=labels[:1])
    with pytest.raises(ValueError, match="input_ids or inputs_embeds"):
        fm(attention_mask=mask)
    with pytest.raises(ValueError, match="attention_mask"):
        fm.generate(input_ids=ids, attention_mask=mask[:, 1:], max_new_tokens=1)
    with pytest.raises(ValueError, match="encoder_reparameterization_type"):
        fastpeft.PromptEncoderConfig(num_virtual_tokens=2, encoder_reparameterization_type="GRU")
    with pytest.raises(ValueError, match="encoder_dropout"):
        fastpeft.PromptEncoderConfig(num_virtual_tokens=2, encoder_dropout=1.5)
    with pytest.raises(ValueError, match="prompt_tuning_init"):
        fastpeft.PromptTuningConfig(num_virtual_tokens=2, prompt_tuning_init="ZEROS")
    with pytest.raises(ValueError, match="prompt_tuning_init_text"):
        fastpeft.PromptTuningConfig(num_virtual_tokens=2, prompt_tuning_init="TEXT", tokenizer_name_or_path="x")
    # a file whose prompt does not fit leaves the model unchanged
    with pytest.raises(ValueError, match="prompt_embeddings"):
        fm.base_model.set_adapter_state_dict("default", {"prompt_embeddings": torch.zeros(N_VIRT + 1, 64)})


def test_encoder_decoder_models_are_refused():
    from transformers import T5Config, T5ForConditionalGeneration

    model = T5ForConditionalGeneration(T5Config(vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=64, num_layers=1,
                                                num_heads=4, decoder_start_token_id=0))
    with pytest.raises(ValueError, match="encoder-decoder"):
        fastpeft.get_peft_model(model, fastpeft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=2))


def _tiny_llama_seqcls():
    from transformers import LlamaConfig, LlamaForSequenceClassification

    return LlamaForSequenceClassification(LlamaConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, num_labels=3, pad_token_id=0)).eval()


def test_seq_cls_with_score_head_matches_peft_and_files(tmp_path):
    m1, m2 = twin(_tiny_llama_seqcls)
    pristine = copy.deepcopy(m1)
    kw = dict(task_type="SEQ_CLS", num_virtual_tokens=3)
    pm = peft.get_peft_model(m1, peft.PromptTuningConfig(**kw))
    fm = fastpeft.get_peft_model(m2, fastpeft.PromptTuningConfig(**kw))
    fm.base_model.prompt_encoder["default"].load_state_dict(pm.prompt_encoder["default"].state_dict())
    with torch.no_grad():  # a trained head, so that saving/loading it matters
        for m in (pm, fm):
            m.get_base_model().score.modules_to_save["default"].weight.copy_(
                torch.arange(3 * 64, dtype=torch.float32).view(3, 64).sin())
    ids, mask, _ = batch()
    lab = torch.tensor([0, 2])
    o1 = pm(input_ids=ids, attention_mask=mask, labels=lab)
    o2 = fm(input_ids=ids, attention_mask=mask, labels=lab)
    assert max_abs(o1.logits, o2.logits) <= PROMPT_FP32_ATOL and max_abs(o1.loss, o2.loss) <= PROMPT_FP32_ATOL
    assert fm.get_nb_trainable_parameters() == pm.get_nb_trainable_parameters()
    pm.save_pretrained(str(tmp_path / "p"))
    fm.save_pretrained(str(tmp_path / "f"))
    from safetensors.torch import load_file

    assert set(load_file(str(tmp_path / "p" / "adapter_model.safetensors"))) == \
        set(load_file(str(tmp_path / "f" / "adapter_model.safetensors"))) == \
        {"prompt_embeddings", "base_model.score.weight"}  # PEFT's prompt-learning layout (no `.model`)
    with torch.no_grad():
        a = fastpeft.PeftModel.from_pretrained(copy.deepcopy(pristine), str(tmp_path / "p"))
        assert max_abs(a(input_ids=ids, attention_mask=mask).logits, o1.logits) <= PROMPT_FP32_ATOL
        b = peft.PeftModel.from_pretrained(copy.deepcopy(pristine), str(tmp_path / "f"))
        assert max_abs(b(input_ids=ids, attention_mask=mask).logits, o2.logits) <= PROMPT_FP32_ATOL


@pytest.mark.parametrize("cname", ["PromptTuningConfig", "PromptEncoderConfig", "PrefixTuningConfig"])
def test_bert_encoder_with_token_type_ids_matches_peft(cname):
    from testing_utils import tiny_bert

    m1, m2 = twin(tiny_bert)
    kw = dict(task_type="FEATURE_EXTRACTION", num_virtual_tokens=3)
    pm = peft.get_peft_model(m1, getattr(peft, cname)(**kw))
    fm = fastpeft.get_peft_model(m2, getattr(fastpeft, cname)(**kw))
    fm.base_model.prompt_encoder["default"].load_state_dict(pm.prompt_encoder["default"].state_dict())
    ids, mask, _ = batch()
    with torch.no_grad():
        o1 = pm(input_ids=ids, attention_mask=mask).last_hidden_state
        o2 = fm(input_ids=ids, attention_mask=mask).last_hidden_state
        assert max_abs(o1, o2) <= PROMPT_FP32_ATOL
        # PEFT drops token_type_ids for FEATURE_EXTRACTION (and extends them with zeros for SEQ_CLS); fastpeft always
        # extends them with zeros over the virtual tokens (prefix tuning: passes them through unchanged)
        tt = torch.zeros_like(ids)
        tt[:, -2:] = 1
        got = fm(input_ids=ids, attention_mask=mask, token_type_ids=tt).last_hidden_state
        base = fm.get_base_model()
        ext_mask = torch.cat([torch.ones(2, 3, dtype=mask.dtype), mask], dim=1)
        if cname == "PrefixTuningConfig":
            from fastpeft.tuners._prompt_learning import build_prefix_cache

            c = fm.peft_config["default"]
            cache = build_prefix_cache(fm.base_model.prompt_encoder["default"].output(), c.num_layers,
                                       c.num_attention_heads, 2)
            want = base(input_ids=ids, attention_mask=ext_mask, token_type_ids=tt, cache=cache).last_hidden_state
        else:
            emb = base.get_input_embeddings()(ids)
            prompt = fm.base_model.prompt_encoder["default"].output().expand(2, -1, -1)
            want = base(inputs_embeds=torch.cat([prompt, emb], 1), attention_mask=ext_mask,
                        token_type_ids=torch.cat([torch.zeros(2, 3, dtype=tt.dtype), tt], 1)).last_hidden_state
        assert max_abs(got, want) <= PROMPT_FP32_ATOL
        assert max_abs(got, o2) >= PROMPT_EFFECT_MIN


@pytest.mark.parametrize("model_name", ["llama", "gpt2"])
def test_gradient_checkpointing_works_and_changes_nothing(model_name):
    """Unlike prefix tuning, prompt tuning trains under gradient checkpointing, with the same loss and gradient."""
    m1, m2 = twin(MODELS[model_name])
    m2.gradient_checkpointing_enable()
    f1 = fastpeft.get_peft_model(m1, _configs("prompt")[1])
    f2 = fastpeft.get_peft_model(m2, _configs("prompt")[1])
    f2.base_model.prompt_encoder.load_state_dict(f1.base_model.prompt_encoder.state_dict())
    f1.train()
    f2.train()
    ids, mask, labels = batch()
    l1 = f1(input_ids=ids, attention_mask=mask, labels=labels).loss
    l2 = f2(input_ids=ids, attention_mask=mask, labels=labels).loss
    l1.backward()
    l2.backward()
    g1 = f1.base_model.prompt_encoder["default"].embedding.weight.grad
    g2 = f2.base_model.prompt_encoder["default"].embedding.weight.grad
    assert max_abs(l1, l2) <= PROMPT_FP32_ATOL and max_abs(g1, g2) <= PROMPT_FP32_ATOL and g2.abs().sum() > 0


@pytest.mark.parametrize("cname", ["PromptTuningConfig", "PromptEncoderConfig", "PrefixTuningConfig"])
def test_bf16_model_fp32_encoder(cname):
    """The encoder stays fp32 (as in PEFT); its output is cast to the model's dtype; gradients reach it in fp32."""
    torch.manual_seed(0)
    fm = fastpeft.get_peft_model(tiny_llama().to(torch.bfloat16),
                                 getattr(fastpeft, cname)(task_type="CAUSAL_LM", num_virtual_tokens=3))
    enc = fm.base_model.prompt_encoder["default"]
    assert {p.dtype for p in enc.parameters()} == {torch.float32}
    ids, mask, labels = batch()
    out = fm(input_ids=ids, attention_mask=mask, labels=labels)
    assert out.logits.dtype == torch.bfloat16
    out.loss.backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in enc.parameters())
    g = fm.generate(input_ids=ids, attention_mask=mask, max_new_tokens=2, do_sample=False, pad_token_id=0,
                    eos_token_id=None)
    assert g.shape == (2, ids.shape[1] + 2)


def test_text_init_adapter_reloads_trainable_without_its_tokenizer(tmp_path):
    """A TEXT-initialised adapter whose tokenizer was a Hub name (or an object) reloads trainable offline: the saved
    prompt replaces the init, so fastpeft does not need (nor download) the tokenizer, unlike PEFT."""
    torch.manual_seed(0)
    base = tiny_llama()
    pristine = copy.deepcopy(base)

    class Tok:
        name_or_path = "some-org/some-hub-tokenizer"

        def __call__(self, text):
            return {"input_ids": [5, 6, 7]}

    cfg = fastpeft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3, prompt_tuning_init="TEXT",
                                      prompt_tuning_init_text="x", tokenizer_name_or_path=Tok())
    fm = fastpeft.get_peft_model(base, cfg)
    fm.save_pretrained(str(tmp_path))
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert saved["tokenizer_name_or_path"] == "some-org/some-hub-tokenizer"
    ids, mask, _ = batch()
    loaded = fastpeft.PeftModel.from_pretrained(pristine, str(tmp_path), is_trainable=True)
    with torch.no_grad():
        assert max_abs(loaded(input_ids=ids, attention_mask=mask).logits,
                       fm(input_ids=ids, attention_mask=mask).logits) <= PROMPT_FP32_ATOL
    assert loaded.base_model.prompt_encoder["default"].embedding.weight.requires_grad
    # a NEW config naming a tokenizer that is not a local directory is refused (nothing is downloaded)
    with pytest.raises(ValueError, match="not a local directory"):
        fastpeft.get_peft_model(tiny_llama(), fastpeft.PromptTuningConfig(
            task_type="CAUSAL_LM", num_virtual_tokens=3, prompt_tuning_init="TEXT", prompt_tuning_init_text="x",
            tokenizer_name_or_path="some-org/some-hub-tokenizer"))
