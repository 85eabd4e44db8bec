"""bitsandbytes 4-bit / 8-bit bases (QLoRA) under LoRA, AdaLoRA and IA3: parity with HF PEFT 0.21.2 on the same
quantized tiny Llama (outputs, every gradient, merged quantized weights element for element), files both ways,
prepare_model_for_kbit_training, a short QLoRA run; plus the top-level ``kernels`` name clash of a source checkout.

bitsandbytes runs Linear4bit / Linear8bitLt on CPU; every test that needs it is skipped when it is missing.
"""

import dataclasses
import os
import subprocess
import sys
import warnings

import pytest
import torch

from testing_utils import PEFT_PARITY_RTOL, load_quantized, rel_err

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

try:
    import bitsandbytes as bnb  # noqa: F401
    import peft
    from transformers import BitsAndBytesConfig, LlamaConfig, LlamaForCausalLM
    HAVE_BNB = True
except ImportError:  # pragma: no cover - the CI installs the test extras
    HAVE_BNB = False

needs_bnb = pytest.mark.skipif(not HAVE_BNB, reason="bitsandbytes / peft / transformers not installed")

import fastpeft  # noqa: E402

QUANT = {
    "nf4-dq": dict(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                   bnb_4bit_compute_dtype=torch.float32),
    "fp4": dict(load_in_4bit=True, bnb_4bit_quant_type="fp4", bnb_4bit_compute_dtype=torch.float32),
    "nf4-bf16": dict(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16),
    "8bit": dict(load_in_8bit=True),
}


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    if not HAVE_BNB:
        pytest.skip("bitsandbytes not installed")
    cfg = LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=32)
    torch.manual_seed(0)
    d = tmp_path_factory.mktemp("tiny_llama")
    LlamaForCausalLM(cfg).save_pretrained(d)
    return str(d)


def _load(tiny_dir, quant):
    return load_quantized(tiny_dir, **QUANT[quant])   # the canonical (not AVX512-BF16 repacked) CPU path


def _pair(tiny_dir, quant, make_cfg, seed=1):
    """The same quantized model wrapped by HF PEFT and by fastpeft, with identical adapter weights."""
    out = []
    for lib in (peft, fastpeft):
        torch.manual_seed(seed)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            out.append(lib.get_peft_model(_load(tiny_dir, quant), make_cfg(lib)))
    return out


def _quant_layers(model):
    return [(n, m) for n, m in model.named_modules() if isinstance(m, (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt))]


def _fwd_bwd(pm, ids):
    pm.train()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # bitsandbytes' fp16-cast notice on 8-bit CPU matmuls
        out = pm(input_ids=ids, labels=ids)
    out.loss.backward()
    return out.logits.detach(), {n: p.grad.detach().clone() for n, p in pm.named_parameters() if p.requires_grad}


def _assert_same_quantized(a, b):
    la, lb = _quant_layers(a), _quant_layers(b)
    assert [n for n, _ in la] == [n for n, _ in lb] and la
    for (n, ma), (_, mb) in zip(la, lb):
        assert type(ma.weight) is type(mb.weight), n
        assert torch.equal(ma.weight.data, mb.weight.data), n  # every quantized code
        if isinstance(ma, bnb.nn.Linear4bit):
            qa, qb = ma.weight.quant_state, mb.weight.quant_state
            assert qa.dtype == qb.dtype and qa.quant_type == qb.quant_type and qa.blocksize == qb.blocksize, n
            assert torch.equal(qa.absmax, qb.absmax), n
            assert (qa.state2 is None) == (qb.state2 is None), n
            if qa.state2 is not None:
                assert torch.equal(qa.state2.absmax, qb.state2.absmax) and torch.equal(qa.offset, qb.offset), n
        else:
            assert torch.equal(ma.weight.SCB, mb.weight.SCB), n


@needs_bnb
@pytest.mark.parametrize("quant", list(QUANT))
def test_lora_parity_and_quantized_merge(tiny_dir, quant):
    mk = lambda lib: lib.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False)  # noqa
    pp, fp = _pair(tiny_dir, quant, mk)
    q = fp.base_model.model.model.layers[0].self_attn.q_proj
    assert type(q).__name__ == "LoraQuantLinear" and q._fusable is False
    assert q.quant_kind == ("8bit" if quant == "8bit" else "4bit")
    ids = torch.randint(0, 96, (2, 8))
    (lp, gp), (lf, gf) = _fwd_bwd(pp, ids), _fwd_bwd(fp, ids)
    assert torch.equal(lp, lf)
    assert sorted(gp) == sorted(gf) and len(gp) == 14
    for k in gp:
        assert torch.equal(gp[k], gf[k]), k
    # merge: dequantize, add, requantize with the layer's own settings - element for element PEFT's result
    pp.eval()
    fp.eval()
    with pytest.warns(UserWarning, match="may get different generations due to rounding errors"):
        fp.merge_adapter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pp.merge_adapter()
    _assert_same_quantized(pp.base_model.model, fp.base_model.model)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert torch.equal(pp(input_ids=ids).logits, fp(input_ids=ids).logits)
        pp.unmerge_adapter()
        fp.unmerge_adapter()
    _assert_same_quantized(pp.base_model.model, fp.base_model.model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        mp, mf = pp.merge_and_unload(), fp.merge_and_unload()
    _assert_same_quantized(mp, mf)
    assert not any("lora" in n for n, _ in mf.named_parameters())


@needs_bnb
@pytest.mark.parametrize("quant", ["nf4-dq", "8bit"])
@pytest.mark.parametrize("method", ["adalora", "ia3"])
def test_adalora_ia3_parity(tiny_dir, quant, method):
    if method == "adalora":
        mk = lambda lib: lib.AdaLoraConfig(init_r=4, target_r=2, total_step=10, target_modules=["q_proj", "v_proj"],  # noqa
                                           task_type="CAUSAL_LM",
                                           lora_alpha=8)
    else:
        mk = lambda lib: lib.IA3Config(target_modules=["k_proj", "v_proj", "down_proj"],  # noqa
                                       feedforward_modules=["down_proj"])
    pp, fp = _pair(tiny_dir, quant, mk)
    with torch.no_grad():  # move the adapters off their identity/zero init, identically
        for (n1, p1), (n2, p2) in zip(pp.named_parameters(), fp.named_parameters()):
            assert n1 == n2
            if p1.requires_grad:
                noise = 0.05 * torch.randn(p1.shape, generator=torch.Generator().manual_seed(len(n1)))
                p1.add_(noise)
                p2.add_(noise)
    ids = torch.randint(0, 96, (2, 8))
    (lp, gp), (lf, gf) = _fwd_bwd(pp, ids), _fwd_bwd(fp, ids)
    assert torch.equal(lp, lf)
    assert sorted(gp) == sorted(gf) and gp
    for k in gp:
        assert rel_err(gf[k], gp[k]) <= PEFT_PARITY_RTOL, k
    if method == "ia3":
        with pytest.raises(ValueError, match="Cannot merge ia3 layers"):
            fp.merge_and_unload()
        return
    # AdaLoRA: PEFT cannot merge into a quantized base; fastpeft dequantizes, adds, requantizes - merged equals unmerged
    # output up to the requantization of the base
    fp.eval()
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        before = fp(input_ids=ids).logits
        layer = fp.base_model.model.model.layers[0].self_attn.q_proj
        dense = fastpeft.utils.quantization.dequantize_weight(layer.base_layer) + layer.get_delta_weight("default")
        fp.merge_adapter()
        after = fp(input_ids=ids).logits
        requant = fastpeft.utils.quantization.dequantize_weight(layer.base_layer)
    q_err = (requant - dense).abs().max().item()
    assert q_err <= 0.2 * dense.abs().max().item()  # one quantization step, not a wrong weight
    assert (after - before).abs().max().item() < 0.1 * before.abs().max().item()


@needs_bnb
def test_files_both_ways(tiny_dir, tmp_path):
    mk = lambda lib: lib.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "down_proj"],  # noqa
                                    init_lora_weights=False)
    pp, fp = _pair(tiny_dir, "nf4-dq", mk, seed=3)
    ids = torch.randint(0, 96, (2, 8))
    fp.save_pretrained(tmp_path / "fast")
    pp.save_pretrained(tmp_path / "peft")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        p_from_f = peft.PeftModel.from_pretrained(_load(tiny_dir, "nf4-dq"), str(tmp_path / "fast"))
        f_from_p = fastpeft.PeftModel.from_pretrained(_load(tiny_dir, "nf4-dq"), str(tmp_path / "peft"))
    with torch.no_grad():
        ref = pp.eval()(input_ids=ids).logits
        assert torch.equal(p_from_f(input_ids=ids).logits, fp.eval()(input_ids=ids).logits)
        assert torch.equal(f_from_p(input_ids=ids).logits, ref)


@needs_bnb
def test_fused_path_refused(tiny_dir, monkeypatch):
    from fastpeft import functional as FP

    def boom(*a, **k):
        raise AssertionError("the fused path must not run on a quantized base")

    monkeypatch.setattr(FP, "lora_linear", boom)
    monkeypatch.setattr(FP, "ia3_linear", boom)
    monkeypatch.setattr(FP, "adalora_linear", boom)
    for cfg in (fastpeft.LoraConfig(r=2, target_modules=["q_proj"]),
                fastpeft.IA3Config(target_modules=["q_proj"], feedforward_modules=[]),
                fastpeft.AdaLoraConfig(init_r=2, total_step=5, target_modules=["q_proj"])):
        pm = fastpeft.get_peft_model(_load(tiny_dir, "nf4-dq"), cfg)
        assert pm.base_model.model.model.layers[0].self_attn.q_proj._fusable is False
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            pm(input_ids=torch.randint(0, 96, (1, 4)))


@needs_bnb
def test_unsupported_variants_on_quantized_base_say_so(tiny_dir):
    m = _load(tiny_dir, "nf4-dq")
    with pytest.raises(ValueError, match="init_lora_weights='pissa' on a bitsandbytes-quantized base"):
        cfg = fastpeft.LoraConfig(r=2, target_modules=["q_proj"])
        cfg.init_lora_weights = "pissa"  # accepted by LoraConfig once PiSSA exists; refused for a quantized base
        fastpeft.get_peft_model(m, cfg)
    assert isinstance(m.model.layers[0].self_attn.q_proj, bnb.nn.Linear4bit)  # rolled back


@needs_bnb
def test_safe_merge_nan_leaves_layer_unchanged(tiny_dir):
    pm = fastpeft.get_peft_model(_load(tiny_dir, "8bit"), fastpeft.LoraConfig(r=2, target_modules=["q_proj"]))
    layer = pm.base_model.model.model.layers[0].self_attn.q_proj
    before = layer.base_layer.weight.data.clone()
    with torch.no_grad():
        layer.lora_B["default"].weight.fill_(float("nan"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(ValueError, match="NaNs detected"):
            layer.merge(safe_merge=True)
    assert torch.equal(layer.base_layer.weight.data, before) and not layer.merged


@needs_bnb
def test_prepare_model_for_kbit_training_matches_peft(tiny_dir):
    assert fastpeft.prepare_model_for_kbit_training.__module__ == "fastpeft.utils.quantization"
    states = []
    for fn in (peft.prepare_model_for_kbit_training, fastpeft.prepare_model_for_kbit_training):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            m = LlamaForCausalLM.from_pretrained(tiny_dir, quantization_config=BitsAndBytesConfig(**QUANT["nf4-dq"]),
                                                 dtype=torch.bfloat16)
            m = fn(m, gradient_checkpointing_kwargs={"use_reentrant": True})
        states.append(({n: (p.dtype, p.requires_grad) for n, p in m.named_parameters()},
                       m.is_gradient_checkpointing if hasattr(m, "is_gradient_checkpointing") else None,
                       m.get_input_embeddings()._forward_hooks is not None and
                       len(m.get_input_embeddings()._forward_hooks)))
    assert states[0] == states[1]
    assert states[1][0]["model.norm.weight"] == (torch.float32, False)


@needs_bnb
def test_qlora_training_matches_peft(tiny_dir):
    """A short QLoRA run (nf4, double quant, fp32 compute): the loss curves and final adapters agree."""
    mk = lambda lib: lib.LoraConfig(r=4, lora_alpha=16, lora_dropout=0.0,  # noqa
                                    target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])
    pair = _pair(tiny_dir, "nf4-dq", mk, seed=5)
    g = torch.Generator().manual_seed(0)
    batches = [torch.randint(0, 96, (2, 12), generator=g) for _ in range(3)]
    curves = []
    for pm in pair:
        pm.train()
        opt = torch.optim.AdamW([p for p in pm.parameters() if p.requires_grad], lr=2e-2)
        losses = []
        for step in range(8):
            ids = batches[step % 3]
            loss = pm(input_ids=ids, labels=ids).loss
            loss.backward()
            opt.step()
            opt.zero_grad()
            losses.append(loss.item())
        curves.append(losses)
    assert curves[1][-1] < curves[1][0] - 0.05  # it learns
    for a, b in zip(*curves):
        assert abs(a - b) <= PEFT_PARITY_RTOL * abs(a)


def _run_from_root(code):
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    return subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=300)


def test_kernels_folder_is_not_hf_kernels_from_repo_root():
    """From the checkout root ``import kernels`` finds our folder first.  When Hugging Face's ``kernels`` is installed
    the name must resolve to it (transformers >= 5.25 imports it at module level); when it is not, the folder must
    behave like an absent package for the libraries that probe it (transformers' availability check, bitsandbytes'
    and transformers' ``from kernels import get_kernel`` in try/except).  ``fastpeft.kernels`` keeps working."""
    code = (
        "import sys, importlib, importlib.machinery\n"
        "assert sys.path[0] == ''\n"
        "hf = importlib.machinery.PathFinder.find_spec('kernels', sys.path[1:])\n"
        "try:\n"
        "    from kernels import get_kernel\n"
        "except ModuleNotFoundError as e:\n"
        "    assert hf is None, 'Hugging Face kernels is installed but did not import'\n"
        "    assert e.name == 'kernels', e.name\n"
        "    k = sys.modules['kernels']\n"
        "    assert getattr(k, '__version__', 'N/A') == 'N/A' and getattr(k, '__file__', None) is None\n"
        "else:\n"
        "    assert hf is not None, 'get_kernel imported from the checkout folder'\n"
        "    assert sys.modules['kernels'].__file__ == hf.origin\n"
        "try:\n"
        "    import transformers.utils.import_utils as u\n"
        "except ImportError:\n"
        "    pass\n"
        "else:\n"
        "    assert u.is_kernels_available() == (hf is not None)\n"
        "m = importlib.import_module('fastpeft.kernels')\n"
        "assert m.__name__ == 'fastpeft.kernels' and m.__file__\n"
        "print('ok')\n"
    )
    r = _run_from_root(code)
    assert r.returncode == 0 and "ok" in r.stdout, r.stderr[-3000:]
    if HAVE_BNB:
        r = _run_from_root("import bitsandbytes, transformers, fastpeft; print('ok')")
        assert r.returncode == 0 and "kernels/__init__" not in r.stderr, r.stderr
        assert "cannot import name 'get_kernel'" not in r.stderr, r.stderr


def test_import_does_not_import_bitsandbytes():
    # peft itself imports bitsandbytes, so PEFT interop (fastpeft._peft_compat) is switched off here: the claim is
    # that fastpeft's own code never imports it
    r = _run_from_root("import os; os.environ['FASTPEFT_PEFT_INTEROP'] = '0'\n"
                       "import sys, fastpeft, fastpeft.tuners.lora.bnb, fastpeft.utils.quantization\n"
                       "fastpeft.prepare_model_for_kbit_training\n"
                       "assert 'bitsandbytes' not in sys.modules\nprint('ok')")
    assert r.returncode == 0 and "ok" in r.stdout, r.stderr[-3000:]


@needs_bnb
def test_benchmark_case_qlora():
    """The 4-bit benchmark case builds, and every provider computes the reference layer."""
    sys.path.insert(0, REPO)
    try:
        from benchmarks.bench_qlora import setup_qlora
        from benchmarks.shapes import shapes
    finally:
        sys.path.remove(REPO)
    # bitsandbytes' CPU inference path (AVX512-BF16 machines, eval without grad) repacks the weight and needs
    # N % 32 == 0 and K % blocksize == 0: a Llama-like 64x96 layer, not the tiny registry's 40x48.
    shp = dataclasses.replace(shapes("tiny", True, with_rank=True)[0], K=64, N=96)
    case = setup_qlora(shp, torch.float32, torch.device("cpu"), ["base", "fastpeft-torch", "peft", "fastpeft-triton"])
    assert sorted(case.providers) == ["base", "fastpeft-torch", "peft"] and "fastpeft-triton" in case.skipped
    x = torch.randn(shp.M, shp.K)
    ref = case.reference(x)
    with torch.no_grad():
        out = {name: case.providers[name].call_eval(x) for name in ("fastpeft-torch", "peft")}
    assert rel_err(out["fastpeft-torch"], out["peft"]) <= PEFT_PARITY_RTOL
    base = case.providers["base"].call  # the bnb layer itself
    if not getattr(base.weight.quant_state, "packing_format_for_cpu", False):
        # the reference dequantizes the canonical layout; the repacked CPU path computes with a bf16 absmax instead
        for name, y in out.items():
            assert rel_err(y, ref) <= PEFT_PARITY_RTOL, name


@needs_bnb
def test_repacked_cpu_weight_dequantizes_and_merges(tiny_dir):
    """A 4-bit weight that bitsandbytes' CPU inference path repacked (what an eval forward does on AVX512-BF16 CPUs;
    done here by the same bitsandbytes function on any machine) dequantizes to the same weight up to the bf16 absmax
    it was repacked with, and merge/unmerge keep working on it."""
    pm = fastpeft.get_peft_model(_load(tiny_dir, "nf4-dq"), fastpeft.LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj"], init_lora_weights=False))
    layer = pm.base_model.model.model.layers[0].self_attn.q_proj
    w = layer.base_layer.weight
    before = fastpeft.utils.quantization.dequantize_weight(layer.base_layer)
    w.data, w.quant_state = bnb.functional._convert_weight_packed_for_cpu(w.data, w.quant_state)
    assert w.quant_state.packing_format_for_cpu
    after = fastpeft.utils.quantization.dequantize_weight(layer.base_layer)
    assert not getattr(w.quant_state, "packing_format_for_cpu", False)
    # each block's absmax rounded to bf16 (8 significant bits): at most 2^-8 relative per element
    assert ((after - before).abs() <= before.abs() * 2.0 ** -8 + 1e-12).all()
    dense = after + layer.get_delta_weight("default")
    w = layer.base_layer.weight
    w.data, w.quant_state = bnb.functional._convert_weight_packed_for_cpu(w.data, w.quant_state)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm.merge_adapter()
    merged = fastpeft.utils.quantization.dequantize_weight(layer.base_layer)
    assert (merged - dense).abs().max() <= 0.2 * dense.abs().max()  # one quantization step, not a wrong weight
