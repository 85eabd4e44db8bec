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
    from torch._subclasses.fake_tensor import FakeTensorMode

    calls = []

    def fake_choose(op, *args, candidates=None):
        calls.append((op, len(args)))
        return "triton"

    monkeypatch.setattr(_backend, "_dispatch_choose", fake_choose)
    monkeypatch.setattr(_backend, "_why_not", lambda b, op, dev: None if b in ("torch", "triton") else "absent")
    dev = torch.device("cuda")
    with FakeTensorMode():  # CUDA tensors without a GPU: the registry predicates read their device
        args = tuple(torch.zeros(*s, device=dev) if s else None for s in ((2, 3), (4, 3), None, (1, 3), None, (4, 1)))
    assert _backend._auto_choice("lora", dev, args) == "triton"
    assert calls == [("lora", 6)]
    # a measured torch entry (fastpeft's torch implementation won where the host decides) is taken on CUDA too
    monkeypatch.setattr(_backend, "_dispatch_choose", lambda op, *a, candidates=None: "torch")
    assert _backend._auto_choice("lora", dev, args) == "torch"
    # a measured choice that cannot run here is ignored, and the default order applies
    monkeypatch.setattr(_backend, "_dispatch_choose", lambda op, *a, candidates=None: "cuda")
    assert _backend._auto_choice("lora", dev, args) == "triton"
    # nothing measured: default order (triton's cublas variant > cuda ext > torch)
    monkeypatch.setattr(_backend, "_dispatch_choose", lambda op, *a, candidates=None: None)
    monkeypatch.setattr(_backend, "_why_not", lambda b, op, dev: None)
    assert _backend._auto_choice("lora", dev, args) == "triton"
    monkeypatch.setattr(_backend, "_why_not", lambda b, op, dev: None if b in ("torch", "cuda") else "absent")
    assert _backend._auto_choice("lora", dev, args) == "cuda"
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
    from torch._subclasses.fake_tensor import FakeTensorMode

    from fastpeft import _backend as B

    monkeypatch.setattr(B, "_why_not", lambda b, op, dev: None)  # every backend installed, as on a GPU machine
    monkeypatch.setattr(B, "_measured_choice", lambda op, dev, args: None)
    monkeypatch.setattr(B, "_AUTO_CACHE", {})
    with FakeTensorMode():
        for dt, want in ((torch.float32, "triton"), (torch.float64, "torch")):
            x = torch.zeros(2, 3, dtype=dt, device="cuda")
            assert B.select_backend("lora", x, "auto") == want, dt
            args = (x, torch.zeros(4, 3, dtype=dt, device="cuda"), None, torch.zeros(1, 3, dtype=dt, device="cuda"),
                    None, torch.zeros(4, 1, dtype=dt, device="cuda"))
            assert B.select_backend("lora", x, "auto", dispatch_args=args) == want, dt
            # the registry predicate refuses float64 on the fused backends, naming the argument; explicit raises
            if dt == torch.float64:
                for name in ("triton", "cuda"):
                    with pytest.raises(RuntimeError, match=f"'{name}' is unavailable.*x has dtype torch.float64"):
                        B.select_backend("lora", x, name, dispatch_args=args)


def test_variant_names(monkeypatch):
    """``triton:fused`` / ``triton:cublas`` are explicit choices (also through FASTPEFT_BACKEND); unknown variants
    are rejected with the list of valid names."""
    if not _backend.triton_available():
        pytest.skip("triton not importable")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    for name in ("triton:fused", "triton:cublas"):
        assert _backend.select_backend("lora", torch.zeros(2, 3), name) == name
    monkeypatch.setenv("FASTPEFT_BACKEND", "triton:fused")
    assert _backend.select_backend("ia3", torch.zeros(2, 3)) == "triton:fused"
    with pytest.raises(ValueError, match="triton:fused"):
        _backend.select_backend("lora", torch.zeros(2, 3), "triton:bogus")


def test_measured_variant_becomes_the_default_for_its_shape_only(monkeypatch):
    """A dispatch-table entry naming triton's fused variant makes auto pick ``triton:fused`` for that shape bucket;
    other shapes keep the default.  Auto's answer is cached per shape and recomputed when the table changes."""
    import fastpeft._dispatch as dispatch

    monkeypatch.setattr(dispatch, "_gpu_name", lambda dev: "NVIDIA H200")
    monkeypatch.setattr(_backend, "_why_not", lambda b, op, dev: None if b.startswith(("torch", "triton")) else "no")
    monkeypatch.setattr(_backend, "_AUTO_CACHE", {})
    dispatch.clear()
    from torch._subclasses.fake_tensor import FakeTensorMode
    try:
        dev = torch.device("cuda")
        # fake CUDA tensors: the registry predicates read the operands' device (CPU tensors would pass only where
        # TRITON_INTERPRET=1 lets triton take them - not on a GPU machine, where this test once failed)
        with FakeTensorMode():
            x = torch.zeros(8192, 4096, device=dev)
            w = torch.zeros(4096, 4096, device=dev)
            a, b = torch.zeros(16, 4096, device=dev), torch.zeros(4096, 16, device=dev)
            small_x = torch.zeros(16, 4096, device=dev)
        args = (x, w, None, a, None, b)

        class FakeX:  # a CUDA-looking x for the cache key (no GPU needed)
            device, dtype = dev, torch.float32

        calls = []
        real = _backend._auto_choice

        def counting(*a, **k):
            calls.append(1)
            return real(*a, **k)

        monkeypatch.setattr(_backend, "_auto_choice", counting)
        assert _backend._cached_auto_choice("lora", FakeX, args) == "triton"
        assert _backend._cached_auto_choice("lora", FakeX, args) == "triton" and len(calls) == 1  # cached
        dispatch.record("NVIDIA H200", torch.float32, "lora", dispatch.bucket(8192, 4096, 4096, 16), "triton",
                        "test entry", variant="fused")
        assert _backend._cached_auto_choice("lora", FakeX, args) == "triton:fused" and len(calls) == 2
        small = (small_x, w, None, a, None, b)
        assert _backend._cached_auto_choice("lora", FakeX, small) == "triton"
        with pytest.raises(ValueError, match="variant"):
            dispatch.record("NVIDIA H200", torch.float32, "lora", "m<=1,n1,k1", "triton", "bad", variant="kaug")
    finally:
        dispatch.clear()
