"""Combining several adapters' tensors into one: the merge rules of ``add_weighted_adapter`` (HF PEFT's names, from
the papers' definitions).

Each rule takes a list of same-shaped "task tensors" t_i (one per adapter: a LoRA factor, or a ΔW) and weights w_i
(a 1-D tensor) and returns one tensor of that shape:

* ``task_arithmetic``: Σ w_i t_i (Ilharco et al., "Editing models with task arithmetic").
* ``magnitude_prune``: Σ w_i prune(t_i), each t_i keeping only its ``density`` fraction of largest magnitudes.
* ``ties``: TIES-merging (Yadav et al. 2023): prune by magnitude, elect each element's sign (the sign of Σ_i t_i with
  ``"total"``, of Σ_i sign(t_i) with ``"frequency"``; ties elect +), then average the weighted w_i t_i that agree
  with it (the mean over the agreeing adapters, at least one).
* ``dare_linear`` / ``dare_ties``: DARE (Yu et al. 2023): each element kept with probability ``density`` (a draw from
  torch's default generator, ``torch.bernoulli``) and the kept ones divided by ``density``; then task arithmetic /
  the TIES sign election and disjoint mean.

The sequence of tensor operations (and so of RNG draws) is the one HF PEFT 0.21's ``peft.utils.merge_utils`` uses,
so the results agree with PEFT's bit for bit under the same RNG state (tested).
"""

from __future__ import annotations

import warnings

import torch

__all__ = ["prune", "task_arithmetic", "magnitude_prune", "ties", "dare_linear", "dare_ties"]

SIGN_METHODS = ("total", "frequency")


def _check_density(density) -> float:
    if density is None:
        raise ValueError("density is required for this combination_type (the fraction of values kept, in [0, 1])")
    d = float(density)
    if d < 0:
        raise ValueError(f"density must be >= 0, got {density}")
    return d


def prune(tensor: torch.Tensor, density: float, method: str, rescale: bool = False) -> torch.Tensor:
    """`tensor` with all but a `density` fraction of its elements set to zero: the largest magnitudes
    (``method="magnitude"``: ``int(density · numel)`` of them) or a random draw keeping each element with probability
    `density` (``"random"``; with `rescale` the kept values are divided by `density`).  density >= 1 keeps everything
    (with a warning)."""
    density = _check_density(density)
    if density >= 1:
        warnings.warn(f"The density {density} is greater than or equal to 1, no pruning will be performed.")
        return tensor
    if method == "magnitude":
        keep = torch.zeros_like(tensor).reshape(-1)
        k = int(density * tensor.numel())
        keep[torch.topk(tensor.abs().reshape(-1), k=k, largest=True)[1]] = 1
        return tensor * keep.reshape(tensor.shape)
    if method == "random":
        pruned = tensor * torch.bernoulli(torch.full_like(input=tensor, fill_value=density))
        return pruned / density if rescale else pruned
    raise ValueError(f"prune method must be 'magnitude' or 'random', got {method!r}")


def _weighted(stacked: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """stacked (n, ...) times weights (n,) broadcast over the trailing dimensions."""
    return stacked * weights.view(weights.shape + (1,) * (stacked.dim() - weights.dim()))


def _majority_agrees(stacked: torch.Tensor, method: str) -> torch.Tensor:
    """Where each t_i has the elected sign (bool, like `stacked`)."""
    if method not in SIGN_METHODS:
        raise ValueError(f"majority_sign_method must be one of {SIGN_METHODS}, got {method!r}")
    sign = stacked.sign()
    votes = stacked.sum(dim=0) if method == "total" else sign.sum(dim=0)
    return sign == torch.where(votes >= 0, 1, -1)


def _disjoint_mean(weighted: torch.Tensor, agrees: torch.Tensor) -> torch.Tensor:
    return (weighted * agrees).sum(dim=0) / torch.clamp(agrees.sum(dim=0), min=1.0)


def task_arithmetic(task_tensors: list[torch.Tensor], weights: torch.Tensor) -> torch.Tensor:
    """Σ_i w_i t_i.  task_tensors: n tensors of one shape; weights: (n,)."""
    return _weighted(torch.stack(task_tensors, dim=0), weights).sum(dim=0)


def magnitude_prune(task_tensors: list[torch.Tensor], weights: torch.Tensor, density: float) -> torch.Tensor:
    """Σ_i w_i prune_magnitude(t_i, density)."""
    pruned = [prune(t, density, method="magnitude") for t in task_tensors]
    return _weighted(torch.stack(pruned, dim=0), weights).sum(dim=0)


def ties(task_tensors: list[torch.Tensor], weights: torch.Tensor, density: float,
         majority_sign_method: str = "total") -> torch.Tensor:
    """TIES: magnitude pruning, sign election, mean of the weighted tensors that agree with the elected sign."""
    stacked = torch.stack([prune(t, density, method="magnitude") for t in task_tensors], dim=0)
    agrees = _majority_agrees(stacked, majority_sign_method)
    return _disjoint_mean(_weighted(stacked, weights), agrees)


def dare_linear(task_tensors: list[torch.Tensor], weights: torch.Tensor, density: float) -> torch.Tensor:
    """DARE then task arithmetic: Σ_i w_i (random_keep(t_i, density) / density)."""
    pruned = [prune(t, density, method="random", rescale=True) for t in task_tensors]
    return _weighted(torch.stack(pruned, dim=0), weights).sum(dim=0)


def dare_ties(task_tensors: list[torch.Tensor], weights: torch.Tensor, density: float,
              majority_sign_method: str = "total") -> torch.Tensor:
    """DARE then TIES' sign election and disjoint mean."""
    stacked = torch.stack([prune(t, density, method="random", rescale=True) for t in task_tensors], dim=0)
    agrees = _majority_agrees(stacked, majority_sign_method)
    return _disjoint_mean(_weighted(stacked, weights), agrees)
