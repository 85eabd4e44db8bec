"""LoRA initialisation variants against HF PEFT 0.21.2 (fp32): identical initial adapters and residual base weights
(PiSSA, PiSSA with svd_lowrank, OLoRA, orthogonal, gaussian), then outputs and every gradient; PiSSA/OLoRA adapters
converted back to a plain LoRA at save time exactly like PEFT; the values fastpeft refuses raise clear errors."""

from __future__ import annotations

import json
import warnings

import pytest
import torch

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

import fastpeft  # noqa: E402
from testing_utils import MODELS, assert_lm_parity, inputs, randomize_trainable, tiny_llama, wrap_pair  # noqa: E402
from testing_utils import PEFT_PARITY_RTOL, assert_close_rel  # noqa: E402


def both(**kw):
    return peft.LoraConfig(**kw), fastpeft.LoraConfig(**kw)


CASES = [
    ("llama", "pissa", False), ("gpt2", "pissa", False), ("llama", "pissa_niter_2", False),
    ("llama", "olora", False), ("gpt2", "orthogonal", False),
    ("llama", "pissa", True),  # PiSSA then DoRA: the magnitude is taken on W_res + s·B·A
]


@pytest.mark.parametrize("arch,init,dora", CASES)
def test_init_variant_parity(arch, init, dora):
    targets = ["q_proj", "v_proj", "up_proj"] if arch == "llama" else ["c_attn", "c_fc"]
    base = MODELS[arch]()
    # wrap_pair asserts the same initial A, B (and magnitude) and the same (possibly rewritten) base weights
    p, f = wrap_pair(base, *both(r=4, lora_alpha=8, target_modules=targets, init_lora_weights=init, use_dora=dora))
    if init in ("pissa", "pissa_niter_2", "olora"):
        # W_res + s·B·A reproduces the original model
        ids = inputs()
        with torch.no_grad():
            base.eval()
            f.eval()
            assert_close_rel(f(input_ids=ids).logits, base(input_ids=ids).logits, 1e-5, "initial model")
        layer = f.base_model.model.model.layers[0].self_attn.q_proj if arch == "llama" else \
            f.base_model.model.transformer.h[0].attn.c_attn
        assert layer.lora_B["default"].weight.abs().sum() > 0
    assert_lm_parity(p, f, train=True)


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_conversion_to_lora_at_save(tmp_path, init):
    """PEFT's workflow: save the adapter right after init, train, save with path_initial_model_for_weight_conversion;
    the result is a rank-2r LoRA for the ORIGINAL base model, identical to PEFT's file."""
    cfg = dict(r=4, lora_alpha=8, target_modules=["q_proj", "o_proj"], init_lora_weights=init)
    base = tiny_llama()
    p, f = wrap_pair(base, *both(**cfg))
    p.save_pretrained(str(tmp_path / "p_init"))
    f.save_pretrained(str(tmp_path / "f_init"))
    randomize_trainable(p, f, scale=0.05)  # "training"
    ids = inputs()
    with torch.no_grad():
        f.eval()
        trained = f(input_ids=ids).logits
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        p.save_pretrained(str(tmp_path / "p"), path_initial_model_for_weight_conversion=str(tmp_path / "p_init"))
        f.save_pretrained(str(tmp_path / "f"), path_initial_model_for_weight_conversion=str(tmp_path / "f_init"))
    from safetensors.torch import load_file

    a = load_file(str(tmp_path / "p" / "adapter_model.safetensors"))
    b = load_file(str(tmp_path / "f" / "adapter_model.safetensors"))
    assert sorted(a) == sorted(b)
    for k in a:
        assert a[k].shape[0 if "lora_A" in k else 1] == 8
        assert_close_rel(b[k], a[k], PEFT_PARITY_RTOL, k)
    ca = json.loads((tmp_path / "p" / "adapter_config.json").read_text())
    cb = json.loads((tmp_path / "f" / "adapter_config.json").read_text())
    for key in ("r", "lora_alpha", "init_lora_weights"):
        assert cb[key] == ca[key], key
    assert cb["r"] == 8 and cb["init_lora_weights"] is True
    ia = json.loads((tmp_path / "p_init" / "adapter_config.json").read_text())
    ib = json.loads((tmp_path / "f_init" / "adapter_config.json").read_text())
    assert ia["init_lora_weights"] is True and ib["init_lora_weights"] is True
    # the converted adapter on the unmodified base model gives the trained model's outputs, in both libraries
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        f2 = fastpeft.PeftModel.from_pretrained(tiny_llama(), str(tmp_path / "f"))
        p2 = peft.PeftModel.from_pretrained(tiny_llama(), str(tmp_path / "f"))
    with torch.no_grad():
        assert_close_rel(f2(input_ids=ids).logits, trained, 1e-5, "converted adapter (fastpeft)")
        assert_close_rel(p2(input_ids=ids).logits, trained, 1e-5, "converted adapter (PEFT)")


def test_pissa_files_load_both_ways(tmp_path):
    """A PiSSA adapter file: loading it re-runs the init on the given base model (PEFT's behaviour), then sets A, B."""
    cfg = dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights="pissa")
    p, f = wrap_pair(tiny_llama(), *both(**cfg))
    randomize_trainable(p, f)
    p.save_pretrained(str(tmp_path / "p"))
    f.save_pretrained(str(tmp_path / "f"))
    ids = inputs()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        f2 = fastpeft.PeftModel.from_pretrained(tiny_llama(), str(tmp_path / "p"))
        p2 = peft.PeftModel.from_pretrained(tiny_llama(), str(tmp_path / "f"))
    with torch.no_grad():
        p.eval()
        ref = p(input_ids=ids).logits
        assert_close_rel(f2(input_ids=ids).logits, ref, PEFT_PARITY_RTOL, "PEFT file in fastpeft")
        assert_close_rel(p2(input_ids=ids).logits, ref, PEFT_PARITY_RTOL, "fastpeft file in PEFT")


@pytest.mark.parametrize("value", ["eva", "corda", "loftq", "lora_ga", "mica", "pissa_niter_x", "kaiming"])
def test_unsupported_init_values_raise(value):
    with pytest.raises(ValueError, match="init_lora_weights"):
        fastpeft.LoraConfig(init_lora_weights=value)


@pytest.mark.parametrize("arch,kw,match", [
    ("gpt2", dict(target_modules=["c_attn"], init_lora_weights="olora"), "Conv1D"),
    ("llama", dict(target_modules=["q_proj"], init_lora_weights="orthogonal", r=3), "even"),
])
def test_init_target_errors_leave_model_unchanged(arch, kw, match):
    base = MODELS[arch]()
    before = {k: v.clone() for k, v in base.state_dict().items()}
    with pytest.raises(ValueError, match=match):
        fastpeft.get_peft_model(base, fastpeft.LoraConfig(**kw))
    after = base.state_dict()
    assert sorted(after) == sorted(before)
    assert all(torch.equal(after[k], before[k]) for k in before)
