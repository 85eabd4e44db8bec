"""The one check "can the fused op replace this adapter layer's forward?", shared by fastpeft's tuner layers and
``fastpeft.accelerate`` (HF PEFT layers).

The fused ops (``fastpeft.functional.lora_linear`` / ``adalora_linear`` / ``ia3_linear``) read the base weight and
compute ``base(x) + adapter(x)`` themselves, so the base layer's own ``forward`` never runs.  That is only correct
when that forward is exactly ``F.linear`` on the weight the op reads.  The check runs at call time, in the adapter
layer's forward, so it sees what was added after the adapter was injected: forward hooks (accelerate's CPU/disk
offloading, user hooks), a weight turned into a DTensor by FSDP2, a base moved to the meta device.
"""

from __future__ import annotations

from typing import Any, Optional, Union

import torch
import torch.nn as nn

from .other import conv1d_class

__all__ = ["base_layer_reason", "input_reason", "fused_base_operands", "dense_base_weight", "is_sharded"]


def is_sharded(t: torch.Tensor) -> bool:
    """True for a DTensor (FSDP2 sharding): its values exist only after the owning module gathers them in its own
    forward, which the fused path would skip."""
    return type(t).__name__ == "DTensor"


def dense_base_weight(base: nn.Module) -> Optional[torch.Tensor]:
    """The base weight as (out_features, in_features) - a transposed view for transformers' Conv1D - when ``base`` is
    exactly an ``nn.Linear`` or a transformers ``Conv1D`` (not a subclass, which may compute something else, e.g. a
    bitsandbytes quantized layer); None otherwise."""
    if type(base) is nn.Linear:
        return base.weight
    conv1d = conv1d_class()
    if conv1d is not None and type(base) is conv1d:
        return base.weight.t()
    return None


def base_layer_reason(base: nn.Module) -> Optional[str]:
    """Why the fused op cannot stand in for ``base``'s forward (None when it can).  Cheap attribute checks only."""
    ops = _base_operands(base)
    return ops if isinstance(ops, str) else None


def input_reason(base: nn.Module, x: Any, args: tuple, kwargs: dict) -> Optional[str]:
    """Why the fused op cannot take this call's arguments where the layer's own forward would cast or reject them
    (None when it can).  ``base`` must have passed ``base_layer_reason``."""
    weight = base.weight
    return _input_reason(weight.shape[0] if type(base) is not nn.Linear else weight.shape[1], weight, x, args, kwargs)


def fused_base_operands(base: nn.Module, x: Any, args: tuple, kwargs: dict) -> Union[tuple, str]:
    """``(weight (N, K), bias (N,) or None)``, what the fused op reads in place of ``base``'s forward, when it can
    stand in for this call; else the reason it cannot (a str): ``base_layer_reason`` and ``input_reason`` in one.

    The adapter layers ask this in every forward, where host time decides small layers: the weight and bias are
    fetched once here (each ``nn.Module`` attribute lookup is a Python call) and handed on to the op."""
    ops = _base_operands(base)
    if isinstance(ops, str):
        return ops
    weight, bias, in_features = ops
    return _input_reason(in_features, weight, x, args, kwargs) or (weight, bias)


def _base_operands(base: nn.Module) -> Union[tuple, str]:
    """(weight as (out, in), bias, in_features) of a base the fused op can stand in for, else why not."""
    cls = type(base)
    if cls is nn.Linear:
        weight = base.weight
        in_features = weight.shape[1]
    else:
        conv1d = conv1d_class()
        if conv1d is None or cls is not conv1d:
            return f"base layer {cls.__name__} is not a plain nn.Linear or transformers Conv1D"
        weight = base.weight.t()
        in_features = weight.shape[1]
    # accelerate's hook is a plain instance attribute (add_hook_to_module sets it, remove_hook_from_module deletes
    # it): a dict lookup, where getattr's miss on an nn.Module raises and catches an AttributeError (~1 µs a call)
    if base._forward_hooks or base._forward_pre_hooks or base.__dict__.get("_hf_hook") is not None:
        return "the base layer has forward hooks (e.g. accelerate offloading)"
    bias = base.bias
    if is_sharded(weight) or (bias is not None and is_sharded(bias)):
        return "the base weight is sharded (DTensor)"
    if weight.device.type == "meta":
        return "the base weight is on the meta device"
    return weight, bias, in_features


def _input_reason(in_features: int, weight: torch.Tensor, x: Any, args: tuple, kwargs: dict) -> Optional[str]:
    """``input_reason`` for a base whose weight and input width are already known."""
    if args:
        return "extra positional forward arguments"
    if kwargs:
        extra = [k for k, v in kwargs.items() if v is not None]
        if extra:
            return f"extra forward keyword arguments {extra} (e.g. mixed-batch adapter_names)"
    if not isinstance(x, torch.Tensor) or not x.is_floating_point() or x.dim() < 1:
        return "the input is not a floating-point tensor with a feature dimension"
    dev = x.device
    if x.dtype != weight.dtype and not (dev.type in ("cpu", "cuda") and torch.is_autocast_enabled(dev.type)):
        return f"input dtype {x.dtype} differs from the base weight dtype {weight.dtype}"
    if dev != weight.device:
        return f"input on {dev} but the base weight on {weight.device}"
    if x.shape[-1] != in_features:
        return f"input has {x.shape[-1]} features, the layer expects {in_features}"
    return None
