"""The AdaLoRA tuner (HF PEFT's ``AdaLoraModel``) and its rank allocator.

The forward adds ``orth_reg_weight · mean_over_matrices ||P − I||_F`` (P = A Aᵀ or Bᵀ B, not squared) to
``outputs.loss`` when the model returns a loss; ``update_and_allocate(global_step)`` runs the rank allocator (call it
after ``backward()`` and before ``zero_grad()``); saving slices A/E/B by ``rank_pattern`` and loading resizes the
layers, as PEFT does.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn

from ...config import PeftType
from ...utils.adapter_math import orth_reg_term
from ...utils.other import get_submodules
from ..tuners_utils import BaseTuner, register_tuner
from .bnb import make_adalora_layer
from .config import AdaLoraConfig
from .layer import AdaLoraLayer, SVDLinear

__all__ = ["AdaLoraModel", "RankAllocator", "ADALORA_TARGET_MODULE_DEFAULTS"]

ADALORA_TARGET_MODULE_DEFAULTS = {
    "llama": ["q_proj", "v_proj"], "mistral": ["q_proj", "v_proj"], "qwen2": ["q_proj", "v_proj"],
    "qwen3": ["q_proj", "v_proj"], "gemma": ["q_proj", "v_proj"], "gemma2": ["q_proj", "v_proj"], "gpt2": ["c_attn"],
    "bert": ["query", "value"], "roberta": ["query", "key", "value", "dense"], "gpt_neox": ["query_key_value"],
    "bloom": ["query_key_value"], "opt": ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"],
    "t5": ["q", "k", "v", "o", "wi", "wo"], "mt5": ["q", "k", "v", "o", "wi_0", "wi_1", "wo"],
    "bart": ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"], "gptj": ["q_proj", "v_proj"],
    "gpt_neo": ["q_proj", "v_proj"], "llama4": ["q_proj", "v_proj"],
    "deberta-v2": ["query_proj", "key_proj", "value_proj", "dense"], "gpt_bigcode": ["c_attn"],
    "deberta": ["in_proj"], "gemma3_text": ["q_proj", "v_proj"], "gemma4": ".*language_model\\..*\\.(q_proj|v_proj)",
    "nemotron_h": ["q_proj", "k_proj", "v_proj", "o_proj"],
}


class RankAllocator:
    """AdaLoRA's rank allocator: EMA importance/uncertainty scores, cubic budget schedule, masking of ``lora_E``.

    ``model`` is the user model (``tuner.model``); parameter names (and rank_pattern keys) are relative to it, e.g.
    ``model.layers.0.self_attn.q_proj.lora_E.default``.
    """

    def __init__(self, model: nn.Module, config: AdaLoraConfig, adapter_name: str) -> None:
        if not (0 < config.beta1 < 1 and 0 < config.beta2 < 1):
            raise ValueError(f"AdaLoRA needs 0 < beta1, beta2 < 1 for the rank allocator, got beta1={config.beta1}, "
                             f"beta2={config.beta2}")
        self.peft_config = config
        self.adapter_name = adapter_name
        self.beta1, self.beta2 = config.beta1, config.beta2
        self.reset_ipt()
        self.init_bgt = 0
        names = set()
        for n, p in model.named_parameters():
            if f"lora_A.{adapter_name}" in n:
                self.init_bgt += p.size(0)
                names.add(n.replace("lora_A", "%s"))
        self.name_set = sorted(names)
        self.target_bgt = config.target_r * len(self.name_set)

    def reset_ipt(self) -> None:
        self.ipt: dict[str, torch.Tensor] = {}
        self.exp_avg_ipt: dict[str, torch.Tensor] = {}
        self.exp_avg_unc: dict[str, torch.Tensor] = {}

    def budget_schedule(self, step: int) -> tuple[int, bool]:
        """(budget, whether to mask at this step): init_bgt until tinit, cubic decay, target_bgt after."""
        c = self.peft_config
        if step <= c.tinit:
            return self.init_bgt, False
        if step > c.total_step - c.tfinal:
            return self.target_bgt, True
        frac = 1 - (step - c.tinit) / (c.total_step - c.tfinal - c.tinit)
        return int((self.init_bgt - self.target_bgt) * (frac ** 3) + self.target_bgt), step % c.deltaT == 0

    def update_ipt(self, model: nn.Module) -> None:
        for n, p in model.named_parameters():
            if "lora_" in n and self.adapter_name in n:
                if p.grad is None:
                    raise RuntimeError(f"update_and_allocate needs gradients but {n} has none; call it after "
                                       "loss.backward() and before optimizer.zero_grad()")
                if n not in self.ipt:
                    self.ipt[n] = torch.zeros_like(p)
                    self.exp_avg_ipt[n] = torch.zeros_like(p)
                    self.exp_avg_unc[n] = torch.zeros_like(p)
                with torch.no_grad():
                    self.ipt[n] = (p * p.grad).abs().detach()
                    self.exp_avg_ipt[n] = self.beta1 * self.exp_avg_ipt[n] + (1 - self.beta1) * self.ipt[n]
                    self.exp_avg_unc[n] = (self.beta2 * self.exp_avg_unc[n]
                                           + (1 - self.beta2) * (self.ipt[n] - self.exp_avg_ipt[n]).abs())

    def _score(self, n: str) -> torch.Tensor:
        return self.exp_avg_ipt[n] * self.exp_avg_unc[n]

    def mask_to_budget(self, model: nn.Module, budget: int) -> dict[str, list[bool]]:
        """Zero the E entries whose triplet score is among the (init_bgt - budget) lowest; returns rank_pattern."""
        a = self.adapter_name
        vec: dict[str, list[torch.Tensor]] = {}
        val: dict[str, torch.Tensor] = {}
        for n, _ in model.named_parameters():
            if f"lora_A.{a}" in n:
                vec.setdefault(n.replace("lora_A", "%s"), []).append(self._score(n).mean(dim=1, keepdim=True))
            if f"lora_B.{a}" in n:
                vec.setdefault(n.replace("lora_B", "%s"), []).append(self._score(n).mean(dim=0).view(-1, 1))
            if f"lora_E.{a}" in n:
                val[n.replace("lora_E", "%s")] = self._score(n)
        triplet: dict[str, torch.Tensor] = {}
        scores = []
        for name_m, parts in vec.items():
            s = val[name_m].view(-1) + torch.cat(parts, dim=1).sum(dim=1).view(-1)
            triplet[name_m % "lora_E"] = s.view(-1, 1)
            scores.append(s.view(-1))
        threshold = torch.kthvalue(torch.cat(scores), k=self.init_bgt - budget)[0].item()
        pattern: dict[str, list[bool]] = {}
        with torch.no_grad():
            for n, p in model.named_parameters():
                if f"lora_E.{a}" in n:
                    drop = triplet[n] <= threshold
                    p.masked_fill_(drop, 0.0)
                    pattern[n] = (~drop).view(-1).tolist()
        return pattern

    def update_and_allocate(self, model: nn.Module, global_step: int, force_mask: bool = False):
        c = self.peft_config
        if global_step < c.total_step - c.tfinal:
            self.update_ipt(model)
        budget, mask = self.budget_schedule(global_step)
        pattern = self.mask_to_budget(model, budget) if (mask or force_mask) else None
        return budget, pattern

    def mask_using_rank_pattern(self, model: nn.Module, rank_pattern: dict) -> None:
        a = self.adapter_name
        truncated = a not in next(iter(rank_pattern.keys()))
        with torch.no_grad():
            for n, p in model.named_parameters():
                if f"lora_E.{a}" in n:
                    key = n.replace(f".{a}", "") if truncated else n
                    keep = torch.tensor(rank_pattern[key], dtype=torch.bool, device=p.device).unsqueeze(-1)
                    p.masked_fill_(~keep, 0.0)


def _strip_adapter(rank_pattern: dict, adapter_name: str) -> dict:
    return {k.replace(f".{adapter_name}", ""): v for k, v in rank_pattern.items()}


def _pattern_module_key(name: str, adapter_name: str) -> str:
    """Module path of a rank_pattern key ('<path>.lora_E[.<adapter>]' -> '<path>'), PEFT's rule."""
    parts = name.split(".")
    return ".".join(parts[:-2]) if adapter_name in name else ".".join(parts[:-1])


@register_tuner(PeftType.ADALORA)
class AdaLoraModel(BaseTuner):
    """AdaLoRA tuner (HF PEFT's ``AdaLoraModel``); one trainable adapter (others must be inference_mode)."""

    prefix = "lora_"
    layer_cls = AdaLoraLayer
    target_module_defaults = ADALORA_TARGET_MODULE_DEFAULTS

    rankallocator: Optional[RankAllocator] = None
    trainable_adapter_name: Optional[str] = None

    def _check_new_adapter_config(self, config) -> None:
        super()._check_new_adapter_config(config)
        trainable = [n for n, c in self.peft_config.items() if not c.inference_mode]
        if trainable and not config.inference_mode:
            raise ValueError(f"AdaLoraModel supports only one trainable adapter (adapter {trainable[0]!r} is "
                             "trainable); set inference_mode=True for the others")

    def add_weighted_adapter(self, *args, **kwargs) -> None:
        """Not for AdaLoRA (its adapters' ranks differ per layer and change in training), as in HF PEFT."""
        raise TypeError(f"{type(self).__name__} does not support add_weighted_adapter (AdaLoRA does not support this "
                        "method, as in HF PEFT)")

    def _finish_injection(self, adapter_name: str) -> None:
        cfg = self.peft_config[adapter_name]
        if not cfg.inference_mode and getattr(self, "rankallocator", None) is None:
            self.trainable_adapter_name = adapter_name
            self.rankallocator = RankAllocator(self.model, cfg, adapter_name)

    def _remove_adapter(self, adapter_name: str, unwrap_empty: bool) -> None:
        super()._remove_adapter(adapter_name, unwrap_empty)
        if getattr(self, "trainable_adapter_name", None) == adapter_name:
            self.trainable_adapter_name = None
            self.rankallocator = None

    def _create_and_replace(self, config, adapter_name, target, target_name, parent, current_key) -> None:
        if isinstance(target, AdaLoraLayer):
            target.update_layer(adapter_name, config.init_r, config.lora_alpha, config)
            return
        new = make_adalora_layer(target, adapter_name, config.init_r, config.lora_alpha, config)
        if new is None:
            self.conv1d_fan_in_fan_out_warning(target, config)
            new = SVDLinear(target, adapter_name, config.init_r, config.lora_alpha, config)
        if adapter_name not in self.active_adapters:
            new.requires_grad_(False)
        setattr(parent, target_name, new)

    # -- training -----------------------------------------------------------------------------------------------
    def forward(self, *args, **kwargs):
        """Run the model; add the orthogonal regularisation to ``outputs.loss`` when there is one."""
        outputs = self.model(*args, **kwargs)
        loss = getattr(outputs, "loss", None)
        name = getattr(self, "trainable_adapter_name", None)
        if isinstance(loss, torch.Tensor) and name is not None:
            w = self.peft_config[name].orth_reg_weight
            reg = 0
            count = 0
            for n, p in self.model.named_parameters():
                if ("lora_A" in n or "lora_B" in n) and name in n:
                    reg = reg + orth_reg_term(p, is_a="lora_A" in n)
                    count += 1
            if count:
                outputs.loss = loss + w * (reg / count)
        return outputs

    def update_and_allocate(self, global_step: int) -> None:
        """Update the importance scores and mask ``lora_E`` to the step's budget (PEFT's schedule).

        Call after ``loss.backward()`` and before ``optimizer.zero_grad()``.  Sets ``config.rank_pattern``.
        """
        name = getattr(self, "trainable_adapter_name", None)
        if name is None or getattr(self, "rankallocator", None) is None:
            raise ValueError("update_and_allocate needs a trainable AdaLoRA adapter (inference_mode=False)")
        cfg = self.peft_config[name]
        end = cfg.total_step - cfg.tfinal
        if global_step < end:
            _, pattern = self.rankallocator.update_and_allocate(self.model, global_step)
            if pattern:
                cfg.rank_pattern = pattern
        elif global_step == end:
            _, pattern = self.rankallocator.update_and_allocate(self.model, global_step, force_mask=True)
            cfg.rank_pattern = pattern
            self.rankallocator.reset_ipt()
        else:
            self.rankallocator.mask_using_rank_pattern(self.model, cfg.rank_pattern)

    # -- save / load (sliced by rank_pattern) -------------------------------------------------------------------
    def _layer_masks(self, adapter_name: str) -> dict[str, list[bool]]:
        """{module path: keep mask} from the adapter's rank_pattern (empty when there is none)."""
        pat = self.peft_config[adapter_name].rank_pattern
        if not pat:
            return {}
        return {_pattern_module_key(k, adapter_name): list(v) for k, v in pat.items()}

    def get_adapter_state_dict(self, adapter_name: str = "default") -> dict[str, torch.Tensor]:
        sd = super().get_adapter_state_dict(adapter_name)
        cfg = self.peft_config[adapter_name]
        if cfg.rank_pattern:
            # PEFT rewrites the pattern's keys without the adapter name when it saves (and keeps them so)
            cfg.rank_pattern = _strip_adapter(cfg.rank_pattern, adapter_name)
        for path, keep in self._layer_masks(adapter_name).items():
            idx = torch.tensor(keep, dtype=torch.bool)
            rank = int(idx.sum())
            for attr in ("lora_E", "lora_A", "lora_B"):
                k = f"base_model.model.{path}.{attr}"
                if k not in sd:
                    continue
                t = sd[k]
                if attr == "lora_B":
                    sd[k] = t[:, idx.to(t.device)] if rank != t.shape[1] else t
                else:
                    sd[k] = t[idx.to(t.device)] if rank != t.shape[0] else t
        return sd

    def _expected_adapter_shapes(self, adapter_name: str) -> dict[str, tuple[int, ...]]:
        shapes = super()._expected_adapter_shapes(adapter_name)
        for path, keep in self._layer_masks(adapter_name).items():
            rank = sum(bool(b) for b in keep)
            for attr in ("lora_E", "lora_A", "lora_B"):
                k = f"base_model.model.{path}.{attr}"
                if k in shapes:
                    s = shapes[k]
                    shapes[k] = (s[0], rank) if attr == "lora_B" else (rank,) + tuple(s[1:])
        return shapes

    def check_adapter_state_dict(self, adapter_name: str, state_dict) -> None:
        for path in self._layer_masks(adapter_name):
            try:
                layer = self.model.get_submodule(path)
            except AttributeError:
                layer = None
            if not isinstance(layer, AdaLoraLayer) or adapter_name not in layer.lora_A:
                raise ValueError(f"rank_pattern names module {path!r}, which has no AdaLoRA adapter "
                                 f"{adapter_name!r} in this model")
        super().check_adapter_state_dict(adapter_name, state_dict)

    def _apply_adapter_state_dict(self, adapter_name: str, state_dict) -> None:
        cfg = self.peft_config[adapter_name]
        for path, keep in self._layer_masks(adapter_name).items():
            _, layer, _ = get_submodules(self.model, path)
            rank = sum(bool(b) for b in keep)
            if layer.lora_A[adapter_name].shape[0] == rank:
                continue
            ranknum = layer._ranknum_value[adapter_name]
            was_trainable = layer.lora_A[adapter_name].requires_grad
            old_dtype = layer.lora_A[adapter_name].dtype
            layer.update_layer(adapter_name, rank, cfg.lora_alpha, cfg, ranknum=ranknum)
            for attr in ("lora_A", "lora_E", "lora_B"):
                par = getattr(layer, attr)[adapter_name]
                par.data = par.data.to(old_dtype)
                par.requires_grad_(was_trainable)
        super()._apply_adapter_state_dict(adapter_name, state_dict)
