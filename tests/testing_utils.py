"""The one testing module: tolerances, the accuracy rule, tiny model builders and the HF PEFT pair helpers.

Test modules import from here and never from each other (tests/test_structure.py checks that).  Optional
dependencies (transformers, peft, datasets, tokenizers) are imported inside the helpers that need them, so importing
this module costs only torch.

Accuracy rule for matmul-bearing ops (flash-attention's): with err the normwise relative error against an fp64
reference,  err(impl) <= MATMUL_FACTOR * err(torch in the same dtype) + rounding_floor(dtype)  (gradients:
GRAD_FACTOR).  Elementwise / pure-torch comparisons use (atol, rtol) per dtype.
"""

from __future__ import annotations

import copy
import functools
import warnings

import torch

# ---------------------------------------------------------------------------------------------------------------
# tolerances (never inline magic numbers in tests)
# ---------------------------------------------------------------------------------------------------------------

F64 = torch.float64
ELEMENTWISE = {
    torch.float64: (1e-12, 1e-10),
    torch.float32: (1e-5, 1.3e-6),
    torch.float16: (1e-3, 1e-3),
    torch.bfloat16: (1e-2, 1.6e-2),
}
MATMUL_FACTOR = 2.0
GRAD_FACTOR = 3.0
# The floor only decides where torch's own same-dtype error is ~0 (M = 0, M = 1 reductions that are exact in torch's
# order, short vectors): an equally valid summation order then still differs by a rounding or two.  Rounding one
# result to the dtype costs <= eps/2 relative, so 2 eps of the tensor's dtype is rounding level (fp32 2.4e-7, fp16
# 2.0e-3, bf16 1.6e-2); the largest need seen is AdaLoRA's dE at M = 1, r = 4 on triton, 2.6e-7 where torch's is 4.7e-8.
ROUNDING_FLOOR_EPS = 2.0
# Parity with HF PEFT in fp32 (issue 2): relative error <= 1e-5.
PEFT_PARITY_RTOL = 1e-5
# Checks with no same-dtype torch baseline to compare against (a benchmark provider vs its fp64 reference, a single
# bf16 gradient vs fp32 math, a bottleneck layer vs fp64 math): normwise relative (fp32) or absolute (bf16) bounds.
# They are never part of the accuracy rule above.
PLAIN_MATMUL_TOL = {torch.float32: 1e-4, torch.bfloat16: 5e-2}
# Dropout keep fraction (tests/test_ops_ref.py): |observed - (1 - p)| <= this many binomial standard deviations.
KEEP_FRACTION_SIGMAS = 5.0
# Modules / functional in fp32 vs fp64 math on small shapes (tests/test_functional.py, tests/test_modules_*.py):
# (atol, rtol); K <= 64 so the fp32 accumulation error stays well below this.
SMALL_FP32 = (2e-5, 2e-5)
# bf16 autocast vs fp32 (tests/test_compile_autocast.py): (atol, rtol) on O(1) outputs with K <= 32.
AUTOCAST_BF16 = (5e-2, 5e-2)
# fp32 directional derivative of the (linear in x, fixed seed) dropout LoRA op: finite difference vs autograd, relative.
TRITON_DROPOUT_FD_RTOL = 1e-4
# Triton vs torch backend on the same seed in fp32 (same mask stream; only summation order differs), relative.
TRITON_VS_TORCH_FP32_RTOL = 1e-5
# GPU training run (tests/test_triton_lora.py): fp32 loss curves of the triton and torch paths, relative (30 AdamW
# steps amplify the summation-order differences a little).
TRITON_TRAINING_LOSS_RTOL = 1e-3
# Prompt-style methods and bottleneck adapters (tests/test_prompt_*.py, test_prefix*.py, test_adaption_prompt*.py,
# test_bottleneck*.py).  Same fp32 ops in the same order as HF PEFT give bit-equal results; these bound the cases where
# only the summation order differs (an expanded vs a batched encoder, a two-chunk prefill vs one forward), absolute.
PROMPT_FP32_ATOL = 1e-5
# generate() first-step scores vs the forward logits (the prompt is prefilled as a separate chunk), absolute fp32.
GENERATE_SCORES_ATOL = 1e-5
# A prompt/prefix that matters must move the logits by far more than rounding: min max-abs difference to the base.
PROMPT_EFFECT_MIN = 1e-2
# Training runs (a few Adam steps on a fixed batch): the final loss must be below this fraction of the first.
TRAIN_LOSS_RATIO = 0.9
# DDP / FSDP2 (2 ranks, gloo, CPU) vs a single-process run on the same global batch (tests/test_distributed.py):
# only the summation order of the gradient all-reduce differs, so fp32 rounding (atol, rtol).
DIST_FP32 = (1e-6, 1e-5)
# Convergence suite (tests/test_convergence.py): fastpeft vs HF PEFT fp32 loss curves (and trained adapters), relative
# per step.  Both run the same fp32 ops in the same order (LoRA and IA3 curves are bit-equal); AdaLoRA's allocator
# run differs by up to ~1e-7 (observed): this bound is ten times that.
CONVERGENCE_FP32_RTOL = 1e-6
# DoRA: fastpeft forms the row norm ‖W + s·B·A‖ without materialising W + s·B·A (fastpeft/tuners/lora/dora.py), PEFT
# materialises it: the norms differ by fp32 rounding every step, and after 20 AdamW steps the trained adapters differ
# by up to 1.3e-6 relative (observed on the tiny Llama and GPT-2; losses by less): ten times the LoRA bound.
DORA_CONVERGENCE_FP32_RTOL = 1e-5


# ---------------------------------------------------------------------------------------------------------------
# error measures and the accuracy rule
# ---------------------------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=None)
def inductor_cpu_problem() -> str:
    """Why inductor cannot build and run a CPU kernel in this environment ('' when it can): a trivial elementwise
    function, compiled and run once per session.  Tests of fastpeft under ``torch.compile(backend="inductor")`` on CPU
    skip with this reason instead of failing (on the first GPU machine every such test failed, reason not captured,
    while the merged-module test - an extern GEMM, no generated C++ - passed): a broken compiler toolchain is the
    environment's problem, and a fastpeft bug still fails them, since the probe itself compiles."""
    try:
        fn = torch.compile(lambda t: (t * 2.0).sin() + 1.0, backend="inductor", fullgraph=True)
        t = torch.linspace(-1.0, 1.0, 37)
        if not torch.allclose(fn(t), (t * 2.0).sin() + 1.0):
            return "inductor's CPU kernel computed a wrong result for (2t).sin() + 1"
        return ""
    except Exception as e:  # noqa: BLE001 - any failure to build is reported as the reason
        return f"inductor cannot build a CPU kernel here: {type(e).__name__}: {str(e).strip()[:300]}"
    finally:
        torch._dynamo.reset()


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||b|| in fp64 (0 when both are empty or b is zero and a equals it)."""
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    if b.numel() == 0:
        return 0.0
    den = b.norm().item()
    num = (a - b).norm().item()
    return num / den if den > 0 else num


def max_abs(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.detach().double() - b.detach().double()).abs().max().item()


def assert_close_rel(actual, expected, rtol, what=""):
    err = rel_err(actual, expected)
    assert err <= rtol, f"{what}: relative error {err:.3e} > {rtol:.1e} (max abs diff " \
                        f"{(actual.double() - expected.double()).abs().max().item() if actual.numel() else 0:.3e})"


def rounding_floor(dtype: torch.dtype) -> float:
    """The rule's floor for a tensor of ``dtype``: ROUNDING_FLOOR_EPS machine epsilons (see its comment)."""
    return ROUNDING_FLOOR_EPS * torch.finfo(dtype).eps


def assert_fa_rule(actual, ref64, same_dtype, factor=MATMUL_FACTOR, what="", dtype=None):
    """err(actual, ref64) <= factor * err(same_dtype, ref64) + rounding_floor(dtype).

    ``same_dtype`` is torch's result in the dtype ``actual`` was computed in; ``dtype`` defaults to ``actual.dtype``
    (pass it when ``actual`` was already converted to fp64).  Returns (err, bound)."""
    dtype = dtype or actual.dtype
    assert tuple(actual.shape) == tuple(ref64.shape), f"{what}: shape {tuple(actual.shape)} != {tuple(ref64.shape)}"
    assert torch.isfinite(actual.detach().double()).all(), f"{what}: non-finite values"
    err, base = rel_err(actual, ref64), rel_err(same_dtype, ref64)
    bound = factor * base + rounding_floor(dtype)
    assert err <= bound, (f"{what}: rel err {err:.3e} > {factor} * torch {str(dtype)[6:]} err {base:.3e} + floor "
                          f"{rounding_floor(dtype):.1e} = {bound:.3e}")
    return err, bound


def close_small(a, b, dtype=torch.float32, what=""):
    """fp32 (or fp64) module / functional results vs fp64 math on small shapes: SMALL_FP32 (fp64: ELEMENTWISE)."""
    atol, rtol = ELEMENTWISE[F64] if dtype == F64 else SMALL_FP32
    torch.testing.assert_close(a.double(), b.double(), atol=atol, rtol=rtol, msg=lambda m: f"{what} ({dtype}): {m}")


class LaunchSpy:
    """Wraps a jitted Triton kernel (monkeypatched over the module attribute its launcher calls): records
    (grid, keyword args, positional args) of every launch in ``launches`` - and ``(name, args)`` in the shared list
    `log`, when given, to see the order across kernels - then launches it."""

    def __init__(self, kernel, log: list | None = None, name: str = ""):
        self.kernel, self.launches, self.log, self.name = kernel, [], log, name

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.launches.append((tuple(grid), kwargs, args))
            if self.log is not None:
                self.log.append((self.name, args))
            return self.kernel[grid](*args, **kwargs)
        return launch


def randomize_module(m):
    """Make a drop-in module's adapter non-trivial by drawing its zero / one-initialised factor: AdaLoRA's E, else
    LoRA's B (normal), IA3's l (uniform in [0.5, 1.5]).  Returns the module."""
    with torch.no_grad():
        if hasattr(m, "lora_E"):
            m.lora_E.normal_()
        elif hasattr(m, "lora_B"):
            m.lora_B.normal_()
        if hasattr(m, "ia3_l"):
            m.ia3_l.uniform_(0.5, 1.5)
    return m


# ---------------------------------------------------------------------------------------------------------------
# tiny models from configs (no downloads)
# ---------------------------------------------------------------------------------------------------------------

VOCAB = 128


def tiny_llama(cls_name: str = "LlamaForCausalLM", **kw):
    """Parity-test Llama: 2 layers, GQA (4 query, 2 KV heads), seeded init (torch.manual_seed(0))."""
    import transformers

    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                   pad_token_id=0, **kw)
    return getattr(transformers, cls_name)(cfg)


def tiny_gpt2():
    """Parity-test GPT-2 (Conv1D projections): 2 layers, seeded init."""
    import transformers

    torch.manual_seed(0)
    cfg = transformers.GPT2Config(vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4, n_positions=64,
                                  bos_token_id=1, eos_token_id=2)
    return transformers.GPT2LMHeadModel(cfg)


MODELS = {"llama": tiny_llama, "gpt2": tiny_gpt2}


def load_quantized(model_dir: str, **quant):
    """``LlamaForCausalLM.from_pretrained(model_dir)`` quantized by bitsandbytes (``quant``: BitsAndBytesConfig
    kwargs), fp32 elsewhere, on bitsandbytes' canonical CPU path.

    On AVX512-BF16 CPUs bitsandbytes' eval forward repacks 4-bit weights in place for its CPU kernel (bf16 absmax),
    and HF PEFT's merge/unmerge then dequantize that layout as if it were the canonical one (wrong weights).  Tests
    that compare with PEFT run every machine on the canonical path; fastpeft's handling of repacked weights has its
    own test (test_lora_bnb.py: test_repacked_cpu_weight_dequantizes_and_merges)."""
    from transformers import BitsAndBytesConfig, LlamaForCausalLM

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = LlamaForCausalLM.from_pretrained(model_dir, quantization_config=BitsAndBytesConfig(**quant),
                                                 dtype=torch.float32)
    for m in model.modules():
        if hasattr(m, "support_avx512bf16_for_cpu"):
            m.support_avx512bf16_for_cpu = False
    return model


def prompt_tiny_llama(**kw):
    """Prompt-method Llama: 2 layers with GQA (4 query heads, 2 KV heads), fp32, eval mode (caller seeds)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, max_position_embeddings=128, pad_token_id=0)
    cfg.update(kw)
    return LlamaForCausalLM(LlamaConfig(**cfg)).eval()


def prompt_tiny_gpt2(**kw):
    """Prompt-method GPT-2 (Conv1D projections), dropout off so train-mode losses are deterministic."""
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = dict(vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4, n_positions=64, pad_token_id=0, bos_token_id=1,
               eos_token_id=2, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    cfg.update(kw)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return GPT2LMHeadModel(GPT2Config(**cfg)).eval()


def tiny_qwen2(**kw):
    """2-layer Qwen2 (q/k/v biases) with GQA."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    cfg = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, max_position_embeddings=128, pad_token_id=0)
    cfg.update(kw)
    return Qwen2ForCausalLM(Qwen2Config(**cfg)).eval()


def tiny_mistral(**kw):
    from transformers import MistralConfig, MistralForCausalLM

    cfg = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, max_position_embeddings=128, pad_token_id=0)
    cfg.update(kw)
    return MistralForCausalLM(MistralConfig(**cfg)).eval()


def tiny_bert(**kw):
    from transformers import BertConfig, BertModel

    cfg = dict(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
               max_position_embeddings=64, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    cfg.update(kw)
    return BertModel(BertConfig(**cfg)).eval()


PROMPT_MODELS = {"llama": prompt_tiny_llama, "gpt2": prompt_tiny_gpt2}


def twin(builder, seed: int = 0):
    """Two identical copies of a tiny model."""
    torch.manual_seed(seed)
    m = builder()
    return m, copy.deepcopy(m)


def batch(b: int = 2, length: int = 7, seed: int = 1, pad_first: int = 2):
    """input_ids (b, length) in [3, VOCAB), an attention mask with `pad_first` left-padded positions in row 0, and
    labels equal to the ids with -100 on the padded positions."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (b, length), generator=g)
    mask = torch.ones(b, length, dtype=torch.long)
    mask[0, :pad_first] = 0
    labels = ids.clone()
    labels[0, :pad_first] = -100
    return ids, mask, labels


# Hugging Face training-stack tests (Trainer, TRL): smaller models, a 64-word vocabulary with a word-level tokenizer.
STACK_VOCAB = 64


def stack_tiny_llama():
    import transformers

    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=STACK_VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                   num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64,
                                   pad_token_id=0, eos_token_id=1, bos_token_id=3)
    return transformers.LlamaForCausalLM(cfg)


def stack_tiny_gpt2():
    import transformers

    torch.manual_seed(0)
    cfg = transformers.GPT2Config(vocab_size=STACK_VOCAB, n_embd=32, n_layer=1, n_head=2, n_positions=64,
                                  pad_token_id=0, eos_token_id=1, bos_token_id=3)
    return transformers.GPT2LMHeadModel(cfg)


def stack_lm_dataset(n=16, seq=12, seed=1):
    import datasets

    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(4, STACK_VOCAB, (n, seq), generator=g)
    # an extra text column: Trainer's remove_unused_columns must keep input_ids/labels and drop only this
    return datasets.Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": torch.ones_like(ids).tolist(),
                                       "labels": ids.tolist(), "text": ["unused"] * n})


def stack_tiny_tokenizer():
    import transformers
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"<pad>": 0, "<eos>": 1, "<unk>": 2, "<bos>": 3, **{f"w{i}": i + 4 for i in range(STACK_VOCAB - 4)}}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", eos_token="<eos>",
                                                unk_token="<unk>", bos_token="<bos>")


def stack_text_dataset(n=8):
    import datasets

    g = torch.Generator().manual_seed(2)
    rows = [" ".join(f"w{j}" for j in torch.randint(0, STACK_VOCAB - 4, (10,), generator=g).tolist())
            for _ in range(n)]
    return datasets.Dataset.from_dict({"text": rows})


def eval_logits(model, ids):
    model.eval()
    with torch.no_grad():
        return model(input_ids=ids).logits


STACK_IDS = torch.randint(4, STACK_VOCAB, (2, 9), generator=torch.Generator().manual_seed(5))


class TinyQV(torch.nn.Module):
    """Two 8x8 linears named q and v (the save/load reliability tests' base model)."""

    def __init__(self):
        super().__init__()
        self.q = torch.nn.Linear(8, 8)
        self.v = torch.nn.Linear(8, 8)

    def forward(self, x):
        return self.v(torch.relu(self.q(x)))


def tiny_qv():
    torch.manual_seed(0)
    return TinyQV()


def tiny_qv_lora(alpha=8, seed=0):
    """fastpeft LoRA (r=2, random B) on ``tiny_qv()``; also imported by a subprocess script of the save tests."""
    import fastpeft

    b = tiny_qv()
    torch.manual_seed(seed)
    return fastpeft.get_peft_model(b, fastpeft.LoraConfig(r=2, lora_alpha=alpha, target_modules=["q", "v"],
                                                          init_lora_weights=False))


# ---------------------------------------------------------------------------------------------------------------
# HF PEFT / fastpeft pairs: one base model wrapped by both libraries under the same seed
# ---------------------------------------------------------------------------------------------------------------


def wrap_pair(base, peft_cfg, fast_cfg, seed=1, check_init=True):
    """(peft_model, fastpeft_model) built from deep copies of ``base`` under the same seed; asserts equal parameter
    names, requires_grad flags and (``check_init``) initial values."""
    import peft

    import fastpeft

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.manual_seed(seed)
        p = peft.get_peft_model(copy.deepcopy(base), peft_cfg)
        torch.manual_seed(seed)
        f = fastpeft.get_peft_model(copy.deepcopy(base), fast_cfg)
    sp, sf = dict(p.named_parameters()), dict(f.named_parameters())
    assert sorted(sp) == sorted(sf), f"parameter names differ: {sorted(set(sp) ^ set(sf))[:10]}"
    for k in sp:
        assert sp[k].requires_grad == sf[k].requires_grad, f"requires_grad differs for {k}"
        if check_init:
            assert torch.equal(sp[k], sf[k]), f"initial value differs for {k}"
    return p, f


def build_pair(make, peft_cfg, fast_cfg, randomize=True):
    """``wrap_pair`` of ``make()`` (or of ``make`` when it is a module), then ``randomize_trainable``."""
    base = make if isinstance(make, torch.nn.Module) else make()
    p, f = wrap_pair(base, peft_cfg, fast_cfg)
    if randomize:
        randomize_trainable(p, f)
    return p, f


def randomize_trainable(p, f, seed=5, scale=0.1):
    """The same random values for every trainable tensor of both models; a DoRA magnitude m becomes m·(1 + scale·z)
    so it stays near the weight norm (B = 0 would hide A's gradient)."""
    sp, sf = dict(p.named_parameters()), dict(f.named_parameters())
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for k in sorted(sp):
            if sp[k].requires_grad and sf[k].requires_grad:
                z = torch.randn(sp[k].shape, generator=g, dtype=sp[k].dtype)
                v = sp[k] * (1 + scale * z) if "magnitude" in k else z * scale
                sp[k].copy_(v)
                sf[k].copy_(v)


def inputs(batch=2, seq=7, seed=11):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, VOCAB, (batch, seq), generator=g)


def run_loss(model, ids, seed=3, **kw):
    torch.manual_seed(seed)
    return model(input_ids=ids, labels=kw.pop("labels", ids), **kw)


def compare_grads(p, f, rtol=PEFT_PARITY_RTOL) -> int:
    sp, sf = dict(p.named_parameters()), dict(f.named_parameters())
    n = 0
    for k in sorted(sp):
        if sp[k].requires_grad:
            assert sf[k].grad is not None, f"no gradient for {k}"
            assert_close_rel(sf[k].grad, sp[k].grad, rtol, f"grad {k}")
            n += 1
    assert n > 0, "no trainable tensor compared"
    return n


def assert_parity(p, f, train=False, ids=None, labels=None, check_grads=True):
    """Same loss/logits and the same gradient of every trainable tensor (RNG reset before each forward)."""
    ids = inputs() if ids is None else ids
    p.train(train)
    f.train(train)
    kw = {} if labels is None else {"labels": labels}
    op = run_loss(p, ids, **kw)
    of = run_loss(f, ids, **kw)
    assert_close_rel(of.logits, op.logits, PEFT_PARITY_RTOL, "logits")
    assert_close_rel(of.loss, op.loss, PEFT_PARITY_RTOL, "loss")
    if not check_grads:
        return op, of
    op.loss.backward()
    of.loss.backward()
    compare_grads(p, f)
    return op, of


def assert_lm_parity(p, f, train=False, ids=None, seed=3):
    """``assert_parity`` with gradients, then both models' gradients zeroed."""
    ids = inputs() if ids is None else ids
    p.train(train)
    f.train(train)
    op, of = run_loss(p, ids, seed), run_loss(f, ids, seed)
    assert_close_rel(of.logits, op.logits, PEFT_PARITY_RTOL, "logits")
    assert_close_rel(of.loss, op.loss, PEFT_PARITY_RTOL, "loss")
    op.loss.backward()
    of.loss.backward()
    compare_grads(p, f)
    p.zero_grad()
    f.zero_grad()
    return op, of


class OneLinear(torch.nn.Module):
    """A model of one ``nn.Linear`` named ``proj`` (bias on): the smallest target for a layer-level parity test."""

    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__()
        self.proj = torch.nn.Linear(in_features, out_features)

    def forward(self, x):
        return self.proj(x)


def run_module_parity(p, f, x, train: bool) -> None:
    """HF PEFT's model `p` and fastpeft's `f` on input tensor x (RNG reset before each forward): the same output and
    the same gradient of every trainable tensor for the loss sum(y²); gradients zeroed after."""
    p.train(train)
    f.train(train)
    torch.manual_seed(3)
    yp = p(x)
    torch.manual_seed(3)
    yf = f(x)
    assert_close_rel(yf, yp, PEFT_PARITY_RTOL, "output")
    yp.square().sum().backward()
    yf.square().sum().backward()
    compare_grads(p, f)
    p.zero_grad()
    f.zero_grad()


def assert_step_bit_for_bit(p, f, n_grads: int, ids=None, seed=3) -> None:
    """One training step of HF PEFT's model `p` and fastpeft's `f` (RNG reset to `seed` before each forward): the
    same loss and the same gradient of every trainable tensor, bit for bit (``torch.equal``); `n_grads` of them."""
    ids = inputs() if ids is None else ids
    losses = []
    for m in (p, f):
        m.train()
        torch.manual_seed(seed)
        loss = m(input_ids=ids, labels=ids).loss
        loss.backward()
        losses.append(loss)
    assert torch.equal(losses[0], losses[1])
    gp = {n: t.grad for n, t in p.named_parameters() if t.grad is not None}
    gf = {n: t.grad for n, t in f.named_parameters() if t.grad is not None}
    assert sorted(gp) == sorted(gf) and len(gp) == n_grads
    for n in gp:
        assert torch.equal(gp[n], gf[n]), n


def assert_same_base_weights(p, f, rtol=PEFT_PARITY_RTOL):
    """Every non-adapter parameter (base weights, possibly modified by init/merge) agrees."""
    sp, sf = dict(p.named_parameters()), dict(f.named_parameters())
    for k in sp:
        if "lora_" not in k:
            assert_close_rel(sf[k], sp[k], rtol, f"param {k}")


def merged_state(model) -> dict:
    """``merge_and_unload`` of a deep copy -> its plain state dict."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return copy.deepcopy(model).merge_and_unload().state_dict()


DORA_TARGETS = {"llama": ["q_proj", "v_proj", "down_proj"], "gpt2": ["c_attn", "c_proj"]}


def dora_pair(arch, **kw):
    """(HF PEFT, fastpeft) DoRA models (r=4, alpha=8, DORA_TARGETS[arch]) of the same tiny base, adapters
    randomized identically; `kw` overrides the config."""
    cfg = dict(r=4, lora_alpha=8, target_modules=DORA_TARGETS[arch], use_dora=True)
    cfg.update(kw)
    p, f = wrap_pair(MODELS[arch](), *both_lora(**cfg))
    randomize_trainable(p, f)
    return p, f


def both_lora(**kw):
    """(peft.LoraConfig(**kw), fastpeft.LoraConfig(**kw))."""
    import peft

    import fastpeft

    return peft.LoraConfig(**kw), fastpeft.LoraConfig(**kw)
