"""(IA)³ through fastpeft's model API against HF PEFT 0.21.2: both modes (output scaling incl. bias, input scaling
for feed-forward modules), Llama and GPT-2 (Conv1D), several adapters, merge/unmerge and merge_and_unload."""

from __future__ import annotations

import warnings

import pytest
import torch

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

import fastpeft  # noqa: E402
from testing_utils import PEFT_PARITY_RTOL, assert_close_rel  # noqa: E402
from testing_utils import (assert_parity, build_pair, inputs, randomize_trainable, tiny_gpt2,  # noqa: E402
                           tiny_llama)

MODELS = {"llama": tiny_llama, "gpt2": tiny_gpt2}


def both(**kw):
    return peft.IA3Config(**kw), fastpeft.IA3Config(**kw)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("train", [False, True])
def test_defaults_both_modes(arch, train):
    p, f = build_pair(MODELS[arch], *both())
    layers = dict(f.base_model.tuner_layers())
    modes = {n.split(".")[-1]: lay.is_feedforward for n, lay in layers.items()}
    assert True in modes.values() and False in modes.values()  # both modes exercised
    shapes = {n: tuple(lay.ia3_l["default"].shape) for n, lay in layers.items()}
    peft_shapes = {n: tuple(m.ia3_l["default"].shape) for n, m in p.base_model.model.named_modules()
                   if hasattr(m, "ia3_l")}
    assert shapes == peft_shapes
    assert_parity(p, f, train=train)


def test_regex_targets_and_feedforward_gpt2_bias_scaled():
    # c_attn has a bias: output mode must scale it too
    kw = dict(target_modules=r".*\.(c_attn|c_fc|c_proj)", feedforward_modules=r".*mlp\.c_proj")
    p, f = build_pair(tiny_gpt2, *both(**kw))
    assert sorted(f.base_model.targeted_module_names) == sorted(p.base_model.targeted_module_names)
    assert_parity(p, f)


def test_several_ia3_adapters_multiply():
    p, f = build_pair(tiny_llama, *both(target_modules=["k_proj", "down_proj"], feedforward_modules=["down_proj"]),
                      randomize=False)
    cfg = dict(target_modules=["k_proj", "v_proj", "down_proj"], feedforward_modules=["down_proj"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        p.add_adapter("b", peft.IA3Config(**cfg))
        f.add_adapter("b", fastpeft.IA3Config(**cfg))
    p.base_model.set_adapter(["default", "b"])
    f.base_model.set_adapter(["default", "b"])
    randomize_trainable(p, f, scale=1.0)
    assert_parity(p, f)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_ia3_merge_unmerge(arch):
    p, f = build_pair(MODELS[arch], *both())
    randomize_trainable(p, f, scale=1.0)
    p.eval()
    f.eval()
    ids = inputs()
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = f(input_ids=ids).logits
        f.base_model.merge_adapter()
        p.base_model.merge_adapter()
        for k, v in p.state_dict().items():
            assert torch.equal(f.state_dict()[k], v), f"merged {k} differs from PEFT"
        assert_close_rel(f(input_ids=ids).logits, ref, PEFT_PARITY_RTOL, "merged")
        with pytest.raises(ValueError, match="already merged"):
            f.base_model.merge_adapter()
        f.base_model.unmerge_adapter()
        p.base_model.unmerge_adapter()
        for k, v in p.state_dict().items():
            assert torch.equal(f.state_dict()[k], v), f"unmerged {k} differs from PEFT"
        plain_p, plain_f = p.merge_and_unload(), f.merge_and_unload()
        for k, v in plain_p.state_dict().items():
            assert torch.equal(plain_f.state_dict()[k], v), k
        assert_close_rel(plain_f(input_ids=ids).logits, ref, PEFT_PARITY_RTOL, "merge_and_unload")


def test_ia3_config_validation():
    with pytest.raises(ValueError, match="subset"):
        fastpeft.IA3Config(target_modules=["q"], feedforward_modules=["q", "down"])
    with pytest.raises(ValueError, match="feedforward_modules"):
        m = torch.nn.Sequential(torch.nn.Linear(4, 4))
        fastpeft.get_peft_model(m, fastpeft.IA3Config(target_modules=["0"]))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_training_step_bit_for_bit(dtype):
    """On CPU the torch backend reproduces HF PEFT's IA3 training step bit for bit (loss and every l gradient; fp32
    l on an fp32 or bf16 base, output and feed-forward modes), with its leaner backward
    (``fastpeft.ops.ia3._ScaleByVector``)."""
    from testing_utils import assert_step_bit_for_bit, randomize_trainable, tiny_llama, wrap_pair
    kw = dict(target_modules=["k_proj", "v_proj", "down_proj"], feedforward_modules=["down_proj"])
    p, f = wrap_pair(tiny_llama().to(dtype), peft.IA3Config(**kw), fastpeft.IA3Config(**kw))
    randomize_trainable(p, f)
    assert_step_bit_for_bit(p, f, n_grads=6)
