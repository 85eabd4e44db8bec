"""All-or-nothing model changes, wrapping twice, adapter names, disable_adapter flags, target_modules and IA3 merge
warnings: each model-changing method is made to fail part way and the model must be exactly as before."""

import warnings

import pytest
import torch
import torch.nn as nn

from fastpeft import AdaLoraConfig, IA3Config, LoraConfig, PeftModel, get_peft_model
from fastpeft.tuners import lora as lora_mod
from fastpeft.tuners.tuners_utils import BaseTunerLayer


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.q = nn.Linear(8, 8)
        self.k = nn.Linear(8, 8)
        self.v = nn.Linear(8, 8)
        self.head = nn.Linear(8, 4)

    def forward(self, x):
        return self.head(self.v(torch.relu(self.q(x) + self.k(x))))


def lora(**kw):
    kw.setdefault("target_modules", ["q", "k", "v"])
    return LoraConfig(r=2, init_lora_weights=False, **kw)


def make(cfg=None):
    torch.manual_seed(0)
    return get_peft_model(Tiny(), cfg or lora())


def snapshot(model):
    """Everything that must survive a failed change: module tree (names and types), values, flags."""
    mods = [(n, type(m).__name__, m.training) for n, m in model.named_modules()]
    params = {n: (p.detach().clone(), p.requires_grad) for n, p in model.named_parameters()}
    layers = {n: (list(m.merged_adapters), list(m.active_adapters), m.disable_adapters)
              for n, m in model.named_modules() if isinstance(m, BaseTunerLayer)}
    tuner = model.base_model
    return mods, params, layers, sorted(tuner.peft_config), tuner.active_adapter, list(tuner.targeted_module_names)


def assert_same(a, b):
    assert a[0] == b[0], "module tree changed"
    assert sorted(a[1]) == sorted(b[1]), "parameter names changed"
    for n, (t, rg) in a[1].items():
        t2, rg2 = b[1][n]
        torch.testing.assert_close(t2, t, rtol=0, atol=0, equal_nan=True, msg=f"{n} value changed")
        assert rg == rg2, f"{n} requires_grad changed"
    assert a[2:] == b[2:]


class Boom(RuntimeError):
    pass


def fail_on_nth(monkeypatch, cls, name, n):
    """Make cls.name raise on its n-th call (0-based), after the earlier calls did their work."""
    real = getattr(cls, name)
    calls = []

    def flaky(self, *a, **k):
        calls.append(1)
        if len(calls) - 1 == n:
            raise Boom(f"{name} failed")
        return real(self, *a, **k)

    monkeypatch.setattr(cls, name, flaky)
    return calls


@pytest.mark.parametrize("fail_at", [0, 1, 2])
@pytest.mark.parametrize("method", ["merge_adapter", "merge_and_unload"])
def test_merge_layer_raises_midway(monkeypatch, method, fail_at):
    m = make()
    before = snapshot(m)
    fail_on_nth(monkeypatch, lora_mod.LoraLayer, "_merge_one", fail_at)
    with pytest.raises(Boom):
        getattr(m, method)() if method == "merge_and_unload" else m.base_model.merge_adapter()
    monkeypatch.undo()
    assert_same(before, snapshot(m))
    m.merge_and_unload()  # still usable afterwards


@pytest.mark.parametrize("method", ["merge_adapter", "merge_and_unload"])
def test_safe_merge_checks_every_layer_first(monkeypatch, method):
    m = make()
    with torch.no_grad():
        m.base_model.model.v.lora_B["default"].weight[0, 0] = float("nan")  # the last layer is broken
    before = snapshot(m)
    writes = fail_on_nth(monkeypatch, lora_mod.LoraLayer, "_merge_one", -1)  # counts calls, never fails
    with pytest.raises(ValueError) as ei:
        if method == "merge_adapter":
            m.base_model.merge_adapter(safe_merge=True)
        else:
            m.merge_and_unload(safe_merge=True)
    assert writes == [], "a layer was merged before the broken one was found"
    msg = str(ei.value)
    assert "NaNs or infs detected in the merged weights; adapter 'default' seems to be broken" in msg
    assert "[layer 'v'; no layer was merged]" in msg
    assert_same(before, snapshot(m))


def test_safe_merge_ia3_and_adalora():
    torch.manual_seed(0)
    m = get_peft_model(Tiny(), IA3Config(target_modules=["q", "k", "v"], feedforward_modules=["v"]))
    with torch.no_grad():
        m.base_model.model.k.ia3_l["default"][0] = float("inf")
    before = snapshot(m)
    with pytest.raises(ValueError, match=r"NaNs or infs .* \[layer 'k'; no layer was merged\]"):
        m.merge_and_unload(safe_merge=True)
    assert_same(before, snapshot(m))
    torch.manual_seed(0)
    m = get_peft_model(Tiny(), AdaLoraConfig(init_r=2, target_modules=["q", "v"], total_step=10,
                                             init_lora_weights=False))
    with torch.no_grad():
        m.base_model.model.v.lora_E["default"][0] = float("nan")
    before = snapshot(m)
    with pytest.raises(ValueError, match=r"NaNs or infs .* \[layer 'v'; no layer was merged\]"):
        m.base_model.merge_adapter(safe_merge=True)
    assert_same(before, snapshot(m))


def test_ia3_merge_failure_restores_replaced_data(monkeypatch):
    """IA3 replaces weight.data instead of writing in place; a failure after it must restore the old tensors."""
    from fastpeft.tuners import ia3 as ia3_mod

    torch.manual_seed(0)
    m = get_peft_model(Tiny(), IA3Config(target_modules=["q", "k", "v"], feedforward_modules=["v"],
                                         init_ia3_weights=False))
    before = snapshot(m)
    fail_on_nth(monkeypatch, ia3_mod.IA3Layer, "_merge_one", 2)
    with pytest.raises(Boom):
        m.merge_and_unload()
    assert_same(before, snapshot(m))


def test_already_merged_layer_fails_before_any_merge():
    m = make()
    m.base_model.model.v.merge()
    before = snapshot(m)
    with pytest.raises(ValueError, match=r"already merged into this layer"):
        m.base_model.merge_adapter()
    assert_same(before, snapshot(m))


def test_unload_failure(monkeypatch):
    m = make(lora(modules_to_save=["head"]))
    before = snapshot(m)
    from fastpeft.tuners import tuners_utils as base_mod

    real = base_mod.get_submodules
    calls = []

    def flaky(model, key):
        calls.append(key)
        if len(calls) == 3:
            raise Boom("get_submodules failed")
        return real(model, key)

    monkeypatch.setattr(base_mod, "get_submodules", flaky)
    with pytest.raises(Boom):
        m.unload()
    monkeypatch.undo()
    assert_same(before, snapshot(m))
    assert isinstance(m.base_model.model.q, lora_mod.Linear)


@pytest.mark.parametrize("fail_at", [0, 2])
def test_add_adapter_failure(monkeypatch, fail_at):
    m = make()
    before = snapshot(m)
    fail_on_nth(monkeypatch, lora_mod.LoraLayer, "update_layer", fail_at)
    with pytest.raises(Boom):
        m.add_adapter("second", lora())
    monkeypatch.undo()
    assert_same(before, snapshot(m))
    m.add_adapter("second", lora())
    assert "second" in m.peft_config


def test_delete_adapter_failure(monkeypatch):
    m = make()
    m.add_adapter("second", lora())
    before = snapshot(m)
    fail_on_nth(monkeypatch, BaseTunerLayer, "delete_adapter", 1)
    with pytest.raises(Boom):
        m.delete_adapter("second")
    monkeypatch.undo()
    assert_same(before, snapshot(m))
    assert "second" in m.base_model.model.q.lora_A


def test_set_adapter_failure_while_merged(monkeypatch):
    m = make()
    m.add_adapter("second", lora())
    m.base_model.merge_adapter()
    before = snapshot(m)
    fail_on_nth(monkeypatch, BaseTunerLayer, "set_adapter", 2)
    with pytest.raises(Boom), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        m.set_adapter("second")
    monkeypatch.undo()
    assert_same(before, snapshot(m))  # still merged, weights as they were, "default" active


def test_failure_with_keyboard_interrupt(monkeypatch):
    m = make()
    before = snapshot(m)
    real = lora_mod.LoraLayer._merge_one
    calls = []

    def interrupted(self, *a):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(self, *a)

    monkeypatch.setattr(lora_mod.LoraLayer, "_merge_one", interrupted)
    with pytest.raises(KeyboardInterrupt):
        m.merge_and_unload()
    assert_same(before, snapshot(m))


@pytest.mark.parametrize("second", ["lora", "ia3"])
def test_wrapping_twice(second):
    torch.manual_seed(0)
    base = Tiny()
    first = get_peft_model(base, lora())
    with torch.no_grad():
        first.base_model.model.q.lora_B["default"].weight.fill_(0.5)
    before = snapshot(first)
    cfg = lora() if second == "lora" else IA3Config(target_modules=["q"], feedforward_modules=[])
    with pytest.raises(ValueError) as ei:
        get_peft_model(base, cfg)
    msg = str(ei.value)
    assert "already carries fastpeft adapter layers" in msg and "add_adapter" in msg and "unload()" in msg
    assert_same(before, snapshot(first))
    plain = first.unload()
    get_peft_model(plain, cfg)  # after unload() the model can be wrapped again


def test_wrapping_hf_peft_model():
    """A base carrying HF PEFT layers (recognised by class, without importing peft) is refused too."""
    fake_layer = type("BaseTunerLayer", (nn.Module,), {"__module__": "peft.tuners.tuners_utils"})
    fake_lora = type("Linear", (fake_layer,), {"__module__": "peft.tuners.lora.layer"})
    torch.manual_seed(0)
    base = Tiny()
    base.q = fake_lora()
    with pytest.raises(ValueError, match=r"already carries HF PEFT adapter layers \(e.g. 'q': Linear\)"):
        get_peft_model(base, lora(target_modules=["k"]))
    assert type(base.k) is nn.Linear


@pytest.mark.parametrize("name", ["", "  ", "a/b", "../evil", "..", "a\\b"])
def test_bad_adapter_names(name, tmp_path):
    m = make()
    before = snapshot(m)
    with pytest.raises(ValueError, match=r"adapter_name must (be a non-empty str|not contain path separators)"):
        m.add_adapter(name, lora())
    assert_same(before, snapshot(m))


def test_disable_adapter_restores_flags(tmp_path):
    m = make()
    m.save_pretrained(str(tmp_path))
    torch.manual_seed(0)
    frozen = PeftModel.from_pretrained(Tiny(), str(tmp_path))  # inference: nothing trainable
    assert not any(p.requires_grad for p in frozen.parameters())
    with frozen.disable_adapter():
        pass
    assert not any(p.requires_grad for p in frozen.parameters())
    flags = {n: p.requires_grad for n, p in m.named_parameters()}
    m.base_model.model.q.lora_A["default"].weight.requires_grad_(False)  # a user's own choice survives too
    flags["base_model.model.q.lora_A.default.weight"] = False
    x = torch.randn(2, 8)
    with m.disable_adapter():
        y = m(x)
    assert {n: p.requires_grad for n, p in m.named_parameters()} == flags
    torch.testing.assert_close(y, m.base_model.model.head(m.base_model.model.v.base_layer(
        torch.relu(m.base_model.model.q.base_layer(x) + m.base_model.model.k.base_layer(x)))))


def test_unmatched_target_modules_warn():
    torch.manual_seed(0)
    with pytest.warns(UserWarning, match=r"target_modules entries \['v_prj'\] match no module of the model"):
        m = get_peft_model(Tiny(), lora(target_modules=["q", "v_prj"]))
    assert isinstance(m.base_model.model.q, lora_mod.Linear)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        get_peft_model(Tiny(), lora(target_modules=["q", "v"]))
        get_peft_model(Tiny(), lora(target_modules="q|v"))


def test_ia3_zero_scale_merge_warns():
    from fastpeft.modules import IA3Linear

    torch.manual_seed(0)
    m = get_peft_model(Tiny(), IA3Config(target_modules=["q", "v"], feedforward_modules=["v"]))
    with torch.no_grad():
        m.base_model.model.q.ia3_l["default"][1] = 0.0
    with pytest.warns(UserWarning, match=r"ia3_l of adapter 'default' has 1 zero entry: merging sets the matching "
                                         r"base weights to zero for good"):
        m.base_model.merge_adapter()
    layer = IA3Linear(8, 8)
    with torch.no_grad():
        layer.ia3_l[:2] = 0.0
    with pytest.warns(UserWarning, match=r"ia3_l has 2 zero entries: merging sets the matching base weights to zero"):
        layer.merge()
    layer.unmerge()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        IA3Linear(8, 8).merge()  # ones: no warning


@pytest.mark.parametrize("method", ["merge_adapter", "merge_and_unload"])
def test_unknown_adapter_names_in_merge(method):
    m = make()
    before = snapshot(m)
    with pytest.raises(ValueError, match=r"adapter_names \['nope'\] do not exist; available: \['default'\]"):
        getattr(m.base_model, method)(adapter_names=["nope"])
    assert_same(before, snapshot(m))


def test_set_adapter_several_with_modules_to_save_rolls_back():
    m = make(lora(modules_to_save=["head"]))
    m.add_adapter("second", lora(modules_to_save=["head"]))
    before = snapshot(m)
    with pytest.raises(ValueError, match="modules_to_save cannot be used with several active adapters"):
        m.base_model.set_adapter(["default", "second"])
    assert_same(before, snapshot(m))
