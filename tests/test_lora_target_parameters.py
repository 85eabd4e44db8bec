"""LoRA on parameters (``LoraConfig.target_parameters``, ``fastpeft/tuners/lora/param.py``): mixture-of-experts
weights stored as 3-D parameters, and 2-D parameters, against HF PEFT 0.21.2's ``lora.ParamWrapper``.

Models: tiny Qwen3-MoE (experts (E, out, in)) and GPT-OSS (experts (E, in, out), ``is_transposed``) from configs,
their expert weights drawn at a scale where the update matters; a tiny Llama for 2-D weights and the recompute.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch

from testing_utils import VOCAB, assert_step_bit_for_bit, inputs, randomize_trainable, tiny_llama, wrap_pair

pytest.importorskip("peft")
import peft  # noqa: E402

import fastpeft  # noqa: E402
from fastpeft.tuners.lora.param import ParamWrapper  # noqa: E402

EXPERTS = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]


def tiny_moe(kind: str):
    """2 layers, 4 experts (2 per token), hidden 32; expert weights N(0, 0.2²)."""
    import transformers

    torch.manual_seed(0)
    common = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                  head_dim=8, num_experts_per_tok=2, pad_token_id=0)
    if kind == "qwen3_moe":
        cfg = transformers.Qwen3MoeConfig(intermediate_size=64, moe_intermediate_size=24, num_experts=4, **common)
        model = transformers.Qwen3MoeForCausalLM(cfg)
    else:
        cfg = transformers.GptOssConfig(intermediate_size=24, num_local_experts=4,
                                        layer_types=["full_attention"] * 2, **common)
        model = transformers.GptOssForCausalLM(cfg)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if ".experts." in n:
                p.normal_(0.0, 0.2)
    return model


def router(kind: str) -> str:
    return "mlp.gate.weight" if kind == "qwen3_moe" else "mlp.router.weight"


def both(kind: str, **kw):
    kw = {"r": 4, "lora_alpha": 8, "target_modules": [], "target_parameters": EXPERTS + [router(kind)], **kw}
    return wrap_pair(tiny_moe(kind), peft.LoraConfig(**kw), fastpeft.LoraConfig(**kw))


@pytest.mark.parametrize("kind", ["qwen3_moe", "gpt_oss"])
def test_structure_init_forward_and_gradients_match_peft(kind):
    """The same nested wrappers (gate_up inside down, in the experts' registration order), parameter names and
    initial values as PEFT; then, with every adapter weight random, the same loss and every gradient bit for bit -
    3-D experts on both layouts (one adapter: PEFT's baddbmm fold) and the 2-D router weight."""
    p, f = both(kind)
    outer = f.base_model.model.model.layers[0].mlp.experts
    assert isinstance(outer, ParamWrapper) and outer.parameter_name == "down_proj"
    assert isinstance(outer.base_layer, ParamWrapper) and outer.base_layer.parameter_name == "gate_up_proj"
    assert outer.num_experts == 4 and outer.lora_A["default"].weight.shape == (4 * 4, outer.in_features)
    assert sorted(f.base_model.targeted_parameter_names) == sorted(
        f"model.layers.{i}.{t}" for i in range(2) for t in EXPERTS + [router(kind)])
    randomize_trainable(p, f)
    # 6 wrapped parameters x (A, B) per layer... 3 per layer, 2 layers
    assert_step_bit_for_bit(p, f, n_grads=2 * 3 * 2)


@pytest.mark.parametrize("kind", ["qwen3_moe", "gpt_oss"])
def test_files_both_ways_and_merge(kind, tmp_path):
    """save_pretrained writes PEFT's keys and values; each library loads the other's directory to the same
    outputs; merge_and_unload gives back the plain module tree with PEFT's merged weights (bit for bit in fp32) and
    the adapted outputs."""
    p, f = both(kind)
    randomize_trainable(p, f)
    f.save_pretrained(tmp_path / "f")
    p.save_pretrained(tmp_path / "p")
    from safetensors.torch import load_file
    a = load_file(tmp_path / "f" / "adapter_model.safetensors")
    b = load_file(tmp_path / "p" / "adapter_model.safetensors")
    assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)
    assert any(".experts.base_layer.lora_A.weight" in k for k in a)
    ids = inputs()
    f.eval()
    want = f(input_ids=ids).logits
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from_f = peft.PeftModel.from_pretrained(tiny_moe(kind), tmp_path / "f")
        from_p = fastpeft.PeftModel.from_pretrained(tiny_moe(kind), tmp_path / "p")
    assert torch.equal(from_f(input_ids=ids).logits, want) and torch.equal(from_p(input_ids=ids).logits, want)
    merged_p, merged_f = p.merge_and_unload(), f.merge_and_unload()
    assert not any(isinstance(m, ParamWrapper) for m in merged_f.modules())
    assert type(merged_f.model.layers[0].mlp.experts).__name__.endswith("Experts")
    sp, sf = merged_p.state_dict(), merged_f.state_dict()
    assert sorted(sp) == sorted(sf) and all(torch.equal(sp[k], sf[k]) for k in sp)
    torch.testing.assert_close(merged_f(input_ids=ids).logits, want, rtol=1e-5, atol=1e-5)


def test_disable_unload_delete_restore_the_model():
    """disable_adapter runs the frozen model; unload / delete of the only adapter with unwrapping give back the
    exact original modules (the nested wrappers undone innermost first)."""
    base = tiny_moe("qwen3_moe")
    ids = inputs()
    with torch.no_grad():
        ref = copy.deepcopy(base)(input_ids=ids).logits
    f = fastpeft.get_peft_model(copy.deepcopy(base), fastpeft.LoraConfig(target_modules=[], target_parameters=EXPERTS))
    with torch.no_grad():
        for n, t in f.named_parameters():
            if "lora_B" in n:
                t.normal_(0, 0.1)
        assert not torch.equal(f(input_ids=ids).logits, ref)
        with f.disable_adapter():
            assert torch.equal(f(input_ids=ids).logits, ref)
    experts = f.base_model.model.model.layers[1].mlp.experts.base_layer.base_layer
    plain = f.unload()
    assert plain.model.layers[1].mlp.experts is experts
    with torch.no_grad():
        assert torch.equal(plain(input_ids=ids).logits, ref)


def test_second_adapter_shares_the_wrappers():
    """A second adapter on the same parameters goes into the existing wrappers (no deeper nesting), trains only when
    active, and is saved under the same keys; another parameter set is refused, naming both sets."""
    f = fastpeft.get_peft_model(tiny_moe("qwen3_moe"),
                                fastpeft.LoraConfig(target_modules=[], target_parameters=EXPERTS))
    f.add_adapter("other", fastpeft.LoraConfig(r=2, target_modules=[], target_parameters=list(reversed(EXPERTS))))
    outer = f.base_model.model.model.layers[0].mlp.experts
    assert isinstance(outer.base_layer, ParamWrapper) and not isinstance(outer.base_layer.base_layer, ParamWrapper)
    assert outer.lora_A["other"].weight.shape == (2 * 4, 24) and not outer.lora_A["other"].weight.requires_grad
    f.set_adapter("other")
    assert outer.lora_A["other"].weight.requires_grad and not outer.lora_A["default"].weight.requires_grad
    sd = f.base_model.get_adapter_state_dict("other")
    assert sorted(sd) == sorted(f.base_model.get_adapter_state_dict("default"))
    with pytest.raises(ValueError, match="same parameters"):
        f.add_adapter("third", fastpeft.LoraConfig(target_modules=[], target_parameters=EXPERTS[:1]))
    assert sorted(f.peft_config) == ["default", "other"]


@pytest.mark.parametrize("bad, match", [
    (dict(lora_dropout=0.1), "lora_dropout"),
    (dict(use_dora=True), "use_dora"),
    (dict(lora_bias=True), "lora_bias"),
    (dict(init_lora_weights="pissa"), "init_lora_weights"),
    (dict(target_parameters=["mlp.experts.no_such_weight"]), "matched no parameter"),
    (dict(target_modules=["gate"], target_parameters=["mlp.gate.weight"]), "target_modules also targets"),
])
def test_refusals_name_the_problem_and_change_nothing(bad, match):
    """PEFT's refusals (dropout, DoRA, lora_bias; init variants that need a Linear's weight) and a parameter that
    matches nothing or whose module target_modules also adapts: ValueError naming it, the model untouched."""
    base = tiny_moe("qwen3_moe")
    before = {n: t.clone() for n, t in base.state_dict().items()}
    mods = [type(m) for m in base.modules()]
    kw = {"target_modules": [], "target_parameters": EXPERTS, **bad}
    with pytest.raises(ValueError, match=match):
        fastpeft.get_peft_model(base, fastpeft.LoraConfig(**kw))
    assert [type(m) for m in base.modules()] == mods
    after = base.state_dict()
    assert sorted(after) == sorted(before) and all(torch.equal(after[k], before[k]) for k in before)


def test_config_type_checks():
    with pytest.raises(TypeError, match="target_parameters"):
        fastpeft.LoraConfig(target_parameters="mlp.experts.down_proj")
    with pytest.raises(ValueError, match="only LoraConfig"):
        fastpeft.AdaLoraConfig(total_step=10, target_parameters=EXPERTS)
    assert fastpeft.LoraConfig(target_parameters={"b", "a"}).target_parameters == ["a", "b"]
    assert fastpeft.LoraConfig(target_parameters=["b", "a", "b"]).target_parameters == ["a", "b"]


def test_mixed_batch_is_refused():
    f = fastpeft.get_peft_model(tiny_moe("qwen3_moe"), fastpeft.LoraConfig(target_modules=["q_proj"],
                                                                          target_parameters=EXPERTS))
    f.eval()
    with pytest.raises(ValueError, match="mixed-adapter batches"):
        f(input_ids=inputs(), adapter_names=["default", "__base__"])


def test_linear_weights_as_parameters_with_activation_recompute():
    """2-D parameters of Llama's Linears (``mlp.down_proj.weight``) next to module targets: PEFT's step bit for bit,
    and fastpeft's activation recompute on or off gives the same loss and gradients."""
    kw = dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
              target_parameters=["mlp.down_proj.weight", "mlp.up_proj.weight"])
    p, f = wrap_pair(tiny_llama(), peft.LoraConfig(**kw), fastpeft.LoraConfig(**kw))
    randomize_trainable(p, f)
    assert_step_bit_for_bit(p, f, n_grads=2 * 4 * 2)
    grads = []
    for on in (True, False):
        f.zero_grad()
        fastpeft.recompute.set_enabled(f, on)
        torch.manual_seed(3)
        loss = f(input_ids=inputs(), labels=inputs()).loss
        loss.backward()
        grads.append((loss.detach(), {n: t.grad.clone() for n, t in f.named_parameters() if t.grad is not None}))
    assert torch.equal(grads[0][0], grads[1][0])
    assert all(torch.equal(grads[0][1][n], grads[1][1][n]) for n in grads[0][1])


def test_bf16_experts_match_peft():
    """A bf16 model (adapters upcast to fp32, PEFT's default): the factors are cast to the experts' dtype before the
    fold, as PEFT does - the same logits bit for bit."""
    base = tiny_moe("qwen3_moe").to(torch.bfloat16)
    kw = dict(r=4, lora_alpha=8, target_modules=[], target_parameters=EXPERTS)
    p, f = wrap_pair(base, peft.LoraConfig(**kw), fastpeft.LoraConfig(**kw))
    randomize_trainable(p, f)
    ids = inputs()
    assert f.base_model.model.model.layers[0].mlp.experts.lora_A["default"].weight.dtype == torch.float32
    assert torch.equal(p(input_ids=ids).logits, f(input_ids=ids).logits)


@pytest.mark.parametrize("kind", ["qwen3_moe", "gpt_oss"])
def test_gradient_checkpointing_matches_peft(kind):
    """transformers' gradient checkpointing (non-reentrant; the decoder layers re-run in backward, the wrappers'
    replaced parameters formed again) with module and parameter targets together: PEFT's loss and every gradient,
    bit for bit."""
    kw = dict(r=4, lora_alpha=8, target_modules=["q_proj"], target_parameters=EXPERTS)
    p, f = wrap_pair(tiny_moe(kind), peft.LoraConfig(**kw), fastpeft.LoraConfig(**kw))
    randomize_trainable(p, f)
    for model in (p, f):
        model.base_model.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.base_model.model.enable_input_require_grads()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # transformers: use_cache=True is incompatible with gradient checkpointing
        assert_step_bit_for_bit(p, f, n_grads=2 * 3 * 2)


def test_target_modules_none_with_parameters_only(tmp_path):
    """target_modules=None on a model type without a default, with target_parameters: only the parameters are
    adapted, and the config then says target_modules=[] as PEFT's does (so the saved files agree)."""
    kw = dict(r=4, target_modules=None, target_parameters=EXPERTS)
    p, f = wrap_pair(tiny_moe("qwen3_moe"), peft.LoraConfig(**kw), fastpeft.LoraConfig(**kw))
    assert f.peft_config["default"].target_modules == p.peft_config["default"].target_modules == set()
    p.save_pretrained(tmp_path / "p")
    f.save_pretrained(tmp_path / "f")
    import json
    cp = json.loads((tmp_path / "p" / "adapter_config.json").read_text())
    cf = json.loads((tmp_path / "f" / "adapter_config.json").read_text())
    # PEFT writes its set of names in set order, fastpeft sorted
    assert cf["target_modules"] == cp["target_modules"] == []
    assert cf["target_parameters"] == sorted(cp["target_parameters"]) == sorted(EXPERTS)


def test_rank_and_alpha_patterns_apply_to_parameters():
    """rank_pattern / alpha_pattern keys match the parameter's key (PEFT's rule): gate_up_proj at rank 2 and alpha
    6, down_proj at the config's; PEFT's shapes and step bit for bit."""
    kw = dict(r=4, lora_alpha=8, target_modules=[], target_parameters=EXPERTS, rank_pattern={"gate_up_proj": 2},
              alpha_pattern={"gate_up_proj": 6})
    p, f = wrap_pair(tiny_moe("qwen3_moe"), peft.LoraConfig(**kw), fastpeft.LoraConfig(**kw))
    outer = f.base_model.model.model.layers[0].mlp.experts
    assert outer.r["default"] == 4 and outer.base_layer.r["default"] == 2
    assert outer.base_layer.scaling["default"] == 3.0 and outer.lora_A["default"].weight.shape[0] == 4 * 4
    randomize_trainable(p, f)
    assert_step_bit_for_bit(p, f, n_grads=2 * 2 * 2)


def test_adapted_parameter_is_not_kept_for_backward(monkeypatch):
    """W + ΔW (every expert of the parameter) is not kept alive between the forward and the backward: the views of
    it that the experts' ops save are recipes, and it is formed again in backward - gradients bit for bit those of
    the run that keeps it (hooks off, PEFT's behaviour, where it does stay alive); a LoRA weight changed in place
    between forward and backward is still reported."""
    import gc
    import weakref

    import fastpeft.tuners.lora.param as P

    made = []
    real = P.ParamWrapper._effective_param

    def spy(self, active):
        t = real(self, active)
        made.append(weakref.ref(t))
        return t

    monkeypatch.setattr(P.ParamWrapper, "_effective_param", spy)
    kw = dict(r=4, lora_alpha=8, target_modules=[], target_parameters=EXPERTS)
    f = fastpeft.get_peft_model(tiny_moe("qwen3_moe"), fastpeft.LoraConfig(**kw))
    randomize_trainable(f, f)
    ids = inputs()
    grads = {}
    may_hook = P._may_hook_saved_tensors
    for keep in (False, True):
        monkeypatch.setattr(P, "_may_hook_saved_tensors", (lambda: False) if keep else may_hook)
        made.clear()
        f.zero_grad()
        loss = f(input_ids=ids, labels=ids).loss
        gc.collect()
        alive = sum(r() is not None for r in made)
        # kept: 3 of the 4 (layer 0's gate_up is not - its input needs no gradient, so its ops save no weight)
        assert len(made) == 4 and alive == (3 if keep else 0), (keep, alive)
        loss.backward()
        grads[keep] = {n: t.grad.clone() for n, t in f.named_parameters() if t.grad is not None}
    assert sorted(grads[False]) == sorted(grads[True]) and len(grads[True]) == 8
    assert all(torch.equal(grads[False][n], grads[True][n]) for n in grads[True])
    monkeypatch.setattr(P, "_may_hook_saved_tensors", may_hook)
    loss = f(input_ids=ids, labels=ids).loss
    with torch.no_grad():
        f.base_model.model.model.layers[0].mlp.experts.lora_B["default"].weight.add_(1.0)
    with pytest.raises(RuntimeError, match="modified"):  # autograd's own check of the factors comes first
        loss.backward()
    loss = f(input_ids=ids, labels=ids).loss
    with torch.no_grad():  # the frozen experts: autograd saved nothing of them, the rebuild checks them
        f.base_model.model.model.layers[1].mlp.experts.base_layer.base_layer.down_proj.mul_(2.0)
    with pytest.raises(RuntimeError, match="modified in place between the forward and the backward"):
        loss.backward()
