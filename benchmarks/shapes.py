"""Named shape registry: (projection, K=in_features, N=out_features) x tokens M x rank r.

``llama3-8b``: Llama-3-8B's projections (hidden 4096, 32 query / 8 key-value heads of 128, FFN 14336).
``cpu-small``: the same projections scaled down 16x, for machines without CUDA (so a CPU run finishes in about a
minute); results on these shapes are labelled with the registry name and say nothing about GPU performance.
"""

from __future__ import annotations

from dataclasses import dataclass

# projection -> (in_features K, out_features N)
LLAMA3_8B = {
    "q_proj": (4096, 4096),
    "k_proj": (4096, 1024),
    "v_proj": (4096, 1024),
    "o_proj": (4096, 4096),
    "gate_proj": (4096, 14336),
    "up_proj": (4096, 14336),
    "down_proj": (14336, 4096),
}
CPU_SMALL = {name: (k // 16, n // 16) for name, (k, n) in LLAMA3_8B.items()}

# ``tiny``: odd sizes for the benchmark's own tests (seconds on CPU).
TINY = {"q_proj": (48, 40), "down_proj": (72, 24)}

REGISTRIES = {
    "llama3-8b": {"proj": LLAMA3_8B, "M": (1, 16, 2048, 8192), "r": (8, 16, 64)},
    "cpu-small": {"proj": CPU_SMALL, "M": (1, 16, 256), "r": (8, 16, 64)},
    "tiny": {"proj": TINY, "M": (1, 7), "r": (1, 4)},
}
QUICK = {
    "llama3-8b": {"proj": ("q_proj", "down_proj"), "M": (16, 2048), "r": (16,)},
    "cpu-small": {"proj": ("q_proj", "down_proj"), "M": (16, 256), "r": (16,)},
    "tiny": {"proj": ("q_proj", "down_proj"), "M": (7,), "r": (4,)},
}

# IA3's default Llama targets: k/v (attention, output scaling) and down_proj (feed-forward, input scaling).
IA3_ATTENTION = ("k_proj", "v_proj", "q_proj", "o_proj")
IA3_FEEDFORWARD = ("down_proj", "gate_proj", "up_proj")


@dataclass(frozen=True)
class Shape:
    registry: str
    proj: str
    M: int
    K: int
    N: int
    r: int

    @property
    def name(self) -> str:
        return f"{self.registry}.{self.proj} M={self.M}" + (f" r={self.r}" if self.r else "")

    @property
    def short(self) -> str:
        return f"{self.proj.replace('_proj', '')} M{self.M}" + (f" r{self.r}" if self.r else "")


def shapes(registry: str, quick: bool = False, with_rank: bool = True) -> list[Shape]:
    """Every (projection, M, r) of a registry (the QUICK subset when ``quick``); r=0 when ``with_rank`` is False."""
    if registry not in REGISTRIES:
        raise ValueError(f"unknown shape registry {registry!r}; known: {sorted(REGISTRIES)}")
    reg = REGISTRIES[registry]
    sel = QUICK[registry] if quick else {"proj": tuple(reg["proj"]), "M": reg["M"], "r": reg["r"]}
    ranks = sel["r"] if with_rank else (0,)
    out = []
    for proj in sel["proj"]:
        k, n = reg["proj"][proj]
        for m in sel["M"]:
            for r in ranks:
                out.append(Shape(registry, proj, m, k, n, r))
    return out


# End-to-end model: Llama with Llama-3-8B dimensions and 4 layers; batch 4 x 2048 (CUDA), and a small CPU stand-in.
E2E = {
    "llama3-8b-4l": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=4, num_attention_heads=32,
                         num_key_value_heads=8, vocab_size=128256, max_position_embeddings=8192,
                         batch=4, seq=2048),
    "cpu-small-4l": dict(hidden_size=256, intermediate_size=896, num_hidden_layers=4, num_attention_heads=8,
                         num_key_value_heads=2, vocab_size=2048, max_position_embeddings=512,
                         batch=2, seq=128),
    "tiny-4l": dict(hidden_size=32, intermediate_size=48, num_hidden_layers=4, num_attention_heads=4,
                    num_key_value_heads=2, vocab_size=64, max_position_embeddings=64, batch=2, seq=8),
}
