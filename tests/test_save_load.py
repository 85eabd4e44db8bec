"""Adapter files: fastpeft <-> HF PEFT in both directions (same keys, shapes, config keys, same outputs after
loading), non-default adapters in sub-folders, safetensors only by default, and failed loads that leave the model
exactly as it was."""

from __future__ import annotations

import json
import warnings

import pytest
import torch

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

import fastpeft  # noqa: E402
from testing_utils import PEFT_PARITY_RTOL, assert_close_rel  # noqa: E402
from safetensors.torch import load_file  # noqa: E402
from testing_utils import build_pair, inputs, tiny_gpt2, tiny_llama  # noqa: E402


def seq_cls():
    return tiny_llama("LlamaForSequenceClassification", num_labels=3)


CASES = {
    "lora-llama": (tiny_llama, "LoraConfig", dict(r=4, lora_alpha=8, target_modules="all-linear", lora_dropout=0.1)),
    "lora-gpt2-bias": (tiny_gpt2, "LoraConfig", dict(r=3, lora_alpha=5, bias="lora_only", use_rslora=True)),
    "lora-seqcls": (seq_cls, "LoraConfig", dict(r=4, task_type="SEQ_CLS")),
    "adalora-llama": (tiny_llama, "AdaLoraConfig", dict(init_r=4, target_r=2, total_step=10, task_type="CAUSAL_LM")),
    "ia3-llama": (tiny_llama, "IA3Config", dict()),
    "ia3-gpt2": (tiny_gpt2, "IA3Config", dict(task_type="CAUSAL_LM")),
}


def logits(model, ids):
    model.eval()
    with torch.no_grad():
        return model(input_ids=ids).logits


def full_state(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_state_equal(before, model):
    after = model.state_dict()
    assert sorted(after) == sorted(before), f"state dict keys changed: {sorted(set(after) ^ set(before))[:5]}"
    for k, v in before.items():
        assert torch.equal(after[k], v), f"{k} changed"


@pytest.mark.parametrize("case", sorted(CASES))
def test_files_both_directions(case, tmp_path):
    make, cls, kw = CASES[case]
    p, f = build_pair(make, getattr(peft, cls)(**kw), getattr(fastpeft, cls)(**kw))
    ids = inputs()
    ref = logits(f, ids)
    assert_close_rel(ref, logits(p, ids), PEFT_PARITY_RTOL, "before saving")
    dp, df = tmp_path / "peft", tmp_path / "fast"
    p.save_pretrained(dp)
    f.save_pretrained(df)
    # same tensors under the same keys
    tp, tf = load_file(dp / "adapter_model.safetensors"), load_file(df / "adapter_model.safetensors")
    assert sorted(tf) == sorted(tp)
    for k in tp:
        assert torch.equal(tf[k], tp[k]), k
    from safetensors import safe_open

    with safe_open(df / "adapter_model.safetensors", "pt") as fh:
        assert fh.metadata() == {"format": "pt"}
    # same config keys and values (the version string is PEFT's format version)
    jp = json.loads((dp / "adapter_config.json").read_text())
    jf = json.loads((df / "adapter_config.json").read_text())
    assert sorted(jf) == sorted(jp)
    assert jf["inference_mode"] is True
    for k in jp:
        a, b = jf[k], jp[k]
        if isinstance(a, list) and isinstance(b, list):
            a, b = sorted(a), sorted(b)
        assert a == b, f"config key {k}: fastpeft {jf[k]!r}, PEFT {jp[k]!r}"
    assert (df / "adapter_config.json").read_text() == json.dumps(jf, indent=2, sort_keys=True)
    # cross loading, no warnings about unknown keys either way
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        cfg_from_peft = fastpeft.PeftConfig.from_pretrained(str(dp))
        cfg_from_fast = peft.PeftConfig.from_pretrained(str(df))
    assert type(cfg_from_peft).__name__ == cls and type(cfg_from_fast).__name__ == cls
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        f2 = fastpeft.PeftModel.from_pretrained(make(), str(dp))
        p2 = peft.PeftModel.from_pretrained(make(), str(df))
    # frozen adapter (PEFT leaves base biases selected by bias="lora_only"/"all" trainable; so do we)
    trainable = sorted(n for n, q in f2.named_parameters() if q.requires_grad)
    assert trainable == sorted(n for n, q in p2.named_parameters() if q.requires_grad)
    assert not any("lora_" in n or "ia3_" in n for n in trainable)
    assert not f2.training
    assert_close_rel(logits(f2, ids), ref, PEFT_PARITY_RTOL, "PEFT file -> fastpeft")
    assert_close_rel(logits(p2, ids), ref, PEFT_PARITY_RTOL, "fastpeft file -> PEFT")
    assert type(f2).__name__ == type(p2).__name__


def test_non_default_adapters_in_subfolders(tmp_path):
    kw_a, kw_b = dict(r=2, target_modules=["q_proj"]), dict(r=3, target_modules=["v_proj", "down_proj"])
    p, f = build_pair(tiny_llama, peft.LoraConfig(**kw_a), fastpeft.LoraConfig(**kw_a), randomize=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.manual_seed(4)
        p.add_adapter("other", peft.LoraConfig(**kw_b))
        torch.manual_seed(4)
        f.add_adapter("other", fastpeft.LoraConfig(**kw_b))
    with torch.no_grad():
        for (n, q), (n2, q2) in zip(p.named_parameters(), f.named_parameters()):
            if "lora_B" in n:
                q.normal_()
                q2.copy_(q)
    p.save_pretrained(tmp_path / "p")
    f.save_pretrained(tmp_path / "f")
    for d in ("p", "f"):
        assert (tmp_path / d / "adapter_model.safetensors").exists()
        assert (tmp_path / d / "other" / "adapter_model.safetensors").exists()
        assert (tmp_path / d / "other" / "adapter_config.json").exists()
    assert sorted(load_file(tmp_path / "f" / "other" / "adapter_model.safetensors")) == \
        sorted(load_file(tmp_path / "p" / "other" / "adapter_model.safetensors"))
    # load both into fastpeft and switch
    ids = inputs()
    f.set_adapter("other")
    ref_other = logits(f, ids)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        g = fastpeft.PeftModel.from_pretrained(tiny_llama(), str(tmp_path / "p"))
        g.load_adapter(str(tmp_path / "p" / "other"), adapter_name="other")
    g.set_adapter("other")
    assert_close_rel(logits(g, ids), ref_other, PEFT_PARITY_RTOL, "loaded 'other'")
    # selected_adapters
    f.save_pretrained(tmp_path / "sel", selected_adapters=["other"])
    assert not (tmp_path / "sel" / "adapter_model.safetensors").exists()
    assert (tmp_path / "sel" / "other" / "adapter_model.safetensors").exists()


def _save_peft_lora(tmp_path, make=tiny_llama, **kw):
    kw = {"r": 4, **kw}
    base = make()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        p = peft.get_peft_model(base, peft.LoraConfig(**kw))
    d = tmp_path / "adapter"
    p.save_pretrained(d)
    return d


def test_bad_shapes_leave_model_unchanged(tmp_path):
    d = _save_peft_lora(tmp_path)
    cfg = json.loads((d / "adapter_config.json").read_text())
    cfg["r"] = 5  # the file's tensors have r = 4
    (d / "adapter_config.json").write_text(json.dumps(cfg))
    model = tiny_llama()
    before = full_state(model)
    grads = {n: q.requires_grad for n, q in model.named_parameters()}
    with pytest.raises(ValueError, match="shape"):
        fastpeft.PeftModel.from_pretrained(model, str(d))
    assert_state_equal(before, model)
    assert {n: q.requires_grad for n, q in model.named_parameters()} == grads
    assert not any("lora" in n for n, _ in model.named_modules())


def test_config_not_fitting_model_leaves_model_unchanged(tmp_path):
    d = _save_peft_lora(tmp_path, target_modules=["q_proj", "v_proj"])
    model = tiny_gpt2()  # has no q_proj / v_proj
    before = full_state(model)
    with pytest.raises(ValueError, match="matched no module"):
        fastpeft.PeftModel.from_pretrained(model, str(d))
    assert_state_equal(before, model)


def test_load_adapter_failure_leaves_peft_model_unchanged(tmp_path):
    d = _save_peft_lora(tmp_path, target_modules=["q_proj", "o_proj"])
    # the second file's keys do not fit: drop one tensor
    sd = load_file(d / "adapter_model.safetensors")
    from safetensors.torch import save_file

    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "adapter_config.json").write_text((d / "adapter_config.json").read_text())
    save_file({k: v for i, (k, v) in enumerate(sorted(sd.items())) if i != 0}, bad / "adapter_model.safetensors")
    f = fastpeft.get_peft_model(tiny_llama(), fastpeft.LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    before = full_state(f)
    grads = {n: q.requires_grad for n, q in f.named_parameters()}
    with pytest.raises(ValueError, match="missing keys"):
        f.load_adapter(str(bad), adapter_name="x")
    assert_state_equal(before, f)
    assert {n: q.requires_grad for n, q in f.named_parameters()} == grads
    assert list(f.peft_config) == ["default"]
    assert sorted(f.base_model.targeted_module_names) == sorted(
        f"model.layers.{i}.self_attn.{m}" for i in range(2) for m in ("q_proj", "v_proj"))
    # and the good one loads
    f.load_adapter(str(d), adapter_name="x")
    assert "x" in f.peft_config
    # an existing name gets the file's weights loaded into it (PEFT's behaviour; Trainer's resume relies on it)
    with torch.no_grad():
        for n, q in f.named_parameters():
            if ".x." in n:
                q.add_(1.0)
    f.load_adapter(str(d), adapter_name="x")
    got = fastpeft.get_peft_model_state_dict(f, adapter_name="x")
    want = load_file(str(d / "adapter_model.safetensors"))
    assert sorted(got) == sorted(want) and all(torch.equal(got[k], want[k]) for k in want)


def test_set_peft_model_state_dict_validates_first():
    f = fastpeft.get_peft_model(tiny_llama(), fastpeft.LoraConfig(r=2))
    sd = {k: v.clone() for k, v in fastpeft.get_peft_model_state_dict(f).items()}
    assert all(".default." not in k for k in sd) and all(k.startswith("base_model.model.") for k in sd)
    before = full_state(f)
    bad = dict(sd)
    k0 = sorted(bad)[0]
    bad[k0] = torch.zeros(3, 3)
    bad[sorted(bad)[1]] = torch.ones_like(bad[sorted(bad)[1]])  # a valid change that must not be applied
    with pytest.raises(ValueError, match=r"shape \(3, 3\)"):
        fastpeft.set_peft_model_state_dict(f, bad)
    assert_state_equal(before, f)
    new = {k: torch.randn_like(v) for k, v in sd.items()}
    fastpeft.set_peft_model_state_dict(f, new)
    for k, v in fastpeft.get_peft_model_state_dict(f).items():
        assert torch.equal(v, new[k])
    # keys without the PeftModel prefix (PEFT's inject_adapter_in_model layout) are accepted
    fastpeft.set_peft_model_state_dict(f, {k[len("base_model.model."):]: v for k, v in sd.items()})
    for k, v in fastpeft.get_peft_model_state_dict(f).items():
        assert torch.equal(v, sd[k])


def test_bin_refused_unless_opted_in(tmp_path):
    base = tiny_llama()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        p = peft.get_peft_model(base, peft.LoraConfig(r=2))
    with torch.no_grad():
        for n, q in p.named_parameters():
            if "lora_B" in n:
                q.normal_()
    p.save_pretrained(tmp_path / "a", safe_serialization=False)
    assert (tmp_path / "a" / "adapter_model.bin").exists()
    model = tiny_llama()
    before = full_state(model)
    with pytest.raises(ValueError, match="safetensors"):
        fastpeft.PeftModel.from_pretrained(model, str(tmp_path / "a"))
    assert_state_equal(before, model)
    f = fastpeft.PeftModel.from_pretrained(model, str(tmp_path / "a"), allow_bin=True)
    ids = inputs()
    assert_close_rel(logits(f, ids), logits(p, ids), PEFT_PARITY_RTOL, ".bin opt-in")


def test_unknown_config_keys_warn_and_are_ignored(tmp_path):
    d = _save_peft_lora(tmp_path)
    cfg = json.loads((d / "adapter_config.json").read_text())
    cfg["a_field_from_peft_9"] = {"x": 1}
    cfg["runtime_config"] = {"ephemeral_gpu_offload": False}
    (d / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.warns(UserWarning, match="a_field_from_peft_9"):
        c = fastpeft.PeftConfig.from_pretrained(str(d))
    assert isinstance(c, fastpeft.LoraConfig) and c.r == 4
    with pytest.warns(UserWarning, match="a_field_from_peft_9"):
        fastpeft.PeftModel.from_pretrained(tiny_llama(), str(d))


def test_unsupported_peft_feature_in_file_is_refused(tmp_path):
    d = _save_peft_lora(tmp_path)
    cfg = json.loads((d / "adapter_config.json").read_text())
    cfg["use_qalora"] = True
    (d / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="use_qalora"):
        fastpeft.PeftConfig.from_pretrained(str(d))
    cfg["use_qalora"] = False
    cfg["peft_type"] = "LOHA"
    (d / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="LOHA"):
        fastpeft.PeftConfig.from_pretrained(str(d))


def test_is_trainable_true(tmp_path):
    d = _save_peft_lora(tmp_path, lora_dropout=0.1)
    f = fastpeft.PeftModel.from_pretrained(tiny_llama(), str(d), is_trainable=True)
    trainable = [n for n, q in f.named_parameters() if q.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    assert f.peft_config["default"].inference_mode is False
    f.save_pretrained(tmp_path / "again")
    assert json.loads((tmp_path / "again" / "adapter_config.json").read_text())["inference_mode"] is True
    assert f.peft_config["default"].inference_mode is False


def test_load_adapter_trainable_and_frozen(tmp_path):
    d = _save_peft_lora(tmp_path, target_modules=["q_proj"])
    f = fastpeft.get_peft_model(tiny_llama(), fastpeft.LoraConfig(r=2, target_modules=["v_proj"]))
    f.load_adapter(str(d), adapter_name="frozen")
    with pytest.raises(ValueError, match="clashes"):
        f.load_adapter(str(d), adapter_name="train", is_trainable=True)
    f.load_adapter(str(d), adapter_name="trainme", is_trainable=True)
    names = {n: q.requires_grad for n, q in f.named_parameters() if "lora_" in n}
    assert all(not v for n, v in names.items() if ".frozen." in n)
    assert all(v for n, v in names.items() if ".trainme." in n)
    assert all(v for n, v in names.items() if ".default." in n)  # the active adapter stays trainable
    assert f.active_adapter == "default"
    assert f.peft_config["frozen"].inference_mode and not f.peft_config["trainme"].inference_mode
