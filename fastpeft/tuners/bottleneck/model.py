"""The bottleneck-adapter tuner: injects ``BottleneckLayer`` wrappers on the outputs of the target modules."""

from __future__ import annotations

from torch import nn

from ...config import PeftType
from ..tuners_utils import BaseTuner, register_tuner
from .config import BottleneckConfig
from .layer import DEFAULT_TARGETS, BottleneckLayer, module_width

__all__ = ["BottleneckTuner"]


@register_tuner(PeftType.BOTTLENECK)
class BottleneckTuner(BaseTuner):
    """Houlsby / Pfeiffer bottleneck adapters on the outputs of the ``target_modules`` (nn.Linear or Conv1D)."""

    prefix = "adapter_"
    layer_cls = BottleneckLayer

    def _prepare_adapter_config(self, config):
        if not isinstance(config, BottleneckConfig):
            raise TypeError(f"BottleneckTuner takes a BottleneckConfig, got {type(config).__name__}")
        if config.target_modules is None:
            mt = getattr(getattr(self.model, "config", None), "model_type", None)
            table = DEFAULT_TARGETS.get(mt)
            if table is None:
                raise ValueError(f"target_modules is None and fastpeft has no default bottleneck placement for "
                                 f"model_type={mt!r} (defaults exist for {sorted(DEFAULT_TARGETS)}); please specify "
                                 "target_modules")
            t = table[config.placement]
            config.target_modules = t if isinstance(t, str) else set(t)
        return config

    def _is_supported_target(self, module: nn.Module) -> bool:
        if isinstance(module, BottleneckLayer):
            return True
        try:
            module_width(module)
        except TypeError:
            return False
        return True

    def _create_and_replace(self, config, adapter_name, target, target_name, parent, current_key) -> None:
        if not isinstance(target, BottleneckLayer):
            new = BottleneckLayer(target)
            new._active_adapter = list(self.active_adapters)
            setattr(parent, target_name, new)
            target = new
        target.add_adapter(adapter_name, config.reduction_factor, config.non_linearity,
                           dropout=config.adapter_dropout, init_weights=config.init_weights)
