"""fastpeft's model API on its own: target matching, bad input, adapters management, extension registries,
dtype handling, generate/attribute forwarding and torch.compile."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
import torch.nn as nn

import fastpeft
from fastpeft.config import PeftConfig, register_config
from fastpeft.tuners.tuners_utils import TUNER_CLASSES, BaseTuner, BaseTunerLayer, register_tuner
from testing_utils import ELEMENTWISE, PEFT_PARITY_RTOL, assert_close_rel


class MLP(nn.Module):
    def __init__(self, d=12, h=20, out=5):
        super().__init__()
        self.emb = nn.Embedding(10, d)
        self.lin0 = nn.Linear(d, h)
        self.act = nn.ReLU()
        self.block = nn.ModuleDict({"lin1": nn.Linear(h, h, bias=False)})
        self.norm = nn.LayerNorm(h)
        self.head = nn.Linear(h, out)

    def forward(self, x):
        h = self.act(self.lin0(x))
        return self.head(self.norm(self.block["lin1"](h)))


def mlp():
    torch.manual_seed(0)
    return MLP()


def randomize_b(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n or "ia3_l" in n:
                p.copy_(torch.randn(p.shape, generator=g))


# -- configs --------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kw, match", [
    (dict(r=0), "r must be a positive int"),
    (dict(r=-2), "r must be a positive int"),
    (dict(r=2.5), "r must be an int"),
    (dict(lora_dropout=1.0), "lora_dropout"),
    (dict(lora_dropout=-0.1), "lora_dropout"),
    (dict(bias="some"), "bias"),
    (dict(target_modules=".*q", layers_to_transform=[0]), "layers_to_transform"),
    (dict(layers_pattern="layers"), "layers_pattern"),
    (dict(init_lora_weights="eva"), "init_lora_weights"),
    (dict(rank_pattern={"q": 0}), "rank_pattern"),
    (dict(use_dora=True, lora_bias=True), "use_dora"),
    (dict(target_modules=[1, 2]), "target_modules"),
])
def test_lora_config_validation(kw, match):
    with pytest.raises((ValueError, TypeError), match=match):
        fastpeft.LoraConfig(**kw)


def test_config_defaults_match_peft():
    peft = pytest.importorskip("peft")
    for name in ("LoraConfig", "IA3Config"):
        ours, theirs = getattr(fastpeft, name)(), getattr(peft, name)()
        d_ours, d_theirs = ours.to_dict(), theirs.to_dict()
        d_theirs.pop("runtime_config", None)
        assert sorted(d_ours) == sorted(d_theirs), name
        for k in d_theirs:
            if k in ("peft_type", "task_type"):
                assert str(d_ours[k]) == str(getattr(d_theirs[k], "value", d_theirs[k]))
            else:
                assert d_ours[k] == d_theirs[k], (name, k)
    a, b = fastpeft.AdaLoraConfig(total_step=3).to_dict(), peft.AdaLoraConfig(total_step=3).to_dict()
    b.pop("runtime_config", None)
    assert sorted(a) == sorted(b)
    assert all(a[k] == b[k] for k in b if k not in ("peft_type", "task_type"))


def test_config_roundtrip_and_registry(tmp_path):
    c = fastpeft.LoraConfig(r=3, target_modules=["b", "a"], task_type="CAUSAL_LM")
    assert c.peft_type == fastpeft.PeftType.LORA and c.task_type == fastpeft.TaskType.CAUSAL_LM
    assert not c.is_prompt_learning
    c.save_pretrained(tmp_path)
    text = (tmp_path / "adapter_config.json").read_text()
    assert '"target_modules": [\n    "a",\n    "b"\n  ]' in text
    c2 = PeftConfig.from_pretrained(str(tmp_path))
    assert isinstance(c2, fastpeft.LoraConfig) and c2.to_dict() == c.to_dict()
    with pytest.raises(ValueError, match="IA3Config"):
        fastpeft.IA3Config.from_dict(c.to_dict())
    with pytest.raises(ValueError, match="task_type"):
        fastpeft.LoraConfig(task_type="NOPE")
    with pytest.raises(ValueError, match="cannot find"):
        PeftConfig.from_pretrained(str(tmp_path / "missing"))


# -- target matching ------------------------------------------------------------------------------------------------


def test_target_matching_rules():
    m = fastpeft.get_peft_model(mlp(), fastpeft.LoraConfig(r=2, target_modules=["lin1", "head"]))
    assert sorted(m.base_model.targeted_module_names) == ["block.lin1", "head"]
    m = fastpeft.get_peft_model(mlp(), fastpeft.LoraConfig(r=2, target_modules=r"lin\d"))  # fullmatch: none
    assert m.base_model.targeted_module_names == ["lin0"]
    m = fastpeft.get_peft_model(mlp(), fastpeft.LoraConfig(r=2, target_modules="all-linear",
                                                           exclude_modules=["head"]))
    assert sorted(m.base_model.targeted_module_names) == ["block.lin1", "lin0"]
    # a modules_to_save module is never targeted
    m = fastpeft.get_peft_model(mlp(), fastpeft.LoraConfig(r=2, target_modules=["lin0", "head"],
                                                           modules_to_save=["head"]))
    assert m.base_model.targeted_module_names == ["lin0"]
    names = dict(m.named_parameters())
    assert names["base_model.model.head.modules_to_save.default.weight"].requires_grad
    assert not names["base_model.model.head.original_module.weight"].requires_grad
    keys = sorted(fastpeft.get_peft_model_state_dict(m))
    assert keys == ["base_model.model.head.bias", "base_model.model.head.weight",
                    "base_model.model.lin0.lora_A.weight", "base_model.model.lin0.lora_B.weight"]


def test_no_match_lists_existing_modules():
    model = mlp()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError) as ei:
        fastpeft.get_peft_model(model, fastpeft.LoraConfig(target_modules=["q_proj"]))
    msg = str(ei.value)
    assert "q_proj" in msg and "lin0" in msg and "head" in msg and "lin1" in msg
    assert sorted(model.state_dict()) == sorted(before)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())


def test_unsupported_module_type():
    with pytest.raises(TypeError, match="'norm' is a LayerNorm"):
        fastpeft.get_peft_model(mlp(), fastpeft.LoraConfig(target_modules=["norm", "lin0"]))
    with pytest.raises(TypeError, match="Embedding"):
        fastpeft.get_peft_model(mlp(), fastpeft.IA3Config(target_modules=["emb"], feedforward_modules=[]))


def test_no_architecture_default():
    with pytest.raises(ValueError, match="target_modules"):
        fastpeft.get_peft_model(mlp(), fastpeft.LoraConfig())


def test_layers_to_transform_plain_module():
    model = nn.Sequential(*[nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4)) for _ in range(3)])
    inner = nn.Module()
    inner.layers = model
    root = nn.Module()
    root.model = inner  # PEFT takes the first numeric segment after at least two names ("model.layers.<i>.")
    m = fastpeft.get_peft_model(root, fastpeft.LoraConfig(r=1, target_modules=["1"], layers_to_transform=[0, 2]))
    assert sorted(m.base_model.targeted_module_names) == ["model.layers.0.1", "model.layers.2.1"]
    peft = pytest.importorskip("peft")
    from peft.tuners.tuners_utils import check_target_module_exists as peft_check

    cfg = peft.LoraConfig(r=1, target_modules=["1"], layers_to_transform=[0, 2])
    ours = fastpeft.LoraConfig(r=1, target_modules=["1"], layers_to_transform=[0, 2])
    from fastpeft.tuners.tuners_utils import check_target_module_exists

    for key in ["model.layers.0.1", "model.layers.1.1", "model.layers.2.1", "layers.0.1", "model.layers.0.0"]:
        assert bool(check_target_module_exists(ours, key)) == bool(peft_check(cfg, key)), key


# -- forward / adapters --------------------------------------------------------------------------------------------


def test_plain_module_task_type_none_and_math():
    model = mlp()
    ref = {k: v.clone() for k, v in model.state_dict().items()}
    m = fastpeft.get_peft_model(model, fastpeft.LoraConfig(r=3, lora_alpha=6, target_modules=["lin0", "lin1"]))
    assert type(m) is fastpeft.PeftModel
    randomize_b(m)
    x = torch.randn(7, 12, dtype=torch.float64).float()
    lin0 = m.base_model.model.lin0
    A, B = lin0.lora_A["default"].weight, lin0.lora_B["default"].weight
    want = x.double() @ ref["lin0.weight"].double().T + ref["lin0.bias"].double() \
        + 2.0 * (x.double() @ A.double().T) @ B.double().T
    assert_close_rel(lin0(x), want, PEFT_PARITY_RTOL, "lin0 vs fp64 math")
    # empty batch and non-contiguous input
    assert m(torch.randn(0, 12)).shape == (0, 5)
    xt = torch.randn(12, 6).T
    assert_close_rel(m(xt), m(xt.contiguous()), PEFT_PARITY_RTOL, "non-contiguous")
    with m.disable_adapter():
        base_out = m(x)
    assert_close_rel(base_out, MLP.forward(mlp(), x), PEFT_PARITY_RTOL, "disabled = base")
    assert not torch.allclose(m(x), base_out)


def test_merge_twice_and_safe_merge():
    m = fastpeft.get_peft_model(mlp(), fastpeft.LoraConfig(r=2, target_modules=["lin0"]))
    randomize_b(m)
    layer = m.base_model.model.lin0
    layer.merge()
    with pytest.raises(ValueError, match="already merged"):
        layer.merge()
    layer.unmerge()
    with pytest.warns(UserWarning, match="unmerged"):
        layer.unmerge()
    w = layer.base_layer.weight.detach().clone()
    with torch.no_grad():
        layer.lora_B["default"].weight[0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        m.base_model.merge_adapter(safe_merge=True)
    assert torch.equal(layer.base_layer.weight, w)
    assert not layer.merged


def test_add_set_delete_adapter():
    m = fastpeft.get_peft_model(mlp(), fastpeft.LoraConfig(r=2, target_modules=["lin0"]))
    m.add_adapter("b", fastpeft.LoraConfig(r=4, target_modules=["lin0", "head"]))
    assert m.active_adapter == "default"
    assert not m.base_model.model.head.lora_A["b"].weight.requires_grad  # added, not active
    m.set_adapter("b")
    assert m.active_adapter == "b" and m.active_adapters == ["b"]
    assert m.base_model.model.head.lora_A["b"].weight.requires_grad
    assert not m.base_model.model.lin0.lora_A["default"].weight.requires_grad
    with pytest.raises(ValueError, match="not found"):
        m.set_adapter("nope")
    with pytest.raises(ValueError, match="same peft_type|cannot add"):
        m.add_adapter("c", fastpeft.IA3Config(target_modules=["lin0"], feedforward_modules=[]))
    with pytest.raises(ValueError, match="already exists"):
        m.add_adapter("b", fastpeft.LoraConfig(r=4, target_modules=["lin0"]))
    with pytest.raises(ValueError, match="adapter_name"):
        m.add_adapter("a.b", fastpeft.LoraConfig(r=4, target_modules=["lin0"]))
    m.delete_adapter("b")
    assert list(m.peft_config) == ["default"] and m.active_adapter == "default"
    assert "b" not in m.base_model.model.lin0.lora_A
    with pytest.raises(ValueError, match="does not exist"):
        m.delete_adapter("b")


def test_only_one_bias_adapter():
    m = fastpeft.get_peft_model(mlp(), fastpeft.LoraConfig(r=2, target_modules=["lin0"], bias="all"))
    with pytest.raises(ValueError, match="bias"):
        m.add_adapter("b", fastpeft.LoraConfig(r=2, target_modules=["lin0"], bias="lora_only"))


@pytest.mark.parametrize("autocast, want", [(True, torch.float32), (False, torch.bfloat16)])
def test_adapter_dtype_upcast(autocast, want):
    model = mlp().to(torch.bfloat16)
    m = fastpeft.get_peft_model(model, fastpeft.LoraConfig(r=2, target_modules=["lin0", "lin1"]),
                                autocast_adapter_dtype=autocast)
    assert m.base_model.model.lin0.lora_A["default"].weight.dtype == want
    randomize_b(m)
    x = torch.randn(3, 12, dtype=torch.bfloat16)
    y = m(x)
    assert y.dtype == torch.bfloat16
    y.float().sum().backward()
    assert m.base_model.model.lin0.lora_A["default"].weight.grad.dtype == want


def test_adapter_dtype_upcast_matches_peft():
    peft = pytest.importorskip("peft")
    base = mlp().to(torch.bfloat16)
    import copy

    torch.manual_seed(1)
    p = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=2, target_modules=["lin0", "lin1"]))
    torch.manual_seed(1)
    f = fastpeft.get_peft_model(copy.deepcopy(base), fastpeft.LoraConfig(r=2, target_modules=["lin0", "lin1"]))
    sp, sf = dict(p.named_parameters()), dict(f.named_parameters())
    with torch.no_grad():
        for k in sp:
            assert sp[k].dtype == sf[k].dtype, k
            if "lora_B" in k:
                sp[k].normal_()
                sf[k].copy_(sp[k])
    x = torch.randn(4, 12).to(torch.bfloat16)
    # bf16 base output + fp32 adapter branch, cast back: equal to PEFT up to bf16 rounding of the sum
    assert_close_rel(f(x).float(), p(x).float(), ELEMENTWISE[torch.bfloat16][1], "bf16 base, fp32 adapter")


def test_ia3_plain_module_modes():
    m = fastpeft.get_peft_model(mlp(), fastpeft.IA3Config(target_modules=["lin0", "head"],
                                                          feedforward_modules=["head"]))
    randomize_b(m)
    lin0, head = m.base_model.model.lin0, m.base_model.model.head
    assert tuple(lin0.ia3_l["default"].shape) == (20, 1) and tuple(head.ia3_l["default"].shape) == (1, 20)
    x = torch.randn(5, 12)
    h = torch.relu((x @ lin0.base_layer.weight.T + lin0.base_layer.bias) * lin0.ia3_l["default"].view(-1))
    h = m.base_model.model.norm(m.base_model.model.block["lin1"](h))
    want = (h * head.ia3_l["default"].view(-1)) @ head.base_layer.weight.T + head.base_layer.bias
    assert_close_rel(m(x), want, PEFT_PARITY_RTOL, "ia3")


# -- forwarding, generate, compile ---------------------------------------------------------------------------------


def test_getattr_and_generate_forwarding():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                                   num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=32,
                                   pad_token_id=0, bos_token_id=1, eos_token_id=2)
    base = transformers.LlamaForCausalLM(cfg).eval()
    ids = torch.tensor([[5, 6, 7]])
    ref = base.generate(ids, max_new_tokens=4, do_sample=False)
    m = fastpeft.get_peft_model(base, fastpeft.LoraConfig(r=2, task_type="CAUSAL_LM"))
    assert m.config is base.config  # forwarded to the user model
    out = m.generate(input_ids=ids, max_new_tokens=4, do_sample=False)  # B = 0: same tokens
    assert torch.equal(out, ref)
    randomize_b(m, seed=3)
    with m.disable_adapter():
        assert torch.equal(m.generate(input_ids=ids, max_new_tokens=4, do_sample=False), ref)


def test_torch_compile_matches_eager():
    m = fastpeft.get_peft_model(mlp(), fastpeft.LoraConfig(r=3, target_modules=["lin0", "lin1", "head"]))
    randomize_b(m)
    m.eval()
    x = torch.randn(6, 12)
    eager = m(x)
    torch._dynamo.reset()
    compiled = torch.compile(m, fullgraph=True)  # no graph break in the tuner layers (HF PEFT has them)
    out = compiled(x)
    assert_close_rel(out, eager, PEFT_PARITY_RTOL, "compiled vs eager")
    # gradients through the compiled model
    m.train()
    out = compiled(x)
    out.square().sum().backward()
    g_c = {n: p.grad.clone() for n, p in m.named_parameters() if p.requires_grad}
    m.zero_grad()
    m(x).square().sum().backward()
    for n, p in m.named_parameters():
        if p.requires_grad:
            assert_close_rel(g_c[n], p.grad, PEFT_PARITY_RTOL, f"compiled grad {n}")


@pytest.mark.parametrize("cfg", [
    lambda: fastpeft.IA3Config(target_modules=["lin0", "head"], feedforward_modules=["head"]),
    lambda: fastpeft.AdaLoraConfig(target_modules=["lin0", "head"], total_step=4, init_lora_weights=False),
    lambda: fastpeft.LoraConfig(r=2, target_modules=["lin0", "lin1"], lora_dropout=0.2),
], ids=["ia3", "adalora", "lora-dropout"])
def test_dynamo_traces_without_graph_breaks(cfg):
    # backend="eager": dynamo capture only (fullgraph=True fails on any graph break); cheap on CPU.  The reset keeps
    # earlier compiles of the same layer code (other scaling/dropout values) from making those floats dynamic.
    torch._dynamo.reset()
    m = fastpeft.get_peft_model(mlp(), cfg())
    randomize_b(m)
    m.eval()
    x = torch.randn(4, 12)
    out = torch.compile(m, fullgraph=True, backend="eager")(x)
    assert_close_rel(out, m(x), PEFT_PARITY_RTOL, "traced vs eager")
    m.train()
    torch.compile(m, fullgraph=True, backend="eager")(x).sum().backward()
    assert all(p.grad is not None for p in m.parameters() if p.requires_grad)


# -- extension points ---------------------------------------------------------------------------------------------


@register_config("TEST_SCALE")
@dataclasses.dataclass
class _ScaleConfig(PeftConfig):
    target_modules: object = None
    init_value: float = 1.0


class _ScaleLayer(BaseTunerLayer):
    adapter_layer_names = ("scale_s",)

    def __init__(self, base, name, value):
        super().__init__(base)
        self.scale_s = nn.ParameterDict({name: nn.Parameter(torch.full((1,), value))})
        self._active_adapter = [name]

    def forward(self, x):
        y = self.base_layer(x)
        if self._disable_adapters:
            return y
        for a in self._present_active():
            y = y * self.scale_s[a]
        return y


@register_tuner("TEST_SCALE")
class _ScaleTuner(BaseTuner):
    prefix = "scale_"
    layer_cls = _ScaleLayer

    def _create_and_replace(self, config, adapter_name, target, target_name, parent, current_key):
        setattr(parent, target_name, _ScaleLayer(target, adapter_name, config.init_value))

    def forward(self, *args, extra=None, **kwargs):
        out = self.model(*args, **kwargs)
        return out if extra is None else out + extra


def test_registries_allow_new_methods(tmp_path):
    assert TUNER_CLASSES["TEST_SCALE"] is _ScaleTuner
    m = fastpeft.get_peft_model(mlp(), _ScaleConfig(target_modules=["head"], init_value=2.0))
    x = torch.randn(2, 12)
    with m.disable_adapter():
        base = m(x)
    assert_close_rel(m(x), 2 * base, PEFT_PARITY_RTOL, "custom tuner")
    assert_close_rel(m(x, extra=1.0), 2 * base + 1, PEFT_PARITY_RTOL, "kwargs reach the tuner")
    assert [n for n, p in m.named_parameters() if p.requires_grad] == ["base_model.model.head.scale_s.default"]
    m.save_pretrained(tmp_path)
    m2 = fastpeft.PeftModel.from_pretrained(mlp(), str(tmp_path))
    assert isinstance(m2.peft_config["default"], _ScaleConfig)
    assert_close_rel(m2(x), m(x), PEFT_PARITY_RTOL, "custom tuner reloaded")


def test_inference_mode_config_freezes_adapter():
    m = fastpeft.get_peft_model(mlp(), fastpeft.LoraConfig(r=2, target_modules=["lin0"], inference_mode=True,
                                                           modules_to_save=["head"]))
    assert not any(p.requires_grad for p in m.parameters())
    t, a = m.get_nb_trainable_parameters()
    assert t == 0 and a == sum(p.numel() for p in m.parameters())
    m.set_adapter("default")  # explicitly activating for training makes it trainable again
    assert sorted(n for n, p in m.named_parameters() if p.requires_grad) == [
        "base_model.model.head.modules_to_save.default.bias", "base_model.model.head.modules_to_save.default.weight",
        "base_model.model.lin0.lora_A.default.weight", "base_model.model.lin0.lora_B.default.weight"]


def test_conv1d_functional_path_uses_transposed_view():
    pytest.importorskip("transformers")
    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(0)
    model = nn.Sequential(Conv1D(7, 5))  # (in=5, out=7), weight stored (5, 7)
    with pytest.warns(UserWarning, match="fan_in_fan_out"):
        m = fastpeft.get_peft_model(model, fastpeft.LoraConfig(r=2, target_modules=["0"]))
    randomize_b(m)
    layer = m.base_model.model[0]
    x = torch.randn(3, 4, 5)
    A, B = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    want = layer.base_layer(x) + (x @ A.T) @ B.T * layer.scaling["default"]
    assert_close_rel(m(x), want, PEFT_PARITY_RTOL, "Conv1D LoRA")
    delta = layer.get_delta_weight("default")
    assert tuple(delta.shape) == (5, 7)  # merged in Conv1D's (in, out) layout
    with torch.no_grad():
        layer.merge()
        assert_close_rel(m(x), want, PEFT_PARITY_RTOL, "Conv1D merged")


def test_linear_subclass_keeps_its_own_forward():
    class HookedLinear(nn.Linear):
        def forward(self, x):
            return super().forward(x) * 2.0

    torch.manual_seed(0)
    model = nn.Sequential(HookedLinear(6, 4))
    m = fastpeft.get_peft_model(model, fastpeft.LoraConfig(r=2, target_modules=["0"]))
    randomize_b(m)
    layer = m.base_model.model[0]
    x = torch.randn(3, 6)
    A, B = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    want = 2.0 * (x @ layer.base_layer.weight.T + layer.base_layer.bias) + (x @ A.T) @ B.T * layer.scaling["default"]
    assert_close_rel(m(x), want, PEFT_PARITY_RTOL, "subclass forward kept")


@pytest.mark.parametrize("method", ["lora", "adalora", "ia3"])
def test_forward_hook_added_to_base_layer_after_injection_runs(method):
    """A hook registered on a tuner layer's base_layer after get_peft_model (what accelerate's offloading does) runs,
    and its effect reaches the output: the fused path, which computes the base matmul itself, must step aside."""
    torch.manual_seed(0)
    cfg = {"lora": fastpeft.LoraConfig(target_modules=["lin0"], r=2, init_lora_weights=False),
           "adalora": fastpeft.AdaLoraConfig(target_modules=["lin0"], init_r=2, total_step=4,
                                             init_lora_weights=False),
           "ia3": fastpeft.IA3Config(target_modules=["lin0"], feedforward_modules=[], init_ia3_weights=False)}[method]
    m = fastpeft.get_peft_model(mlp(), cfg)
    layer = m.base_model.model.lin0
    x = torch.randn(3, layer.base_layer.in_features)
    with torch.no_grad():
        plain = layer(x)
    calls = []

    def hook(module, args, out):
        calls.append(module)
        return out + 1.0

    handle = layer.base_layer.register_forward_hook(hook)
    try:
        with torch.no_grad():
            hooked = layer(x)
    finally:
        handle.remove()
    assert calls == [layer.base_layer]
    # LoRA / AdaLoRA add the adapter to the hooked base output; IA3 (output mode) scales it by l
    shift = layer.ia3_l["default"].reshape(-1) if method == "ia3" else 1.0
    torch.testing.assert_close(hooked, plain + shift, rtol=1e-5, atol=1e-5)


def test_default_target_modules_are_peft_tables():
    """``target_modules=None`` picks HF PEFT's per-model-type defaults: every entry of PEFT's LoRA, AdaLoRA and IA3
    tables (target and feed-forward) is in fastpeft's with the same value (fastpeft's AdaLoRA table also has
    mistral), and a model type added from them (GPT-Neo) targets the modules PEFT targets."""
    peft = pytest.importorskip("peft")
    import transformers
    import peft.utils.constants as C

    from fastpeft.tuners.adalora.model import ADALORA_TARGET_MODULE_DEFAULTS
    from fastpeft.tuners.ia3.model import IA3_FEEDFORWARD_MODULE_DEFAULTS, IA3_TARGET_MODULE_DEFAULTS
    from fastpeft.tuners.lora.model import LORA_TARGET_MODULE_DEFAULTS

    for theirs, ours in ((C.TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING, LORA_TARGET_MODULE_DEFAULTS),
                         (C.TRANSFORMERS_MODELS_TO_ADALORA_TARGET_MODULES_MAPPING, ADALORA_TARGET_MODULE_DEFAULTS),
                         (C.TRANSFORMERS_MODELS_TO_IA3_TARGET_MODULES_MAPPING, IA3_TARGET_MODULE_DEFAULTS),
                         (C.TRANSFORMERS_MODELS_TO_IA3_FEEDFORWARD_MODULES_MAPPING, IA3_FEEDFORWARD_MODULE_DEFAULTS)):
        for model_type, value in theirs.items():
            assert ours.get(model_type) == value, model_type
    torch.manual_seed(0)
    base = transformers.GPTNeoForCausalLM(transformers.GPTNeoConfig(
        vocab_size=64, hidden_size=16, num_layers=2, num_heads=2, attention_types=[[["global"], 2]],
        max_position_embeddings=32))
    p = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=2))
    f = fastpeft.get_peft_model(copy.deepcopy(base), fastpeft.LoraConfig(r=2))
    assert sorted(f.base_model.targeted_module_names) == sorted(p.base_model.targeted_module_names)
    assert any(n.endswith("q_proj") for n in f.base_model.targeted_module_names)


def test_fused_base_operands_hands_over_the_weight_or_says_why_not():
    """The one check the adapter layers make per call (``fastpeft.utils.fused.fused_base_operands``): the base's
    weight as (out, in) - a transposed view for Conv1D - and bias when the fused op can stand in for the base layer's
    forward; otherwise the reason, the same one ``base_layer_reason`` / ``input_reason`` give."""
    from transformers.pytorch_utils import Conv1D

    from fastpeft.utils.fused import base_layer_reason, fused_base_operands, input_reason
    lin = nn.Linear(6, 4)
    x = torch.randn(3, 6)
    w, b = fused_base_operands(lin, x, (), {"adapter_names": None})
    assert w is lin.weight and b is lin.bias
    conv = Conv1D(4, 6)   # weight (in, out) = (6, 4)
    w, b = fused_base_operands(conv, x, (), {})
    assert w.shape == (4, 6) and w.data_ptr() == conv.weight.data_ptr() and b is conv.bias

    class Sub(nn.Linear):
        pass
    hooked = nn.Linear(6, 4)
    handle = hooked.register_forward_pre_hook(lambda m, a: None)
    cases = [(Sub(6, 4), x, (), {}, "is not a plain nn.Linear"),
             (hooked, x, (), {}, "forward hooks"),
             (nn.Linear(6, 4, device="meta"), x.to("meta"), (), {}, "meta device"),
             (lin, x, (1,), {}, "extra positional"),
             (lin, x, (), {"adapter_names": ["a"]}, "extra forward keyword arguments ['adapter_names']"),
             (lin, x.long(), (), {}, "not a floating-point tensor"),
             (lin, x.double(), (), {}, "input dtype torch.float64 differs"),
             (lin, torch.randn(3, 5), (), {}, "input has 5 features, the layer expects 6")]
    for base, xi, args, kwargs, why in cases:
        got = fused_base_operands(base, xi, args, kwargs)
        assert isinstance(got, str) and why in got, (why, got)
        assert got == (base_layer_reason(base) or input_reason(base, xi, args, kwargs))
    handle.remove()
    assert not isinstance(fused_base_operands(hooked, x, (), {}), str)
    # under autocast a 16-bit input may meet an fp32 base (autocast casts both operands of the fused op)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not isinstance(fused_base_operands(lin, x.bfloat16(), (), {}), str)
