"""DoRA (``use_dora=True``) against HF PEFT 0.21.2 in fp32: outputs, every gradient (magnitude included), merged
weights, several adapters, files both ways, mixed batches, and a short training run; plus the accuracy of the
expanded row norm against fp64."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

import fastpeft  # noqa: E402
from testing_utils import (assert_lm_parity, inputs, merged_state, randomize_trainable,  # noqa: E402
                        tiny_gpt2, tiny_llama, wrap_pair)
from testing_utils import OneLinear, PEFT_PARITY_RTOL, assert_close_rel, dora_pair  # noqa: E402
from fastpeft.tuners.lora.dora import dora_row_norm  # noqa: E402

def both(**kw):
    return peft.LoraConfig(**kw), fastpeft.LoraConfig(**kw)


@pytest.mark.parametrize("arch,dropout", [("llama", 0.1), ("gpt2", 0.0)])
def test_dora_parity_train_eval_merge(arch, dropout):
    p, f = dora_pair(arch, lora_dropout=dropout)
    mags = [n for n, _ in f.named_parameters() if "lora_magnitude_vector" in n]
    assert mags and all(n.endswith(".default.weight") for n in mags)
    assert_lm_parity(p, f, train=True)    # train: with dropout the extra W·drop(x) matmul, like PEFT
    assert_lm_parity(p, f, train=False)   # eval: base output reused
    sp, sf = merged_state(p), merged_state(f)
    assert sorted(sp) == sorted(sf)
    for k in sp:
        assert_close_rel(sf[k], sp[k], PEFT_PARITY_RTOL, f"merged {k}")
    # same saved keys and shapes as PEFT (magnitude without ".weight")
    kp = {k: tuple(v.shape) for k, v in peft.get_peft_model_state_dict(p).items()}
    kf = {k: tuple(v.shape) for k, v in fastpeft.get_peft_model_state_dict(f).items()}
    assert kf == kp and any(k.endswith("lora_magnitude_vector") for k in kf)


def test_dora_merge_unmerge_several_adapters():
    """A DoRA and a LoRA adapter active together: summed outputs, merged in turn (the DoRA norm is taken on the
    unmerged weight), unmerged back to the original weights."""
    p, f = wrap_pair(tiny_llama(), *both(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], use_dora=True))
    kw = dict(r=2, lora_alpha=4, target_modules=["v_proj", "o_proj"], init_lora_weights=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.manual_seed(2)
        p.add_adapter("b", peft.LoraConfig(use_dora=True, **kw))
        torch.manual_seed(2)
        f.add_adapter("b", fastpeft.LoraConfig(use_dora=True, **kw))
        torch.manual_seed(3)
        p.add_adapter("c", peft.LoraConfig(**kw))
        torch.manual_seed(3)
        f.add_adapter("c", fastpeft.LoraConfig(**kw))
    for m in (p, f):
        m.base_model.set_adapter(["c", "default", "b"])
    randomize_trainable(p, f)
    assert_lm_parity(p, f, train=False)
    before = copy.deepcopy(f.state_dict())
    ids = inputs()
    with torch.no_grad():
        ref_p = p(input_ids=ids).logits
        ref_f = f(input_ids=ids).logits
        p.merge_adapter()
        f.merge_adapter()
        assert_close_rel(f(input_ids=ids).logits, ref_f, PEFT_PARITY_RTOL, "merged vs unmerged logits")
        assert_close_rel(p(input_ids=ids).logits, ref_p, PEFT_PARITY_RTOL, "PEFT merged vs unmerged")
        sp, sf = p.state_dict(), f.state_dict()
        for k in sp:
            assert_close_rel(sf[k], sp[k], PEFT_PARITY_RTOL, f"merged {k}")
        f.unmerge_adapter()
        for k, v in f.state_dict().items():
            assert_close_rel(v, before[k], PEFT_PARITY_RTOL, f"unmerged {k}")
        assert_close_rel(f(input_ids=ids).logits, ref_f, PEFT_PARITY_RTOL, "after unmerge")


def test_dora_safe_merge_refuses_nan():
    _, f = dora_pair("gpt2")
    layer = f.base_model.model.transformer.h[0].attn.c_attn
    w0 = layer.base_layer.weight.detach().clone()
    with torch.no_grad():
        layer.lora_magnitude_vector["default"].weight[3] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        layer.merge(safe_merge=True)
    assert torch.equal(layer.base_layer.weight, w0) and not layer.merged


def test_dora_files_load_both_ways(tmp_path):
    p, f = dora_pair("gpt2", lora_dropout=0.1)
    ids = inputs()
    p.save_pretrained(tmp_path / "p")
    f.save_pretrained(tmp_path / "f")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        f2 = fastpeft.PeftModel.from_pretrained(tiny_gpt2(), str(tmp_path / "p"))
        p2 = peft.PeftModel.from_pretrained(tiny_gpt2(), str(tmp_path / "f"))
    with torch.no_grad():
        p.eval()
        ref = p(input_ids=ids).logits
        assert_close_rel(f2(input_ids=ids).logits, ref, PEFT_PARITY_RTOL, "PEFT file in fastpeft")
        assert_close_rel(p2(input_ids=ids).logits, ref, PEFT_PARITY_RTOL, "fastpeft file in PEFT")
    from safetensors.torch import load_file

    a = load_file(str(tmp_path / "p" / "adapter_model.safetensors"))
    b = load_file(str(tmp_path / "f" / "adapter_model.safetensors"))
    assert sorted(a) == sorted(b)
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_dora_mixed_batch_rows_match_single_adapter():
    """PEFT refuses adapter_names with DoRA; fastpeft runs each row as if its adapter were the only one active."""
    _, f = dora_pair("llama", lora_dropout=0.1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.manual_seed(4)
        f.add_adapter("b", fastpeft.LoraConfig(r=2, target_modules=["q_proj", "o_proj"], use_dora=True,
                                              init_lora_weights=False))
    f.eval()
    ids = inputs(batch=3)
    names = ["b", "__base__", "default"]
    with torch.no_grad():
        out = f(input_ids=ids, adapter_names=names).logits
        for i, a in enumerate(names):
            if a == "__base__":
                with f.disable_adapter():
                    ref = f(input_ids=ids[i:i + 1]).logits
            else:
                f.set_adapter(a)
                ref = f(input_ids=ids[i:i + 1]).logits
            assert_close_rel(out[i:i + 1], ref, PEFT_PARITY_RTOL, f"row {i} ({a})")


def test_dora_training_run_matches_peft():
    """A short AdamW run (dropout on): the loss curves agree step by step."""
    p, f = dora_pair("llama", lora_dropout=0.1, r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    g = torch.Generator().manual_seed(7)
    batches = [torch.randint(3, 128, (2, 10), generator=g) for _ in range(2)]
    curves = []
    for m in (p, f):
        m.train()
        opt = torch.optim.AdamW([q for q in m.parameters() if q.requires_grad], lr=1e-2)
        losses = []
        for step in range(8):
            ids = batches[step % len(batches)]
            torch.manual_seed(100 + step)
            loss = m(input_ids=ids, labels=ids).loss
            loss.backward()
            opt.step()
            opt.zero_grad()
            losses.append(loss.item())
        curves.append(torch.tensor(losses, dtype=torch.float64))
    assert curves[1][-1] < curves[1][0] - 0.05, f"no learning: {curves[1].tolist()}"
    assert_close_rel(curves[1], curves[0], 1e-4, "loss curve")


def test_dora_norm_cache_follows_base_weight():
    _, f = dora_pair("gpt2")
    f.eval()
    ids = inputs()
    with torch.no_grad():
        y0 = f(input_ids=ids).logits
        layer = f.base_model.model.transformer.h[0].attn.c_attn
        layer.base_layer.weight.mul_(1.5)   # an in-place change of the frozen weight (e.g. a base checkpoint load)
        y1 = f(input_ids=ids).logits
        layer.base_layer.weight.div_(1.5)
        y2 = f(input_ids=ids).logits
    assert not torch.allclose(y0, y1)
    assert_close_rel(y2, y0, PEFT_PARITY_RTOL, "restored weight")


@pytest.mark.parametrize("max_fallback_rows", [None, 6])
@pytest.mark.parametrize("scale", [1e-3, 1.0, 30.0])
def test_expanded_norm_accuracy_vs_fp64(scale, max_fallback_rows):
    """The expanded row norm stays within 2x the error of the direct fp32 norm (PEFT's) against fp64, including
    rows where s·B·A nearly cancels W (those rows fall back to the direct form)."""
    g = torch.Generator().manual_seed(0)
    out, inn, r, s = 96, 160, 8, 2.0
    W = torch.randn(out, inn, generator=g, dtype=torch.float64) * 0.05
    A = torch.randn(r, inn, generator=g, dtype=torch.float64) * 0.1
    B = torch.randn(out, r, generator=g, dtype=torch.float64) * 0.1 * scale
    # rows 0-3: W = -s·B·A + tiny, so ‖W + sBA‖ is 1e-4 of ‖W‖ (cancellation)
    W[:4] = -s * (B[:4] @ A) + 1e-4 * W[:4]
    ref = torch.linalg.norm(W + s * (B @ A), dim=1)
    W32, A32, B32 = W.float(), A.float(), B.float()
    direct = torch.linalg.norm(W32 + s * (B32 @ A32), dim=1).double()
    ours = dora_row_norm(W32, A32, B32, s, max_fallback_rows=max_fallback_rows).double()
    err_direct = ((direct - ref).abs() / ref).max().item()
    err_ours = ((ours - ref).abs() / ref).max().item()
    eps = torch.finfo(torch.float32).eps
    assert err_ours <= 2 * max(err_direct, eps), (err_ours, err_direct)


def test_dora_bf16_layer_within_twice_peft_error():
    """bf16 base, fp32 adapters (PEFT's default): fastpeft's DoRA layer (eval: one LoRA call plus a column scale)
    stays within 2x the error of PEFT's DoRA layer against an fp64 reference."""

    torch.manual_seed(0)
    base = OneLinear(256, 192)
    with torch.no_grad():
        base.proj.weight.normal_(0, 256 ** -0.5)
    p, f = wrap_pair(base.to(torch.bfloat16), *both(r=8, lora_alpha=16, target_modules=["proj"], use_dora=True))
    randomize_trainable(p, f, scale=0.3)
    L, F_ = p.base_model.model.proj, f.base_model.model.proj
    x = torch.randn(64, 256, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16)
    W, b = L.base_layer.weight.double(), L.base_layer.bias.double()
    A, B = L.lora_A["default"].weight.double(), L.lora_B["default"].weight.double()
    m = L.lora_magnitude_vector["default"].weight.double()
    Wt = W + L.scaling["default"] * (B @ A)
    ref = x.double() @ ((m / torch.linalg.norm(Wt, dim=1))[:, None] * Wt).t() + b
    p.eval()
    f.eval()
    with torch.no_grad():
        err_p = ((L(x).double() - ref).norm() / ref.norm()).item()
        err_f = ((F_(x).double() - ref).norm() / ref.norm()).item()
    assert err_f <= 2 * err_p, (err_f, err_p)
