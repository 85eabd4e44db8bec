"""HF PEFT's own get/set_peft_model_state_dict on fastpeft models (what accelerate's FSDP adapter-only checkpoints
and TRL's teacher sync call): same keys and tensors as fastpeft's functions, and set_* loads them (never silently
nothing)."""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

import fastpeft  # noqa: E402
import fastpeft.save_load as FS  # noqa: E402
from fastpeft._peft_compat import interop_enabled  # noqa: E402

pytestmark = pytest.mark.skipif(not interop_enabled(), reason="peft interop disabled")


def tiny_llama():
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                   num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64)
    return transformers.LlamaForCausalLM(cfg)


CONFIGS = {
    "lora": lambda: fastpeft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                        init_lora_weights=False, task_type="CAUSAL_LM"),
    "adalora": lambda: fastpeft.AdaLoraConfig(init_r=4, target_r=2, total_step=10, target_modules=["q_proj"],
                                              task_type="CAUSAL_LM"),
    "ia3": lambda: fastpeft.IA3Config(target_modules=["k_proj", "down_proj"], feedforward_modules=["down_proj"],
                                      task_type="CAUSAL_LM"),
    "prompt_tuning": lambda: fastpeft.PromptTuningConfig(num_virtual_tokens=3, task_type="CAUSAL_LM"),
}


def perturb(model, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * 0.1)


@pytest.mark.parametrize("method", sorted(CONFIGS))
def test_peft_functions_on_fastpeft_models(method):
    ids = torch.randint(4, 64, (2, 7), generator=torch.Generator().manual_seed(1))
    m = fastpeft.get_peft_model(tiny_llama(), CONFIGS[method]())
    perturb(m, 2)
    ours = FS.get_peft_model_state_dict(m)
    assert ours
    for get in (peft.get_peft_model_state_dict, peft.utils.get_peft_model_state_dict,
                peft.utils.save_and_load.get_peft_model_state_dict):
        theirs = get(m)
        assert sorted(theirs) == sorted(ours)
        for k in ours:
            assert torch.equal(theirs[k], ours[k]), k

    m.eval()
    with torch.no_grad():
        want = m(input_ids=ids).logits
    fresh = fastpeft.get_peft_model(tiny_llama(), CONFIGS[method]())
    perturb(fresh, 3)
    fresh.eval()
    with torch.no_grad():
        assert not torch.equal(fresh(input_ids=ids).logits, want)
    peft.set_peft_model_state_dict(fresh, {k: v.clone() for k, v in ours.items()})
    got_sd = FS.get_peft_model_state_dict(fresh)
    assert sorted(got_sd) == sorted(ours)
    for k in ours:
        assert torch.equal(got_sd[k], ours[k]), k
    with torch.no_grad():
        assert torch.equal(fresh(input_ids=ids).logits, want)


def test_set_rejects_foreign_keys_loudly():
    m = fastpeft.get_peft_model(tiny_llama(), CONFIGS["lora"]())
    with pytest.raises(ValueError):
        peft.set_peft_model_state_dict(m, {"base_model.model.nope.lora_A.weight": torch.zeros(4, 32)})


def test_hf_peft_models_still_use_peft():
    pm = peft.get_peft_model(tiny_llama(), peft.LoraConfig(r=4, target_modules=["q_proj"], task_type="CAUSAL_LM"))
    sd = peft.get_peft_model_state_dict(pm)
    assert sorted(sd) == sorted(k.replace(".default", "") for k in pm.state_dict() if "lora_" in k)


def test_accelerate_fsdp_helper_adapter_only():
    fsdp_utils = pytest.importorskip("accelerate.utils.fsdp_utils")
    get = getattr(fsdp_utils, "_get_model_state_dict", None)
    setf = getattr(fsdp_utils, "_set_model_state_dict", None)
    if get is None or setf is None:
        pytest.skip("accelerate has no _get/_set_model_state_dict helpers")
    m = fastpeft.get_peft_model(tiny_llama(), CONFIGS["lora"]())
    perturb(m, 4)
    ours = FS.get_peft_model_state_dict(m)
    sd = get(m, adapter_only=True)
    assert sorted(sd) == sorted(ours)
    fresh = fastpeft.get_peft_model(tiny_llama(), CONFIGS["lora"]())
    setf(fresh, {k: v.clone() for k, v in sd.items()}, adapter_only=True)
    for k, v in FS.get_peft_model_state_dict(fresh).items():
        assert torch.equal(v, ours[k]), k
