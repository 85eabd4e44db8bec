"""LoRA through fastpeft's model API against HF PEFT 0.21.2 on tiny Llama (GQA) and GPT-2 (Conv1D) models.

Each case builds the same base model twice, injects PEFT's and fastpeft's adapter under the same seed (so the
initial adapter weights must be equal), overwrites the trainable tensors with the same random values, and compares
the loss and the gradient of every trainable tensor (fp32, relative error <= PEFT_PARITY_RTOL).  Train-mode dropout
is compared with the RNG reset before each forward.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

import fastpeft  # noqa: E402
from testing_utils import (MODELS, PEFT_PARITY_RTOL, assert_close_rel, assert_parity, build_pair,  # noqa: E402
                           inputs, randomize_trainable, run_loss, tiny_gpt2, tiny_llama)

def both(**kw):
    return peft.LoraConfig(**kw), fastpeft.LoraConfig(**kw)


# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_default_targets_eval(arch):
    p, f = build_pair(MODELS[arch], *both(r=4, lora_alpha=8))
    assert sorted(f.base_model.targeted_module_names) == sorted(p.base_model.targeted_module_names)
    assert_parity(p, f)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_all_linear_rslora_dropout_train(arch):
    p, f = build_pair(MODELS[arch], *both(r=4, lora_alpha=16, target_modules="all-linear", use_rslora=True,
                                          lora_dropout=0.25))
    assert sorted(f.base_model.targeted_module_names) == sorted(p.base_model.targeted_module_names)
    assert not any("lm_head" in n for n in f.base_model.targeted_module_names)
    assert_parity(p, f, train=True)
    # the dropout really is active (different seed -> different loss)
    f.train()
    a = run_loss(f, inputs(), seed=3).loss
    b = run_loss(f, inputs(), seed=4).loss
    assert not torch.equal(a, b)


@pytest.mark.parametrize("bias", ["all", "lora_only"])
def test_bias_modes_gpt2(bias):
    p, f = build_pair(tiny_gpt2, *both(r=3, lora_alpha=6, target_modules=["c_attn", "c_fc"], bias=bias,
                                       lora_dropout=0.1))
    trainable_p = sorted(n for n, q in p.named_parameters() if q.requires_grad)
    trainable_f = sorted(n for n, q in f.named_parameters() if q.requires_grad)
    assert trainable_f == trainable_p
    assert any(n.endswith("bias") for n in trainable_f)
    assert_parity(p, f, train=True)


def test_rank_and_alpha_pattern_llama():
    kw = dict(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj", "down_proj"],
              rank_pattern={"q_proj": 2, "layers.1.self_attn.v_proj": 7}, alpha_pattern={"v_proj": 3, "down_proj": 32})
    p, f = build_pair(tiny_llama, *both(**kw))
    q = f.base_model.model.model.layers[1].self_attn
    assert q.q_proj.r["default"] == 2 and q.v_proj.r["default"] == 7
    assert q.v_proj.scaling["default"] == pytest.approx(3 / 7)
    assert_parity(p, f)


def test_layers_to_transform_and_regex():
    p, f = build_pair(tiny_llama, *both(r=2, target_modules=["q_proj", "k_proj"], layers_to_transform=[1]))
    assert sorted(f.base_model.targeted_module_names) == ["model.layers.1.self_attn.k_proj",
                                                         "model.layers.1.self_attn.q_proj"]
    assert_parity(p, f)
    p, f = build_pair(tiny_llama, *both(r=2, target_modules=r".*layers\.0\.(self_attn\.o|mlp\.up)_proj"))
    assert sorted(f.base_model.targeted_module_names) == sorted(p.base_model.targeted_module_names)
    assert len(f.base_model.targeted_module_names) == 2
    assert_parity(p, f)


@pytest.mark.parametrize("init", [True, "gaussian", False])
def test_init_matches_peft(init):
    # build_pair asserts identical initial values (same RNG consumption as PEFT)
    p, f = build_pair(tiny_llama, *both(r=4, init_lora_weights=init), randomize=False)
    B = f.base_model.model.model.layers[0].self_attn.q_proj.lora_B["default"].weight
    assert (B.abs().sum() == 0) == (init is not False)
    if init is not False:  # B = 0: the adapted model equals the base model
        with torch.no_grad(), f.disable_adapter():
            ref = f(input_ids=inputs()).logits
        assert torch.equal(f(input_ids=inputs()).logits, ref)
    assert_parity(p, f)


def test_several_adapters_summed():
    cfg_b = dict(r=3, lora_alpha=5, target_modules=["v_proj", "o_proj"], lora_dropout=0.2)
    p, f = build_pair(tiny_llama, *both(r=4, lora_alpha=8, lora_dropout=0.1), randomize=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.manual_seed(2)
        p.add_adapter("b", peft.LoraConfig(**cfg_b))
        torch.manual_seed(2)
        f.add_adapter("b", fastpeft.LoraConfig(**cfg_b))
    p.base_model.set_adapter(["default", "b"])
    f.base_model.set_adapter(["default", "b"])
    assert f.active_adapters == ["default", "b"]
    randomize_trainable(p, f)
    names = sorted(n for n, q in f.named_parameters() if q.requires_grad)
    assert names == sorted(n for n, q in p.named_parameters() if q.requires_grad)
    assert any(".b." in n for n in names) and any(".default." in n for n in names)
    assert_parity(p, f, train=True)
    # switching to one adapter
    p.set_adapter("b")
    f.set_adapter("b")
    for m in (p, f):
        m.zero_grad()
    assert_parity(p, f)


def test_seq_cls_modules_to_save():
    def make():
        return tiny_llama("LlamaForSequenceClassification", num_labels=3)

    p, f = build_pair(make, *both(r=4, task_type="SEQ_CLS"))
    assert isinstance(f, fastpeft.peft_model.PeftModelForSequenceClassification)
    assert "base_model.model.score.modules_to_save.default.weight" in dict(f.named_parameters())
    labels = torch.tensor([0, 2])
    assert_parity(p, f, labels=labels)
    assert sorted(fastpeft.get_peft_model_state_dict(f)) == sorted(peft.get_peft_model_state_dict(p))


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_merge_unmerge_and_merge_and_unload(arch):
    p, f = build_pair(MODELS[arch], *both(r=4, lora_alpha=8, target_modules="all-linear"))
    p.eval()
    f.eval()
    ids = inputs()
    with torch.no_grad():
        ref = f(input_ids=ids).logits
        f.base_model.merge_adapter()
        p.base_model.merge_adapter()
        merged = f(input_ids=ids).logits
        assert_close_rel(merged, ref, PEFT_PARITY_RTOL, "merged vs unmerged")
        assert_close_rel(merged, p(input_ids=ids).logits, PEFT_PARITY_RTOL, "merged vs PEFT merged")
        sp, sf = p.state_dict(), f.state_dict()
        for k in sp:
            assert torch.equal(sp[k], sf[k]), f"merged weight {k} differs from PEFT's"
        with pytest.raises(ValueError, match="already merged"):
            f.base_model.merge_adapter()
        f.base_model.unmerge_adapter()
        assert_close_rel(f(input_ids=ids).logits, ref, PEFT_PARITY_RTOL, "unmerged")
        plain_p = p.merge_and_unload()
        plain_f = f.merge_and_unload()
    assert type(plain_f) is type(plain_p)
    assert not any("lora" in n for n in plain_f.state_dict())
    assert sorted(plain_f.state_dict()) == sorted(plain_p.state_dict())
    for k, v in plain_p.state_dict().items():
        assert_close_rel(plain_f.state_dict()[k], v, PEFT_PARITY_RTOL, k)
    with torch.no_grad():
        assert_close_rel(plain_f(input_ids=ids).logits, ref, PEFT_PARITY_RTOL, "merge_and_unload")


def test_disable_adapter_and_unload():
    base = tiny_gpt2().eval()
    p, f = build_pair(base, *both(r=4, lora_dropout=0.1))
    p.eval()
    f.eval()
    ids = inputs()
    with torch.no_grad():
        ref = base(input_ids=ids).logits
        with f.disable_adapter():
            assert torch.equal(f(input_ids=ids).logits, ref)
        with p.disable_adapter():
            assert torch.equal(p(input_ids=ids).logits, ref)
        assert not torch.equal(f(input_ids=ids).logits, ref)
        plain = f.unload()
        assert torch.equal(plain(input_ids=ids).logits, ref)
    assert sorted(plain.state_dict()) == sorted(base.state_dict())


def test_print_trainable_parameters_identical(capsys):
    p, f = build_pair(tiny_llama, *both(r=4, target_modules="all-linear"), randomize=False)
    p.print_trainable_parameters()
    f.print_trainable_parameters()
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 2 and out[0] == out[1]
    assert out[0].startswith("trainable params: ")
    assert f.get_nb_trainable_parameters() == p.get_nb_trainable_parameters()


def test_mixed_batch_adapter_names():
    p, f = build_pair(tiny_llama, *both(r=4, lora_alpha=8), randomize=False)
    cfg_b = dict(r=2, lora_alpha=4, target_modules=["v_proj", "o_proj", "up_proj"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        p.add_adapter("b", peft.LoraConfig(**cfg_b))
        f.add_adapter("b", fastpeft.LoraConfig(**cfg_b))
    p.base_model.set_adapter(["default", "b"])
    f.base_model.set_adapter(["default", "b"])
    randomize_trainable(p, f)
    p.set_adapter("default")
    f.set_adapter("default")
    p.eval()
    f.eval()
    ids = inputs(batch=4)
    names = ["b", "__base__", "default", "b"]
    with torch.no_grad():
        out_f = f(input_ids=ids, adapter_names=names).logits
        out_p = p(input_ids=ids, adapter_names=names).logits
        assert_close_rel(out_f, out_p, PEFT_PARITY_RTOL, "mixed batch vs PEFT")
        # each row equals the single-adapter run
        f.set_adapter("b")
        single_b = f(input_ids=ids).logits
        f.set_adapter("default")
        single_d = f(input_ids=ids).logits
        with f.disable_adapter():
            single_base = f(input_ids=ids).logits
    for i, ref in [(0, single_b), (1, single_base), (2, single_d), (3, single_b)]:
        assert_close_rel(out_f[i], ref[i], PEFT_PARITY_RTOL, f"row {i}")
    # generate with a mixed batch, greedy and beam search
    kw = dict(max_new_tokens=3, do_sample=False, pad_token_id=0)
    assert torch.equal(f.generate(input_ids=ids, adapter_names=names, **kw),
                       p.generate(input_ids=ids, adapter_names=names, **kw))
    assert torch.equal(f.generate(input_ids=ids, adapter_names=names, num_beams=2, **kw),
                       p.generate(input_ids=ids, adapter_names=names, num_beams=2, **kw))
    # bad input
    with pytest.raises(ValueError, match="unknown adapters"):
        f(input_ids=ids, adapter_names=["b", "x", "b", "b"])
    with pytest.raises(ValueError, match="rows"):
        f(input_ids=ids, adapter_names=["b"])
    f.train()
    with pytest.raises(ValueError, match="training mode"):
        f(input_ids=ids, adapter_names=names)
    f.eval()
    f.base_model.merge_adapter()
    with pytest.raises(ValueError, match="merged"):
        f(input_ids=ids, adapter_names=names)
    f.base_model.unmerge_adapter()
    # the per-row state is cleared after each call
    assert all(layer._batch_adapter_names is None for _, layer in f.base_model.tuner_layers())


def test_mixed_batch_modules_to_save():
    def make():
        return tiny_llama("LlamaForSequenceClassification", num_labels=3)

    p, f = build_pair(make, *both(r=4, task_type="SEQ_CLS"), randomize=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        p.add_adapter("b", peft.LoraConfig(r=2, task_type="SEQ_CLS"))
        f.add_adapter("b", fastpeft.LoraConfig(r=2, task_type="SEQ_CLS"))
    with torch.no_grad():
        sp, sf = dict(p.named_parameters()), dict(f.named_parameters())
        g = torch.Generator().manual_seed(0)
        for k in sorted(sp):
            if "lora_" in k or "modules_to_save" in k:
                v = torch.randn(sp[k].shape, generator=g) * 0.1
                sp[k].copy_(v)
                sf[k].copy_(v)
    p.eval()
    f.eval()
    ids = inputs(batch=3)
    names = ["b", "default", "__base__"]
    with torch.no_grad():
        assert_close_rel(f(input_ids=ids, adapter_names=names).logits,
                         p(input_ids=ids, adapter_names=names).logits, PEFT_PARITY_RTOL, "mixed SEQ_CLS")


def test_gradient_checkpointing_dropout_train():
    def make():
        m = tiny_llama()
        m.gradient_checkpointing_enable()
        return m

    p, f = build_pair(make, *both(r=4, target_modules="all-linear", lora_dropout=0.3))
    assert f.get_base_model().is_activation_checkpointing
    assert_parity(p, f, train=True)


def test_autocast_bf16_error_not_worse_than_peft():
    """Under torch.autocast(bf16) both differ from fp32; fastpeft's error must stay within FA's rule of PEFT's."""
    from testing_utils import GRAD_FACTOR, MATMUL_FACTOR, rel_err

    p, f = build_pair(tiny_llama, *both(r=4, target_modules="all-linear"))
    ids = inputs()
    ref = f(input_ids=ids, labels=ids)
    ref.loss.backward()
    ref_grads = {n: q.grad.clone() for n, q in f.named_parameters() if q.requires_grad}
    f.zero_grad()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        op, of = p(input_ids=ids, labels=ids), f(input_ids=ids, labels=ids)
    assert of.logits.dtype == op.logits.dtype == torch.bfloat16
    e_f, e_p = rel_err(of.logits.float(), ref.logits), rel_err(op.logits.float(), ref.logits)
    assert e_f <= MATMUL_FACTOR * e_p, (e_f, e_p)
    op.loss.backward()
    of.loss.backward()
    sp, sf = dict(p.named_parameters()), dict(f.named_parameters())
    for k, g in ref_grads.items():
        assert sf[k].grad.dtype == torch.float32
        ef, ep = rel_err(sf[k].grad, g), rel_err(sp[k].grad, g)
        assert ef <= GRAD_FACTOR * ep, (k, ef, ep)


@pytest.mark.parametrize("init", [True, False])
def test_lora_bias_gpt2(init):
    p, f = build_pair(tiny_gpt2, *both(r=3, target_modules=["c_attn", "c_fc"], lora_bias=True,
                                       init_lora_weights=init, lora_dropout=0.1))
    assert "base_model.model.transformer.h.0.attn.c_attn.lora_B.default.bias" in dict(f.named_parameters())
    assert_parity(p, f, train=True)
    p.eval()
    f.eval()
    ids = inputs()
    with torch.no_grad():
        ref = f(input_ids=ids).logits
        p.base_model.merge_adapter()
        f.base_model.merge_adapter()
        for k, v in p.state_dict().items():
            assert_close_rel(f.state_dict()[k], v, PEFT_PARITY_RTOL, f"merged {k}")
        assert_close_rel(f(input_ids=ids).logits, ref, PEFT_PARITY_RTOL, "merged lora_bias")
        f.base_model.unmerge_adapter()
        assert_close_rel(f(input_ids=ids).logits, ref, PEFT_PARITY_RTOL, "unmerged lora_bias")
    assert sorted(fastpeft.get_peft_model_state_dict(f)) == sorted(peft.get_peft_model_state_dict(p))


def test_lora_bias_merge_needs_base_bias():
    _, f = build_pair(tiny_llama, *both(r=2, lora_bias=True))  # Llama projections have no bias
    layer = f.base_model.model.model.layers[0].self_attn.q_proj
    w = layer.base_layer.weight.detach().clone()
    with pytest.raises(ValueError, match="no bias"):
        layer.merge()
    assert torch.equal(layer.base_layer.weight, w) and not layer.merged


def test_training_loop_matches_peft():
    """Six AdamW steps with train-mode dropout: the loss curves and the final adapters agree."""
    p, f = build_pair(tiny_gpt2, *both(r=4, lora_alpha=8, target_modules="all-linear", lora_dropout=0.1),
                      randomize=False)
    opts = [torch.optim.AdamW([q for q in m.parameters() if q.requires_grad], lr=1e-2) for m in (p, f)]
    p.train()
    f.train()
    losses = ([], [])
    ids = inputs(batch=4)  # one fixed batch, so the loss must go down
    for step in range(6):
        for m, opt, out in zip((p, f), opts, losses):
            torch.manual_seed(1000 + step)
            loss = m(input_ids=ids, labels=ids).loss
            loss.backward()
            opt.step()
            opt.zero_grad()
            out.append(loss.detach())
    assert_close_rel(torch.stack(losses[1]), torch.stack(losses[0]), PEFT_PARITY_RTOL, "loss curve")
    assert losses[1][-1] < losses[1][0]  # it trains
    sp = peft.get_peft_model_state_dict(p)
    for k, v in fastpeft.get_peft_model_state_dict(f).items():
        assert_close_rel(v, sp[k], PEFT_PARITY_RTOL, k)


@pytest.mark.parametrize("method", ["LoraConfig", "AdaLoraConfig", "IA3Config"])
@pytest.mark.parametrize("autocast", [True, False])
def test_bf16_base_adapter_dtypes_match_peft(method, autocast):
    """bf16 model: adapters upcast to fp32 by default (kept bf16 with autocast_adapter_dtype=False), as in PEFT."""
    from testing_utils import ELEMENTWISE

    kw = {"LoraConfig": dict(r=4, lora_dropout=0.1), "AdaLoraConfig": dict(init_r=4, total_step=5),
          "IA3Config": dict()}[method]
    base = tiny_llama().to(torch.bfloat16)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.manual_seed(1)
        p = peft.get_peft_model(copy.deepcopy(base), getattr(peft, method)(**kw),
                                autocast_adapter_dtype=autocast)
        torch.manual_seed(1)
        f = fastpeft.get_peft_model(copy.deepcopy(base), getattr(fastpeft, method)(**kw),
                                    autocast_adapter_dtype=autocast)
    sp, sf = dict(p.named_parameters()), dict(f.named_parameters())
    for k in sp:
        assert sf[k].dtype == sp[k].dtype, k
    adapter_dtypes = {q.dtype for n, q in sf.items() if q.requires_grad}
    assert adapter_dtypes == {torch.float32 if autocast else torch.bfloat16}
    # HF PEFT 0.21.2's upcast re-creates AdaLoRA's frozen ranknum as a *trainable* Parameter (a PEFT bug); fastpeft
    # keeps it frozen.  Every other requires_grad flag agrees.
    assert not any(q.requires_grad for n, q in sf.items() if ".ranknum." in n)
    for k in sp:
        if ".ranknum." not in k:
            assert sf[k].requires_grad == sp[k].requires_grad, k
    randomize_trainable(p, f)
    ids = inputs()
    op, of = run_loss(p.train(), ids), run_loss(f.train(), ids)
    assert of.logits.dtype == op.logits.dtype == torch.bfloat16
    assert_close_rel(of.logits.float(), op.logits.float(), ELEMENTWISE[torch.bfloat16][1], "bf16 logits")


@pytest.mark.parametrize("dtype,dropout", [(torch.float32, 0.0), (torch.float32, 0.1), (torch.bfloat16, 0.0)],
                         ids=["fp32", "fp32-dropout", "bf16"])
def test_training_step_bit_for_bit(dtype, dropout):
    """On CPU the torch backend reproduces HF PEFT's training step bit for bit - loss and every adapter gradient,
    fp32 adapters on an fp32 or bf16 base, with dropout in fp32 (same RNG state) - even though it computes the M x N
    tail of the layer in place (``fastpeft.ops.lora._ScaledDeltaAdd``).  (bf16 with dropout is not bit-equal by
    design: fastpeft drops x before the fp32 cast, PEFT after it - see ``lora_fwd_ref``; test_parity covers it.)"""
    from testing_utils import assert_step_bit_for_bit, randomize_trainable, tiny_llama, wrap_pair
    kw = dict(r=8, lora_alpha=16, lora_dropout=dropout,
              target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    p, f = wrap_pair(tiny_llama().to(dtype), peft.LoraConfig(**kw), fastpeft.LoraConfig(**kw))
    randomize_trainable(p, f)
    assert_step_bit_for_bit(p, f, n_grads=28)
