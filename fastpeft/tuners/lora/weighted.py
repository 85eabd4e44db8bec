"""``LoraModel.add_weighted_adapter``: a new LoRA adapter that combines existing ones (HF PEFT's method, names and
results).

The new adapter gets the first adapter's config with ``r`` = the combined rank, ``lora_alpha = r`` (scaling 1: the
combined factors carry each adapter's scaling) and the union of the adapters' ``target_modules``; it is injected
like any adapter (not activated, frozen), then in every layer that holds it its factors are set from the layers'
adapters that the list names:

* ``cat``: A = [w_1 s_1 A_1; w_2 s_2 A_2; ...], B = [B_1, B_2, ...] - exactly Σ w_i s_i B_i A_i, rank Σ r_i.
* ``linear``, ``ties``, ``dare_linear``, ``dare_ties``, ``magnitude_prune``: the A's and the B's are combined
  separately (``fastpeft.utils.merge_utils``) with weights √|w_i s_i| (the sign on A's side) - an approximation of
  the weighted sum of the ΔW's; all adapters must have one rank.
* ``svd``, ``ties_svd``, ``dare_linear_svd``, ``dare_ties_svd``, ``magnitude_prune_svd``: the ΔW_i = s_i B_i A_i are
  combined, then the best rank-``svd_rank`` approximation (torch.linalg.svd) is split into B = U S, A = Vᴴ
  (``svd_clamp``: clamp both to that quantile of their values' magnitudes).

Same sequence of tensor operations (and RNG draws for the ``dare`` rules) as HF PEFT 0.21.2, so the factors agree
with PEFT's under the same RNG state (tested).  Differences: a ``weights`` list of another length than
``adapters``, a missing ``density`` or an unknown option raise a ValueError naming it (PEFT truncates or fails
later); DoRA adapters are refused (PEFT would leave the new magnitude vector stale); a first adapter initialised
with PiSSA / OLoRA does not pass that init on (PEFT's copy of the config re-runs it, rewriting the base weights of
every targeted layer); SVD on Conv1d / Conv3d layers
flattens their kernels as it does Conv2d's; an ``adapter_name`` that exists already is left alone with a warning
(PEFT returns silently).  All or nothing: an error leaves the model and its configs as they were.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Optional

import torch

from ...utils import merge_utils
from ..tuners_utils import union_module_specs
from .conv import _ConvNd
from .embedding import Embedding
from .layer import LoraLayer

__all__ = ["add_weighted_adapter", "COMBINATION_TYPES"]

_FACTOR_RULES = {"linear": "task_arithmetic", "ties": "ties", "dare_linear": "dare_linear", "dare_ties": "dare_ties",
                 "magnitude_prune": "magnitude_prune"}
_SVD_RULES = {"svd": "task_arithmetic", "ties_svd": "ties", "dare_linear_svd": "dare_linear",
              "dare_ties_svd": "dare_ties", "magnitude_prune_svd": "magnitude_prune"}
COMBINATION_TYPES = ("cat",) + tuple(_FACTOR_RULES) + tuple(_SVD_RULES)
_NEEDS_DENSITY = {"ties", "dare_linear", "dare_ties", "magnitude_prune"}


def _rule_call(rule: str, tensors: list, weights: torch.Tensor, density, sign_method: str) -> torch.Tensor:
    fn = getattr(merge_utils, rule)
    if rule == "task_arithmetic":
        return fn(tensors, weights)
    if rule in ("ties", "dare_ties"):
        return fn(tensors, weights, density, sign_method)
    return fn(tensors, weights, density)


def _check(tuner, adapters: list, combination_type: str, svd_rank, density,
           majority_sign_method: str) -> tuple[str, int, object]:
    """Validate the LoRA-specific arguments against the model (the shared ones: ``BaseTuner._weighted_adapter_args``);
    returns (combination_type, new rank, new target_modules)."""
    configs = [tuner.peft_config[a] for a in adapters]
    for a, c in zip(adapters, configs):
        if getattr(c, "target_parameters", None):
            raise ValueError(f"add_weighted_adapter does not support targeting nn.Parameter (problematic adapter "
                             f"'{a}')")
        if getattr(c, "use_dora", False):
            raise ValueError(f"add_weighted_adapter does not support DoRA adapters (adapter {a!r} has "
                             "use_dora=True): the combined adapter's magnitude vector would not match its factors")
    if combination_type not in COMBINATION_TYPES:
        raise ValueError(f"Invalid combination_type: {combination_type!r} (one of {COMBINATION_TYPES})")
    if len(adapters) == 1:   # one adapter: only the linear rule makes sense (PEFT's rule)
        combination_type = "linear"
    if majority_sign_method not in merge_utils.SIGN_METHODS:
        raise ValueError(f"majority_sign_method must be one of {merge_utils.SIGN_METHODS}, got "
                         f"{majority_sign_method!r}")
    rule = _FACTOR_RULES.get(combination_type) or _SVD_RULES.get(combination_type)
    if rule in _NEEDS_DENSITY and density is None:
        raise ValueError(f"combination_type {combination_type!r} needs density (the fraction of values kept, in "
                         "[0, 1])")
    ranks = [max(c.r, *c.rank_pattern.values()) if c.rank_pattern else c.r for c in configs]
    if combination_type in _FACTOR_RULES:
        if len(set(ranks)) != 1:
            raise ValueError("All adapters must have the same r value when using combination_type linear, ties, "
                             f"dare_ties, dare_linear or magnitude_prune (ranks: {dict(zip(adapters, ranks))})")
        new_rank = ranks[0]
    elif combination_type == "cat":
        new_rank = sum(ranks)
    else:
        if svd_rank is not None and (isinstance(svd_rank, bool) or not isinstance(svd_rank, int) or svd_rank < 1):
            raise ValueError(f"svd_rank must be a positive int or None, got {svd_rank!r}")
        new_rank = svd_rank or max(ranks)
    return combination_type, new_rank, union_module_specs([c.target_modules for c in configs], "target_modules")


def _factors(layer, name: str) -> Optional[tuple[torch.Tensor, torch.Tensor]]:
    """(A, B) parameters of adapter `name` in `layer`, or None."""
    if name in layer.lora_A:
        return layer.lora_A[name].weight, layer.lora_B[name].weight
    if isinstance(layer, Embedding) and name in layer.lora_embedding_A:
        return layer.lora_embedding_A[name], layer.lora_embedding_B[name]
    return None


def add_weighted_adapter(tuner, adapters: list, weights: list, adapter_name: str, combination_type: str = "svd",
                         svd_rank: Optional[int] = None, svd_clamp: Optional[float] = None,
                         svd_full_matrices: bool = True, svd_driver: Optional[str] = None,
                         density: Optional[float] = None, majority_sign_method: str = "total") -> None:
    """``LoraModel.add_weighted_adapter`` (see the module docstring and that method)."""
    if not tuner._weighted_adapter_args(adapters, weights, adapter_name):
        return
    combination_type, new_rank, targets = _check(tuner, adapters, combination_type, svd_rank, density,
                                                 majority_sign_method)
    first = tuner.peft_config[adapters[0]]
    init = first.init_lora_weights
    # PiSSA / OLoRA initialisation rewrites the base weights (W - BA); the combined adapter's factors are overwritten
    # below, so such an init would only corrupt the base model (HF PEFT copies it): the default init instead
    if isinstance(init, str) and (init.startswith("pissa") or init.lower() == "olora"):
        init = True
    config = dataclasses.replace(first, r=new_rank, lora_alpha=new_rank, target_modules=targets, alpha_pattern={},
                                 rank_pattern={}, init_lora_weights=init)
    tuner.inject_adapter(adapter_name, config)
    tuner._freeze_adapter(adapter_name)
    for key, layer in list(tuner.model.named_modules()):
        if "lora_" in key or not isinstance(layer, LoraLayer):
            continue
        new = _factors(layer, adapter_name)
        if new is None:
            continue
        A, B = new
        A.data = A.data * 0.0
        B.data = B.data * 0.0
        present = [(a, w) for a, w in zip(adapters, weights) if _factors(layer, a) is not None]
        if not present:
            raise ValueError(f"layer {key!r} holds the new adapter but none of {list(adapters)}")
        if combination_type == "cat":
            As = torch.cat([_factors(layer, a)[0].data * w * layer.scaling[a] for a, w in present], dim=0)
            Bs = torch.cat([_factors(layer, a)[1].data for a, _ in present], dim=1)
            A.data[:As.shape[0], :] = As
            B.data[:, :Bs.shape[1]] = Bs
        elif combination_type in _SVD_RULES:
            A.data, B.data = _svd_factors(layer, present, _SVD_RULES[combination_type], new_rank, A, B, density,
                                          majority_sign_method, svd_clamp, svd_full_matrices, svd_driver)
        else:
            A.data, B.data = _combined_factors(layer, present, _FACTOR_RULES[combination_type], density,
                                               majority_sign_method)


def _combined_factors(layer, present: list, rule: str, density, sign_method: str) -> tuple:
    """The A's and the B's combined separately, with weights √|w s| (the sign on A's side)."""
    wa, wb, As, Bs = [], [], [], []
    for a, w in present:
        ws = w * layer.scaling[a]
        wa.append(math.sqrt(abs(ws)) * (1 if ws >= 0 else -1))
        wb.append(math.sqrt(abs(ws)))
        fa, fb = _factors(layer, a)
        As.append(fa.data)
        Bs.append(fb.data)
    dtype = As[0].dtype
    out = [_rule_call(rule, ts, torch.tensor(ws).to(ts[0].device), density, sign_method)
           for ts, ws in ((As, wa), (Bs, wb))]
    return out[0].to(dtype), out[1].to(dtype)


def _svd_factors(layer, present: list, rule: str, new_rank: int, A, B, density, sign_method: str, clamp,
                 full_matrices: bool, driver) -> tuple:
    """(A, B) = (Vᴴ, U S) of the best rank-`new_rank` approximation of the combined ΔW."""
    deltas = [layer.get_delta_weight(a) for a, _ in present]   # scaling applied there
    delta = _rule_call(rule, deltas, torch.tensor([w for _, w in present]).to(deltas[0].device), density,
                       sign_method)
    conv = isinstance(layer, _ConvNd)
    if conv:
        delta = delta.flatten(start_dim=1)   # (out, in · kernel); a 1x1 kernel gives (out, in)
    if getattr(layer, "fan_in_fan_out", False) or isinstance(layer, Embedding):
        delta = delta.T
    U, S, Vh = torch.linalg.svd(delta, full_matrices=full_matrices, driver=driver)
    U = U[:, :new_rank] @ torch.diag(S[:new_rank])
    Vh = Vh[:new_rank, :]
    if clamp is not None:
        hi = torch.quantile(torch.cat([U.flatten(), Vh.flatten()]), clamp)
        U, Vh = U.clamp(-hi, hi), Vh.clamp(-hi, hi)
    if conv:
        U, Vh = U.reshape(B.data.shape), Vh.reshape(A.data.shape)
    return Vh, U
