"""(IA)³ with HF PEFT's layout (``ia3_l`` ParameterDict) and math.

Attention (non-feedforward) modules scale the output, bias included: ``y = base(x) ⊙ l`` with l stored (out, 1);
feed-forward modules scale the input: ``y = base(x ⊙ l)`` with l stored (1, in).  Several active adapters multiply.
"""

from __future__ import annotations

import re
import warnings

import torch
import torch.nn as nn

from .. import functional as FP
from ..config import IA3Config, PeftType
from ._utils import in_out_features, is_conv1d, linear_weight_oi, transpose
from .base import BaseTuner, BaseTunerLayer, register_tuner

__all__ = ["IA3Layer", "Linear", "IA3Model", "IA3_TARGET_MODULE_DEFAULTS", "IA3_FEEDFORWARD_MODULE_DEFAULTS"]

IA3_TARGET_MODULE_DEFAULTS = {
    "llama": ["k_proj", "v_proj", "down_proj"], "mistral": ["k_proj", "v_proj", "down_proj"],
    "mixtral": ["k_proj", "v_proj", "w2"], "qwen2": ["q_proj", "v_proj", "down_proj"],
    "qwen3": ["q_proj", "v_proj", "down_proj"], "gemma": ["q_proj", "v_proj", "down_proj"],
    "gemma2": ["q_proj", "v_proj", "down_proj"], "gpt2": ["c_attn", "mlp.c_proj"],
    "bert": ["key", "value", "output.dense"], "roberta": ["key", "value", "output.dense"],
    "opt": ["q_proj", "k_proj", "fc2"], "t5": ["k", "v", "wo"], "phi": ["q_proj", "v_proj", "fc2"],
    "gpt_neox": ["query_key_value", "dense_4h_to_h"], "falcon": ["query_key_value", "dense_4h_to_h"],
    "bloom": ["query_key_value", "mlp.dense_4h_to_h"],
}
IA3_FEEDFORWARD_MODULE_DEFAULTS = {
    "llama": ["down_proj"], "mistral": ["down_proj"], "mixtral": ["w2"], "qwen2": ["down_proj"],
    "qwen3": ["down_proj"], "gemma": ["down_proj"], "gemma2": ["down_proj"], "gpt2": ["mlp.c_proj"],
    "bert": ["output.dense"], "roberta": ["output.dense"], "opt": ["fc2"], "t5": ["wo"], "phi": ["fc2"],
    "gpt_neox": ["dense_4h_to_h"], "falcon": ["dense_4h_to_h"], "bloom": ["mlp.dense_4h_to_h"],
}


class IA3Layer(BaseTunerLayer):
    adapter_layer_names = ("ia3_l",)
    other_param_names = ()

    def __init__(self, base_layer: nn.Module, is_feedforward: bool) -> None:
        super().__init__(base_layer)
        self.ia3_l = nn.ParameterDict({})
        self.is_feedforward = bool(is_feedforward)
        self.in_features, self.out_features = in_out_features(base_layer)
        self.fan_in_fan_out = is_conv1d(base_layer)

    def update_layer(self, adapter_name: str, config: IA3Config) -> None:
        # drawn like PEFT (randn, then ones) so the RNG stream stays aligned with a PEFT model built the same way
        shape = (1, self.in_features) if self.is_feedforward else (self.out_features, 1)
        self.ia3_l[adapter_name] = nn.Parameter(torch.randn(shape))
        if config.init_ia3_weights:
            with torch.no_grad():
                self.ia3_l[adapter_name].fill_(1.0)
        w = self.base_layer.weight
        p = self.ia3_l[adapter_name]
        p.data = p.data.to(device=w.device, dtype=w.dtype if w.is_floating_point() else None)

    def _scale_weight(self, a: str, inverse: bool, safe_merge: bool = False) -> None:
        base = self.base_layer
        vec = transpose(self.ia3_l[a].data, self.fan_in_fan_out)
        w_dtype = base.weight.dtype
        new_w = torch.div(base.weight.data, vec + 1e-8) if inverse else torch.mul(base.weight.data, vec)
        new_b = None
        if not self.is_feedforward and base.bias is not None:
            s = self.ia3_l[a].data.reshape(base.bias.shape)
            new_b = torch.div(base.bias.data, s + 1e-8) if inverse else torch.mul(base.bias.data, s)
        if safe_merge and (not torch.isfinite(new_w).all() or (new_b is not None and not torch.isfinite(new_b).all())):
            raise ValueError(f"NaNs or infs detected in the merged weights; adapter {a!r} seems to be broken (the "
                             "weights were not modified)")
        base.weight.data = new_w.to(w_dtype)
        if new_b is not None:
            base.bias.data = new_b.to(base.bias.dtype)

    def _merge_one(self, a: str, safe_merge: bool) -> None:
        zeros = int((self.ia3_l[a].data == 0).sum())
        if zeros:
            warnings.warn(f"ia3_l of adapter {a!r} has {zeros} zero entr{'y' if zeros == 1 else 'ies'}: merging sets "
                          "the matching base weights to zero for good (unmerge() cannot bring them back). Keep a "
                          "copy of the base model if you need it.", UserWarning, stacklevel=3)
        self._scale_weight(a, inverse=False, safe_merge=safe_merge)

    def _check_merge_finite(self, adapter_names: list[str]) -> None:
        """safe_merge's check of ``_merge_one``'s arithmetic, without writing (see BaseTunerLayer)."""
        if type(self)._merge_one is not IA3Layer._merge_one:
            return
        base = self.base_layer
        acc_w = base.weight.data
        acc_b = base.bias.data if (not self.is_feedforward and base.bias is not None) else None
        for a in adapter_names:
            acc_w = torch.mul(acc_w, transpose(self.ia3_l[a].data, self.fan_in_fan_out))
            if acc_b is not None:
                acc_b = torch.mul(acc_b, self.ia3_l[a].data.reshape(acc_b.shape))
            if not torch.isfinite(acc_w).all() or (acc_b is not None and not torch.isfinite(acc_b).all()):
                raise ValueError(f"NaNs or infs detected in the merged weights; adapter {a!r} seems to be broken (the "
                                 "weights were not modified)")

    def unmerge(self) -> None:
        if self.merged:
            warnings.warn("Unmerge result can be inaccurate for (IA)^3.", UserWarning, stacklevel=2)
        super().unmerge()

    def _unmerge_one(self, a: str) -> None:
        self._scale_weight(a, inverse=True)


class Linear(IA3Layer):
    """(IA)³ around ``nn.Linear`` / transformers ``Conv1D`` (HF PEFT's ``ia3.Linear``).

    Input x: (..., in_features); output (..., out_features).
    """

    def __init__(self, base_layer: nn.Module, adapter_name: str, config: IA3Config, is_feedforward: bool) -> None:
        super().__init__(base_layer, is_feedforward)
        self._active_adapter = [adapter_name]
        self.update_layer(adapter_name, config)

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if self._base_only():
            return self.base_layer(x, *args, **kwargs)
        active = self._present_active()
        if not active:
            return self.base_layer(x, *args, **kwargs)
        if self._fusable and len(active) == 1 and not args and not kwargs:
            base = self.base_layer
            return FP.ia3_linear(x, linear_weight_oi(base), base.bias, self.ia3_l[active[0]],
                                 self.is_feedforward, backend=None)
        scale = 1
        dtype = x.dtype
        for a in active:
            dtype = self.ia3_l[a].dtype
            scale = scale * self.ia3_l[a].flatten()
        if self.is_feedforward:
            return self.base_layer((x.to(dtype) * scale).to(x.dtype), *args, **kwargs)
        result = self.base_layer(x, *args, **kwargs)
        return (result * scale).to(result.dtype)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"feedforward={self.is_feedforward}, adapters={self.adapter_names()}")


@register_tuner(PeftType.IA3)
class IA3Model(BaseTuner):
    """(IA)³ tuner (HF PEFT's ``IA3Model``)."""

    prefix = "ia3_"
    layer_cls = IA3Layer
    target_module_defaults = IA3_TARGET_MODULE_DEFAULTS

    def _prepare_adapter_config(self, config: IA3Config) -> IA3Config:
        model_type = getattr(getattr(self.model, "config", None), "model_type", None)
        config = super()._prepare_adapter_config(config)
        if config.feedforward_modules is None:
            ff = IA3_FEEDFORWARD_MODULE_DEFAULTS.get(model_type)
            if ff is None:
                raise ValueError(f"feedforward_modules is None and fastpeft has no default for "
                                 f"model_type={model_type!r}; please specify feedforward_modules (may be [])")
            config.feedforward_modules = set(ff)
        return config

    @staticmethod
    def _is_feedforward(config: IA3Config, key: str) -> bool:
        ff = config.feedforward_modules
        if isinstance(ff, str):
            return bool(re.fullmatch(ff, key))
        return any(key.endswith(t) for t in ff)  # PEFT's rule: plain suffix, no "."

    def _create_and_replace(self, config, adapter_name, target, target_name, parent, current_key) -> None:
        ff = self._is_feedforward(config, current_key)
        if isinstance(target, IA3Layer):
            if target.is_feedforward != ff:
                raise ValueError(f"module {current_key!r} is feed-forward for one IA3 adapter and not for another")
            target.update_layer(adapter_name, config)
            return
        from .lora_bnb import make_ia3_layer  # bitsandbytes 4/8-bit bases

        new = make_ia3_layer(target, adapter_name, config, ff)
        if new is None:
            self.conv1d_fan_in_fan_out_warning(target, config)
            new = Linear(target, adapter_name, config, ff)
        if adapter_name not in self.active_adapters:
            new.requires_grad_(False)
        setattr(parent, target_name, new)
