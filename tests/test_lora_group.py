"""The sibling-group LoRA op (``fastpeft.ops.lora_group``): the Triton launchers (interpreter on CPU) against the fp64
reference, forward and every gradient, within the accuracy rule (2x / 3x torch's same-dtype error)."""

from __future__ import annotations

import math

import pytest
import torch

from fastpeft.ops.lora_group import lora_group_apply

from testing_utils import GRAD_FACTOR, MATMUL_FACTOR, LaunchSpy, assert_fa_rule

pytest.importorskip("triton")
import triton  # noqa: E402

from fastpeft.kernels import _target as KT  # noqa: E402
from fastpeft.kernels import lora as KL  # noqa: E402

F16, F32, F64 = torch.float16, torch.float32, torch.float64
DEV = "cuda" if torch.cuda.is_available() else "cpu"


class Group:
    """G LoRA layers on one x: fp64 masters cast per run."""

    def __init__(self, m, k, ns, ranks, dtype, adt=None, with_bias=True, w_t=False, dead=()):
        self.m, self.k, self.ns, self.ranks = m, k, list(ns), list(ranks)
        self.dtype, self.adt, self.with_bias, self.w_t, self.dead = dtype, adt or dtype, with_bias, w_t, set(dead)
        g = torch.Generator().manual_seed(7)
        self.x = torch.randn(m, k, generator=g, dtype=F64)
        self.w = [torch.randn(n, k, generator=g, dtype=F64) / math.sqrt(k) for n in ns]
        self.b = [torch.randn(n, generator=g, dtype=F64) for n in ns]
        self.a = [torch.randn(r, k, generator=g, dtype=F64) / math.sqrt(k) for r in ranks]
        self.bb = [torch.randn(n, r, generator=g, dtype=F64) / math.sqrt(r) for n, r in zip(ns, ranks)]
        self.dy = [torch.randn(m, n, generator=g, dtype=F64) for n in ns]
        self.sc = [0.5 + 0.25 * i for i in range(len(ns))]

    def run(self, backend, dtype=None, adt=None):
        dtype, adt = dtype or self.dtype, adt or self.adt
        x = self.x.to(DEV, dtype).requires_grad_(True)
        w = [(t.t().contiguous().to(DEV, dtype).t() if self.w_t else t.to(DEV, dtype)) for t in self.w]
        b = [t.to(DEV, dtype).requires_grad_(True) if self.with_bias else None for t in self.b]
        a = [t.to(DEV, adt).requires_grad_(True) for t in self.a]
        bb = [t.to(DEV, adt).requires_grad_(True) for t in self.bb]
        ys = lora_group_apply(x, w, b, a, bb, self.sc, backend)
        live = [i for i in range(len(ys)) if i not in self.dead]
        torch.autograd.backward([ys[i] for i in live], [self.dy[i].to(DEV, ys[i].dtype) for i in live])
        out = {"dx": x.grad}
        for i, y in enumerate(ys):
            out[f"y{i}"] = y
            for name, t in (("dA", a[i]), ("dB", bb[i])) + ((("dbias", b[i]),) if self.with_bias else ()):
                if i in self.dead:
                    assert t.grad is None, f"{name}{i}: a member without gradient got one"
                else:
                    out[f"{name}{i}"] = t.grad
        return {kk: v.detach().double().cpu() for kk, v in out.items()}


def check(group: Group):
    tri, same, ref = group.run("triton"), group.run("torch"), group.run("torch", F64, F64)
    assert tri.keys() == ref.keys()
    for name, want in ref.items():
        factor = MATMUL_FACTOR if name.startswith("y") else GRAD_FACTOR
        dtype = group.adt if name[:2] in ("dA", "dB") else group.dtype
        assert_fa_rule(tri[name], want, same[name], factor, name, dtype=dtype)


CASES = {
    # q / k / v of a GQA attention: one wide and two narrow members, tails everywhere, trainable biases
    "qkv_fp32": dict(m=37, k=50, ns=(75, 20, 20), ranks=(3, 3, 3), dtype=F32),
    # gate / up, fp32 adapters on an fp16 base (HF PEFT's default precision), M = 1, r = 1 next to r = 4
    "gateup_fp16_fp32adapters_m1": dict(m=1, k=33, ns=(40, 40), ranks=(1, 4), dtype=F16, adt=F32),
    # Conv1D-style transposed weights, no bias, fp16 throughout, r = 16
    "fp16_wT_nobias_r16": dict(m=21, k=40, ns=(24, 24, 24), ranks=(16, 16, 16), dtype=F16, with_bias=False,
                               w_t=True),
    # a member whose output gets no gradient (k of q/k/v unused): its parameters get none, the others are exact
    "dead_member": dict(m=19, k=30, ns=(30, 10, 10), ranks=(2, 2, 2), dtype=F32, dead=(1,)),
    "m0": dict(m=0, k=30, ns=(30, 10), ranks=(2, 2), dtype=F32),
}


@pytest.mark.parametrize("name", list(CASES))
def test_group_matches_fp64_reference(name):
    check(Group(**CASES[name]))


def test_group_chunk_count_set_by_narrowest_member():
    """The members' dSe share one (P, M, R) buffer whose P is the smallest member chunk count; a wider member then has
    programs whose N chunk is empty, which store zeros in its columns (else the dA pass and the dX expand would sum
    garbage).  Small blocks and a small program target make that happen here, checked, and the gradients still
    match the fp64 reference."""
    m, k = 40, 24
    with KT.forced_launch_shape(blocks=(16, 16, 4), programs=8):
        tgt = KT.launch_target(torch.device(DEV), None)
        narrow = 48
        p = KL.dy_split(m, narrow, tgt)[2]
        wide = next(n for n in range(17, 400) if p <= KL.dy_split(m, n, tgt)[2]
                    and triton.cdiv(triton.cdiv(n, 16), triton.cdiv(triton.cdiv(n, 16), p)) < p)
        assert p > 1
        check(Group(m, k, (wide, narrow), (2, 3), F32))


def test_group_forward_is_one_launch_per_member(monkeypatch):
    """The group's forward: the first member's GEMM, then one launch computing every member's S (the A's stacked)
    and adding the first member's term (its columns lead S), then per other member its GEMM and one expand reading
    its columns of S - G Triton launches, one pass over x; no separate shrink.  Outputs and S still match the
    members run one by one (fp64 reference in ``check``)."""
    launches = []
    for name in ("_lora_shrink_kernel", "_lora_shrink_expand_kernel", "_lora_expand_kernel"):
        monkeypatch.setattr(KL, name, LaunchSpy(getattr(KL, name), launches, name))
    g = Group(33, 24, (20, 12, 12), (4, 2, 3), F32)
    check(g)
    fwd = launches[:3]
    assert [n for n, _ in fwd] == ["_lora_shrink_expand_kernel", "_lora_expand_kernel", "_lora_expand_kernel"]
    args = fwd[0][1]
    assert (args[9], args[10]) == (9, 4)  # R = 4 + 2 + 3 stacked rows, the first member's 4 expanded
