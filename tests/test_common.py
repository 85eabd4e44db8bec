"""One shared tester for every weight-side method (in the spirit of HF PEFT's PeftCommonTester).

Every method (LoRA, LoRA r=1, LoRA+DoRA, AdaLoRA, IA3, LoRA and DoRA on GPT-2's Conv1D, LoRA on Conv1d/2d/3d, IA3 on
Conv2d/3d, LoRA on nn.Embedding) runs through ``fastpeft.get_peft_model`` on every available backend (torch always;
triton when it runs here: on a GPU, or in Triton's interpreter on CPU in fp32/fp16 only, since the interpreter's
bf16 ``tl.dot`` is not usable; cuda with a GPU) and dtype, selected the way a user selects it: ``FASTPEFT_BACKEND``.
Checked for each:

- forward and the gradient of the input (token ids have none) and of every trainable tensor against an fp64 copy of
  the model, under the accuracy rule (tests/testing_utils.py: ``assert_fa_rule``);
- odd shapes: M = 1, M = 0, a non-contiguous input, feature sizes that are not multiples of 16 (all models), r = 1;
- merge / unmerge round trip and merge_and_unload; save / load round trip; disable_adapter.

Quantized (bitsandbytes) bases have no fp64 copy to compare with; they are tested against HF PEFT on the same
quantized model instead (tests/test_lora_bnb.py: outputs, gradients, merges, files; tests/test_convergence.py: a
QLoRA training run).

Only public names are used (fastpeft.*, configs, fastpeft.backend_info), so moving code inside the package does not
touch this file.
"""
from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn

import fastpeft
from testing_utils import GRAD_FACTOR, MATMUL_FACTOR, assert_fa_rule, rel_err

F16, F32, F64, BF16 = torch.float16, torch.float32, torch.float64, torch.bfloat16
HAS_CUDA = torch.cuda.is_available()
DEV = "cuda" if HAS_CUDA else "cpu"
# fp32 merge / unmerge: the merged weight W + s·BA is rounded once more than the unmerged path, relative.
MERGE_FP32_RTOL = 1e-5
# fp32 unmerge restores W up to the rounding of (W + Δ) - Δ: a few ulps of W, relative.
UNMERGE_FP32_RTOL = 1e-6

# ---------------------------------------------------------------------------------------------------------------
# tiny base models (feature sizes 23 -> 37 -> 19: no multiple of 16, tails in every tile)
# ---------------------------------------------------------------------------------------------------------------


class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(23, 37)
        self.fc2 = nn.Linear(37, 19)

    def forward(self, x):
        return self.fc2(torch.tanh(self.fc1(x)))


class GPT2Style(nn.Module):
    """The same MLP with transformers' Conv1D (weight stored (in, out); LoRA needs fan_in_fan_out=True)."""

    def __init__(self):
        super().__init__()
        from transformers.pytorch_utils import Conv1D

        self.fc1 = Conv1D(37, 23)
        self.fc2 = Conv1D(19, 37)

    def forward(self, x):
        return self.fc2(torch.tanh(self.fc1(x)))


class ConvNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 5, 3, padding=1)
        self.head = nn.Linear(5 * 5, 7)

    def forward(self, x):
        h = torch.tanh(self.conv(x))            # (..., 5, 5, 5)
        return self.head(h.flatten(-2))          # (..., 5, 7): the head sees the last two dims flattened


class ConvNet1d(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv1d(3, 5, 3, padding=1)
        self.head = nn.Linear(5 * 6, 7)

    def forward(self, x):
        return self.head(torch.tanh(self.conv(x)).flatten(-2))   # (N, 3, 6) -> (N, 5, 6) -> (N, 7)


class ConvNet3d(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv3d(3, 4, (3, 1, 3), padding=(1, 0, 1))
        self.head = nn.Linear(4 * 2 * 3 * 3, 7)

    def forward(self, x):
        return self.head(torch.tanh(self.conv(x)).flatten(-4))   # (N, 3, 2, 3, 3) -> (N, 4, 2, 3, 3) -> (N, 7)


class EmbedMLP(nn.Module):
    """Token ids -> an embedding (29 x 23) -> a linear head: LoRA on nn.Embedding (HF PEFT's lora.Embedding)."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(29, 23)
        self.fc2 = nn.Linear(23, 19)

    def forward(self, ids):
        return self.fc2(torch.tanh(self.emb(ids)))


def _lora(**kw):
    return fastpeft.LoraConfig(**{"r": 4, "lora_alpha": 8, "target_modules": ["fc1", "fc2"], **kw})


METHODS = {
    "lora": (MLP, lambda: _lora()),
    "lora_r1": (MLP, lambda: _lora(r=1, lora_alpha=2)),
    "dora": (MLP, lambda: _lora(use_dora=True)),
    "adalora": (MLP, lambda: fastpeft.AdaLoraConfig(init_r=4, target_r=2, total_step=10, lora_alpha=8,
                                                      target_modules=["fc1", "fc2"])),
    "ia3": (MLP, lambda: fastpeft.IA3Config(target_modules=["fc1", "fc2"], feedforward_modules=["fc2"])),
    "lora_conv1d": (GPT2Style, lambda: _lora(fan_in_fan_out=True)),
    "dora_conv1d": (GPT2Style, lambda: _lora(fan_in_fan_out=True, use_dora=True)),
    "lora_conv2d": (ConvNet, lambda: _lora(target_modules=["conv", "head"])),
    "lora_nn_conv1d": (ConvNet1d, lambda: _lora(target_modules=["conv", "head"])),
    "lora_conv3d": (ConvNet3d, lambda: _lora(target_modules=["conv", "head"])),
    "ia3_conv2d": (ConvNet, lambda: fastpeft.IA3Config(target_modules=["conv", "head"], feedforward_modules=["conv"])),
    "ia3_conv3d": (ConvNet3d, lambda: fastpeft.IA3Config(target_modules=["conv", "head"], feedforward_modules=[])),
    "lora_embedding": (EmbedMLP, lambda: _lora(target_modules=["emb", "fc2"])),
}
# methods whose input is token ids: no input gradient, no dtype cast of the input
ID_INPUT = {"lora_embedding"}
# conv methods: one sample's (channels, *spatial)
CONV_INPUT = {"lora_conv2d": (3, 5, 5), "lora_nn_conv1d": (3, 6), "lora_conv3d": (3, 2, 3, 3),
              "ia3_conv2d": (3, 5, 5), "ia3_conv3d": (3, 2, 3, 3)}


def _needs(method):
    if method.endswith("conv1d"):
        pytest.importorskip("transformers")


def _backends():
    """(backend, dtypes) pairs that can run on this machine."""
    out = [("torch", (F32, F16, BF16))]
    info = fastpeft.backend_info()["backends"]
    if info["triton"]["available"]:
        if HAS_CUDA:
            out.append(("triton", (F32, F16, BF16)))
        elif fastpeft.backend_info().get("triton_interpret"):
            out.append(("triton", (F32, F16)))  # the interpreter's bf16 tl.dot is not usable
    if HAS_CUDA and info.get("cuda", {}).get("available"):
        out.append(("cuda", (F32, F16, BF16)))
    return out


BACKENDS = [b for b, _ in _backends()]
BACKEND_DTYPES = [pytest.param(b, d, id=f"{b}-{str(d)[6:]}") for b, ds in _backends() for d in ds]


def build(method, seed=0):
    """fastpeft model (fp32, CPU) with every trainable tensor random (B = 0 would hide A's gradient)."""
    _needs(method)
    make_base, make_cfg = METHODS[method]
    torch.manual_seed(seed)
    base = make_base()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = fastpeft.get_peft_model(base, make_cfg())
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.requires_grad:
                z = torch.randn(p.shape, generator=g)
                if "magnitude" in name:
                    p.mul_(1 + 0.1 * z)
                elif "ia3_l" in name:
                    p.copy_(1 + 0.3 * z)
                else:
                    p.copy_(0.3 * z)
    return model.eval()


def make_input(method, lead=(5, 7), seed=2, noncontig=False):
    g = torch.Generator().manual_seed(seed)
    if method in ID_INPUT:
        ids = torch.randint(0, 29, lead[::-1] if noncontig else lead, generator=g)
        return ids.t() if noncontig else ids
    tail = CONV_INPUT.get(method, (23,))
    if method in CONV_INPUT:
        lead = lead[:1]  # a conv takes one batch dimension
    if noncontig:  # same values, transposed storage
        x = torch.randn(*tail[::-1], *lead[::-1], generator=g, dtype=F64)
        x = x.permute(*range(x.dim() - 1, -1, -1))
        assert not x.is_contiguous()
        return x
    return torch.randn(*lead, *tail, generator=g, dtype=F64)


def run(model, x, backend, monkeypatch, dtype):
    """Output and the gradients (input, every trainable tensor) as a name -> tensor dict, in their own dtypes."""
    monkeypatch.setenv("FASTPEFT_BACKEND", backend)
    model = model.to(DEV)
    model.zero_grad(set_to_none=True)
    ids = not x.is_floating_point()
    x = x.to(DEV) if ids else x.to(DEV, dtype)
    if not ids:   # token ids have no gradient
        x = x.detach().requires_grad_(True) if x.is_contiguous() else x.detach().clone(
            memory_format=torch.preserve_format).requires_grad_(True)
    y = model(x)
    g = torch.Generator().manual_seed(3)
    dy = torch.randn(y.shape, generator=g, dtype=F64).to(DEV, y.dtype)
    y.backward(dy)
    out = {"y": y.detach()} if ids else {"y": y.detach(), "dx": x.grad}
    for name, p in model.named_parameters():
        if p.requires_grad:
            assert p.grad is not None, f"no gradient for {name}"
            out[name] = p.grad
    return out


def check_accuracy(method, backend, dtype, monkeypatch, x):
    model = build(method)
    impl = run(copy.deepcopy(model).to(DEV, dtype), x, backend, monkeypatch, dtype)
    same = run(copy.deepcopy(model).to(DEV, dtype), x, "torch", monkeypatch, dtype)
    ref = run(copy.deepcopy(model).double(), x, "torch", monkeypatch, F64)
    assert impl.keys() == ref.keys()
    for name, want in ref.items():
        got = impl[name]
        assert got.dtype == same[name].dtype, f"{name}: dtype {got.dtype} (torch backend: {same[name].dtype})"
        assert_fa_rule(got.cpu(), want.cpu(), same[name].cpu(), MATMUL_FACTOR if name == "y" else GRAD_FACTOR,
                       f"{method}/{backend}/{str(dtype)[6:]} {name}")


# ---------------------------------------------------------------------------------------------------------------
# accuracy: every method x backend x dtype, then the odd shapes
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend,dtype", BACKEND_DTYPES)
@pytest.mark.parametrize("method", list(METHODS))
def test_forward_and_every_gradient_match_fp64(method, backend, dtype, monkeypatch):
    check_accuracy(method, backend, dtype, monkeypatch, make_input(method))


@pytest.mark.parametrize("shape", ["m1", "m0", "noncontig"])
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("method", list(METHODS))
def test_odd_shapes_fp32(method, backend, shape, monkeypatch):
    if shape == "m1":
        x = make_input(method, lead=(1,))
    elif shape == "m0":
        x = make_input(method, lead=(0,))
    else:
        x = make_input(method, lead=(4, 3), noncontig=True)
    check_accuracy(method, backend, F32, monkeypatch, x)


# ---------------------------------------------------------------------------------------------------------------
# model lifecycle: merge / unmerge, save / load, disable_adapter (fp32)
# ---------------------------------------------------------------------------------------------------------------


def _out(model, x, backend, monkeypatch):
    monkeypatch.setenv("FASTPEFT_BACKEND", backend)
    with torch.no_grad():
        return model.to(DEV)(x.to(DEV) if not x.is_floating_point() else x.to(DEV, F32)).cpu()


def _base_weights(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("method", list(METHODS))
def test_merge_unmerge_round_trip(method, backend, monkeypatch):
    model = build(method).to(DEV)
    x = make_input(method)
    want = _out(model, x, backend, monkeypatch)
    base_before = _base_weights(model)
    base_out = _out(_fresh_base(method).to(DEV), x, backend, monkeypatch)
    assert rel_err(want, base_out) > 1e-2, "the adapter does not change the output: the test would prove nothing"

    model.merge_adapter()
    assert rel_err(_out(model, x, backend, monkeypatch), want) <= MERGE_FP32_RTOL
    model.unmerge_adapter()
    tol = UNMERGE_FP32_RTOL
    if method == "ia3":
        # IA3 unmerges W / (l + 1e-8) (HF PEFT's formula, which fastpeft keeps for parity): a relative bias of
        # 1e-8 / |l| on top of the rounding
        tol += 1e-8 / min(p.detach().abs().min().item() for n, p in model.named_parameters() if "ia3_l" in n)
    for n, w in _base_weights(model).items():
        assert rel_err(w, base_before[n]) <= tol, f"unmerge did not restore {n}"
    assert rel_err(_out(model, x, backend, monkeypatch), want) <= MERGE_FP32_RTOL

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        plain = copy.deepcopy(model).merge_and_unload()
    assert not any(p.requires_grad and ("lora_" in n or "ia3_" in n) for n, p in plain.named_parameters())
    assert type(plain) is METHODS[method][0]
    assert rel_err(_out(plain, x, backend, monkeypatch), want) <= MERGE_FP32_RTOL


@pytest.mark.parametrize("method", list(METHODS))
def test_save_load_round_trip(method, tmp_path, monkeypatch):
    model = build(method)
    x = make_input(method)
    want = _out(model, x, "torch", monkeypatch)
    model.save_pretrained(str(tmp_path))
    # a fresh base with the same (seeded) weights; the adapter comes from the files
    loaded = fastpeft.PeftModel.from_pretrained(_fresh_base(method), str(tmp_path)).eval()
    assert torch.equal(_out(loaded, x, "torch", monkeypatch), want)
    sd_a = fastpeft.get_peft_model_state_dict(model)
    sd_b = fastpeft.get_peft_model_state_dict(loaded)
    assert sd_a.keys() == sd_b.keys() and all(torch.equal(sd_a[k], sd_b[k]) for k in sd_a)


def _fresh_base(method):
    torch.manual_seed(0)
    return METHODS[method][0]()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("method", list(METHODS))
def test_disable_adapter_gives_the_base_model(method, backend, monkeypatch):
    model = build(method).to(DEV)
    x = make_input(method)
    with_adapter = _out(model, x, backend, monkeypatch)
    base = _out(_fresh_base(method).to(DEV), x, backend, monkeypatch)
    with model.disable_adapter():
        assert torch.equal(_out(model, x, backend, monkeypatch), base)
    assert torch.equal(_out(model, x, backend, monkeypatch), with_adapter)
