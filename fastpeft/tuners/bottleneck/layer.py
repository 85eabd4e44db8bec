"""Bottleneck adapters (Houlsby et al. 2019; Pfeiffer et al. 2020), pure PyTorch.

A bottleneck adapter rewrites the output ``h`` of a chosen sub-layer (before the residual add) as::

    h' = h + W_up · f(W_down · drop(h) + b_down) + b_up      W_down: (m, d), W_up: (d, m), m = d // reduction_factor

with ``f`` the non-linearity (swish by default, as AdapterHub's Houlsby config).  ``W_up`` and ``b_up`` start at
zero, so an adapted model is exactly the base model at init.  Placements:

* ``"houlsby"``: after the attention output projection and after the feed-forward output projection.
* ``"pfeiffer"``: after the feed-forward output projection only.

HF PEFT has no such method, so the file format is fastpeft's own, in PEFT's scheme: ``adapter_config.json`` with
``"peft_type": "BOTTLENECK"`` and ``adapter_model.safetensors`` with keys
``base_model.model.<module path>.adapter_down.weight`` / ``.bias`` and ``adapter_up.weight`` / ``.bias``.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..tuners_utils import BaseTunerLayer

# non_linearity name -> function.  "swish" and "silu" are the same function (x·sigmoid(x)).
ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "swish": F.silu,
    "silu": F.silu,
    "relu": F.relu,
    "gelu": F.gelu,
    "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
    "tanh": torch.tanh,
    "sigmoid": torch.sigmoid,
    "leakyrelu": F.leaky_relu,
    "identity": lambda x: x,
}

# model_type -> placement -> default target_modules (PEFT's list rule: exact name or "."-suffix; str: regex fullmatch)
DEFAULT_TARGETS = {
    "llama": {"houlsby": ["self_attn.o_proj", "mlp.down_proj"], "pfeiffer": ["mlp.down_proj"]},
    "gpt2": {"houlsby": ["attn.c_proj", "mlp.c_proj"], "pfeiffer": ["mlp.c_proj"]},
    "bert": {"houlsby": ["attention.output.dense", "output.dense"], "pfeiffer": r".*layer\.\d+\.output\.dense"},
}
for _t in ("mistral", "qwen2", "qwen3", "gemma", "gemma2", "phi3", "olmo"):
    DEFAULT_TARGETS[_t] = DEFAULT_TARGETS["llama"]
for _t in ("roberta", "xlm-roberta", "electra", "camembert"):
    DEFAULT_TARGETS[_t] = DEFAULT_TARGETS["bert"]


def bottleneck_ref(h: torch.Tensor, w_down: torch.Tensor, b_down: Optional[torch.Tensor], w_up: torch.Tensor,
                   b_up: Optional[torch.Tensor], non_linearity: str = "swish") -> torch.Tensor:
    """Reference math ``h + W_up f(W_down h + b_down) + b_up`` (no dropout), in the inputs' dtype.

    Args:
        h: (..., d).  w_down: (m, d).  b_down: (m,) or None.  w_up: (d, m).  b_up: (d,) or None.
    Returns:
        (..., d).
    """
    act = ACTIVATIONS[non_linearity]
    return h + F.linear(act(F.linear(h, w_down, b_down)), w_up, b_up)


def module_width(layer: nn.Module) -> int:
    """Output width d of a Linear-like module (nn.Linear, transformers' Conv1D); TypeError otherwise."""
    if isinstance(layer, nn.Linear):
        return layer.out_features
    if type(layer).__name__ == "Conv1D" and hasattr(layer, "nf"):
        return int(layer.nf)
    raise TypeError(f"bottleneck adapters wrap nn.Linear or transformers Conv1D modules, got {type(layer).__name__}")


class BottleneckLayer(BaseTunerLayer):
    """A sub-layer (kept as ``.base_layer``) followed by per-adapter bottleneck networks.

    ``adapter_down[name]`` is ``nn.Linear(d, m)``, ``adapter_up[name]`` is ``nn.Linear(m, d)`` (zero-init when
    ``init_weights``).  Active adapters are applied in order (each sees the previous one's output).

    Forward: x (..., in) -> base_layer(x) (..., d) -> adapters -> (..., d), in the base output's dtype; the adapter
    runs in its own dtype (fp32 adapters on a bf16 model, as PEFT's default for its adapters).
    The adapter is not linear, so it cannot be merged into the base weight (``merge`` raises ValueError).
    """

    adapter_layer_names = ("adapter_down", "adapter_up")
    other_param_names = ("adapter_dropout", "non_linearity")

    def __init__(self, base_layer: nn.Module) -> None:
        if isinstance(base_layer, BottleneckLayer):
            raise TypeError("this module already is a BottleneckLayer")
        super().__init__(base_layer)
        self.width = module_width(base_layer)
        self.adapter_down = nn.ModuleDict()
        self.adapter_up = nn.ModuleDict()
        self.adapter_dropout = nn.ModuleDict()
        self.non_linearity: dict[str, str] = {}

    def add_adapter(self, name: str, reduction_factor: float, non_linearity: str, dropout: float = 0.0,
                    init_weights: bool = True, dtype: Optional[torch.dtype] = None) -> None:
        """Create adapter ``name`` with ``m = max(1, d // reduction_factor)`` hidden units."""
        if non_linearity not in ACTIVATIONS:
            raise ValueError(f"non_linearity must be one of {sorted(ACTIVATIONS)}, got {non_linearity!r}")
        m = max(1, int(self.width // reduction_factor))
        w = _weight_of(self.base_layer)
        fk = {"device": w.device, "dtype": dtype or (w.dtype if w.dtype.is_floating_point else torch.float32)}
        down = nn.Linear(self.width, m, **fk)
        up = nn.Linear(m, self.width, **fk)
        if init_weights:
            nn.init.zeros_(up.weight)
            nn.init.zeros_(up.bias)
        self.adapter_down[name] = down
        self.adapter_up[name] = up
        self.adapter_dropout[name] = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.non_linearity[name] = non_linearity

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        h = self.base_layer(x, *args, **kwargs)
        if self.disable_adapters:
            return h
        for name in self._present_active():
            down, up = self.adapter_down[name], self.adapter_up[name]
            z = self.adapter_dropout[name](h.to(down.weight.dtype))
            z = up(ACTIVATIONS[self.non_linearity[name]](down(z)))
            h = (h.to(z.dtype) + z).to(h.dtype)
        return h

    def _merge_one(self, adapter_name: str, safe_merge: bool) -> None:
        raise ValueError("bottleneck adapters are not linear and cannot be merged into the base weights; use "
                         "unload() to remove them or keep the adapted model")

    def extra_repr(self) -> str:
        return f"width={self.width}, adapters={list(self.adapter_down)}, active={self.active_adapters}"


def _weight_of(layer: nn.Module) -> torch.Tensor:
    w = getattr(layer, "weight", None)
    if w is None:
        w = next(layer.parameters())
    return w
