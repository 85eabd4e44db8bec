#!/usr/bin/env bash
# One GPU check of the C++/CUDA extension fastpeft._C, for a machine with an NVIDIA GPU (written for the H200 device
# machine, whose python3 holds a CUDA build of torch).  Run from the repository root:
#
#     bash benchmarks/gpu_check.sh            # writes into $OUT (default: ./gpu_check_out)
#
# Phases, each time-boxed so the whole script ends within GPU_CHECK_BUDGET seconds (default 540):
#   1. build  : pip install -e . --no-build-isolation --no-deps with FASTPEFT_BUILD_CUDA=1 (sm_90 unless
#               TORCH_CUDA_ARCH_LIST is set), then `import fastpeft._C`          -> $OUT/build.log
#   2. tests  : pytest tests/test_cuda_ext.py tests/test_build.py + the Triton GPU tests -> $OUT/tests.log
#   3. ext    : correctness + timings of every cuda variant vs base / torch / triton / HF PEFT on the Llama-3-8B
#               projections (bf16, r=16), decode under a CUDA graph, the dispatch table measured on them
#                                                          -> $OUT/ext_bench.csv, $OUT/dispatch_table.json
#   4. bench  : python -m benchmarks --quick --op lora,ia3 --dtype bf16 (if time is left)
#                                                          -> $OUT/bench/results.csv, $OUT/bench/latest.md
#   summary of everything (GPU, versions, commit, phase results)  -> $OUT/summary.txt
# At most 7 files, one folder deep (the device machine returns 8 files, 2 folders deep).
# Exit status: 0 when the build and the tests passed, 1 otherwise (the benchmarks never fail the script).
set -u -o pipefail

OUT="${OUT:-$(pwd)/gpu_check_out}"
mkdir -p "$OUT"
BUDGET="${GPU_CHECK_BUDGET:-540}"
PY="${PYTHON:-python3}"
export PYTHONUNBUFFERED=1
SUMMARY="$OUT/summary.txt"
: > "$SUMMARY"
say() { echo "$*" | tee -a "$SUMMARY"; }
left() { echo $(( BUDGET - SECONDS )); }

say "gpu_check: $(date -u +%FT%TZ) commit $(git rev-parse --short HEAD 2>/dev/null || echo '?')"
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv,noheader 2>&1 | sed 's/^/gpu: /' | tee -a "$SUMMARY"
"$PY" - <<'PY' 2>&1 | tee -a "$SUMMARY"
import torch
print("torch", torch.__version__, "cuda", torch.version.cuda, "device", torch.cuda.get_device_name(0) if torch.cuda.is_available() else None)
try:
    import triton; print("triton", triton.__version__)
except Exception as e:
    print("triton: not importable:", e)
try:
    import peft; print("peft", peft.__version__)
except Exception as e:
    print("peft: not importable:", e)
PY
command -v nvcc >/dev/null && nvcc --version | tail -2 | tee -a "$SUMMARY"

# ---- 1. build ------------------------------------------------------------------------------------------------
export FASTPEFT_BUILD_CUDA=1
export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}"
export MAX_JOBS="${MAX_JOBS:-16}"
export NVCC_THREADS="${NVCC_THREADS:-4}"
# setup.py finds the toolkit root itself (also behind a wrapper-script nvcc) and, when the toolkit has no cuBLAS,
# takes cublasLt from torch's nvidia wheel (checked without a GPU by .ci/build_ext_full.sh).
BUILD_OK=0
t0=$SECONDS
if timeout "$(( $(left) > 330 ? 330 : $(left) ))" "$PY" -m pip install -v -e . --no-build-isolation --no-deps \
     > "$OUT/build.log" 2>&1 && "$PY" -c "import fastpeft._C, torch; assert hasattr(torch.ops.fastpeft, 'lora_fwd_cuda')" >> "$OUT/build.log" 2>&1; then
  BUILD_OK=1
elif timeout "$(( $(left) > 300 ? 300 : $(left) ))" "$PY" setup.py build_ext --inplace >> "$OUT/build.log" 2>&1 \
     && "$PY" -c "import fastpeft._C" >> "$OUT/build.log" 2>&1; then
  BUILD_OK=1  # pip refused (offline metadata, old pip): the in-place build is the same extension
fi
grep -E "warning|error" "$OUT/build.log" | grep -v "^ *$" | head -20 >> "$SUMMARY"
say "build: ok=$BUILD_OK in $(( SECONDS - t0 )) s"
if [ "$BUILD_OK" != 1 ]; then
  tail -40 "$OUT/build.log"
  say "gpu_check: build failed; see build.log (the Triton GPU tests still run)"
  timeout "$(( $(left) > 240 ? 240 : $(left) ))" "$PY" -m pytest tests/test_triton_lora.py tests/test_triton_ia3.py \
    -q -rfEs -p no:cacheprovider > "$OUT/tests.log" 2>&1
  tail -15 "$OUT/tests.log" | tee -a "$SUMMARY"
  exit 1
fi

# ---- 1b. warm Triton's kernel cache in the background ---------------------------------------------------------
# The autotuned GEMM compiles each (flags, configuration) pair once per process tree; on first use in the benchmarks
# that is ~100 compiles.  .ci/compile_triton.py compiles the same bf16 kernels for sm_90 with the H200's SM count
# (ahead of time, no launches) into the same cache, on spare cores, while the tests run.
( TRITON_PRECOMPILE_LOG="$(mktemp)"; timeout "$(( $(left) > 400 ? 400 : $(left) ))" "$PY" .ci/compile_triton.py     --quick > "$TRITON_PRECOMPILE_LOG" 2>&1; echo "triton precompile: rc=$? $(tail -1 "$TRITON_PRECOMPILE_LOG")"     >> "$SUMMARY" ) &

# ---- 2. tests ------------------------------------------------------------------------------------------------
t0=$SECONDS
TESTS_OK=0
timeout "$(( $(left) > 240 ? 240 : $(left) ))" "$PY" -m pytest tests/test_cuda_ext.py tests/test_build.py \
  tests/test_triton_lora.py tests/test_triton_ia3.py tests/test_op_paths.py -q -rfEs \
  -p no:cacheprovider > "$OUT/tests.log" 2>&1 && TESTS_OK=1
tail -15 "$OUT/tests.log" | tee -a "$SUMMARY"
say "tests: ok=$TESTS_OK in $(( SECONDS - t0 )) s"

# ---- 3. extension benchmark ----------------------------------------------------------------------------------
BENCH_PY="$(mktemp --suffix=.py)"
cat > "$BENCH_PY" <<'PY'
"""Timings of the cuda extension's variants against the base layer, torch, triton and HF PEFT (bf16, r=16)."""
import csv, os, statistics, subprocess, sys, time
import torch
import torch.nn.functional as F
from fastpeft import _cuda, _dispatch, functional as Fn
from fastpeft.ops.lora import lora_fwd_ref

OUT = sys.argv[1]
DEADLINE = time.time() + float(sys.argv[2])
dev, dt, R = "cuda", torch.bfloat16, 16
SHAPES = [("q_proj", 4096, 4096), ("up_proj", 4096, 14336), ("down_proj", 14336, 4096)]
MS = [1, 16, 2048, 8192]
gpu = torch.cuda.get_device_name()
commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
rows = []


def bench(fn, reps=25, warmup=3):
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    ts = []
    for _ in range(reps):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record(); fn(); e.record(); e.synchronize()
        ts.append(s.elapsed_time(e))
    return statistics.median(ts)


def bench_graph(fn, reps=25):
    fn(); torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        fn()
        torch.cuda.synchronize()
        with torch.cuda.graph(g):
            fn()
    torch.cuda.current_stream().wait_stream(s)
    return bench(g.replay, reps)


def rel(a, b):
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def add(layer, M, K, N, what, ms, err=None, note=""):
    rows.append(dict(gpu=gpu, commit=commit, torch=torch.__version__, layer=layer, M=M, K=K, N=N, r=R,
                     dtype="bf16", what=what, ms=round(ms, 5) if ms is not None else "", err=err if err is None else f"{err:.2e}",
                     note=note))


for layer, K, N in SHAPES:
    for M in MS:
        if time.time() > DEADLINE:
            print("ext bench: out of time, stopping"); break
        torch.manual_seed(0)
        # Rotate input sets so L2 (60 MB) does not hold W between calls at small M.
        nset = max(1, min(4, int(200e6 // (2 * (M * K + N * K)) )))
        sets = []
        for _ in range(nset):
            x = torch.randn(M, K, device=dev, dtype=dt)
            W = torch.randn(N, K, device=dev, dtype=dt) / K ** 0.5
            A = torch.randn(R, K, device=dev, dtype=dt) / K ** 0.5
            B = torch.randn(N, R, device=dev, dtype=dt) / R
            sets.append((x, W, A, B))
        it = [0]

        def nxt():
            it[0] = (it[0] + 1) % nset
            return sets[it[0]]
        x, W, A, B = sets[0]
        y_ref, _ = lora_fwd_ref(x.float(), W.float(), None, A.float(), None, B.float(), 2.0, 0.0, 0)
        base = bench(lambda: (lambda s: F.linear(s[0], s[1]))(nxt()))
        add(layer, M, K, N, "base fwd", base)
        variants = (["decode"] if M <= 16 else []) + ["accum", "kaug"]
        best = None
        for v in variants:
            def f(v=v):
                x, W, A, B = nxt()
                if v == "decode":
                    return torch.ops.fastpeft.lora_decode_cuda(x, W, None, A, None, B, 2.0, 0.0, 0)
                return torch.ops.fastpeft.lora_fwd_cuda(x, W, None, A, None, B, 2.0, 0.0, 0, 1 if v == "kaug" else 0)
            it[0] = -1
            y, _ = f()
            t = bench(f)
            add(layer, M, K, N, f"cuda/{v} lora fwd", t, rel(y, y_ref), f"x{t / base:.3f} base")
            if M <= 16:
                try:
                    tg = bench_graph(lambda v=v: f(v))
                    tb = bench_graph(lambda: F.linear(sets[0][0], sets[0][1]))
                    add(layer, M, K, N, f"cuda/{v} lora fwd (graph)", tg, None, f"x{tg / tb:.3f} base (graph)")
                    add(layer, M, K, N, "base fwd (graph)", tb)
                except Exception as e:
                    add(layer, M, K, N, f"cuda/{v} lora fwd (graph)", None, None, f"failed: {e}")
        # fwd+bwd per backend through autograd (x and adapters require grad; W frozen)
        base_fb = None
        results = {}
        for backend in ["base", "torch", "triton", "cuda"]:
            try:
                xs = [s[0].clone().requires_grad_(True) for s in sets]
                As = [s[2].clone().requires_grad_(True) for s in sets]
                Bs = [s[3].clone().requires_grad_(True) for s in sets]
                gy = torch.randn(M, N, device=dev, dtype=dt)
                k = [0]

                def fb(backend=backend):
                    k[0] = (k[0] + 1) % nset
                    i = k[0]
                    if backend == "base":
                        y = F.linear(xs[i], sets[i][1])
                    else:
                        y = Fn.lora_linear(xs[i], sets[i][1], None, As[i], Bs[i], scaling=2.0, backend=backend)
                    y.backward(gy)
                t = bench(fb, reps=15)
                results[backend] = t
                if backend == "base":
                    base_fb = t
                add(layer, M, K, N, f"{backend} fwd+bwd", t, None, f"x{t / base_fb:.3f} base" if base_fb else "")
            except Exception as e:
                add(layer, M, K, N, f"{backend} fwd+bwd", None, None, f"failed: {type(e).__name__}: {e}"[:200])
        # the measured dispatch entry for this bucket (fwd+bwd through autograd; the cuda fwd variant by fwd time)
        cands = {b: results[b] for b in ("cuda", "triton") if b in results}
        if cands:
            win = min(cands, key=cands.get)
            fwd_rows = [r for r in rows if r["layer"] == layer and r["M"] == M and r["what"].startswith("cuda/")
                        and r["what"].endswith("lora fwd") and r["ms"] != ""]
            var = min(fwd_rows, key=lambda r: r["ms"])["what"].split("/")[1].split()[0] if fwd_rows else None
            _dispatch.record(gpu, dt, "lora", _dispatch.bucket(M, N, K, R), win,
                             "measured by benchmarks/gpu_check.sh (fwd+bwd, autograd): " +
                             ", ".join(f"{b} {t:.4f} ms" for b, t in sorted(cands.items())),
                             variant=var if win == "cuda" else None, timings_ms=cands)
        # IA3 (output mode, attention-style): contract path (saves z) and the inference path (alpha vector)
        try:
            l = 1 + 0.1 * torch.randn(N, device=dev, dtype=dt)
            yi = _cuda.ia3_fwd_cuda_inference(x, W, None, l, False)
            add(layer, M, K, N, "cuda ia3 fwd (alpha vector, inference)", bench(lambda: (lambda s: _cuda.ia3_fwd_cuda_inference(s[0], s[1], None, l, False))(nxt())),
                rel(yi, F.linear(x.float(), W.float()) * l.float()), "")
            add(layer, M, K, N, "cuda ia3 fwd (saves z)", bench(lambda: (lambda s: _cuda.ia3_fwd_cuda(s[0], s[1], None, l, False))(nxt())))
            lr = l.clone().requires_grad_(True)
            xr = x.clone().requires_grad_(True)
            gy = torch.randn(M, N, device=dev, dtype=dt)
            for backend in ("cuda", "triton", "torch"):
                try:
                    def ia3fb(backend=backend):
                        Fn.ia3_linear(xr, W, None, lr, feedforward=False, backend=backend).backward(gy)
                    add(layer, M, K, N, f"{backend} ia3 fwd+bwd", bench(ia3fb, reps=15))
                except Exception as e:
                    add(layer, M, K, N, f"{backend} ia3 fwd+bwd", None, None, f"failed: {e}"[:200])
        except Exception as e:
            add(layer, M, K, N, "cuda ia3", None, None, f"failed: {type(e).__name__}: {e}"[:200])
        # HF PEFT at decode sizes (the >= 5x target)
        if M <= 16:
            try:
                from peft.tuners.lora.layer import Linear as PeftLinear
                lin = torch.nn.Linear(K, N, bias=False, device=dev, dtype=dt)
                pl = PeftLinear(lin, "default", r=R, lora_alpha=2 * R)
                add(layer, M, K, N, "peft lora fwd", bench(lambda: pl(nxt()[0])))
            except Exception as e:
                add(layer, M, K, N, "peft lora fwd", None, None, f"failed: {type(e).__name__}: {e}"[:200])
        del sets
        torch.cuda.empty_cache()
        print(f"ext bench: {layer} M={M} done", flush=True)

with open(os.path.join(OUT, "ext_bench.csv"), "w", newline="") as f:
    w = csv.DictWriter(f, fieldnames=list(rows[0].keys()))
    w.writeheader(); w.writerows(rows)
_dispatch.export_table(os.path.join(OUT, "dispatch_table.json"))
for r in rows:
    print(f"{r['layer']:>9} M={r['M']:<5} {r['what']:<42} {r['ms']!s:>10} ms  err={r['err']}  {r['note']}")
PY
if [ "$(left)" -gt 60 ]; then
  t0=$SECONDS
  timeout "$(( $(left) - 20 ))" "$PY" "$BENCH_PY" "$OUT" "$(( $(left) - 60 ))" 2>&1 | tee -a "$SUMMARY" | tail -80
  say "ext bench: rc=$? in $(( SECONDS - t0 )) s"
fi
rm -f "$BENCH_PY"

# ---- 4. the project benchmark (quick) ------------------------------------------------------------------------
if [ "$(left)" -gt 150 ]; then
  t0=$SECONDS
  timeout "$(( $(left) - 10 ))" "$PY" -m benchmarks --quick --op lora,ia3 --dtype bf16 --no-plot --out "$OUT/bench" \
    > "$OUT/bench_stdout.tmp" 2>&1
  rc=$?
  tail -30 "$OUT/bench_stdout.tmp" >> "$SUMMARY"; rm -f "$OUT/bench_stdout.tmp"
  say "bench: rc=$rc in $(( SECONDS - t0 )) s"
else
  say "bench: skipped (only $(left) s left)"
fi

say "gpu_check: build ok, tests ok=$TESTS_OK, total $SECONDS s"
[ "$TESTS_OK" = 1 ]
