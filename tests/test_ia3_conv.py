"""(IA)³ on ``nn.Conv2d`` and ``nn.Conv3d`` (HF PEFT 0.21.2's ``ia3.Conv2d`` / ``Conv3d``) against PEFT in fp32: output
and feed-forward (input) scaling, a grouped conv in both modes, biases; outputs, every gradient, merged weights and
unmerge, files both ways."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn as nn

peft = pytest.importorskip("peft")

import fastpeft  # noqa: E402
from testing_utils import (PEFT_PARITY_RTOL, assert_close_rel, merged_state,  # noqa: E402
                           randomize_trainable, run_module_parity, wrap_pair)


class Net(nn.Module):
    def __init__(self, conv):
        super().__init__()
        self.a = conv(3, 8, 3, padding=1)
        self.grouped = conv(8, 8, 3, padding=1, groups=2)
        self.b = conv(8, 6, 1, bias=False)
        self.ff = conv(6, 4, 3, padding=1)
        self.head = nn.Linear(4, 5)

    def forward(self, x):
        for m in (self.a, self.grouped, self.b, self.ff):
            x = torch.tanh(m(x))
        return self.head(x.flatten(2).mean(-1))


def make(kind):
    torch.manual_seed(0)
    return Net(nn.Conv2d if kind == "2d" else nn.Conv3d)


def data(kind):
    g = torch.Generator().manual_seed(5)
    return torch.randn(*((2, 3, 6, 6) if kind == "2d" else (2, 3, 3, 4, 4)), generator=g)


def configs(ff):
    kw = dict(target_modules=["a", "grouped", "b", "ff", "head"], feedforward_modules=ff)
    return peft.IA3Config(**kw), fastpeft.IA3Config(**kw)


@pytest.mark.parametrize("kind", ["2d", "3d"])
@pytest.mark.parametrize("ff", [["ff", "head"], ["grouped", "b"]], ids=["ff-last", "ff-grouped"])
def test_ia3_conv_matches_peft(kind, ff, tmp_path):
    p, f = wrap_pair(make(kind), *configs(ff))
    conv = type(f.base_model.model.grouped)
    assert conv.__name__ == ("Conv2d" if kind == "2d" else "Conv3d") == type(p.base_model.model.grouped).__name__
    assert f.base_model.model.grouped.ia3_l["default"].shape == p.base_model.model.grouped.ia3_l["default"].shape
    randomize_trainable(p, f, scale=0.3)
    with torch.no_grad():  # l around 1, as trained scales are
        for m in (p, f):
            for n, t in m.named_parameters():
                if "ia3_l" in n:
                    t.add_(1.0)
    x = data(kind)
    for train in (True, False):
        run_module_parity(p, f, x, train)
    sp, sf = merged_state(p), merged_state(f)
    assert sorted(sp) == sorted(sf)
    for k in sp:
        assert_close_rel(sf[k], sp[k], PEFT_PARITY_RTOL, f"merged {k}")
    f.eval()
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = f(x)
        f.merge_adapter()
        assert_close_rel(f(x), ref, PEFT_PARITY_RTOL, "merged output")
        f.unmerge_adapter()
        assert_close_rel(f(x), ref, PEFT_PARITY_RTOL, "unmerged output")
    p.save_pretrained(tmp_path / "p")
    f.save_pretrained(tmp_path / "f")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        f2 = fastpeft.PeftModel.from_pretrained(make(kind), str(tmp_path / "p"))
        p2 = peft.PeftModel.from_pretrained(make(kind), str(tmp_path / "f"))
    with torch.no_grad():
        want = p.eval()(x)
        assert_close_rel(f2(x), want, PEFT_PARITY_RTOL, "PEFT file in fastpeft")
        assert_close_rel(p2(x), want, PEFT_PARITY_RTOL, "fastpeft file in PEFT")
