"""LoRA initialisation variants (``init_lora_weights``) with HF PEFT 0.21.2's math and RNG order, and the
conversion of a PiSSA/OLoRA adapter back to a plain LoRA at save time.

=====================  =======================================================  ==========================  ========
value                  A (r, in)                                                B (out, r)                  base W
=====================  =======================================================  ==========================  ========
``True``               kaiming_uniform(a=√5)                                    0                           kept
``"gaussian"``         N(0, 1/r)                                                0                           kept
``False``              nn.Linear's default (so ΔW ≠ 0; for tests)               nn.Linear's default         kept
``"pissa"``            diag(√(S_r/s))·Uhᵀ_r  (full SVD of W, fp32)              V_r·diag(√(S_r/s))          W - s·BA
``"pissa_niter_N"``    same with ``torch.svd_lowrank(W, r, niter=N)``           same                        W - s·BA
``"olora"``            R[:r] of QR(W) (fp32)                                    Q[:, :r]                    W - s·BA
``"orthogonal"``       QR-based random (r must be even)                         same                        kept
=====================  =======================================================  ==========================  ========

``"pissa*"``/``"olora"``/``"orthogonal"`` apply to Linear (and, except OLoRA, transformers Conv1D) bases; Conv2d
takes ``True``/``False``/``"gaussian"`` only, like PEFT.  ``"eva"``, ``"corda"``, ``"loftq"``, ``"lora_ga"`` and
``"mica"`` need data, quantisation or extra machinery and are refused by ``LoraConfig`` (see ``UNSUPPORTED_INITS``).
"""

from __future__ import annotations

import copy
import os
import re
import torch
import torch.nn as nn

from ...utils.adapter_files import read_adapter_weights
from ...utils.adapter_init import init_lora_pair
from ...utils.other import is_conv1d, transpose

__all__ = ["SUPPORTED_INITS", "UNSUPPORTED_INITS", "check_init_lora_weights", "init_lora_adapter",
           "convert_mutated_init_state_dict", "converted_config", "convert_for_save"]

SUPPORTED_INITS = (True, False, "gaussian", "pissa", "pissa_niter_<N>", "olora", "orthogonal")
UNSUPPORTED_INITS = ("eva", "corda", "loftq", "lora_ga", "mica")
_NITER = re.compile(r"pissa_niter_(\d+)")


def check_init_lora_weights(value) -> None:
    """Raise ValueError for an ``init_lora_weights`` value fastpeft's LoRA cannot apply."""
    if value is True or value is False:
        return
    if isinstance(value, str):
        if value.lower() in ("gaussian", "olora") or value in ("pissa", "orthogonal") or _NITER.fullmatch(value):
            return
        if value.startswith("pissa"):
            raise ValueError(f"init_lora_weights={value!r}: expected 'pissa' or 'pissa_niter_<number of iterations>'")
        if value.lower() in UNSUPPORTED_INITS:
            raise ValueError(f"init_lora_weights={value!r} is not supported by fastpeft (it needs data-driven or "
                             f"quantisation machinery); supported: True, False, 'gaussian', 'pissa', "
                             "'pissa_niter_<N>', 'olora', 'orthogonal'")
    raise ValueError(f"init_lora_weights={value!r} is not supported by fastpeft (supported: True, False, 'gaussian', "
                     "'pissa', 'pissa_niter_<N>', 'olora', 'orthogonal')")


def _needs_linear(layer, init) -> None:
    base = layer.base_layer
    if isinstance(base, nn.modules.conv._ConvNd):
        raise ValueError(f"init_lora_weights={init!r} is not supported for {type(base).__name__} targets (as in HF "
                         "PEFT, conv layers take True, False or 'gaussian')")


def check_init_for_target(module: nn.Module, r: int, init, name: str = "") -> None:
    """Raise ValueError, before the model is touched, when ``init`` cannot be applied to ``module`` with rank ``r``."""
    if not isinstance(init, str) or init.lower() == "gaussian":
        return
    where = f" (target {name!r})" if name else ""
    if isinstance(module, nn.modules.conv._ConvNd):
        raise ValueError(f"init_lora_weights={init!r} is not supported for {type(module).__name__} targets{where} "
                         "(as in HF PEFT, conv layers take True, False or 'gaussian')")
    if init.lower() == "olora" and is_conv1d(module):
        raise ValueError(f"init_lora_weights='olora' is not supported for transformers Conv1D targets{where} (HF "
                         "PEFT 0.21.2 builds wrongly shaped adapters for them); use nn.Linear targets or 'pissa'")
    if init == "orthogonal" and r % 2 != 0:
        raise ValueError(f"init_lora_weights='orthogonal' requires an even LoRA rank, got r={r}{where}")


def init_lora_adapter(layer, adapter_name: str, init) -> None:
    """Initialise ``lora_A``/``lora_B`` of ``adapter_name`` per ``init`` (the table above); may rewrite the base
    weight (PiSSA/OLoRA).  Called right after the two modules were constructed, before the dtype move."""
    A = layer.lora_A[adapter_name]
    B = layer.lora_B[adapter_name]
    if init is False:
        return
    if isinstance(init, str) and init.startswith("pissa"):
        _needs_linear(layer, init)
        _pissa(layer, adapter_name, init)
    elif isinstance(init, str) and init.lower() == "olora":
        _needs_linear(layer, init)
        _olora(layer, adapter_name)
    elif init == "orthogonal":
        _needs_linear(layer, init)
        _orthogonal(layer, adapter_name)
    else:
        init_lora_pair(A.weight, B.weight, layer.r[adapter_name], init)
        if layer.lora_bias.get(adapter_name, False):
            with torch.no_grad():
                nn.init.zeros_(B.bias)


def _float_weight(layer, what: str) -> torch.Tensor:
    w = layer.base_layer.weight
    if w.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise TypeError(f"init_lora_weights={what!r} needs a float32/float16/bfloat16 base weight, got {w.dtype} "
                        "(initialise on the unquantised model, then quantise the residual)")
    return w


def _pissa(layer, adapter_name: str, init: str) -> None:
    w = _float_weight(layer, init)
    dtype = w.dtype
    r, s = layer.r[adapter_name], layer.scaling[adapter_name]
    with torch.no_grad():
        weight = transpose(w.to(torch.float32), layer.fan_in_fan_out)  # (out, in)
        if init == "pissa":
            V, S, Uh = torch.linalg.svd(weight.data, full_matrices=False)
            Vr, Sr, Uhr = V[:, :r], S[:r], Uh[:r]
        else:
            m = _NITER.fullmatch(init)
            if m is None:
                raise ValueError(f"init_lora_weights should be 'pissa' or 'pissa_niter_[number of iters]', got "
                                 f"{init!r}")
            Vr, Sr, Ur = torch.svd_lowrank(weight.data, r, niter=int(m.group(1)))
            Uhr = Ur.t()
        Sr = Sr / s
        A = torch.diag(torch.sqrt(Sr)) @ Uhr
        B = Vr @ torch.diag(torch.sqrt(Sr))
        layer.lora_A[adapter_name].weight.data = A
        layer.lora_B[adapter_name].weight.data = B
        residual = weight.data - s * B @ A
        layer.base_layer.weight.data = transpose(residual.to(dtype), layer.fan_in_fan_out)


def _olora(layer, adapter_name: str) -> None:
    if is_conv1d(layer.base_layer):
        # PEFT factorises the stored (in, out) Conv1D weight as if it were (out, in), giving adapter shapes that do not
        # fit the layer; refuse rather than produce a different adapter.
        raise ValueError("init_lora_weights='olora' is not supported for transformers Conv1D targets (HF PEFT "
                         "0.21.2 builds wrongly shaped adapters for them); use nn.Linear targets or 'pissa'")
    w = _float_weight(layer, "olora")
    dtype = w.dtype
    r, s = layer.r[adapter_name], layer.scaling[adapter_name]
    with torch.no_grad():
        weight = w.to(torch.float32)
        Q, R = torch.linalg.qr(weight.data)
        Qr, Rr = Q[:, :r], R[:r]
        layer.lora_A[adapter_name].weight.data = Rr.contiguous()
        layer.lora_B[adapter_name].weight.data = Qr.contiguous()
        residual = weight.data - s * layer.lora_B[adapter_name].weight @ layer.lora_A[adapter_name].weight
        layer.base_layer.weight.data = residual.to(dtype)


def _orthogonal(layer, adapter_name: str) -> None:
    r = layer.r[adapter_name]
    if r % 2 != 0:
        raise ValueError(f"init_lora_weights='orthogonal' requires an even LoRA rank, got r={r}")
    with torch.no_grad():
        X = torch.randn(r, r)
        Q, _ = torch.linalg.qr(X)
        q_odd, q_even = Q[0::2, :], Q[1::2, :]
        dtype = layer.base_layer.weight.dtype
        A = torch.randn(layer.in_features, r // 2).mm(q_odd).T / 10.0
        B = torch.randn(r // 2, layer.out_features).T.mm(q_even) / 10.0
    layer.lora_A[adapter_name].weight = nn.Parameter(A.contiguous().to(dtype))
    layer.lora_B[adapter_name].weight = nn.Parameter(B.contiguous().to(dtype))


# -- PiSSA / OLoRA -> LoRA at save time -----------------------------------------------------------------------------


def converted_config(config):
    """The config written next to a converted adapter: plain LoRA, rank doubled, same scaling (PEFT's rule)."""
    cfg = copy.deepcopy(config)
    cfg.init_lora_weights = True
    cfg.r *= 2
    if not cfg.use_rslora:
        cfg.lora_alpha *= 2
    else:
        cfg.lora_alpha *= 2 ** 0.5
    if cfg.rank_pattern:
        cfg.rank_pattern = {k: 2 * v for k, v in cfg.rank_pattern.items()}
    if cfg.alpha_pattern:
        cfg.alpha_pattern = {k: 2 * v for k, v in cfg.alpha_pattern.items()}
    return cfg


def convert_mutated_init_state_dict(config, state_dict: dict, path_initial: str,
                                    allow_bin: bool = False) -> dict:
    """Turn a trained PiSSA/OLoRA adapter into a plain LoRA adapter of twice the rank (HF PEFT's
    ``save_pretrained(..., path_initial_model_for_weight_conversion=...)``).

    With ``W = W_res + s·B₀A₀`` at initialisation and ``W_res + s·BA`` after training, the change is
    ``ΔW = s·(BA - B₀A₀) = s·[B | -B₀]·[A ; A₀]``, so the result holds ``lora_A = cat([A, A₀], dim=0)`` (2r, in) and
    ``lora_B = cat([B, -B₀], dim=1)`` (out, 2r); with alpha doubled too (``converted_config``) the scaling is
    unchanged.  Only lora_A/lora_B tensors are kept, as in PEFT.

    Args:
        config: the adapter's LoraConfig (PiSSA/OLoRA/True init).
        state_dict: {PEFT file key: tensor} of the trained adapter.
        path_initial: directory holding the adapter as saved right after initialisation (before training).
    Returns:
        the converted {PEFT file key: tensor}.  Raises ValueError (nothing written) when the initial adapter does not
        fit.  Like PEFT, the caller writes ``config`` with ``init_lora_weights=True`` into ``path_initial``.
    """

    if config.use_rslora and (config.rank_pattern or config.alpha_pattern):
        raise ValueError("Passing `path_initial_model_for_weight_conversion` to `save_pretrained` is not supported "
                         "when using `rank_pattern` or `alpha_pattern` at the same time as `use_rslora=True`.")
    if not any(str(config.init_lora_weights).lower().startswith(p) for p in ("pissa", "olora", "true")):
        import warnings

        warnings.warn("`path_initial_model_for_weight_conversion` only works for converting a PiSSA/CorDA/OLoRA/"
                      "LoRA-GA adapter to a LoRA adapter", UserWarning, stacklevel=3)
    if getattr(config, "use_dora", False):
        raise ValueError("path_initial_model_for_weight_conversion cannot convert a DoRA adapter (the magnitude "
                         "vector has no plain-LoRA equivalent)")
    initial = read_adapter_weights(path_initial, allow_bin=allow_bin)

    def _init_key(k: str) -> str:
        if k in initial:
            return k
        bare = k[len("base_model.model."):] if k.startswith("base_model.model.") else k
        if bare in initial:
            return bare
        raise ValueError(f"the initial adapter in {path_initial!r} has no tensor for {k!r}; it must be the same "
                         "adapter saved right after initialisation")

    out = {}
    for k, v in state_dict.items():
        if "lora_A" in k:
            v0 = initial[_init_key(k)].to(device=v.device, dtype=v.dtype)
            if v0.shape[1:] != v.shape[1:]:
                raise ValueError(f"{k}: initial shape {tuple(v0.shape)} does not fit {tuple(v.shape)}")
            out[k] = torch.cat([v, v0], dim=0)
        elif "lora_B" in k:
            v0 = initial[_init_key(k)].to(device=v.device, dtype=v.dtype)
            if v0.shape[0] != v.shape[0]:
                raise ValueError(f"{k}: initial shape {tuple(v0.shape)} does not fit {tuple(v.shape)}")
            out[k] = torch.cat([v, -v0], dim=1)
    return out


def convert_for_save(config, state_dict: dict, path_initial: str) -> tuple[dict, object]:
    """``save_pretrained(..., path_initial_model_for_weight_conversion=path_initial)``: the converted
    (state_dict, config) to write instead of the adapter's own.  Like PEFT, also rewrites the config in
    ``path_initial`` as a plain LoRA (``init_lora_weights=True``), so that directory loads as an ordinary adapter on
    the unmodified base model; that happens only after the conversion succeeded."""
    if str(getattr(config, "peft_type", "")) != "LORA":
        raise ValueError("path_initial_model_for_weight_conversion works for LoRA adapters only, got peft_type="
                         f"{config.peft_type}")
    if not os.path.isdir(path_initial):
        raise ValueError(f"path_initial_model_for_weight_conversion={path_initial!r} is not a directory holding the "
                         "adapter saved right after initialisation")
    converted = convert_mutated_init_state_dict(config, state_dict, path_initial)
    initial_cfg = copy.deepcopy(config)
    initial_cfg.init_lora_weights = True
    initial_cfg.save_pretrained(path_initial)
    return converted, converted_config(config)
