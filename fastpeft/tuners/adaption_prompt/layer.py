"""Adaption prompt (LLaMA-Adapter, Zhang et al. 2023): gated, separately normalised prompt attention.

An adapted attention layer computes, on top of the unchanged attention output ``o`` (after its output projection)::

    K_p = k_proj(P),  V_p = v_proj(P)                  P: (1, A, hidden) learned; NO rotary embedding on K_p
    q   = rope(q_proj(h))                               the layer's own queries, recomputed (rotary models only)
    s   = g · softmax(q K_pᵀ / √head_dim)               over the A adapter tokens only, in fp32, no mask
    out = o + W_o (s V_p)                               W_o: o_proj's weight (llama family; no bias)  /  nothing (GPT-2)

``g`` is one scalar per layer, initialised to 0, so at init the model is exactly the base model.  With grouped-query
attention the KV heads of ``K_p``/``V_p`` are repeated to the query heads exactly as the model repeats its own KV.

Supported model types: llama, mistral, qwen2 (HF PEFT refuses qwen2) and gpt2.  The llama family shares one code
path (q/k/v/o projections and the ``position_embeddings=(cos, sin)`` the decoder layer passes to attention); GPT-2
uses its fused ``c_attn`` projection and, as in PEFT, adds the adapter output without the output projection.

Differences from PEFT (documented, deliberate): the adapter output is projected with ``o_proj``'s weight only, so a
model whose ``o_proj`` has a bias stays exactly the base model at init (PEFT adds the bias a second time); the number
of KV heads comes from the layer's projection sizes, not ``hidden // k_proj.out_features`` (they differ when
``head_dim`` is set explicitly).
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..tuners_utils import BaseTunerLayer

# model_type -> (default target_modules, code path)
SUPPORTED_MODEL_TYPES = {
    "llama": ("self_attn", "llama"),
    "mistral": ("self_attn", "llama"),
    "qwen2": ("self_attn", "llama"),
    "gpt2": ("attn", "gpt2"),
}


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """(..., d) -> (..., d): ``[-x2, x1]`` for the halves x1, x2 of the last axis (the rotary-embedding rotation)."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def adaption_attention_ref(q: torch.Tensor, k_p: torch.Tensor, v_p: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
    """The adapter's attention: ``gate · softmax(q k_pᵀ/√d) v_p`` over the adapter tokens only.

    Args:
        q: (B, H, L, d) queries (already rotated for rotary models).
        k_p, v_p: (B or 1, H_kv, A, d) adapter keys / values; H must be a multiple of H_kv (grouped-query attention:
            KV head j serves query heads j·H/H_kv ... (j+1)·H/H_kv - 1, as ``repeat_kv`` in transformers).
        gate: (1,) or scalar.
    Returns:
        (B, L, H·d) in q's dtype.
    """
    b, h, l, d = q.shape
    h_kv = k_p.shape[1]
    if h % h_kv:
        raise ValueError(f"number of query heads {h} is not a multiple of the number of KV heads {h_kv}")
    rep = h // h_kv
    if rep > 1:
        k_p = k_p.repeat_interleave(rep, dim=1)
        v_p = v_p.repeat_interleave(rep, dim=1)
    scores = torch.matmul(q, k_p.to(q.dtype).transpose(-1, -2)) / math.sqrt(d)
    probs = F.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
    probs = gate * probs
    out = torch.matmul(probs, v_p.to(probs.dtype))  # (B, H, L, d)
    return out.transpose(1, 2).reshape(b, l, h * d).to(q.dtype)


def _linear_no_bias(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``x Wᵀ`` of a projection, without its bias (so a zero input maps to zero)."""
    if isinstance(layer, nn.Linear):
        return F.linear(x.to(layer.weight.dtype), layer.weight)
    y = layer(x)
    bias = getattr(layer, "bias", None)
    return y - bias if bias is not None else y


class AdaptedAttention(BaseTunerLayer):
    """Wraps one attention module (kept as ``.base_layer``) and adds the adaption prompt to its output.

    Holds one ``adaption_prompt`` (1, A, hidden) and one ``adaption_gate`` (1,) per adapter name in ParameterDicts
    (saved as PEFT's ``<path>.adaption_prompt`` / ``<path>.adaption_gate``); one adapter is active at a time (PEFT's
    rule for this method).

    Args:
        attn: the attention module (LlamaAttention / MistralAttention / Qwen2Attention / GPT2Attention).
        kind: ``"llama"`` (q/k/v/o projections + rotary position embeddings) or ``"gpt2"`` (fused ``c_attn``).
    """

    adapter_layer_names = ("adaption_prompt", "adaption_gate")

    def __init__(self, attn: nn.Module, kind: str) -> None:
        if isinstance(attn, AdaptedAttention):
            raise TypeError("this attention module already carries an adaption prompt")
        if kind not in ("llama", "gpt2"):
            raise ValueError(f"kind must be 'llama' or 'gpt2', got {kind!r}")
        if kind == "llama":
            for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
                if not hasattr(attn, name):
                    raise TypeError(f"{type(attn).__name__} has no {name}; cannot add an adaption prompt to it")
            if not hasattr(attn, "head_dim"):
                raise TypeError(f"{type(attn).__name__} has no head_dim; cannot add an adaption prompt to it")
        elif not hasattr(attn, "c_attn") or getattr(attn, "is_cross_attention", False):
            raise TypeError(f"{type(attn).__name__} is not a GPT-2 self-attention module")
        super().__init__(attn)
        self.kind = kind
        self.adaption_prompt = nn.ParameterDict()
        self.adaption_gate = nn.ParameterDict()
        if kind == "llama":
            self.head_dim = int(attn.head_dim)
            self.num_heads = _out_features(attn.q_proj) // self.head_dim
            self.num_kv_heads = _out_features(attn.k_proj) // self.head_dim
            self.hidden_size = _in_features(attn.q_proj)
        else:
            self.head_dim = int(attn.head_dim)
            self.num_heads = int(attn.num_heads)
            self.num_kv_heads = self.num_heads
            self.hidden_size = int(attn.embed_dim)

    # -- adapters -----------------------------------------------------------------------------------------------
    def add_adapter(self, name: str, adapter_len: int, dtype: Optional[torch.dtype] = None) -> None:
        """Create ``adaption_prompt[name]`` ~ N(0, 1) (1, adapter_len, hidden) and ``adaption_gate[name]`` = 0 (1,).

        The dtype defaults to the attention weights' dtype (PEFT's choice, so the file matches).
        """
        attn = self.base_layer
        w = attn.q_proj.weight if self.kind == "llama" else attn.c_proj.weight
        dtype = dtype or (w.dtype if w.dtype.is_floating_point else torch.float32)
        self.adaption_prompt[name] = nn.Parameter(
            torch.empty(1, adapter_len, self.hidden_size, device=w.device, dtype=dtype).normal_())
        self.adaption_gate[name] = nn.Parameter(torch.zeros(1, device=w.device, dtype=dtype))

    def _merge_one(self, adapter_name: str, safe_merge: bool) -> None:
        raise ValueError("an adaption prompt is an extra attention term and cannot be merged into the base weights; "
                         "use unload() to remove it")

    # -- forward ------------------------------------------------------------------------------------------------
    def forward(self, *args, **kwargs):
        out = self.base_layer(*args, **kwargs)
        names = [] if self.disable_adapters else self._present_active()
        if not names:
            return out
        if len(names) > 1:
            raise ValueError(f"only one adaption-prompt adapter can be active at a time, got {names}")
        if kwargs.get("output_attentions"):
            raise NotImplementedError("output_attentions is not supported with an adaption prompt")
        hidden = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
        attn_out, rest = (out[0], tuple(out[1:])) if isinstance(out, tuple) else (out, None)
        extra = self.adapter_output(hidden, names[0], kwargs.get("position_embeddings"))
        attn_out = (attn_out + extra).to(attn_out.dtype)
        return (attn_out, *rest) if rest is not None else attn_out

    def adapter_output(self, hidden: torch.Tensor, name: str,
                       position_embeddings: Optional[tuple[torch.Tensor, torch.Tensor]] = None) -> torch.Tensor:
        """The gated prompt-attention term added to the attention output.

        Args:
            hidden: (B, L, hidden) the attention module's input.
            position_embeddings: ``(cos, sin)``, each (B, L, head_dim), for the llama family (required there).
        Returns:
            (B, L, hidden).
        """
        attn = self.base_layer
        prompt = self.adaption_prompt[name]
        gate = self.adaption_gate[name]
        b, l, _ = hidden.shape
        hd, a = self.head_dim, prompt.shape[1]
        if self.kind == "llama":
            if position_embeddings is None:
                raise ValueError("the adaption prompt needs the rotary `position_embeddings=(cos, sin)` that the "
                                 "decoder layer passes to its attention module")
            q = attn.q_proj(hidden).view(b, l, -1, hd).transpose(1, 2)
            cos, sin = position_embeddings
            cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
            q = q * cos + rotate_half(q) * sin
            k_p = attn.k_proj(prompt).view(1, a, self.num_kv_heads, hd).transpose(1, 2)
            v_p = attn.v_proj(prompt).view(1, a, self.num_kv_heads, hd).transpose(1, 2)
            ctx = adaption_attention_ref(q, k_p, v_p, gate)
            return _linear_no_bias(attn.o_proj, ctx)
        split = self.hidden_size
        q = attn.c_attn(hidden).split(split, dim=2)[0]
        q = q.view(b, l, self.num_heads, hd).transpose(1, 2)
        _, k_p, v_p = attn.c_attn(prompt).split(split, dim=2)
        k_p = k_p.view(1, a, self.num_heads, hd).transpose(1, 2)
        v_p = v_p.view(1, a, self.num_heads, hd).transpose(1, 2)
        return adaption_attention_ref(q, k_p, v_p, gate)

    def __getattr__(self, name: str):
        # transformers code may read attributes (layer_idx, config, is_causal, ...) of the attention module.
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "base_layer":
                raise
            return getattr(self.base_layer, name)


def _out_features(layer: nn.Module) -> int:
    if hasattr(layer, "out_features"):
        return int(layer.out_features)
    return int(layer.weight.shape[0])


def _in_features(layer: nn.Module) -> int:
    if hasattr(layer, "in_features"):
        return int(layer.in_features)
    return int(layer.weight.shape[1])
