"""``fastpeft.kernels._partials.sum_partials``: the one launch that finishes the skinny kernels' split reductions
(CPU: Triton's interpreter, see conftest.py)."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")
from fastpeft.kernels import _partials as KP  # noqa: E402


@pytest.mark.interpreter
def test_sums_in_order_and_casts_each_buffer():
    """Four buffers of different lengths (one not a multiple of the tile, one spanning several tiles), partial
    counts and dtypes in one launch: each equals the fp32 sum over dim 0, in order, cast once to its dtype."""
    g = torch.Generator().manual_seed(0)
    parts = [torch.randn(p, *shape, generator=g) for p, shape in
             ((3, (70, 5)), (1, (2100,)), (7, (9, 4)), (2, (1,)))]
    dtypes = [torch.bfloat16, torch.float16, torch.float32, torch.bfloat16]
    outs = KP.sum_partials(list(zip(parts, dtypes)), parts[0])
    for part, dt, out in zip(parts, dtypes, outs):
        want = part[0].clone()
        for p in range(1, part.shape[0]):
            want += part[p]  # the kernel's order: p = 0, 1, ...
        assert out.dtype == dt and out.shape == part.shape[1:]
        if dt == torch.bfloat16:
            # Triton's interpreter truncates fp32 -> bf16 (a GPU rounds to nearest): within one bf16 ulp
            assert ((out.float() - want).abs() <= want.abs() * 2.0 ** -7).all(), (part.shape, dt)
        else:
            assert torch.equal(out, want.to(dt)), (part.shape, dt)


def test_single_fp32_partial_is_a_view_and_launches_nothing(monkeypatch):
    calls = []
    monkeypatch.setattr(KP, "_sum_partials_kernel", type("K", (), {"__getitem__": lambda s, g: calls.append(g)})())
    part = torch.randn(1, 6, 3)
    (out,) = KP.sum_partials([(part, torch.float32)], part)
    assert out.data_ptr() == part.data_ptr() and out.shape == (6, 3) and not calls


def test_more_than_four_buffers_is_refused():
    parts = [(torch.randn(2, 3), torch.float32)] * 5
    with pytest.raises(ValueError, match="at most 4"):
        KP.sum_partials(parts, parts[0][0])


def test_plan_without_work_lays_out_empty_segments():
    """No buffer needing work (every job a single fp32 partial, or none - IA3's scale_weight launches with such a
    plan): zero tiles, and the launch arguments are four empty segments on `like` with zero bounds, as the general
    layout gives them (IA3's kernel takes them as they are)."""
    like = torch.randn(3, 2)
    for jobs in ([], [(torch.randn(1, 4, 2), torch.float32)] * 2):
        plan = KP.plan_partials(jobs, like)
        assert plan.tiles == 0 and (plan.bytes_read, plan.bytes_written, plan.flops) == (0, 0, 0)
        assert len(plan.args) == 4 * KP.SEGMENTS + KP.SEGMENTS - 1
        assert plan.args[:4 * KP.SEGMENTS:4] == [like] * KP.SEGMENTS
        assert plan.args[1:4 * KP.SEGMENTS:4] == [like] * KP.SEGMENTS
        assert plan.args[2:4 * KP.SEGMENTS:4] == [0] * KP.SEGMENTS and plan.args[3:4 * KP.SEGMENTS:4] == [0] * KP.SEGMENTS
        assert plan.args[4 * KP.SEGMENTS:] == [0] * (KP.SEGMENTS - 1)
        assert [o.data_ptr() for o in plan.outs] == [p.data_ptr() for p, _ in jobs]
