"""Triton launchers of the sibling-group LoRA op (``fastpeft.ops.lora_group``): G LoRA layers that read the same x
(q/k/v; gate/up) share one shrink forward and one pass over x for all their dA backward.

    y_i = x W_iᵀ + b_i + s_i · (x A_iᵀ) B_iᵀ        x: (M, K)  W_i: (N_i, K)  A_i: (r_i, K)  B_i: (N_i, r_i)

Per training step, against G separate ``lora`` ops (``kernels/lora.py``, whose kernels these reuse):
  forward   the first member's cuBLAS ``F.linear`` and one ``_lora_shrink_expand_kernel`` over x with the A_i
            stacked (R = Σ r_i rows; one small copy of the A_i): S for every member, the first member's term added;
            then per other member its ``F.linear`` and ``_lora_expand_kernel`` (reading its columns of S):
            1 pass over x instead of G, G Triton launches.
  backward  per member ``_lora_dy_kernel`` (its dSe written into its columns of one shared (P, M, R) buffer, P
            the group's chunk count), dX = Σ_i dY_i W_i by cuBLAS (``torch.mm`` then ``addmm_`` accumulating in
            place: no M×K sum of G gradients by autograd), then one ``_lora_da_kernel`` over x and dX together for
            every dA_i and the rank-r term Σ_i dS_i A_i added into dX, and the partial sums finished:
            1 pass over x and 1 read + write of dX instead of G each, and G - 1 fewer M×K additions.
No dropout (the members' masks would differ; a group with dropout runs as separate ops) and no AdaLoRA e.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from ._partials import SEGMENTS as _SEGMENTS
from ._partials import sum_partials
from ._target import LaunchTarget, launch_target, on_input_device
from .lora import _da_pass, _dy_pass, _expand, dy_split, shrink_expand

__all__ = ["lora_group_fwd_triton", "lora_group_bwd_triton"]


def _offsets(ranks: list[int]) -> list[int]:
    out, o = [], 0
    for r in ranks:
        out.append(o)
        o += r
    return out


@on_input_device
def lora_group_fwd_triton(x: torch.Tensor, weights: list[torch.Tensor], biases: list[Optional[torch.Tensor]],
                          lora_As: list[torch.Tensor], lora_Bs: list[torch.Tensor], scalings: list[float],
                          target: Optional[LaunchTarget] = None) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Forward of the group; the contract of ``fastpeft.ops.lora_group.lora_group_fwd_ref``.

    Args:
        x: (M, K).  weights[i]: (N_i, K), any strides.  biases[i]: (N_i,) or None.  lora_As[i]: (r_i, K) and
        lora_Bs[i]: (N_i, r_i), one adapter dtype for all.  scalings[i]: s_i.  target: launch target.
    Returns:
        ys: [(M, N_i)] in x's dtype; S: (M, R) fp32, R = Σ r_i, member i's S in columns [o_i, o_i + r_i).
    """
    m, _ = x.shape
    ranks = [a.shape[0] for a in lora_As]
    total = sum(ranks)
    if m == 0:
        return [x.new_empty((0, w.shape[0])) for w in weights], x.new_empty((0, total), dtype=torch.float32)
    tgt = launch_target(x.device, target)
    y = F.linear(x, weights[0], biases[0])
    # S of every member (the stacked A's rows in member order), the first member's term added in the same launch
    s = shrink_expand(y, x, torch.cat(lora_As), None, lora_Bs[0], float(scalings[0]), 0.0, 0, tgt)
    ys = [y]
    for w, b, B, sc, r, o in zip(weights[1:], biases[1:], lora_Bs[1:], scalings[1:], ranks[1:], _offsets(ranks)[1:]):
        y = F.linear(x, w, b)
        _expand(y, s.narrow(1, o, r).unsqueeze(0), float(sc), None, B.t(), tgt)
        ys.append(y)
    return ys, s


@on_input_device
def lora_group_bwd_triton(x: torch.Tensor, dys: list[Optional[torch.Tensor]], weights: list[torch.Tensor],
                          lora_As: list[torch.Tensor], lora_Bs: list[torch.Tensor], S: torch.Tensor,
                          scalings: list[float], needs_dx: bool, has_bias: list[bool],
                          target: Optional[LaunchTarget] = None
                          ) -> tuple[torch.Tensor, list, list, list]:
    """Backward of the group; the contract of ``fastpeft.ops.lora_group.lora_group_bwd_ref``.

    Args:
        x: (M, K) as saved.  dys[i]: (M, N_i) contiguous, or None for a member whose output got no gradient.
        weights, lora_As, lora_Bs, scalings: as the forward.  S: (M, R) fp32 from the forward.  needs_dx: compute
        dx.  has_bias[i]: compute member i's dbias.
    Returns:
        dx (M, K) in x's dtype (empty (0,) without `needs_dx`), and per member dA_i (r_i, K), dB_i (N_i, r_i) in the
        adapter dtype and dbias_i (N_i,) in W_i's dtype - None for a member without gradient (and for dbias_i
        without `has_bias[i]`).
    """
    m, k = x.shape
    g = len(dys)
    live = [i for i in range(g) if dys[i] is not None]
    ranks = [a.shape[0] for a in lora_As]
    offs = _offsets(ranks)
    adt = lora_As[0].dtype
    dA: list = [None] * g
    dB: list = [None] * g
    dbias: list = [None] * g
    if not live:
        return (x.new_zeros((m, k)) if needs_dx else x.new_empty(0)), dA, dB, dbias
    if m == 0:
        for i in live:
            dA[i], dB[i] = torch.zeros_like(lora_As[i]), torch.zeros_like(lora_Bs[i])
            if has_bias[i]:
                dbias[i] = torch.zeros(weights[i].shape[0], device=x.device, dtype=weights[i].dtype)
        return (x.new_empty((0, k)) if needs_dx else x.new_empty(0)), dA, dB, dbias
    tgt = launch_target(x.device, target)
    # the live members' dSe side by side: (P, M, R_live), P = the smallest of their own dY-pass chunk counts
    live_ranks = [ranks[i] for i in live]
    live_offs = _offsets(live_ranks)
    p = min(dy_split(m, weights[i].shape[0], tgt)[2] for i in live)
    dse = torch.empty((p, m, sum(live_ranks)), device=x.device, dtype=torch.float32)
    jobs, slots = [], []
    for i, o in zip(live, live_offs):
        r = ranks[i]
        _, db_part, dbias_part, _ = _dy_pass(dys[i], lora_Bs[i], S.narrow(1, offs[i], r), None, scalings[i],
                                             has_bias[i], tgt, dse_out=dse.narrow(2, o, r))
        jobs.append((db_part, lora_Bs[i].dtype))
        slots.append(("B", i))
        if has_bias[i]:
            jobs.append((dbias_part, weights[i].dtype))
            slots.append(("bias", i))
    a_live = lora_As[live[0]] if len(live) == 1 else torch.cat([lora_As[i] for i in live])
    if needs_dx:
        first, *rest = live
        dx = torch.mm(dys[first], weights[first])
        for i in rest:
            dx.addmm_(dys[i], weights[i])  # cuBLAS beta = 1: the members' dX summed in place
        # one pass over x and dX: every dA_i, and Σ_i dS_i A_i added into dX
        da_part, _, _ = _da_pass(x, dse, None, S, adt, 0.0, 0, tgt, dx=dx, lora_A=a_live)
    else:
        dx = x.new_empty(0)
        da_part, _, _ = _da_pass(x, dse, None, S, adt, 0.0, 0, tgt)
    jobs.insert(0, (da_part, adt))
    slots.insert(0, ("A", -1))
    outs: list = []
    for lo in range(0, len(jobs), _SEGMENTS):
        outs += sum_partials(jobs[lo:lo + _SEGMENTS], dys[live[0]])
    for (kind, i), t in zip(slots, outs):
        if kind == "A":
            for j, o in zip(live, live_offs):
                dA[j] = t.narrow(0, o, ranks[j])
        elif kind == "B":
            dB[i] = t
        else:
            dbias[i] = t
    return dx, dA, dB, dbias
