"""HF PEFT's remaining public loading API under fastpeft's names, against HF PEFT 0.21.2: the ``AutoPeftModel``
classes (base model named by the adapter, task check, ``auto_mapping`` allowlist, tokenizer-driven embedding growth,
Hub ids from the cache, keyword routing), ``inject_adapter_in_model``, ``get_peft_config``, ``load_peft_weights``,
the registries, and the public names a user's ``from peft import ...`` line may carry."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

import fastpeft  # noqa: E402
from testing_utils import STACK_IDS as IDS, STACK_VOCAB, eval_logits as logits  # noqa: E402
from testing_utils import stack_tiny_llama as tiny_llama, stack_tiny_tokenizer as tiny_tokenizer  # noqa: E402

KW = dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])


def _randomize_b(model):
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=g))


@pytest.fixture
def saved(tmp_path):
    """A base model saved to disk and, beside it, a LoRA adapter (CAUSAL_LM) and the same adapter without a task
    type, both naming that base; the PEFT model that wrote them (for reference logits)."""
    base_dir = tmp_path / "base"
    tiny_llama().save_pretrained(str(base_dir))
    out = {"base": base_dir}
    for name, task in (("causal", "CAUSAL_LM"), ("notask", None)):
        base = transformers.AutoModelForCausalLM.from_pretrained(str(base_dir))
        p = peft.get_peft_model(base, peft.LoraConfig(**KW, task_type=task))
        _randomize_b(p)
        p.save_pretrained(str(tmp_path / name))
        out[name] = tmp_path / name
        out[name + "_ref"] = p
    return out


def test_auto_causal_lm_loads_base_and_adapter_like_peft(saved):
    ref = logits(saved["causal_ref"], IDS)
    f = fastpeft.AutoPeftModelForCausalLM.from_pretrained(str(saved["causal"]))
    p = peft.AutoPeftModelForCausalLM.from_pretrained(str(saved["causal"]))
    assert type(f) is fastpeft.PeftModelForCausalLM and not f.training
    assert torch.equal(logits(f, IDS), ref) and torch.equal(logits(p, IDS), ref)
    assert not any(q.requires_grad for q in f.parameters())
    # is_trainable, adapter_name; base keyword arguments reach the base model's from_pretrained
    t = fastpeft.AutoPeftModelForCausalLM.from_pretrained(str(saved["causal"]), adapter_name="mine",
                                                          is_trainable=True, dtype=torch.bfloat16)
    assert t.active_adapter == "mine" and t.training
    assert {n for n, q in t.named_parameters() if q.requires_grad} == \
        {n for n, _ in t.named_parameters() if ".lora_" in n}
    assert t.get_base_model().model.embed_tokens.weight.dtype == torch.bfloat16


def test_auto_task_mismatch_is_refused_like_peft(saved):
    for lib in (fastpeft, peft):
        with pytest.raises(ValueError, match="Expected target PEFT class: PeftModelForCausalLM, but you have asked "
                                             "for: PeftModelForSequenceClassification"):
            lib.AutoPeftModelForSequenceClassification.from_pretrained(str(saved["causal"]))
        with pytest.raises(ValueError, match="Cannot use `AutoPeftModel` with a task type"):
            lib.AutoPeftModel.from_pretrained(str(saved["causal"]))
    with pytest.raises(EnvironmentError, match="from_pretrained"):
        fastpeft.AutoPeftModelForCausalLM()


def test_auto_peft_model_uses_the_auto_mapping_within_the_allowlist(saved, tmp_path):
    ref = logits(saved["notask_ref"], IDS)
    cfg = json.loads((saved["notask"] / "adapter_config.json").read_text())
    assert cfg["auto_mapping"]["base_model_class"] == "LlamaForCausalLM"
    f = fastpeft.AutoPeftModel.from_pretrained(str(saved["notask"]))
    p = peft.AutoPeftModel.from_pretrained(str(saved["notask"]))
    assert type(f) is fastpeft.PeftModel and type(f.get_base_model()).__name__ == "LlamaForCausalLM"
    assert torch.equal(logits(f, IDS), ref) and torch.equal(logits(p, IDS), ref)
    # a task class on an adapter without a task type: the auto_mapping's class, the task's PeftModel class
    g = fastpeft.AutoPeftModelForCausalLM.from_pretrained(str(saved["notask"]))
    assert type(g) is fastpeft.PeftModelForCausalLM and torch.equal(logits(g, IDS), ref)
    # a library outside the allowlist is not imported
    bad = tmp_path / "bad"
    shutil.copytree(saved["notask"], bad)
    cfg["auto_mapping"] = {"base_model_class": "Thing", "parent_library": "fastpeft_not_a_module"}
    (bad / "adapter_config.json").write_text(json.dumps(cfg))
    for lib in (fastpeft, peft):
        with pytest.raises(ValueError, match="import_allowlist=\\['fastpeft_not_a_module'\\]"):
            lib.AutoPeftModel.from_pretrained(str(bad))
    with pytest.raises(ModuleNotFoundError):   # allowed, so it is imported
        fastpeft.AutoPeftModel.from_pretrained(str(bad), import_allowlist=["fastpeft_not_a_module"])
    # no task type and no auto_mapping, or no base model named
    cfg.pop("auto_mapping")
    (bad / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="Cannot infer the auto class"):
        fastpeft.AutoPeftModel.from_pretrained(str(bad))
    cfg["base_model_name_or_path"] = None
    (bad / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="does not name its base model"):
        fastpeft.AutoPeftModel.from_pretrained(str(bad))


def test_auto_grows_embeddings_to_the_adapters_tokenizer(saved):
    tok = tiny_tokenizer()
    tok.add_tokens(["<new0>", "<new1>", "<new2>"])
    assert len(tok) == STACK_VOCAB + 3
    tok.save_pretrained(str(saved["causal"]))
    f = fastpeft.AutoPeftModelForCausalLM.from_pretrained(str(saved["causal"]))
    p = peft.AutoPeftModelForCausalLM.from_pretrained(str(saved["causal"]))
    for m in (f, p):
        assert m.get_base_model().get_input_embeddings().weight.shape[0] == STACK_VOCAB + 3
    assert torch.equal(logits(f, IDS)[..., :STACK_VOCAB], logits(saved["causal_ref"], IDS))


def test_auto_from_hub_id_in_the_cache(saved, tmp_path):
    """An adapter given as a Hub id is read from huggingface_hub's cache (offline in the test session), its base
    model from the local path its config names."""
    repo = tmp_path / "cache" / "models--user--adapter"
    snap = repo / "snapshots" / ("a" * 40)
    snap.mkdir(parents=True)
    for fn in ("adapter_config.json", "adapter_model.safetensors"):
        shutil.copy(saved["causal"] / fn, snap / fn)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("a" * 40)
    f = fastpeft.AutoPeftModelForCausalLM.from_pretrained("user/adapter", cache_dir=str(tmp_path / "cache"))
    assert torch.equal(logits(f, IDS), logits(saved["causal_ref"], IDS))
    with pytest.raises(ValueError, match="'user/missing'"):
        fastpeft.AutoPeftModelForCausalLM.from_pretrained("user/missing", cache_dir=str(tmp_path / "cache"))


def test_inject_adapter_in_model_like_peft():
    cfg = dict(KW, init_lora_weights=False)
    pm = peft.inject_adapter_in_model(peft.LoraConfig(**cfg), tiny_llama())
    base = tiny_llama()
    fm = fastpeft.inject_adapter_in_model(fastpeft.LoraConfig(**cfg), base)
    assert fm is base and isinstance(fm.model.layers[0].self_attn.q_proj, fastpeft.tuners.lora.Linear)
    sd = {k: v for k, v in pm.state_dict().items() if "lora_" in k}
    assert sorted(sd) == sorted(k for k in fm.state_dict() if "lora_" in k)
    fm.load_state_dict(sd, strict=False)
    assert torch.equal(fm(input_ids=IDS).logits, pm(input_ids=IDS).logits)
    with pytest.raises(ValueError, match="already carries fastpeft adapter layers"):
        fastpeft.inject_adapter_in_model(fastpeft.LoraConfig(**cfg), fm, adapter_name="other")
    plain = tiny_llama()
    before = {k: v.clone() for k, v in plain.state_dict().items()}
    for bad, why in ((fastpeft.PromptTuningConfig(num_virtual_tokens=2), "use get_peft_model"),
                     (peft.LoraConfig(**cfg), "must be a fastpeft PeftConfig")):
        with pytest.raises((ValueError, TypeError), match=why):
            fastpeft.inject_adapter_in_model(bad, plain)
    with pytest.raises(ValueError, match="target_modules instead"):
        fastpeft.inject_adapter_in_model(fastpeft.LoraConfig(**cfg), plain, state_dict=sd)
    assert plain.state_dict().keys() == before.keys()
    # IA3 too
    ia = fastpeft.inject_adapter_in_model(fastpeft.IA3Config(target_modules=["k_proj"], feedforward_modules=[]),
                                          tiny_llama())
    assert isinstance(ia.model.layers[0].self_attn.k_proj, fastpeft.tuners.ia3.Linear)


def test_status_functions_on_peft_models_and_injected_models():
    """``get_layer_status`` / ``get_model_status`` as functions: on a PeftModel and on a model whose adapter layers
    ``inject_adapter_in_model`` put in (no wrapper), the same dataclasses as PEFT's."""
    import dataclasses
    cfg = dict(KW, init_lora_weights=False)
    for wrap in (True, False):
        if wrap:
            p = peft.get_peft_model(tiny_llama(), peft.LoraConfig(**cfg))
            f = fastpeft.get_peft_model(tiny_llama(), fastpeft.LoraConfig(**cfg))
        else:
            p = peft.inject_adapter_in_model(peft.LoraConfig(**cfg), tiny_llama())
            f = fastpeft.inject_adapter_in_model(fastpeft.LoraConfig(**cfg), tiny_llama())
        got = [dataclasses.asdict(x) for x in fastpeft.get_layer_status(f)]
        assert got == [dataclasses.asdict(x) for x in peft.get_layer_status(p)]
        assert dataclasses.asdict(fastpeft.get_model_status(f)) == dataclasses.asdict(peft.get_model_status(p))
    with pytest.raises(ValueError, match="No adapter layers"):
        fastpeft.get_layer_status(tiny_llama())
    pt = fastpeft.get_peft_model(tiny_llama(), fastpeft.PromptTuningConfig(num_virtual_tokens=2, task_type="CAUSAL_LM"))
    with pytest.raises(TypeError, match="prefix tuning and adaption prompt"):
        fastpeft.get_model_status(pt)


def test_get_peft_config_load_peft_weights_and_registries(saved, tmp_path):
    d = json.loads((saved["causal"] / "adapter_config.json").read_text())
    for lib in (fastpeft, peft):
        c = lib.get_peft_config(d)
        assert type(c).__name__ == "LoraConfig" and c.r == 4 and str(c.task_type) in ("CAUSAL_LM",
                                                                                      "TaskType.CAUSAL_LM")
    with pytest.raises(ValueError, match="peft_type"):
        fastpeft.get_peft_config({"r": 4})
    import warnings
    with warnings.catch_warnings():   # Hub download arguments are not config fields for a local directory
        warnings.simplefilter("error")
        c = fastpeft.PeftConfig.from_pretrained(str(saved["causal"]), user_agent="x", etag_timeout=3, revision="v")
    assert c.r == 4
    mine, theirs = fastpeft.load_peft_weights(str(saved["causal"])), peft.load_peft_weights(str(saved["causal"]),
                                                                                           device="cpu")
    assert sorted(mine) == sorted(theirs) and all(torch.equal(mine[k], theirs[k]) for k in mine)
    with pytest.raises(ValueError, match="'user/nothing'"):
        fastpeft.load_peft_weights("user/nothing", cache_dir=str(tmp_path))
    with pytest.raises(TypeError, match="bogus"):
        fastpeft.load_peft_weights(str(saved["causal"]), bogus=1)
    assert fastpeft.PEFT_TYPE_TO_CONFIG_MAPPING["LORA"] is fastpeft.LoraConfig
    assert fastpeft.PEFT_TYPE_TO_CONFIG_MAPPING[fastpeft.PeftType.IA3] is fastpeft.IA3Config
    assert fastpeft.PEFT_TYPE_TO_TUNER_MAPPING["LORA"] is fastpeft.LoraModel
    assert fastpeft.MODEL_TYPE_TO_PEFT_MODEL_MAPPING["CAUSAL_LM"] is fastpeft.PeftModelForCausalLM


# What a script written for HF PEFT imports, for the methods fastpeft implements: every name resolves, and names that
# are classes in PEFT are classes here.
PEFT_NAMES = [
    "PeftModel", "PeftConfig", "PeftType", "TaskType", "get_peft_model", "LoraConfig", "AdaLoraConfig", "IA3Config",
    "PromptTuningConfig", "PromptTuningInit", "PromptEncoderConfig", "PrefixTuningConfig", "AdaptionPromptConfig",
    "PromptLearningConfig", "PromptEncoderReparameterizationType", "PeftModelForCausalLM", "PeftModelForSeq2SeqLM",
    "PeftModelForSequenceClassification", "PeftModelForTokenClassification", "PeftModelForQuestionAnswering",
    "PeftModelForFeatureExtraction", "AutoPeftModel", "AutoPeftModelForCausalLM", "AutoPeftModelForSeq2SeqLM",
    "AutoPeftModelForSequenceClassification", "AutoPeftModelForTokenClassification",
    "AutoPeftModelForQuestionAnswering", "AutoPeftModelForFeatureExtraction", "inject_adapter_in_model",
    "get_peft_config", "get_peft_model_state_dict", "set_peft_model_state_dict", "load_peft_weights",
    "prepare_model_for_kbit_training", "LoraModel", "AdaLoraModel", "IA3Model", "PromptEmbedding", "PromptEncoder",
    "PrefixEncoder", "MODEL_TYPE_TO_PEFT_MODEL_MAPPING", "PEFT_TYPE_TO_CONFIG_MAPPING", "PEFT_TYPE_TO_TUNER_MAPPING",
    "get_layer_status", "get_model_status",
]


@pytest.mark.parametrize("name", PEFT_NAMES)
def test_peft_public_name(name):
    assert hasattr(peft, name)
    mine = getattr(fastpeft, name)
    assert isinstance(mine, type) == isinstance(getattr(peft, name), type)
    assert name in fastpeft.__all__
