"""The one place that decides the backend: fastpeft._backend.select_backend and backend_info()."""

import pytest
import torch

import fastpeft
from fastpeft import _backend


def test_auto_on_cpu_is_torch(monkeypatch):
    monkeypatch.delenv("FASTPEFT_BACKEND", raising=False)
    assert _backend.select_backend("lora", torch.zeros(2, 3)) == "torch"
    assert _backend.select_backend("lora", torch.zeros(2, 3), "auto") == "torch"


def test_env_override_and_argument_precedence(monkeypatch):
    monkeypatch.setenv("FASTPEFT_BACKEND", "torch")
    assert _backend.select_backend("lora", torch.zeros(2, 3)) == "torch"
    monkeypatch.setenv("FASTPEFT_BACKEND", "cuda")
    # the explicit argument wins over the environment
    assert _backend.select_backend("lora", torch.zeros(2, 3), "torch") == "torch"
    with pytest.raises(RuntimeError, match="'cuda' is unavailable"):
        _backend.select_backend("lora", torch.zeros(2, 3))


def test_bad_names(monkeypatch):
    with pytest.raises(ValueError, match="backend must be one of"):
        _backend.select_backend("lora", torch.zeros(2, 3), "cutlass")
    with pytest.raises(TypeError, match="backend must be a str"):
        _backend.select_backend("lora", torch.zeros(2, 3), 3)
    monkeypatch.setenv("FASTPEFT_BACKEND", "fast")
    with pytest.raises(ValueError, match="FASTPEFT_BACKEND='fast'"):
        _backend.select_backend("lora", torch.zeros(2, 3))


def test_explicit_cuda_on_cpu_says_why():
    with pytest.raises(RuntimeError, match="cuda"):
        _backend.select_backend("lora", torch.zeros(2, 3), "cuda")


def test_triton_on_cpu_needs_interpreter(monkeypatch):
    if not _backend.triton_available():
        pytest.skip("triton not importable")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert _backend.select_backend("lora", torch.zeros(2, 3), "triton") == "triton"
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        _backend.select_backend("lora", torch.zeros(2, 3), "triton")


def test_auto_uses_measured_dispatch_on_cuda(monkeypatch):
    """On CUDA tensors, auto asks fastpeft._dispatch for the measured choice and takes it when it can run."""
    import fastpeft._dispatch as dispatch

    calls = []

    def fake_choose(op, *args):
        calls.append((op, len(args)))
        return "triton"

    monkeypatch.setattr(dispatch, "choose", fake_choose)
    monkeypatch.setattr(_backend, "_why_not", lambda b, op, dev: None if b in ("torch", "triton") else "absent")
    dev = torch.device("cuda")
    args = (torch.zeros(2, 3), torch.zeros(4, 3), None, torch.zeros(1, 3), None, torch.zeros(4, 1))
    assert _backend._auto_choice("lora", dev, args) == "triton"
    assert calls == [("lora", 6)]
    # a measured choice that cannot run here is ignored, and the default order applies
    monkeypatch.setattr(dispatch, "choose", lambda op, *a: "cuda")
    assert _backend._auto_choice("lora", dev, args) == "triton"
    # nothing measured: default order (cuda ext > triton > torch)
    monkeypatch.setattr(dispatch, "choose", lambda op, *a: None)
    monkeypatch.setattr(_backend, "_why_not", lambda b, op, dev: "absent")
    assert _backend._auto_choice("lora", dev, args) == "torch"


def test_backend_info_reports_every_backend_with_a_reason():
    info = fastpeft.backend_info()
    assert info["torch"] == torch.__version__
    assert set(info["backends"]) == {"torch", "triton", "cuda"}
    for name, entry in info["backends"].items():
        assert isinstance(entry["available"], bool) and entry["reason"], name
    if torch.version.cuda is None:
        assert info["backends"]["cuda"]["available"] is False
        assert "CPU build" in info["backends"]["cuda"]["reason"]
    assert info["cuda_devices"] == (torch.cuda.device_count() if torch.version.cuda is not None else 0)
    assert "dispatch" in info


def test_cuda_ext_has_looks_for_both_halves_of_the_op(monkeypatch):
    """The ops fastpeft._C registers are <op>_fwd_cuda / <op>_bwd_cuda; the backend check must look for those (it
    once looked for <op>_cuda, which no op is called, so the extension could never be selected)."""
    import types

    from fastpeft import _backend as B

    fake_ops = types.SimpleNamespace(lora_fwd_cuda=object(), lora_bwd_cuda=object(), ia3_fwd_cuda=object())
    monkeypatch.setattr(B, "cuda_ext_available", lambda: True)
    monkeypatch.setattr(B.torch.ops, "fastpeft", fake_ops, raising=False)
    assert B._cuda_ext_has("lora")
    assert not B._cuda_ext_has("ia3")  # no ia3_bwd_cuda
    assert not B._cuda_ext_has("adalora")


def test_auto_sends_float64_to_torch(monkeypatch):
    from fastpeft import _backend as B

    monkeypatch.setattr(B, "_auto_choice", lambda *a, **k: "cuda")  # what auto would pick for a CUDA tensor
    assert B.select_backend("lora", torch.zeros(2, 3, dtype=torch.float32), "auto") == "cuda"
    assert B.select_backend("lora", torch.zeros(2, 3, dtype=torch.float64), "auto") == "torch"
