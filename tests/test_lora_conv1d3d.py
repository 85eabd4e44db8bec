"""LoRA on ``nn.Conv1d`` and ``nn.Conv3d`` against HF PEFT 0.21.2 in fp32 (the Conv2d cases are
``tests/test_lora_conv2d.py``): an audio-style 1-D stack and a video-style 3-D stack with kernel sizes 1/3, stride,
padding (incl. "same") and groups - outputs and every gradient in training (dropout) and eval, merged kernels, files
both ways, DoRA on both, and the refusals (DoRA on a grouped conv, dilation, a rank not divisible by groups, merging a
grouped conv)."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn as nn

peft = pytest.importorskip("peft")

import fastpeft  # noqa: E402
from testing_utils import (PEFT_PARITY_RTOL, assert_close_rel, merged_state,  # noqa: E402
                           randomize_trainable, run_module_parity, wrap_pair)


class Net1d(nn.Module):
    """Conv1d front end: 5-tap conv, strided 3-tap, grouped 3-tap, 1x1 projection, "same" 7-tap, linear head."""

    def __init__(self):
        super().__init__()
        self.conv_in = nn.Conv1d(4, 8, 5, padding=2)
        self.down = nn.Conv1d(8, 12, 3, stride=2, padding=1)
        self.grouped = nn.Conv1d(12, 12, 3, padding=1, groups=2, bias=False)
        self.proj = nn.Conv1d(12, 16, 1)
        self.same = nn.Conv1d(16, 8, 7, padding="same")
        self.head = nn.Linear(8, 5)

    def forward(self, x):
        for m in (self.conv_in, self.down, self.grouped, self.proj):
            x = torch.nn.functional.silu(m(x))
        return self.head(self.same(x).mean(dim=2))


class Net3d(nn.Module):
    """Conv3d block: 3x3x3 conv, strided, grouped, (1, 1, 1) and (1, 1, 3) projections, linear head."""

    def __init__(self):
        super().__init__()
        self.conv_in = nn.Conv3d(3, 8, 3, padding=1)
        self.down = nn.Conv3d(8, 12, 3, stride=(1, 2, 2), padding=1)
        self.grouped = nn.Conv3d(12, 12, 3, padding=1, groups=2, bias=False)
        self.proj = nn.Conv3d(12, 16, 1)
        self.temporal = nn.Conv3d(16, 8, (3, 1, 1), padding=(1, 0, 0))
        self.head = nn.Linear(8, 5)

    def forward(self, x):
        for m in (self.conv_in, self.down, self.grouped, self.proj):
            x = torch.nn.functional.silu(m(x))
        return self.head(self.temporal(x).mean(dim=(2, 3, 4)))


def make(kind):
    torch.manual_seed(0)
    return Net1d() if kind == "1d" else Net3d()


def inputs_for(kind, seed=11):
    g = torch.Generator().manual_seed(seed)
    shape = (2, 4, 20) if kind == "1d" else (2, 3, 4, 6, 6)
    return torch.randn(*shape, generator=g)


ALL = {"1d": ["conv_in", "down", "grouped", "proj", "same", "head"],
       "3d": ["conv_in", "down", "grouped", "proj", "temporal", "head"]}


def both(**kw):
    return peft.LoraConfig(**kw), fastpeft.LoraConfig(**kw)


@pytest.mark.parametrize("use_dora", [False, True], ids=["lora", "dora"])
@pytest.mark.parametrize("kind", ["1d", "3d"])
def test_parity_train_eval_and_files(kind, use_dora, tmp_path):
    """Same layer classes' names as PEFT's (lora.Conv1d / Conv3d), initial values (DoRA's magnitude too), outputs
    and every gradient (with dropout in training), and saved tensors loaded both ways."""
    targets = [t for t in ALL[kind] if not (use_dora and t == "grouped")]  # PEFT's DoRA cannot take a grouped conv
    p, f = wrap_pair(make(kind), *both(r=4, lora_alpha=8, target_modules=targets, lora_dropout=0.1,
                                       use_dora=use_dora))
    conv = type(f.base_model.model.down).__name__
    assert conv == ("Conv1d" if kind == "1d" else "Conv3d") == type(p.base_model.model.down).__name__
    randomize_trainable(p, f)
    x = inputs_for(kind)
    run_module_parity(p, f, x, train=True)
    run_module_parity(p, f, x, train=False)
    p.save_pretrained(tmp_path / "p")
    f.save_pretrained(tmp_path / "f")
    from safetensors.torch import load_file
    a = load_file(tmp_path / "f" / "adapter_model.safetensors")
    b = load_file(tmp_path / "p" / "adapter_model.safetensors")
    assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)
    if use_dora:
        assert a["base_model.model.down.lora_magnitude_vector"].shape == (1, 12) + (1,) * (1 if kind == "1d" else 3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        f2 = fastpeft.PeftModel.from_pretrained(make(kind), str(tmp_path / "p"))
        p2 = peft.PeftModel.from_pretrained(make(kind), str(tmp_path / "f"))
    with torch.no_grad():
        ref = p(x)
        assert_close_rel(f2(x), ref, PEFT_PARITY_RTOL, "PEFT file in fastpeft")
        assert_close_rel(p2(x), ref, PEFT_PARITY_RTOL, "fastpeft file in PEFT")


@pytest.mark.parametrize("use_dora", [False, True], ids=["lora", "dora"])
@pytest.mark.parametrize("kind", ["1d", "3d"])
def test_merge_matches_peft_and_the_adapted_outputs(kind, use_dora):
    """merge_and_unload: PEFT's merged kernels (the 1-D and 3-D convolution of B over Aᵀ) - except where PEFT's own
    merge fails (a Conv3d whose kernel is 1 x 1 in its first two dimensions: PEFT takes the 1x1 Conv2d product
    there), which fastpeft merges by convolution; the merged model gives the adapted outputs."""
    mergeable = [t for t in ALL[kind] if t != "grouped"]
    peft_can = [t for t in mergeable if not (kind == "3d" and t == "proj")]  # PEFT: RuntimeError on (1, 1, 1)
    p, f = wrap_pair(make(kind), *both(r=4, lora_alpha=8, target_modules=peft_can, init_lora_weights=False,
                                       use_dora=use_dora))
    sp, sf = merged_state(p), merged_state(f)
    assert sorted(sp) == sorted(sf)
    for k in sp:
        assert_close_rel(sf[k], sp[k], PEFT_PARITY_RTOL, f"merged {k}")
    _, f = wrap_pair(make(kind), *both(r=4, lora_alpha=8, target_modules=mergeable, init_lora_weights=False,
                                       use_dora=use_dora))
    x = inputs_for(kind)
    f.eval()
    with torch.no_grad():
        ref = f(x)
        merged = f.merge_and_unload()
        assert_close_rel(merged(x), ref, PEFT_PARITY_RTOL, "merged output")
    assert not any(hasattr(m, "lora_A") for m in merged.modules())


@pytest.mark.parametrize("kw, match, err", [
    (dict(target_modules=["grouped"], r=4, use_dora=True), "DoRA on a Conv1d with groups=2", ValueError),
    (dict(target_modules=["grouped"], r=3), "divisible by groups", ValueError),
])
def test_refusals(kw, match, err):
    base = make("1d")
    before = {k: v.clone() for k, v in base.state_dict().items()}
    with pytest.raises(err, match=match):
        fastpeft.get_peft_model(base, fastpeft.LoraConfig(**kw))
    assert all(torch.equal(base.state_dict()[k], v) for k, v in before.items())
    assert not any(hasattr(m, "lora_A") for m in base.modules())


def test_dilation_refused_and_grouped_merge_refused():
    net = make("3d")
    net.down = nn.Conv3d(8, 12, 3, padding=2, dilation=2)
    with pytest.raises(ValueError, match="dilation"):
        fastpeft.get_peft_model(net, fastpeft.LoraConfig(target_modules=["down"]))
    f = fastpeft.get_peft_model(make("1d"), fastpeft.LoraConfig(r=4, target_modules=["grouped"],
                                                                init_lora_weights=False))
    w0 = f.base_model.model.grouped.base_layer.weight.detach().clone()
    with pytest.raises(NotImplementedError, match="groups > 1"):
        f.base_model.model.grouped.merge()
    assert torch.equal(f.base_model.model.grouped.base_layer.weight, w0)
