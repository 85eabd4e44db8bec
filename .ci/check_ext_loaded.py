"""Check fastpeft._C against the Python side, without a GPU.

Two modes:
  * default (run by .ci/build_ext_full.sh): the built extension fastpeft._C must be importable (a CUDA build of
    torch, the .so built against it, on PYTHONPATH or installed);
  * ``--simulate``: the extension is absent (any torch, CPU builds included; tests/test_cuda_ext.py runs this): the
    op schemas are read from csrc/ext.cpp and defined through torch.library, so everything below except the
    loading and the C++ kernel registrations is checked in plain CI.  Refuses to run when fastpeft._C is importable.
Checks, one line each, tagged by group:
  [decl]     csrc/ext.cpp: every m.def has a CUDA m.impl, the C++ function's parameter types / names and return
             arity match the schema (what TORCH_LIBRARY checks only at load time), fastpeft._cuda.OPS and the fake
             kernels registered in fastpeft/_cuda.py name exactly those ops, with the schema's argument names;
  [load]     fastpeft._C loads (every symbol resolved), CUDA is not initialised, torch.ops.fastpeft.<op> has the
             schema of ext.cpp, a CUDA kernel, no CPU kernel, a fake (Meta) kernel;
  [fake]     the wrappers of fastpeft/_cuda.py on fake CUDA tensors (FakeTensorMode needs no GPU) over the argument
             combinations the callers use: every output's shape and dtype equals the torch reference's
             (fastpeft/ops/*.py, run on small real CPU tensors);
  [backend]  fastpeft._backend selects the cuda backend for CUDA tensors when the extension is there;
  [autograd] fastpeft.functional (lora, adalora, ia3; backend="cuda") forward on fake CUDA tensors, then the
             autograd Function's backward node applied by hand: every gradient has its input's shape and dtype;
  [cpu]      an op called with CPU tensors raises a clear dispatcher error (no crash);
  [info]     fastpeft.backend_info() reports the extension.
Exit status 0 when every check holds, 1 otherwise, 3 when --simulate finds the real extension.

Usage: python .ci/check_ext_loaded.py [--simulate] [--quick] [--csrc DIR]
"""

from __future__ import annotations

import argparse
import ast
import os
import re
import sys
import traceback

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FAILED: list[str] = []

_CPP_TO_SCHEMA = {"at::Tensor": "Tensor", "c10::optional<at::Tensor>": "Tensor?",
                  "std::optional<at::Tensor>": "Tensor?", "double": "float", "int64_t": "int", "bool": "bool"}


def check(cond: bool, group: str, what: str) -> None:
    print(f"check_ext: {'OK  ' if cond else 'FAIL'} [{group}] {what}", flush=True)
    if not cond:
        FAILED.append(f"[{group}] {what}")


def parse_ext(src: str) -> tuple[dict, set]:
    """{op name: schema text} of every m.def and the set of names given a CUDA m.impl in ext.cpp."""
    defs = {}
    for m in re.finditer(r"m\.def\(((?:\s*\"(?:[^\"\\]|\\.)*\")+)\s*\)", src):
        schema = "".join(re.findall(r"\"((?:[^\"\\]|\\.)*)\"", m.group(1)))
        defs[schema.split("(", 1)[0].strip()] = schema
    impl_block = re.search(r"TORCH_LIBRARY_IMPL\(\s*fastpeft\s*,\s*CUDA\s*,\s*m\s*\)\s*\{(.*?)\n\}", src, re.S)
    impls = set(re.findall(r"m\.impl\(\s*\"(\w+)\"", impl_block.group(1))) if impl_block else set()
    return defs, impls


def schema_parts(schema: str) -> tuple[list, int]:
    """([(type, name), ...], number of returned tensors) of 'name(Type a, Type? b) -> (Tensor, Tensor)'."""
    m = re.fullmatch(r"\s*\w+\((.*)\)\s*->\s*(.*?)\s*", schema, re.S)
    args = [tuple(a.split()) for a in m.group(1).split(",") if a.strip()]
    rets = m.group(2).strip("() ")
    return args, len([r for r in rets.split(",") if r.strip()])


def cpp_signature(src: str, name: str) -> tuple[list, int] | None:
    """([(schema type, name), ...], tuple arity) of the C++ kernel `name` in ext.cpp, or None if not found."""
    m = re.search(r"std::tuple<([^;{}()]*?)>\s+" + name + r"\s*\(([^)]*)\)\s*\{", src, re.S)
    if m is None:
        return None
    params = []
    for p in m.group(2).split(","):
        p = re.sub(r"\bconst\b|&", " ", p).split()
        params.append((_CPP_TO_SCHEMA.get("".join(p[:-1]), "?" + "".join(p[:-1])), p[-1]))
    return params, len(m.group(1).split(","))


def fake_signatures(path: str) -> dict:
    """{op name: [parameter names]} of the functions decorated with reg("fastpeft::<op>") in fastpeft/_cuda.py,
    and the argument counts of every torch.ops.fastpeft.<op>(...) call there: {op: [counts]} under key 'calls'."""
    tree = ast.parse(open(path).read())
    fakes, calls = {}, {}
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef):
            for dec in node.decorator_list:
                if (isinstance(dec, ast.Call) and dec.args and isinstance(dec.args[0], ast.Constant)
                        and str(dec.args[0].value).startswith("fastpeft::")):
                    fakes[dec.args[0].value.split("::", 1)[1]] = [a.arg for a in node.args.args]
        if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                and ast.unparse(node.func.value) == "torch.ops.fastpeft"):
            calls.setdefault(node.func.attr, []).append((len(node.args), [k.arg for k in node.keywords]))
    return {"fakes": fakes, "calls": calls}


def norm_schema(s: str) -> str:
    return re.sub(r"\s+", " ", s).replace("( ", "(").replace(" )", ")").strip()


def check_declarations(src: str, defs: dict, impls: set, ops: tuple) -> None:
    check(bool(defs), "decl", f"ext.cpp declares ops: {sorted(defs)}")
    check(impls == set(defs), "decl", f"every declared op has exactly one CUDA m.impl (impl: {sorted(impls)})")
    check(set(defs) == set(ops), "decl", f"ext.cpp's ops == fastpeft._cuda.OPS ({sorted(ops)})")
    py = fake_signatures(os.path.join(ROOT, "fastpeft", "_cuda.py"))
    check(set(py["fakes"]) == set(defs), "decl", f"fastpeft/_cuda.py registers fakes for exactly ext.cpp's ops "
                                                 f"({sorted(py['fakes'])})")
    for name, schema in sorted(defs.items()):
        args, nret = schema_parts(schema)
        sig = cpp_signature(src, name)
        if sig is None:
            check(False, "decl", f"{name}: C++ kernel definition found in ext.cpp")
            continue
        check(sig[0] == [(t, n) for t, n in args] and sig[1] == nret, "decl",
              f"{name}: C++ kernel signature == schema ({len(args)} args, {nret} returns)")
        if sig[0] != list(args) or sig[1] != nret:
            print(f"    schema {args} -> {nret}\n    C++    {sig[0]} -> {sig[1]}")
        if name in py["fakes"]:
            check(py["fakes"][name] == [n for _, n in args], "decl", f"{name}: fake kernel parameters == schema's")
        for nargs, kws in py["calls"].get(name, []):
            check(nargs + len(kws) == len(args) and set(kws) <= {n for _, n in args}, "decl",
                  f"{name}: fastpeft/_cuda.py calls it with {nargs} positional + {kws} keyword of {len(args)} args")


def meta(t: torch.Tensor) -> tuple:
    return (tuple(t.shape), t.dtype)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--simulate", action="store_true", help="define ext.cpp's schemas in Python (no extension)")
    ap.add_argument("--quick", action="store_true", help="fewer argument combinations")
    ap.add_argument("--csrc", default=os.path.join(ROOT, "csrc"))
    opts = ap.parse_args()

    import fastpeft
    from fastpeft import _backend, _cuda
    src = open(os.path.join(opts.csrc, "ext.cpp")).read()
    defs, impls = parse_ext(src)
    print(f"check_ext: torch {torch.__version__} (CUDA {torch.version.cuda}), cuda available: "
          f"{torch.cuda.is_available()}, fastpeft from {os.path.dirname(fastpeft.__file__)}, "
          f"mode {'simulate' if opts.simulate else 'extension'}")
    check_declarations(src, defs, impls, _cuda.OPS)

    if opts.simulate:
        try:
            import fastpeft._C  # noqa: F401
            print("check_ext: fastpeft._C is importable: run without --simulate")
            return 3
        except ImportError:
            pass
        lib = torch.library.Library("fastpeft", "FRAGMENT")  # noqa: F841 (kept alive until exit)
        for schema in defs.values():
            lib.define(schema)
        _cuda._register_fakes()
        _cuda._state.update(loaded=True, reason="simulated: ext.cpp's schemas defined in Python")
        _backend._PROBES["cuda"] = (True, "fastpeft._C loaded (simulated)")
    else:
        check(not torch.cuda.is_initialized(), "load", "import fastpeft does not initialise CUDA")
        try:
            import fastpeft._C as ext
        except Exception as e:  # the point of this mode: say exactly why it did not load
            check(False, "load", f"import fastpeft._C ({type(e).__name__}: {e})")
            return 1
        check(True, "load", f"import fastpeft._C ({ext.__file__})")
        check(_cuda.available(), "load", f"fastpeft._cuda.available() (reason: {_cuda.unavailable_reason()})")
        check(not torch.cuda.is_initialized(), "load", "loading fastpeft._C does not initialise CUDA")
        for name, schema in sorted(defs.items()):
            q = f"fastpeft::{name}"
            if not hasattr(torch.ops.fastpeft, name):
                check(False, "load", f"torch.ops.fastpeft.{name} exists")
                continue
            live = str(getattr(torch.ops.fastpeft, name).default._schema)
            check(norm_schema(live) == norm_schema(f"fastpeft::{schema}"), "load",
                  f"{name}: registered schema == ext.cpp's")
            check(torch._C._dispatch_has_kernel_for_dispatch_key(q, "CUDA"), "load", f"{name}: CUDA kernel")
            check(not torch._C._dispatch_has_kernel_for_dispatch_key(q, "CPU"), "load", f"{name}: no CPU kernel")
            check(torch._C._dispatch_has_kernel_for_dispatch_key(q, "Meta"), "load", f"{name}: fake (Meta) kernel")
    # The Python-defined ops of the same namespace coexist with the C++ fragment.
    import fastpeft.ops.ia3  # noqa: F401
    import fastpeft.ops.lora  # noqa: F401
    check(hasattr(torch.ops.fastpeft, "lora_fwd") and hasattr(torch.ops.fastpeft, "ia3_fwd")
          and all(hasattr(torch.ops.fastpeft, n) for n in defs), "load",
          "the Python custom ops (fastpeft::lora_fwd, ia3_fwd, ...) and ext.cpp's coexist in torch.ops.fastpeft")

    # ---- wrappers on fake CUDA tensors vs the reference on CPU ------------------------------------------------
    from torch._subclasses.fake_tensor import FakeTensorMode

    from fastpeft.ops.ia3 import ia3_bwd_ref, ia3_fwd_ref
    from fastpeft.ops.lora import lora_bwd_ref, lora_fwd_ref

    def fake_like(mode, t):
        if t is None:
            return None
        with mode:
            return torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device="cuda")

    def compare(got, want):
        got = got if isinstance(got, (tuple, list)) else (got,)
        want = want if isinstance(want, (tuple, list)) else (want,)
        ok = len(got) == len(want) and all(meta(g) == meta(w) and g.device.type == "cuda"
                                           for g, w in zip(got, want))
        if not ok:
            print(f"    got  {[(meta(g), g.device) for g in got]}\n    want {[meta(w) for w in want]}")
        return ok

    n_calls = 0
    bad = []
    g = torch.Generator().manual_seed(0)
    shapes = [(5, 24, 20, 4), (0, 16, 8, 2), (40, 33, 17, 1)]
    dtypes = [(torch.bfloat16, torch.float32), (torch.float16, torch.float16), (torch.float32, torch.float32)]
    flags = [(b, e, t) for b in (True, False) for e in (True, False) for t in (False, True)]
    if opts.quick:
        dtypes = dtypes[:2]
        flags = [(True, True, False), (False, False, True), (True, False, True)]
    for (M, K, N, r) in shapes:
        for dt, adt in dtypes:
            for bias, ada, wt in flags:
                x = torch.randn(M, K, generator=g).to(dt)
                w = torch.randn(K, N, generator=g).to(dt).t() if wt else torch.randn(N, K, generator=g).to(dt)
                b = torch.randn(N, generator=g).to(dt) if bias else None
                A = torch.randn(r, K, generator=g).to(adt)
                B = torch.randn(N, r, generator=g).to(adt)
                E = torch.randn(r, generator=g).to(adt) if ada else None
                dy = torch.randn(M, N, generator=g).to(dt)
                tag = f"lora M={M} K={K} N={N} r={r} {dt} adt={adt} bias={bias} E={ada} wt={wt}"
                ref_y = lora_fwd_ref(x, w, b, A, E, B, 1.5, 0.1, 7)
                mode = FakeTensorMode()
                fx, fw, fb, fA, fB, fE, fdy = (fake_like(mode, t) for t in (x, w, b, A, B, E, dy))
                try:
                    with mode:
                        outs = [("fwd", _cuda.lora_fwd_cuda(fx, fw, fb, fA, fE, fB, 1.5, 0.1, 7))]
                        for fold in (_cuda.FOLD_ACCUM, _cuda.FOLD_KAUG):
                            outs.append((f"fold={fold}", torch.ops.fastpeft.lora_fwd_cuda(
                                fx, fw, fb, fA, fE, fB, 1.5, 0.1, 7, fold)))
                        if M <= 16:
                            outs.append(("decode", _cuda.lora_decode_cuda(fx, fw, fb, fA, fE, fB, 1.5, 0.1, 7)))
                    for what, got in outs:
                        n_calls += 1
                        if not compare(got, ref_y):
                            bad.append(f"{tag} {what}")
                    fS = outs[0][1][1]
                    for needs_dx in (True, False):
                        for has_bias in (True, False):
                            want = lora_bwd_ref(dy, x, w, A, E, B, ref_y[1], 1.5, 0.1, 7, needs_dx, has_bias)
                            with mode:
                                got = _cuda.lora_bwd_cuda(fdy, fx, fw, fA, fE, fB, fS, 1.5, 0.1, 7, needs_dx,
                                                          has_bias)
                            n_calls += 1
                            if not compare(got, want):
                                bad.append(f"{tag} bwd needs_dx={needs_dx} has_bias={has_bias}")
                except Exception as e:
                    traceback.print_exc()
                    bad.append(f"{tag}: {type(e).__name__}: {e}")

    ia3_dtypes = [(dt, ldt) for dt, _ in dtypes for ldt in dict.fromkeys((dt, torch.float32))]
    ia3_flags = [(b, t) for b in (True, False) for t in (False, True)]
    if opts.quick:
        ia3_flags = [(True, False), (False, True)]
    for (M, K, N, _) in shapes:
        for dt, ldt in ia3_dtypes:
            for ff in (False, True):
                for bias, wt in ia3_flags:
                    x = torch.randn(M, K, generator=g).to(dt)
                    w = torch.randn(K, N, generator=g).to(dt).t() if wt else torch.randn(N, K, generator=g).to(dt)
                    b = torch.randn(N, generator=g).to(dt) if bias else None
                    lv = torch.rand(K if ff else N, generator=g).to(ldt)
                    dy = torch.randn(M, N, generator=g).to(dt)
                    tag = f"ia3 M={M} K={K} N={N} {dt} l={ldt} bias={bias} ff={ff} wt={wt}"
                    ref_y, ref_saved = ia3_fwd_ref(x, w, b, lv, ff)
                    mode = FakeTensorMode()
                    fx, fw, fb, fl, fdy = (fake_like(mode, t) for t in (x, w, b, lv, dy))
                    try:
                        with mode:
                            got = _cuda.ia3_fwd_cuda(fx, fw, fb, fl, ff)
                            # the op's save_z=False form (no z: l as cuBLASLt's per-row alpha in output mode)
                            got_inf = torch.ops.fastpeft.ia3_fwd_cuda(fx, fw, fb, fl, ff, False)[0]
                        n_calls += 2
                        if not compare(got, (ref_y, ref_saved)):
                            bad.append(f"{tag} fwd")
                        if not compare(got_inf, ref_y):
                            bad.append(f"{tag} fwd inference")
                        fsaved = got[1]
                        # The callers pass x only in feed-forward mode (output mode saves z instead).
                        xx = x if ff else x.new_empty(0)
                        for needs_dx in (True, False):
                            for has_bias in (True, False):
                                want = ia3_bwd_ref(dy, xx, w, lv, ref_saved, ff, needs_dx, has_bias)
                                with mode:
                                    got = _cuda.ia3_bwd_cuda(fdy, fake_like(mode, xx), fw, fl, fsaved, ff, needs_dx,
                                                             has_bias)
                                n_calls += 1
                                if not compare(got, want):
                                    bad.append(f"{tag} bwd needs_dx={needs_dx} has_bias={has_bias}")
                    except Exception as e:
                        traceback.print_exc()
                        bad.append(f"{tag}: {type(e).__name__}: {e}")
    for b_ in bad[:20]:
        print(f"    mismatch: {b_}")
    check(not bad and n_calls > 0, "fake", f"wrappers on fake CUDA tensors: every output's shape/dtype is the "
                                           f"reference's ({n_calls} calls, {len(bad)} mismatches)")
    # float64 (not a kernel dtype) and empty feature dimensions: the registry predicate refuses them for the cuda
    # backend (select_backend then runs torch, or raises for an explicit backend="cuda").
    from fastpeft.ops._registry import supports
    with FakeTensorMode():
        c32, c64 = torch.empty(3, 4, device="cuda"), torch.empty(3, 4, dtype=torch.float64, device="cuda")
        w32, a32 = torch.empty(5, 4, device="cuda"), torch.empty(2, 4, device="cuda")
        b32 = torch.empty(5, 2, device="cuda")
        ok32 = supports("lora", "cuda", c32, (c32, w32, None, a32, None, b32)) is None
        r64 = supports("lora", "cuda", c32, (c32, w32, None, a32.double(), None, b32.double()))
        r_empty = supports("lora", "cuda", c32, (c32, torch.empty(0, 4, device="cuda"), None, a32, None,
                                                 torch.empty(0, 2, device="cuda")))
        rx64 = supports("ia3", "cuda", c64, (c64, w32.double(), None, torch.empty(5, device="cuda"), False))
    check(ok32 and r64 and "lora_A" in r64 and r_empty and "empty" in r_empty and rx64 and "x" in rx64,
          "fake", "the cuda predicate takes fp32 and refuses float64 operands and empty feature dims, naming them")

    # ---- backend selection ------------------------------------------------------------------------------------
    from fastpeft import functional as Fn
    with FakeTensorMode():
        xc = torch.empty(4, 8, device="cuda")
    for op in ("lora", "ia3"):
        why = _backend._why_not("cuda", op, xc.device)
        check(why is None, "backend", f"the cuda backend can run op {op!r} on CUDA tensors (reason: {why})")
        auto = _backend.select_backend(op, xc, "auto")
        # The default GPU path is triton's cublas variant; the extension is the default only without triton (or
        # by a measured dispatch entry).
        want = "triton" if _backend._why_not("triton", op, xc.device) is None else "cuda"
        check(auto == want, "backend", f"auto picks {want!r} for op {op!r} on a CUDA tensor (got {auto!r})")
    if any(_backend._why_not("cuda", op, xc.device) is not None for op in ("lora", "ia3")):
        # Exercise the rest of the path anyway, with the lookup the ops' names need.
        print("check_ext: note: patching fastpeft._backend._cuda_ext_has for the autograd checks below")
        _backend._cuda_ext_has = lambda op: all(hasattr(torch.ops.fastpeft, f"{op}_{s}_cuda") for s in ("fwd", "bwd"))

    # ---- autograd: functional forward, then the Function's backward ------------------------------------------
    # The autograd engine cannot run on fake CUDA tensors without a device (it asks the driver for a primary
    # context), so the backward is called by hand and its gradients are checked as the engine would check them
    # (shape and dtype of each against its input).  A CUDA build of torch records the graph (the Function's node is
    # taken from it); a CPU build cannot even record it on fake CUDA tensors (no CUDA device guard: abort), so there
    # the functional forward runs without grad and the Function runs with a stand-in ctx.
    from fastpeft.ops.ia3 import IA3LinearFunction
    from fastpeft.ops.lora import LoRALinearFunction
    use_graph = torch.version.cuda is not None

    class Ctx:  # what LoRALinearFunction / IA3LinearFunction use of autograd's ctx
        def __init__(self, n):
            self.needs_input_grad = (True,) * n

        def save_for_backward(self, *ts):
            self.saved_tensors = ts

        def mark_non_differentiable(self, *ts):
            pass

    def node_of(t, name):
        stack, seen = [t.grad_fn], set()
        while stack:
            n = stack.pop()
            if n is None or id(n) in seen:
                continue
            seen.add(id(n))
            if type(n).__name__.startswith(name):
                return n
            stack.extend(f for f, _ in n.next_functions)
        raise AssertionError(f"no {name} node in the graph")

    def backward(y, fn, inputs, dy):
        if use_graph:
            return node_of(y, fn.__name__).apply(dy)
        ctx = Ctx(len(inputs))
        fn.forward(ctx, *inputs)
        return fn.backward(ctx, dy)

    def grads_ok(grads, inputs):
        return len(grads) == len(inputs) and all(
            gr is None or (isinstance(inp, torch.Tensor) and gr.shape == inp.shape and gr.dtype == inp.dtype)
            for gr, inp in zip(grads, inputs))

    bad = []
    # (float64 is not among them: an explicitly chosen backend refuses dtypes its kernels do not take, with an error
    # naming them - tests/test_backend.py - instead of falling back to the reference.)
    ad_dtypes = [(torch.bfloat16, torch.float32), (torch.float16, torch.float16), (torch.float32, torch.float32)]
    for dt, adt in ad_dtypes:
        for M in (3, 40):
            try:
                with FakeTensorMode():
                    rg = dict(requires_grad=use_graph)
                    x = torch.empty(2, M, 24, device="cuda", dtype=dt, **rg)
                    w = torch.empty(20, 24, device="cuda", dtype=dt)
                    b = torch.empty(20, device="cuda", dtype=dt, **rg)
                    A = torch.empty(4, 24, device="cuda", dtype=adt, **rg)
                    B = torch.empty(20, 4, device="cuda", dtype=adt, **rg)
                    E = torch.empty(4, 1, device="cuda", dtype=adt, **rg)
                    x2 = x.detach().reshape(-1, 24)
                    dy = torch.empty(2 * M, 20, device="cuda", dtype=dt)
                    cases = [("lora", Fn.lora_linear(x, w, b, A, B, scaling=2.0, dropout_p=0.1, seed=3,
                                                     backend="cuda"),
                              LoRALinearFunction, (x2, w, b.detach(), A.detach(), None, B.detach(), 2.0, 0.1, 3,
                                                   "cuda")),
                             ("adalora", Fn.adalora_linear(x, w, None, A, E, B, 2.0, 4.0, backend="cuda"),
                              LoRALinearFunction, (x2, w, None, A.detach(), E.detach().reshape(4), B.detach(), 0.5,
                                                   0.0, 0, "cuda"))]
                    for ff, n_l in ((False, 20), (True, 24)):
                        lv = torch.empty(n_l, device="cuda", dtype=adt, **rg)
                        cases.append((f"ia3 ff={ff}", Fn.ia3_linear(x, w, b, lv, feedforward=ff, backend="cuda"),
                                      IA3LinearFunction, (x2, w, b.detach(), lv.detach(), ff, "cuda")))
                    for name, y, fn, inputs in cases:
                        grads = backward(y, fn, inputs, dy)
                        ok = (y.shape == (2, M, 20) and y.dtype == dt and grads_ok(grads, inputs)
                              and grads[0] is not None)
                        if not ok:
                            bad.append(f"{name} {dt} adt={adt} M={M}: y {tuple(y.shape)} {y.dtype}, grads "
                                       f"{[None if gr is None else (tuple(gr.shape), gr.dtype) for gr in grads]}")
            except Exception as e:
                traceback.print_exc()
                bad.append(f"{dt} adt={adt} M={M}: {type(e).__name__}: {e}")
    for b_ in bad:
        print(f"    {b_}")
    check(not bad, "autograd", f"functional lora/adalora/ia3 (backend='cuda') on fake CUDA tensors, backward "
                               f"{'node from the graph' if use_graph else 'with a stand-in ctx'}: the output and "
                               f"every gradient have their input's shape and dtype")

    # ---- CPU tensors: a clear dispatcher error ----------------------------------------------------------------
    try:
        torch.ops.fastpeft.lora_fwd_cuda(torch.randn(2, 4), torch.randn(3, 4), None, torch.randn(2, 4), None,
                                         torch.randn(3, 2), 1.0, 0.0, 0, 0)
        check(False, "cpu", "lora_fwd_cuda on CPU tensors raises")
    except NotImplementedError as e:
        msg = str(e).splitlines()[0]
        check("CPU" in msg and "lora_fwd_cuda" in msg, "cpu", f"lora_fwd_cuda on CPU tensors raises: {msg[:100]}")
    try:
        _cuda.ia3_fwd_cuda(torch.randn(2, 4), torch.randn(3, 4), None, torch.ones(3), False)
        check(False, "cpu", "the ia3 wrapper on CPU tensors raises")
    except NotImplementedError as e:
        check("CPU" in str(e), "cpu", f"the ia3 wrapper on CPU tensors raises: {str(e).splitlines()[0][:100]}")

    # ---- backend_info -----------------------------------------------------------------------------------------
    info = fastpeft.backend_info()
    cuda = info["backends"]["cuda"]
    print(f"check_ext: backend_info: cuda = {cuda}, torch_cuda = {info['torch_cuda']}")
    check(cuda["available"] is True and "loaded" in cuda["reason"], "info", "backend_info reports fastpeft._C")
    if not opts.simulate:
        check(not torch.cuda.is_initialized(), "load", "nothing above initialised CUDA")

    print(f"check_ext: {'all checks passed' if not FAILED else f'{len(FAILED)} FAILED'}")
    return 1 if FAILED else 0


if __name__ == "__main__":
    sys.exit(main())
