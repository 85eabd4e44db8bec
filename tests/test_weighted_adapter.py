"""``add_weighted_adapter`` (LoRA: every combination type; IA3) against HF PEFT 0.21.2 under the same RNG state:
the new adapter's factors bit for bit, on Linear, Conv1D (GPT-2), Embedding and Conv2d layers; the merge rules
against their definitions; refusals with clear errors that leave the model as it was."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

import fastpeft  # noqa: E402
from fastpeft.utils import merge_utils as M  # noqa: E402
from testing_utils import STACK_IDS as IDS, stack_tiny_gpt2 as tiny_gpt2, stack_tiny_llama as tiny_llama  # noqa: E402

TYPES = ["svd", "linear", "cat", "ties", "ties_svd", "dare_ties", "dare_linear", "dare_ties_svd", "dare_linear_svd",
         "magnitude_prune", "magnitude_prune_svd"]


def _pair(make_base, configs: dict, config: str = "LoraConfig", prefix: str = "lora_", seed: int = 11):
    """The same adapters (`config` classes of each library built from `configs`: name -> keyword arguments; random
    values, set identically) in a PEFT and a fastpeft model."""
    models = []
    for lib in (peft, fastpeft):
        names = list(configs)
        m = lib.get_peft_model(make_base(), getattr(lib, config)(**configs[names[0]]), adapter_name=names[0])
        for n in names[1:]:
            m.add_adapter(n, getattr(lib, config)(**configs[n]))
        models.append(m)
    p, f = models
    g = torch.Generator().manual_seed(seed)
    fsd = dict(f.named_parameters())
    with torch.no_grad():
        for n, q in p.named_parameters():
            if prefix in n:
                q.copy_(torch.randn(q.shape, generator=g))
                fsd[n].copy_(q)
    return p, f


def _adapter_tensors(model, name):
    return {k: v for k, v in model.state_dict().items() if f".{name}." in f".{k}." or k.endswith(f".{name}")}


def _assert_same_new_adapter(p, f, name):
    ps, fs = _adapter_tensors(p, name), _adapter_tensors(f, name)
    assert ps and sorted(ps) == sorted(fs)
    for k in ps:
        assert fs[k].dtype == ps[k].dtype and torch.equal(fs[k], ps[k]), k
    pc, fc = p.peft_config[name], f.peft_config[name]
    assert (fc.r, fc.lora_alpha, fc.target_modules) == (pc.r, pc.lora_alpha, pc.target_modules)


LLAMA = {"t1": dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
         "t2": dict(r=4, lora_alpha=16, target_modules=["v_proj", "o_proj"]),
         "t3": dict(r=4, lora_alpha=4, target_modules=["q_proj", "v_proj"], use_rslora=True)}


@pytest.mark.parametrize("ctype", TYPES)
def test_lora_combination_types_match_peft(ctype):
    p, f = _pair(tiny_llama, LLAMA)
    kw = dict(adapters=["t1", "t2", "t3"], weights=[0.7, -0.4, 1.3], adapter_name="mix", combination_type=ctype)
    if any(t in ctype for t in ("ties", "dare", "magnitude")):
        kw["density"] = 0.5
    for m in (p, f):
        torch.manual_seed(3)   # the dare rules draw their masks from torch's default generator
        m.add_weighted_adapter(**kw)
    _assert_same_new_adapter(p, f, "mix")
    assert not any(q.requires_grad for n, q in f.named_parameters() if ".mix." in n)
    assert f.active_adapter == "t1"
    for m in (p, f):
        m.set_adapter("mix")
        m.eval()
    with torch.no_grad():
        assert torch.equal(f(input_ids=IDS).logits, p(input_ids=IDS).logits)


def test_cat_is_the_exact_weighted_sum_and_svd_its_best_approximation():
    p, f = _pair(tiny_llama, LLAMA)
    f.add_weighted_adapter(["t1", "t3"], [0.5, 2.0], "cat", combination_type="cat")
    f.add_weighted_adapter(["t1", "t3"], [0.5, 2.0], "svd8", combination_type="svd", svd_rank=8)
    layer = f.base_model.model.model.layers[0].self_attn.q_proj
    want = 0.5 * layer.get_delta_weight("t1") + 2.0 * layer.get_delta_weight("t3")
    assert layer.r["cat"] == 8 and layer.scaling["cat"] == 1.0
    torch.testing.assert_close(layer.get_delta_weight("cat"), want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(layer.get_delta_weight("svd8"), want, rtol=1e-4, atol=1e-5)   # rank 8 >= rank(want)


@pytest.mark.parametrize("ctype", ["svd", "cat", "ties", "dare_linear"])
def test_gpt2_conv1d_and_embedding_layers_match_peft(ctype):
    cfgs = {"t1": dict(r=2, lora_alpha=4, target_modules=["c_attn", "wte"]),
            "t2": dict(r=2, lora_alpha=2, target_modules=["c_attn", "c_proj", "wte"])}
    p, f = _pair(tiny_gpt2, cfgs)
    kw = dict(density=0.5) if ctype in ("ties", "dare_linear") else {}
    for m in (p, f):
        torch.manual_seed(5)
        m.add_weighted_adapter(["t1", "t2"], [1.0, 0.5], "mix", combination_type=ctype, **kw)
    _assert_same_new_adapter(p, f, "mix")


class _Convs(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.c3 = nn.Conv2d(3, 6, 3, padding=1)
        self.c1 = nn.Conv2d(6, 4, 1)

    def forward(self, x):
        return self.c1(torch.relu(self.c3(x)))


@pytest.mark.parametrize("ctype", ["svd", "cat", "linear", "magnitude_prune_svd"])
def test_conv2d_layers_match_peft(ctype):
    cfgs = {"t1": dict(r=2, lora_alpha=2, target_modules=["c3", "c1"]),
            "t2": dict(r=2, lora_alpha=4, target_modules=["c3", "c1"])}
    p, f = _pair(_Convs, cfgs)
    kw = dict(density=0.4) if "prune" in ctype else {}
    for m in (p, f):
        m.add_weighted_adapter(["t1", "t2"], [0.3, 0.9], "mix", combination_type=ctype, **kw)
    _assert_same_new_adapter(p, f, "mix")


def test_ia3_weighted_adapter_matches_peft():
    p, f = _pair(tiny_llama, {"t1": dict(target_modules=["k_proj", "down_proj"], feedforward_modules=["down_proj"]),
                              "t2": dict(target_modules=["v_proj", "down_proj"], feedforward_modules=["down_proj"])},
                 config="IA3Config", prefix="ia3_l", seed=1)
    for m in (p, f):
        m.add_weighted_adapter(["t1", "t2"], [0.25, 2.0], "mix")
    ps, fs = _adapter_tensors(p, "mix"), _adapter_tensors(f, "mix")
    assert ps and sorted(ps) == sorted(fs) and all(torch.equal(ps[k], fs[k]) for k in ps)
    pc, fc = p.peft_config["mix"], f.peft_config["mix"]
    assert (fc.target_modules, fc.feedforward_modules) == (pc.target_modules, pc.feedforward_modules)
    with pytest.raises(ValueError, match="one per adapter"):
        f.add_weighted_adapter(["t1", "t2"], [1.0], "x")


def test_refusals_leave_the_model_unchanged():
    _, f = _pair(tiny_llama, {**LLAMA, "r8": dict(r=8, lora_alpha=8, target_modules=["q_proj"])})
    before = copy.deepcopy(f.state_dict())
    cfg_names = sorted(f.peft_config)
    cases = [(dict(adapters=["t1", "zz"], weights=[1, 1]), "Adapter zz does not exist"),
             (dict(adapters=["t1", "t2"], weights=[1.0]), "one number per adapter"),
             (dict(adapters=["t1", "t2"], weights=[1.0, float("nan")]), "finite"),
             (dict(adapters=["t1", "t2"], weights=[1, 1], combination_type="avg"), "Invalid combination_type"),
             (dict(adapters=["t1", "t2"], weights=[1, 1], combination_type="ties"), "needs density"),
             (dict(adapters=["t1", "r8"], weights=[1, 1], combination_type="linear"), "same r value"),
             (dict(adapters=["t1", "t2"], weights=[1, 1], combination_type="ties", density=0.5,
                   majority_sign_method="median"), "majority_sign_method"),
             (dict(adapters=["t1", "t2"], weights=[1, 1], svd_rank=0), "svd_rank")]
    for kw, why in cases:
        with pytest.raises(ValueError, match=why):
            f.add_weighted_adapter(adapter_name="new", **kw)
        assert sorted(f.peft_config) == cfg_names
        after = f.state_dict()
        assert sorted(after) == sorted(before) and all(torch.equal(after[k], before[k]) for k in before)
    # a failure half way (inside the SVD) rolls the injected adapter back
    import fastpeft.tuners.lora.weighted as W
    orig = W._svd_factors
    calls = []

    def boom(*a, **k):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("boom")
        return orig(*a, **k)
    W._svd_factors = boom
    try:
        with pytest.raises(RuntimeError, match="boom"):
            f.add_weighted_adapter(["t1", "t2"], [1, 1], "new")
    finally:
        W._svd_factors = orig
    assert sorted(f.peft_config) == cfg_names and sorted(f.state_dict()) == sorted(before)
    with pytest.warns(UserWarning, match="exists already"):
        f.add_weighted_adapter(["t1", "t2"], [1, 1], "t1")
    dora = fastpeft.get_peft_model(tiny_llama(), fastpeft.LoraConfig(r=2, target_modules=["q_proj"], use_dora=True))
    dora.add_adapter("t2", fastpeft.LoraConfig(r=2, target_modules=["q_proj"]))
    with pytest.raises(ValueError, match="DoRA"):
        dora.add_weighted_adapter(["default", "t2"], [1, 1], "mix")
    ada = fastpeft.get_peft_model(tiny_llama(), fastpeft.AdaLoraConfig(target_modules=["q_proj"], total_step=4))
    with pytest.raises(TypeError, match="does not support add_weighted_adapter"):
        ada.add_weighted_adapter(["default"], [1.0], "mix")


def test_merge_rules_by_their_definitions():
    g = torch.Generator().manual_seed(0)
    ts = [torch.randn(5, 7, generator=g) for _ in range(3)]
    w = torch.tensor([0.5, -1.0, 2.0])
    torch.testing.assert_close(M.task_arithmetic(ts, w), sum(wi * t for wi, t in zip(w, ts)))
    # magnitude pruning keeps the int(density * numel) largest magnitudes
    kept = M.prune(ts[0], 0.4, "magnitude")
    k = int(0.4 * ts[0].numel())
    assert int((kept != 0).sum()) == k and kept.abs().min() == 0
    assert torch.equal(kept[kept != 0].abs().sort().values, ts[0].abs().flatten().sort().values[-k:])
    # ties with density 1: mean of the weighted tensors that agree with the sign of the sum, per element
    with pytest.warns(UserWarning, match="no pruning"):
        got = M.ties(ts, w, 1.0, "total")
    st = torch.stack(ts)
    elected = torch.where(st.sum(0) >= 0, 1.0, -1.0)
    agree = st.sign() == elected
    want = (st * w.view(3, 1, 1) * agree).sum(0) / agree.sum(0).clamp(min=1)
    torch.testing.assert_close(got, want)
    # dare: kept values rescaled by 1 / density, the rest zero
    torch.manual_seed(0)
    d = M.prune(ts[0], 0.25, "random", rescale=True)
    nz = d != 0
    torch.testing.assert_close(d[nz], ts[0][nz] / 0.25)
    with pytest.raises(ValueError, match="density"):
        M.ties(ts, w, None)


def test_a_pissa_first_adapter_leaves_the_base_weights_alone():
    """PiSSA rewrote the base weights when its adapter was made; combining adapters must not run it again (HF PEFT's
    copy of the first config does, changing W of every targeted layer)."""
    f = fastpeft.get_peft_model(tiny_llama(), fastpeft.LoraConfig(r=2, target_modules=["q_proj"],
                                                                  init_lora_weights="pissa"), adapter_name="t1")
    f.add_adapter("t2", fastpeft.LoraConfig(r=2, target_modules=["q_proj"]))
    w = f.base_model.model.model.layers[0].self_attn.q_proj.base_layer.weight.detach().clone()
    f.add_weighted_adapter(["t1", "t2"], [1.0, 1.0], "mix", combination_type="cat")
    assert torch.equal(f.base_model.model.model.layers[0].self_attn.q_proj.base_layer.weight, w)
    assert f.peft_config["mix"].init_lora_weights is True
