"""Bottleneck (Houlsby / Pfeiffer) adapters: the layer against its fp64 math, identity at init, placements on Llama,
GPT-2 and BERT, gradients only to adapter parameters, save/load, training, several adapters, bad input."""

from __future__ import annotations

import copy
import json
import warnings

import pytest
import torch
import torch.nn as nn

from testing_utils import ELEMENTWISE, PLAIN_MATMUL_TOL, PROMPT_EFFECT_MIN, PROMPT_FP32_ATOL, TRAIN_LOSS_RATIO
from testing_utils import batch, max_abs, tiny_bert, twin
from testing_utils import prompt_tiny_gpt2 as tiny_gpt2, prompt_tiny_llama as tiny_llama

import fastpeft  # noqa: E402
from fastpeft.tuners.bottleneck.layer import ACTIVATIONS, BottleneckLayer, bottleneck_ref  # noqa: E402

warnings.filterwarnings("ignore", category=FutureWarning)


def _layer(d_in=13, d_out=37, rf=4, act="swish", init=False, dtype=torch.float64):
    torch.manual_seed(0)
    layer = BottleneckLayer(nn.Linear(d_in, d_out, dtype=dtype))
    layer.add_adapter("a", rf, act, init_weights=init)
    layer.set_adapter("a")
    return layer


def _math(layer, x, name="a"):
    """fp64 reference: h + W_up f(W_down h + b_down) + b_up with h = base(x), written out."""
    base = layer.base_layer
    h = x.double() @ base.weight.double().T + base.bias.double()
    down, up = layer.adapter_down[name], layer.adapter_up[name]
    z = h @ down.weight.double().T + down.bias.double()
    z = {"swish": lambda t: t * torch.sigmoid(t), "relu": torch.relu, "tanh": torch.tanh,
         "gelu": lambda t: 0.5 * t * (1 + torch.erf(t / 2 ** 0.5))}[layer.non_linearity[name]](z)
    return h + z @ up.weight.double().T + up.bias.double()


@pytest.mark.parametrize("act", ["swish", "relu", "tanh", "gelu"])
@pytest.mark.parametrize("shape", [(1, 13), (3, 5, 13), (0, 13)])
def test_layer_matches_math_fp64(act, shape):
    layer = _layer(act=act)
    assert layer.adapter_down["a"].weight.shape == (37 // 4, 37)
    x = torch.randn(*shape, dtype=torch.float64)
    y = layer(x)
    assert y.shape == (*shape[:-1], 37)
    atol, rtol = ELEMENTWISE[torch.float64]
    torch.testing.assert_close(y, _math(layer, x), atol=atol, rtol=rtol)
    # the package reference agrees too
    d, u = layer.adapter_down["a"], layer.adapter_up["a"]
    torch.testing.assert_close(y, bottleneck_ref(layer.base_layer(x), d.weight, d.bias, u.weight, u.bias, act),
                               atol=atol, rtol=rtol)


def test_layer_fp32_noncontiguous_and_gradcheck():
    layer = _layer(dtype=torch.float32)
    x = torch.randn(13, 6)[:, :5].T  # (5, 13) non-contiguous
    assert not x.is_contiguous()
    torch.testing.assert_close(layer(x).double(), _math(layer, x), atol=PLAIN_MATMUL_TOL[torch.float32], rtol=1e-5)
    small = _layer(d_in=3, d_out=8, rf=4)
    xs = torch.randn(2, 3, dtype=torch.float64, requires_grad=True)
    params = [small.adapter_down["a"].weight, small.adapter_up["a"].weight, small.adapter_up["a"].bias]
    assert torch.autograd.gradcheck(lambda inp, *ps: small(inp), (xs, *params))


def test_zero_init_is_identity_and_only_up_gets_gradient_first():
    layer = _layer(init=True, dtype=torch.float32)
    x = torch.randn(4, 13)
    assert torch.equal(layer(x), layer.base_layer(x))
    layer(x).sum().backward()
    assert layer.adapter_up["a"].weight.grad.abs().sum() > 0
    assert torch.count_nonzero(layer.adapter_down["a"].weight.grad) == 0  # blocked by the zero up projection
    assert layer.base_layer.weight.grad is not None  # the layer alone does not freeze; the tuner does


def test_dropout_on_adapter_input_only():
    layer = BottleneckLayer(nn.Linear(8, 16))
    layer.add_adapter("a", 4, "relu", dropout=0.5, init_weights=False)
    layer.set_adapter("a")
    layer.train()
    x = torch.randn(3, 8)
    h = layer.base_layer(x)
    torch.manual_seed(5)
    y = layer(x)
    torch.manual_seed(5)
    dropped = nn.functional.dropout(h, 0.5, True)
    d, u = layer.adapter_down["a"], layer.adapter_up["a"]
    assert torch.allclose(y, h + u(torch.relu(d(dropped))), atol=PROMPT_FP32_ATOL)
    layer.eval()
    assert torch.allclose(layer(x), h + u(torch.relu(d(h))), atol=PROMPT_FP32_ATOL)


PLACEMENTS = {
    ("llama", "houlsby"): ["model.layers.0.mlp.down_proj", "model.layers.0.self_attn.o_proj",
                           "model.layers.1.mlp.down_proj", "model.layers.1.self_attn.o_proj"],
    ("llama", "pfeiffer"): ["model.layers.0.mlp.down_proj", "model.layers.1.mlp.down_proj"],
    ("gpt2", "houlsby"): ["transformer.h.0.attn.c_proj", "transformer.h.0.mlp.c_proj", "transformer.h.1.attn.c_proj",
                          "transformer.h.1.mlp.c_proj"],
    ("gpt2", "pfeiffer"): ["transformer.h.0.mlp.c_proj", "transformer.h.1.mlp.c_proj"],
    ("bert", "houlsby"): ["encoder.layer.0.attention.output.dense", "encoder.layer.0.output.dense",
                          "encoder.layer.1.attention.output.dense", "encoder.layer.1.output.dense"],
    ("bert", "pfeiffer"): ["encoder.layer.0.output.dense", "encoder.layer.1.output.dense"],
}
BUILDERS = {"llama": tiny_llama, "gpt2": tiny_gpt2, "bert": tiny_bert}


def _out(model, ids, mask):
    out = model(input_ids=ids, attention_mask=mask)
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


@pytest.mark.parametrize("model_name,placement", list(PLACEMENTS))
def test_placements_identity_at_init_and_trainable_params(model_name, placement):
    base, ref = twin(BUILDERS[model_name])
    fm = fastpeft.get_peft_model(base, fastpeft.BottleneckConfig(placement=placement))
    wrapped = sorted(n for n, m in base.named_modules() if isinstance(m, BottleneckLayer))
    assert wrapped == PLACEMENTS[(model_name, placement)]
    for n in wrapped:
        assert base.get_submodule(n).adapter_down["default"].out_features == 64 // 16  # reduction_factor 16
    ids, mask, _ = batch()
    fm.train()
    ref.train()
    y = _out(fm, ids, mask)
    assert torch.equal(y, _out(ref, ids, mask))
    y.float().pow(2).mean().backward()
    for n, p in fm.named_parameters():
        if ".adapter_" in n:
            assert p.requires_grad, n
        else:
            assert not p.requires_grad and p.grad is None, n
    ups = [p.grad for n, p in fm.named_parameters() if "adapter_up" in n and n.endswith("weight")]
    assert len(ups) == len(wrapped) and all(g is not None and g.abs().sum() > 0 for g in ups)


def test_model_output_matches_manual_composition():
    """With random (non-zero) adapters, the adapted Llama equals the base Llama with the adapters applied by hand
    through forward hooks that compute the reference formula."""
    base, ref = twin(tiny_llama)
    fm = fastpeft.get_peft_model(base, fastpeft.BottleneckConfig(reduction_factor=8, init_weights=False,
                                                                non_linearity="gelu"))
    hooks = []
    for name, m in base.named_modules():
        if isinstance(m, BottleneckLayer):
            d, u = m.adapter_down["default"], m.adapter_up["default"]
            target = ref.get_submodule(name)
            hooks.append(target.register_forward_hook(
                lambda mod, inp, out, d=d, u=u: bottleneck_ref(out, d.weight, d.bias, u.weight, u.bias, "gelu")))
    ids, mask, _ = batch()
    with torch.no_grad():
        y, r = _out(fm, ids, mask), _out(ref, ids, mask)
    for h in hooks:
        h.remove()
    assert max_abs(y, r) <= PROMPT_FP32_ATOL
    with torch.no_grad():
        assert max_abs(y, _out(ref, ids, mask)) >= PROMPT_EFFECT_MIN
        with fm.disable_adapter():
            assert torch.equal(_out(fm, ids, mask), _out(ref, ids, mask))


@pytest.mark.parametrize("model_name", ["llama", "gpt2", "bert"])
def test_save_load_round_trip(model_name, tmp_path):
    base, pristine = twin(BUILDERS[model_name])
    fm = fastpeft.get_peft_model(base, fastpeft.BottleneckConfig(init_weights=False, reduction_factor=8))
    fm.eval()
    fm.save_pretrained(str(tmp_path))
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "BOTTLENECK" and cfg["reduction_factor"] == 8 and cfg["inference_mode"] is True
    from safetensors.torch import load_file

    sd = load_file(str(tmp_path / "adapter_model.safetensors"))
    first = PLACEMENTS[(model_name, "houlsby")][0]
    assert {f"base_model.model.{first}.adapter_{w}.{p}" for w in ("down", "up") for p in ("weight", "bias")} <= set(sd)
    assert len(sd) == 4 * len(PLACEMENTS[(model_name, "houlsby")])
    ids, mask, _ = batch()
    loaded = fastpeft.PeftModel.from_pretrained(copy.deepcopy(pristine), str(tmp_path))
    with torch.no_grad():
        assert torch.equal(_out(loaded, ids, mask), _out(fm, ids, mask))
    assert not any(p.requires_grad for p in loaded.parameters())
    # a file whose shapes do not fit fails before anything changes
    sd_bad = dict(sd)
    k = f"base_model.model.{first}.adapter_down.weight"
    sd_bad[k] = torch.zeros(3, 64)
    with pytest.raises(ValueError, match="adapter_down"):
        loaded.base_model.set_adapter_state_dict("default", sd_bad)
    with torch.no_grad():
        assert torch.equal(_out(loaded, ids, mask), _out(fm, ids, mask))


def test_training_reduces_loss():
    torch.manual_seed(0)
    fm = fastpeft.get_peft_model(tiny_llama(), fastpeft.BottleneckConfig(reduction_factor=8))
    fm.train()
    ids, mask, _ = batch(b=4, length=8)
    labels = torch.full_like(ids, 7)  # a task the adapters can learn: always continue with token 7
    opt = torch.optim.Adam([p for p in fm.parameters() if p.requires_grad], lr=1e-2)
    base_before = {n: p.detach().clone() for n, p in fm.named_parameters() if not p.requires_grad}
    losses = []
    for _ in range(15):
        loss = fm(input_ids=ids, attention_mask=mask, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < TRAIN_LOSS_RATIO * losses[0], losses
    for n, p in fm.named_parameters():
        if n in base_before:
            assert torch.equal(p, base_before[n]), n


def test_several_adapters_and_generate():
    torch.manual_seed(0)
    base = tiny_llama()
    pristine = copy.deepcopy(base)
    fm = fastpeft.get_peft_model(base, fastpeft.BottleneckConfig(init_weights=False))
    fm.add_adapter("ffn", fastpeft.BottleneckConfig(placement="pfeiffer", init_weights=False, non_linearity="relu"))
    ids, mask, _ = batch()
    with torch.no_grad():
        a = _out(fm, ids, mask)
        fm.set_adapter("ffn")
        b = _out(fm, ids, mask)
    assert max_abs(a, b) >= PROMPT_EFFECT_MIN
    trainable = {n for n, p in fm.named_parameters() if p.requires_grad}
    assert trainable and all(n.endswith((".ffn.weight", ".ffn.bias")) and "mlp.down_proj" in n for n in trainable)
    out = fm.generate(input_ids=ids[:, :5], max_new_tokens=3, do_sample=False, pad_token_id=0, eos_token_id=None)
    seq = ids[:, :5]
    with torch.no_grad():
        for _ in range(3):
            seq = torch.cat([seq, fm(input_ids=seq).logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(out, seq)
    fm.delete_adapter("ffn")
    assert list(fm.peft_config) == ["default"]
    with torch.no_grad():
        assert max_abs(_out(fm, ids, mask), a) == 0.0
    with pytest.raises(ValueError, match="cannot be merged"):
        fm.merge_and_unload()
    plain = fm.unload()
    assert not any(isinstance(m, BottleneckLayer) for m in plain.modules())
    with torch.no_grad():
        assert torch.equal(_out(plain, ids, mask), _out(pristine, ids, mask))


def test_bf16_model_fp32_adapters():
    torch.manual_seed(0)
    fm = fastpeft.get_peft_model(tiny_llama().to(torch.bfloat16), fastpeft.BottleneckConfig(init_weights=False))
    assert {p.dtype for n, p in fm.named_parameters() if ".adapter_" in n} == {torch.float32}
    ids, mask, _ = batch()
    assert fm(input_ids=ids, attention_mask=mask).logits.dtype == torch.bfloat16


def test_bad_input():
    for kw, field in [({"reduction_factor": 0}, "reduction_factor"), ({"reduction_factor": -2}, "reduction_factor"),
                      ({"placement": "parallel"}, "placement"), ({"non_linearity": "softplus"}, "non_linearity"),
                      ({"adapter_dropout": 1.0}, "adapter_dropout")]:
        with pytest.raises(ValueError, match=field):
            fastpeft.BottleneckConfig(**kw)
    with pytest.raises(TypeError, match="target_modules"):
        fastpeft.BottleneckConfig(target_modules=[1, 2])
    base = tiny_llama()
    snapshot = {n: type(m) for n, m in base.named_modules()}
    with pytest.raises(ValueError, match="matched no module"):
        fastpeft.get_peft_model(base, fastpeft.BottleneckConfig(target_modules=["no_such_proj"]))
    with pytest.raises(TypeError, match="Embedding"):
        fastpeft.get_peft_model(base, fastpeft.BottleneckConfig(target_modules=["embed_tokens"]))
    assert {n: type(m) for n, m in base.named_modules()} == snapshot
    plain = nn.Sequential(nn.Linear(4, 4))
    with pytest.raises(ValueError, match="target_modules"):
        fastpeft.get_peft_model(plain, fastpeft.BottleneckConfig())
    fm = fastpeft.get_peft_model(plain, fastpeft.BottleneckConfig(target_modules=["0"], reduction_factor=2))
    assert torch.equal(fm(torch.ones(2, 4)), plain[0].base_layer(torch.ones(2, 4)))
    assert sorted(ACTIVATIONS) == sorted(set(ACTIVATIONS))
