"""LoRA (and DoRA) on ``nn.Conv2d`` against HF PEFT 0.21.2 in fp32 on a small diffusion-style conv net: kernel
sizes 1/3, stride, padding (incl. "same"), groups; outputs, every gradient, merged kernels, files both ways, and the
clear errors for what PEFT cannot do (dilation, rank not divisible by groups, merging a grouped conv)."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.nn as nn

peft = pytest.importorskip("peft")

import fastpeft  # noqa: E402
from testing_utils import merged_state, randomize_trainable, run_module_parity, wrap_pair  # noqa: E402
from testing_utils import PEFT_PARITY_RTOL, assert_close_rel  # noqa: E402


class ConvNet(nn.Module):
    """A UNet-block-like stack: 3x3 conv, strided 3x3, grouped 3x3, 1x1 projection, "same" padded 5x5, linear head."""

    def __init__(self):
        super().__init__()
        self.conv_in = nn.Conv2d(3, 8, 3, padding=1)
        self.down = nn.Conv2d(8, 12, 3, stride=2, padding=1)
        self.grouped = nn.Conv2d(12, 12, 3, padding=1, groups=2, bias=False)
        self.proj = nn.Conv2d(12, 16, 1)
        self.same = nn.Conv2d(16, 8, (5, 3), padding="same")
        self.head = nn.Linear(8, 5)

    def forward(self, x):
        x = torch.nn.functional.silu(self.conv_in(x))
        x = torch.nn.functional.silu(self.down(x))
        x = torch.nn.functional.silu(self.grouped(x))
        x = torch.nn.functional.silu(self.proj(x))
        x = self.same(x)
        return self.head(x.mean(dim=(2, 3)))


def make_net():
    torch.manual_seed(0)
    return ConvNet()


def images(n=2, seed=11):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, 10, 10, generator=g)


def both(**kw):
    return peft.LoraConfig(**kw), fastpeft.LoraConfig(**kw)


ALL = ["conv_in", "down", "grouped", "proj", "same", "head"]
MERGEABLE = ["conv_in", "down", "proj", "same", "head"]


@pytest.mark.parametrize("use_dora", [False, True])
def test_conv2d_parity_train_eval(use_dora):
    targets = MERGEABLE if use_dora else ALL  # PEFT's DoRA cannot take a grouped conv
    p, f = wrap_pair(make_net(), *both(r=4, lora_alpha=8, target_modules=targets, lora_dropout=0.1,
                                       use_dora=use_dora))
    assert type(f.base_model.model.down).__name__ == "Conv2d" and hasattr(f.base_model.model.down, "lora_A")
    randomize_trainable(p, f)
    run_module_parity(p, f, images(), train=True)
    run_module_parity(p, f, images(), train=False)
    if use_dora:  # (the LoRA case targets the grouped conv, which neither library merges)
        sp, sf = merged_state(p), merged_state(f)
        assert sorted(sp) == sorted(sf)
        for k in sp:
            assert_close_rel(sf[k], sp[k], PEFT_PARITY_RTOL, f"merged {k}")
    kp = {k: tuple(v.shape) for k, v in peft.get_peft_model_state_dict(p).items()}
    kf = {k: tuple(v.shape) for k, v in fastpeft.get_peft_model_state_dict(f).items()}
    assert kf == kp
    if use_dora:
        assert kf["base_model.model.down.lora_magnitude_vector"] == (1, 12, 1, 1)


def test_conv2d_merged_output_and_unmerge():
    p, f = wrap_pair(make_net(), *both(r=4, lora_alpha=8, target_modules=MERGEABLE, init_lora_weights=False))
    sp, sf = merged_state(p), merged_state(f)
    for k in sp:
        assert_close_rel(sf[k], sp[k], PEFT_PARITY_RTOL, f"merged {k}")
    f.eval()
    x = images()
    before = copy.deepcopy(f.state_dict())
    with torch.no_grad():
        ref = f(x)
        f.merge_adapter()
        assert_close_rel(f(x), ref, PEFT_PARITY_RTOL, "merged output")
        f.unmerge_adapter()
        for k, v in f.state_dict().items():
            assert_close_rel(v, before[k], PEFT_PARITY_RTOL, f"unmerged {k}")


@pytest.mark.parametrize("use_dora", [False, True])
def test_conv2d_files_load_both_ways(tmp_path, use_dora):
    p, f = wrap_pair(make_net(), *both(r=4, lora_alpha=8, target_modules=MERGEABLE if use_dora else ALL,
                                       use_dora=use_dora))
    randomize_trainable(p, f)
    p.save_pretrained(tmp_path / "p")
    f.save_pretrained(tmp_path / "f")
    x = images()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        f2 = fastpeft.PeftModel.from_pretrained(make_net(), str(tmp_path / "p"))
        p2 = peft.PeftModel.from_pretrained(make_net(), str(tmp_path / "f"))
    with torch.no_grad():
        p.eval()
        ref = p(x)
        assert_close_rel(f2(x), ref, PEFT_PARITY_RTOL, "PEFT file in fastpeft")
        assert_close_rel(p2(x), ref, PEFT_PARITY_RTOL, "fastpeft file in PEFT")


def test_conv2d_grouped_merge_refused_and_unchanged():
    _, f = wrap_pair(make_net(), *both(r=4, target_modules=["grouped"], init_lora_weights=False))
    w0 = f.base_model.model.grouped.base_layer.weight.detach().clone()
    with pytest.raises(NotImplementedError, match="groups > 1"):
        f.base_model.model.grouped.merge()
    assert torch.equal(f.base_model.model.grouped.base_layer.weight, w0)


@pytest.mark.parametrize("kw, match", [
    (dict(r=3, target_modules=["grouped"]), "divisible by groups"),
    (dict(r=4, target_modules=["dil"]), "dilation"),
    (dict(r=4, target_modules=["conv_in"], init_lora_weights="pissa"), "conv layers"),
    (dict(r=4, target_modules=["grouped"], use_dora=True), "groups"),
])
def test_conv2d_unsupported_cases_raise_clearly(kw, match):
    net = make_net()
    net.dil = nn.Conv2d(3, 3, 3, padding=2, dilation=2)
    before = dict(net.named_modules())
    with pytest.raises(ValueError, match=match):
        fastpeft.get_peft_model(net, fastpeft.LoraConfig(**kw))
    assert dict(net.named_modules()).keys() == before.keys()
    assert all(type(m) is type(before[n]) for n, m in net.named_modules())
