"""fastpeft.accelerate / restore on models built by HF PEFT (tiny Llama with nn.Linear, tiny GPT-2 with Conv1D)."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.nn as nn

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

from testing_utils import ELEMENTWISE, PEFT_PARITY_RTOL, rel_err  # noqa: E402

import fastpeft  # noqa: E402
from fastpeft import integrations  # noqa: E402
from fastpeft.integrations import accelerate, fallback_reason, is_accelerated, restore  # noqa: E402

warnings.filterwarnings("ignore", message=".*fan_in_fan_out.*")


def _tiny_llama():
    cfg = transformers.LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return transformers.LlamaForCausalLM(cfg)


def _tiny_gpt2():
    # resid/attn/embd dropout default to 0.1: model-level dropout also draws from the RNG, which the test seeds.
    cfg = transformers.GPT2Config(vocab_size=128, n_embd=64, n_layer=2, n_head=4, n_positions=64,
                                  bos_token_id=0, eos_token_id=0)
    return transformers.GPT2LMHeadModel(cfg)


MODELS = {"llama": _tiny_llama, "gpt2": _tiny_gpt2}


def _config(method: str, model: str):
    targets = "all-linear" if model == "llama" else None
    if method == "lora":
        # init_lora_weights=False: B != 0, so the adapter changes outputs and every gradient is non-trivial.
        return peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.1, target_modules=targets, init_lora_weights=False)
    if method == "lora_nodrop":
        return peft.LoraConfig(r=3, lora_alpha=5, lora_dropout=0.0, target_modules=targets, init_lora_weights=False,
                               use_rslora=True)
    if method == "adalora":
        return peft.AdaLoraConfig(init_r=6, target_r=2, total_step=10, lora_dropout=0.1)
    if method == "ia3":
        return peft.IA3Config(init_ia3_weights=False)
    raise AssertionError(method)


def _build(model: str, method: str):
    torch.manual_seed(0)
    m = peft.get_peft_model(MODELS[model](), _config(method, model))
    if method == "adalora":
        # PEFT inits E = 0 (so dA = dB = 0); give the singular values realistic non-zero values.
        gen = torch.Generator().manual_seed(3)
        with torch.no_grad():
            for n, p in m.named_parameters():
                if "lora_E" in n:
                    p.copy_(torch.randn(p.shape, generator=gen))
    return m


def _step(m, ids, seed=1):
    """One forward + backward under a fixed RNG state; returns logits, loss and the gradients by name."""
    m.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    out = m(input_ids=ids, labels=ids)
    out.loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in m.named_parameters() if p.grad is not None}
    return out.logits.detach().clone(), out.loss.detach().clone(), grads


def _count_fused(monkeypatch):
    calls = {"n": 0}
    for name in ("lora_linear", "adalora_linear", "ia3_linear"):
        orig = getattr(integrations, name)

        def wrapped(*a, _orig=orig, **k):
            calls["n"] += 1
            return _orig(*a, **k)

        monkeypatch.setattr(integrations, name, wrapped)
    return calls


def _peft_layers(m):
    return [mod for mod in m.modules() if integrations._kind(mod) is not None]


@pytest.mark.parametrize("model", ["llama", "gpt2"])
@pytest.mark.parametrize("method", ["lora", "lora_nodrop", "adalora", "ia3"])
def test_outputs_and_gradients_equal(model, method, monkeypatch):
    m = _build(model, method)
    m.train()
    ids = torch.randint(0, 128, (2, 11))
    logits0, loss0, grads0 = _step(m, ids)
    assert len(grads0) > 0

    calls = _count_fused(monkeypatch)
    assert accelerate(m, backend="torch") is m
    layers = _peft_layers(m)
    assert layers and all(is_accelerated(layer) for layer in layers)
    assert all(fallback_reason(layer) is None for layer in layers)
    logits1, loss1, grads1 = _step(m, ids)
    assert calls["n"] == len(layers), "every adapted layer must run the fused op exactly once"
    assert rel_err(logits1, logits0) <= PEFT_PARITY_RTOL
    assert rel_err(loss1, loss0) <= PEFT_PARITY_RTOL
    assert grads1.keys() == grads0.keys()
    for k in grads0:
        assert rel_err(grads1[k], grads0[k]) <= PEFT_PARITY_RTOL, k

    # eval mode (dropout off) too
    m.eval()
    with torch.no_grad():
        e1 = m(input_ids=ids).logits
    restore(m)
    assert not is_accelerated(m)
    with torch.no_grad():
        e0 = m(input_ids=ids).logits
    assert rel_err(e1, e0) <= PEFT_PARITY_RTOL

    # restore gives PEFT's own forward back: bit-identical to the first run, and the fused op is no longer called
    m.train()
    before = calls["n"]
    logits2, loss2, grads2 = _step(m, ids)
    assert calls["n"] == before
    assert torch.equal(logits2, logits0) and torch.equal(loss2, loss0)
    for k in grads0:
        assert torch.equal(grads2[k], grads0[k]), k


def test_instance_level_only():
    """accelerate never patches a class: a second PEFT model of the same classes keeps PEFT's forward."""
    from peft.tuners.lora.layer import Linear as PeftLoraLinear
    class_forward = PeftLoraLinear.forward
    a, b = _build("llama", "lora"), _build("llama", "lora")
    accelerate(a)
    assert PeftLoraLinear.forward is class_forward
    assert not is_accelerated(b)
    assert all("forward" not in layer.__dict__ for layer in _peft_layers(b))
    assert all("forward" in layer.__dict__ for layer in _peft_layers(a))
    restore(a)
    assert all("forward" not in layer.__dict__ for layer in _peft_layers(a))


@pytest.mark.parametrize("model,method", [("llama", "lora"), ("gpt2", "adalora"), ("llama", "ia3")])
def test_save_pretrained_tensors_identical(model, method, tmp_path):
    from safetensors.torch import load_file
    m = _build(model, method)
    ids_before = {n: id(p) for n, p in m.named_parameters()}
    m.save_pretrained(tmp_path / "before")
    accelerate(m)
    assert {n: id(p) for n, p in m.named_parameters()} == ids_before, "parameters must be shared, not copied"
    m.save_pretrained(tmp_path / "after")
    sd0 = load_file(tmp_path / "before" / "adapter_model.safetensors")
    sd1 = load_file(tmp_path / "after" / "adapter_model.safetensors")
    assert sd0.keys() == sd1.keys() and len(sd0) > 0
    for k in sd0:
        assert sd0[k].dtype == sd1[k].dtype and sd0[k].shape == sd1[k].shape, k
        assert sd0[k].view(torch.uint8).flatten().tolist() == sd1[k].view(torch.uint8).flatten().tolist(), k
    # also the PEFT state dict in memory (same tensors)
    sd_mem = peft.get_peft_model_state_dict(m)
    assert sd_mem.keys() == sd0.keys()


@pytest.mark.parametrize("model,method", [("llama", "lora"), ("gpt2", "lora"), ("llama", "adalora"),
                                          ("gpt2", "ia3")])
def test_optimizer_steps(model, method):
    """AdamW created before accelerate keeps training the shared parameters; 3 steps track PEFT's."""
    ref = _build(model, method)
    fast = copy.deepcopy(ref)
    opt_ref = torch.optim.AdamW([p for p in ref.parameters() if p.requires_grad], lr=1e-2)
    opt_fast = torch.optim.AdamW([p for p in fast.parameters() if p.requires_grad], lr=1e-2)
    accelerate(fast)
    ids = torch.randint(0, 128, (2, 9))
    start = {n: p.detach().clone() for n, p in fast.named_parameters() if p.requires_grad}
    for step in range(3):
        for m, opt in ((ref, opt_ref), (fast, opt_fast)):
            _step(m, ids, seed=10 + step)
            opt.step()
    moved = 0
    pr = dict(ref.named_parameters())
    for n, p in fast.named_parameters():
        if p.requires_grad:
            assert rel_err(p.detach(), pr[n].detach()) <= 10 * PEFT_PARITY_RTOL, n
            moved += int(not torch.equal(p.detach(), start[n]))
    assert moved > 0
    # the optimizer state is keyed by the very parameters the accelerated layers read
    assert all(p in opt_fast.state for p in fast.parameters() if p.requires_grad)


def test_bf16_base_fp32_adapters():
    """PEFT's default autocast_adapter_dtype: bf16 base, fp32 adapters; output cast back to bf16."""
    torch.manual_seed(0)
    base = _tiny_llama().to(torch.bfloat16)
    m = peft.get_peft_model(base, _config("lora_nodrop", "llama"))
    m.eval()
    layer = _peft_layers(m)[0]
    assert layer.lora_A["default"].weight.dtype == torch.float32
    x = torch.randn(3, 5, layer.in_features, dtype=torch.bfloat16)
    with torch.no_grad():
        y0 = layer(x)
        accelerate(m)
        y1 = layer(x)
    atol, rtol = ELEMENTWISE[torch.bfloat16]
    assert y1.dtype == y0.dtype == torch.bfloat16
    torch.testing.assert_close(y1, y0, atol=atol, rtol=rtol)


def _layer_out(layer, x, **kw):
    torch.manual_seed(5)
    return layer(x, **kw)


def test_fallback_cases_run_peft_forward(monkeypatch):
    torch.manual_seed(0)
    m = peft.get_peft_model(_tiny_llama(), peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"],
                                                           init_lora_weights=False))
    m.add_adapter("other", peft.LoraConfig(r=2, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    m.eval()
    layer = m.base_model.model.model.layers[0].self_attn.q_proj
    x = torch.randn(4, 64)
    ref = _layer_out(layer, x)
    calls = _count_fused(monkeypatch)
    accelerate(m)
    assert rel_err(_layer_out(layer, x), ref) <= PEFT_PARITY_RTOL and calls["n"] == 1

    # several active adapters
    m.base_model.set_adapter(["default", "other"])
    reason = fallback_reason(layer, x)
    assert reason is not None and "2 active adapters" in reason
    n = calls["n"]
    y = _layer_out(layer, x)
    assert calls["n"] == n
    restore(m)
    assert torch.equal(_layer_out(layer, x), y)
    accelerate(m)
    m.base_model.set_adapter("default")

    # mixed-batch adapter_names
    names = ["default", "other", "__base__", "default"]
    y = _layer_out(layer, x, adapter_names=names)
    assert calls["n"] == n and "adapter_names" in fallback_reason(layer, x, adapter_names=names)

    # disabled adapters
    with m.disable_adapter():
        assert fallback_reason(layer) == "adapters are disabled"
        torch.testing.assert_close(layer(x), layer.base_layer(x), atol=0, rtol=0)

    # merged
    layer.merge()
    assert "merged" in fallback_reason(layer)
    torch.testing.assert_close(_layer_out(layer, x), ref, atol=1e-5, rtol=1e-5)
    layer.unmerge()
    assert calls["n"] == n
    assert fallback_reason(layer, x) is None

    # dtype mismatch the base layer itself would reject is left to PEFT (which raises the same error)
    assert "dtype" in fallback_reason(layer, x.double())
    # wrong feature count
    assert "features" in fallback_reason(layer, torch.randn(2, 7))


@pytest.mark.parametrize("kw,needle", [({"use_dora": True}, "variant"), ({"lora_bias": True}, "lora_bias")])
def test_fallback_dora_and_lora_bias(kw, needle, monkeypatch):
    torch.manual_seed(0)
    base = _tiny_llama()
    for mod in base.modules():
        if isinstance(mod, nn.Linear):  # lora_bias needs a base bias
            if mod.bias is None and kw.get("lora_bias"):
                mod.bias = nn.Parameter(torch.randn(mod.out_features) * 0.1, requires_grad=False)
    m = peft.get_peft_model(base, peft.LoraConfig(r=4, target_modules=["q_proj"], init_lora_weights=False, **kw))
    m.train()
    ids = torch.randint(0, 128, (2, 7))
    l0, _, g0 = _step(m, ids)
    calls = _count_fused(monkeypatch)
    accelerate(m)
    layer = _peft_layers(m)[0]
    assert needle in fallback_reason(layer)
    l1, _, g1 = _step(m, ids)
    assert calls["n"] == 0
    assert torch.equal(l1, l0)
    for k in g0:
        assert torch.equal(g1[k], g0[k]), k


def test_trainable_base_bias_is_fused_and_correct():
    """bias='all' makes base biases trainable; the fused op computes dbias."""
    torch.manual_seed(0)
    m = peft.get_peft_model(_tiny_gpt2(), peft.LoraConfig(r=4, bias="all", init_lora_weights=False))
    m.train()
    ids = torch.randint(0, 128, (2, 7))
    l0, _, g0 = _step(m, ids)
    assert any("c_attn.base_layer.bias" in k for k in g0)
    accelerate(m)
    assert all(fallback_reason(layer) is None for layer in _peft_layers(m))
    l1, _, g1 = _step(m, ids)
    assert rel_err(l1, l0) <= PEFT_PARITY_RTOL
    for k in g0:
        assert rel_err(g1[k], g0[k]) <= PEFT_PARITY_RTOL, k


def test_bad_arguments():
    with pytest.raises(TypeError, match="nn.Module"):
        accelerate("not a model")
    with pytest.raises(TypeError, match="nn.Module"):
        restore(42)
    m = _build("llama", "ia3")
    with pytest.raises(ValueError, match="backend"):
        accelerate(m, backend="tpu")
    assert not is_accelerated(m)
    assert restore(m) is m  # never accelerated: a no-op
    assert fallback_reason(nn.Linear(2, 2)).endswith("not an HF PEFT LoRA/AdaLoRA/IA3 linear layer")


def test_top_level_exports():
    assert fastpeft.accelerate is accelerate and fastpeft.restore is restore


def test_merge_and_unload_after_accelerate():
    m = _build("llama", "lora")
    m.eval()
    ids = torch.randint(0, 128, (1, 6))
    with torch.no_grad():
        ref = m(input_ids=ids).logits
    accelerate(m)
    plain = m.merge_and_unload()
    assert not is_accelerated(plain)
    with torch.no_grad():
        out = plain(input_ids=ids).logits
    assert rel_err(out, ref) <= 10 * PEFT_PARITY_RTOL


@pytest.mark.interpreter
def test_triton_backend_eval_parity():
    if not fastpeft._backend.triton_available():
        pytest.skip(f"triton backend unavailable: {fastpeft._backend._triton_probe()[1]}")
    pytest.importorskip("fastpeft.kernels.lora", reason="the Triton LoRA kernel has not landed yet")
    m = _build("gpt2", "lora_nodrop")
    m.eval()
    ids = torch.randint(0, 128, (1, 5))
    with torch.no_grad():
        ref = m(input_ids=ids).logits
    accelerate(m, backend="triton")
    with torch.no_grad():
        out = m(input_ids=ids).logits
    assert rel_err(out, ref) <= 10 * PEFT_PARITY_RTOL
