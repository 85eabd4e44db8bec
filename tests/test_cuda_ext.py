"""The C++/CUDA extension fastpeft._C.

CPU-runnable here:
  * the Philox header csrc/common/philox.cuh, compiled for the host with g++, against the torch reference stream
    (fastpeft/ops/dropout.py) bit for bit - the 4 words, the 8-per-call 16-bit extraction and keep bits the kernels
    use, and the p16 / scale threshold: the one piece of the CUDA math that can be checked without a GPU (the
    kernels' warp-shuffle sharing of each call is GPU-only, covered by test_dropout_mask_is_the_shared_stream);
  * fastpeft._cuda / fastpeft._dispatch with the extension absent;
  * csrc/ext.cpp against the Python side (.ci/check_ext_loaded.py --simulate, a subprocess): the C++ kernel
    signatures against the schemas, the names of OPS / fake kernels / wrapper calls, and the wrappers, fake kernels
    and autograd Functions run on fake CUDA tensors with ext.cpp's schemas defined in Python (no GPU, no build).
GPU-only (skipped without CUDA and a built extension): every op against the fp64 torch reference (outputs and all
gradients), fp32/fp16/bf16, odd shapes, M = 0 and 1, non-contiguous weights, the dropout mask in forward and
backward and against the Triton stream, torch.library.opcheck, and the C++ argument checks.
"""

from __future__ import annotations

import os
import re
import shutil
import struct
import subprocess
import sys

import pytest
import torch

from fastpeft import _cuda, _dispatch
from fastpeft.ops import dropout as drop_ref
from fastpeft.ops.ia3 import ia3_bwd_ref, ia3_fwd_ref
from fastpeft.ops.lora import lora_bwd_ref, lora_fwd_ref

from testing_utils import ELEMENTWISE, GRAD_FACTOR, MATMUL_FACTOR, assert_fa_rule, rel_err  # noqa: F401

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CSRC = os.path.join(ROOT, "csrc")

# ---------------------------------------------------------------------------------------------------------------
# Philox host test (CPU)
# ---------------------------------------------------------------------------------------------------------------

_PHILOX_MAIN = r"""
#include <cstdio>
#include <cinttypes>
#include "common/philox.cuh"
// stdin, one request per line:
//   w seed c0 c1 c2 c3  -> the 4 words of Philox-4x32-10 (philox4x32_10)
//   g seed m g p16      -> the 8 uint16 of row m, group g (uniforms16), then keep_bits8 as an int
//   e seed m k p16      -> uniform16 and keep of the single element (m, k)
//   t p                 -> p16 and the bits of the fp32 scale (threshold)
int main() {
  char op[2];
  while (std::scanf("%1s", op) == 1) {
    if (op[0] == 'w') {
      unsigned long long seed; unsigned c[4]; uint32_t r[4];
      if (std::scanf("%llu %u %u %u %u", &seed, &c[0], &c[1], &c[2], &c[3]) != 5) return 2;
      fastpeft::philox::philox4x32_10(seed, c[0], c[1], c[2], c[3], r);
      std::printf("%" PRIu32 " %" PRIu32 " %" PRIu32 " %" PRIu32 "\n", r[0], r[1], r[2], r[3]);
    } else if (op[0] == 'g') {
      unsigned long long seed, m, g; unsigned p16; uint32_t u[8];
      if (std::scanf("%llu %llu %llu %u", &seed, &m, &g, &p16) != 4) return 2;
      fastpeft::philox::uniforms16(seed, m, g, u);
      for (int j = 0; j < 8; ++j) std::printf("%" PRIu32 " ", u[j]);
      std::printf("%" PRIu32 "\n", fastpeft::philox::keep_bits8(seed, m, g, p16));
    } else if (op[0] == 'e') {
      unsigned long long seed, m, k; unsigned p16;
      if (std::scanf("%llu %llu %llu %u", &seed, &m, &k, &p16) != 4) return 2;
      std::printf("%" PRIu32 " %d\n", fastpeft::philox::uniform16(seed, m, k),
                  fastpeft::philox::keep(seed, m, k, p16) ? 1 : 0);
    } else if (op[0] == 't') {
      double p; uint32_t p16; float scale; uint32_t bits;
      if (std::scanf("%lf", &p) != 1) return 2;
      fastpeft::philox::threshold(p, &p16, &scale);
      static_assert(sizeof(bits) == sizeof(scale), "fp32");
      __builtin_memcpy(&bits, &scale, sizeof(bits));
      std::printf("%" PRIu32 " %" PRIu32 "\n", p16, bits);
    } else {
      return 3;
    }
  }
  return 0;
}
"""


@pytest.fixture(scope="module")
def philox_host(tmp_path_factory):
    """Run requests (lines, see _PHILOX_MAIN) through philox.cuh compiled for the host; one output line each."""
    cxx = shutil.which(os.environ.get("CXX", "g++"))
    if cxx is None:
        pytest.skip("no host C++ compiler (g++) to build the Philox host test")
    d = tmp_path_factory.mktemp("philox")
    src, exe = d / "philox_main.cpp", d / "philox_main"
    src.write_text(_PHILOX_MAIN)
    subprocess.run([cxx, "-std=c++17", "-O1", "-Wall", "-Werror", f"-I{CSRC}", str(src), "-o", str(exe)],
                   check=True, capture_output=True, text=True)

    def run(lines):
        out = subprocess.run([str(exe)], input="".join(ln + "\n" for ln in lines), check=True, capture_output=True,
                             text=True).stdout.splitlines()
        assert len(out) == len(lines)
        return [[int(v) for v in ln.split()] for ln in out]
    return run


def _fp32_bits(x: float) -> int:
    return struct.unpack("<I", struct.pack("<f", x))[0]


@pytest.mark.parametrize("seed", [0, 1, 12345, 2**32 - 1, 2**32, 2**40 + 17, 2**63 - 1])
def test_philox_host_words_match_torch_reference(philox_host, seed):
    g = torch.Generator().manual_seed(seed % 1000)
    ctr = [torch.randint(0, 2**32, (16,), generator=g, dtype=torch.int64) for _ in range(4)]
    ctr = [torch.cat([c, torch.tensor([0, 2**32 - 1])]) for c in ctr]
    got = philox_host([f"w {seed} " + " ".join(str(int(c[i])) for c in ctr) for i in range(len(ctr[0]))])
    ref = [w.tolist() for w in drop_ref.philox4x32_10(seed, *ctr)]
    assert got == [list(t) for t in zip(*ref)]


def test_philox_host_known_answer(philox_host):
    # Random123 kat_vectors for philox4x32 10 rounds (all four words).
    got = philox_host(["w 0 0 0 0 0", f"w {(0x299F31D0 << 32) | 0xA4093822} {0x243F6A88} {0x85A308D3} {0x13198A2E} "
                                      f"{0x03707344}"])
    assert got == [[0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8], [0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1]]
    assert drop_ref.philox4x32_10(0, *(torch.tensor([0]),) * 4)[0].tolist() == [0x6627E8D5]


@pytest.mark.parametrize("p", [0.1, 0.05, 0.5, 0.9, 1e-7, 0.999])
@pytest.mark.parametrize("shape,row_offset", [((7, 13), 0), ((3, 100), 0), ((4, 11), 5), ((3, 19), 2**32 - 2)])
def test_philox_host_8_per_call_matches_dropout_keep_mask(philox_host, p, shape, row_offset):
    """The 8-per-call extraction (uniforms16 / keep_bits8: the kernels' path) and the single-element form both give
    dropout_keep_mask / dropout_uniform16 bit for bit, incl. partial last groups and rows >= 2**32."""
    seed = 987654321987
    m, k = shape
    p16, _ = drop_ref.dropout_threshold(p)
    groups = -(-k // 8)
    rows = philox_host([f"g {seed} {row_offset + i} {gi} {p16}" for i in range(m) for gi in range(groups)])
    u = torch.tensor([r[:8] for r in rows]).view(m, groups * 8)[:, :k]
    bits = torch.tensor([r[8] for r in rows]).view(m, groups, 1)
    keep8 = ((bits >> torch.arange(8)) & 1).bool().view(m, groups * 8)[:, :k]
    assert torch.equal(u, drop_ref.dropout_uniform16(seed, shape, row_offset=row_offset))
    ref = drop_ref.dropout_keep_mask(seed, shape, p, row_offset=row_offset)
    assert torch.equal(keep8, ref)
    single = philox_host([f"e {seed} {row_offset + i} {j} {p16}" for i in range(m) for j in range(k)])
    assert torch.equal(torch.tensor([s[0] for s in single]).view(m, k), u)
    assert torch.equal(torch.tensor([s[1] == 1 for s in single]).view(m, k), ref)
    # Not a vacuous check: both outcomes occur for these p.
    if 0.05 <= p <= 0.9:
        assert 0 < ref.sum() < ref.numel()


def test_philox_host_threshold_matches_dropout_threshold(philox_host):
    """make_dropout's p16 and fp32 scale (philox::threshold) equal dropout_threshold's, which the Triton kernels
    receive: exact ties (round half to even), values near 1 (clamped to 65535), tiny p (p16 = 0), random p."""
    g = torch.Generator().manual_seed(0)
    ps = [0.0, 1e-12, 2**-17, 3 * 2**-17, 5 * 2**-17, 0.1, 0.3, 0.5, 0.9, 0.99998, 0.999999, 1 - 2**-40]
    ps += [(2 * j + 1) * 2**-17 for j in range(0, 65536, 4099)]  # more exact half-way cases
    ps += torch.rand(300, generator=g, dtype=torch.float64).tolist()
    got = philox_host([f"t {p!r}" for p in ps])
    for p, (p16, bits) in zip(ps, got):
        want16, want_scale = drop_ref.dropout_threshold(p)
        assert (p16, bits) == (want16, _fp32_bits(want_scale)), p


# ---------------------------------------------------------------------------------------------------------------
# Launch planning host test (CPU): csrc/common/plan.h, compiled with g++
# ---------------------------------------------------------------------------------------------------------------

_PLAN_MAIN = r"""
#include <cstdio>
#include <cinttypes>
#include "common/plan.h"
namespace pl = fastpeft::plan;
// stdin, one request per line:
//   s len quantum min_chunk other target -> splits chunk of split_reduction
//   r M K r sms / c M C r sms / i M C sms -> splits chunk of rowdot_split / coldot_split / ia3_bwd_split
//   v addr ld esize                     -> vec16 of that address (0 / 1)
//   a addr                              -> ptr_alignment
//   k dev ta tb m n k lda ldb ldd dt ala alb ald albias av bnz ws -> gemm_key
//   w splits chunk out                  -> workspace_elems
int main() {
  char op[2];
  while (std::scanf("%1s", op) == 1) {
    long long a[20];
    if (op[0] == 's') {
      if (std::scanf("%lld %lld %lld %lld %lld", &a[0], &a[1], &a[2], &a[3], &a[4]) != 5) return 2;
      const pl::Split s = pl::split_reduction(a[0], a[1], a[2], a[3], a[4]);
      std::printf("%lld %lld\n", (long long)s.splits, (long long)s.chunk);
    } else if (op[0] == 'r' || op[0] == 'c') {
      if (std::scanf("%lld %lld %lld %lld", &a[0], &a[1], &a[2], &a[3]) != 4) return 2;
      const pl::Split s = op[0] == 'r' ? pl::rowdot_split(a[0], a[1], (int)a[2], (int)a[3])
                                       : pl::coldot_split(a[0], a[1], (int)a[2], (int)a[3]);
      std::printf("%lld %lld\n", (long long)s.splits, (long long)s.chunk);
    } else if (op[0] == 'i') {
      if (std::scanf("%lld %lld %lld", &a[0], &a[1], &a[2]) != 3) return 2;
      const pl::Split s = pl::ia3_bwd_split(a[0], a[1], (int)a[2]);
      std::printf("%lld %lld\n", (long long)s.splits, (long long)s.chunk);
    } else if (op[0] == 'v') {
      if (std::scanf("%lld %lld %lld", &a[0], &a[1], &a[2]) != 3) return 2;
      std::printf("%d\n", pl::vec16(reinterpret_cast<const void*>(static_cast<uintptr_t>(a[0])), a[1], (int)a[2]));
    } else if (op[0] == 'a') {
      if (std::scanf("%lld", &a[0]) != 1) return 2;
      std::printf("%u\n", pl::ptr_alignment(reinterpret_cast<const void*>(static_cast<uintptr_t>(a[0]))));
    } else if (op[0] == 'k') {
      for (int i = 0; i < 18; ++i)
        if (std::scanf("%lld", &a[i]) != 1) return 2;
      pl::GemmKey g{(int)a[0], a[1] != 0, a[2] != 0, a[3], a[4], a[5], a[6], a[7], a[8], (int)a[9], (uint32_t)a[10],
                    (uint32_t)a[11], (uint32_t)a[12], (uint32_t)a[13], a[14] != 0, a[15] != 0, (uint64_t)a[16]};
      (void)a[17];
      std::printf("%s\n", pl::gemm_key(g).c_str());
    } else if (op[0] == 'w') {
      if (std::scanf("%lld %lld %lld", &a[0], &a[1], &a[2]) != 3) return 2;
      std::printf("%lld\n", (long long)pl::workspace_elems(pl::Split{a[0], a[1]}, a[2]));
    } else {
      return 3;
    }
  }
  return 0;
}
"""


@pytest.fixture(scope="module")
def plan_host(tmp_path_factory):
    """Run requests (lines, see _PLAN_MAIN) through csrc/common/plan.h compiled for the host; one output line each."""
    cxx = shutil.which(os.environ.get("CXX", "g++"))
    if cxx is None:
        pytest.skip("no host C++ compiler (g++) to build the plan host test")
    d = tmp_path_factory.mktemp("plan")
    src, exe = d / "plan_main.cpp", d / "plan_main"
    src.write_text(_PLAN_MAIN)
    subprocess.run([cxx, "-std=c++17", "-O1", "-Wall", "-Werror", f"-I{CSRC}", str(src), "-o", str(exe)],
                   check=True, capture_output=True, text=True)

    def run(lines):
        out = subprocess.run([str(exe)], input="".join(ln + "\n" for ln in lines), check=True, capture_output=True,
                             text=True).stdout.splitlines()
        assert len(out) == len(lines)
        return out
    return run


def _check_split(length, quantum, splits, chunk, max_splits=32):
    assert 1 <= splits <= max_splits and chunk % quantum == 0 and chunk > 0
    assert (splits - 1) * chunk < length <= splits * chunk, (length, quantum, splits, chunk)  # no empty chunk


def test_plan_split_reduction_invariants(plan_host):
    """Every split of a reduction covers the whole range with non-empty chunks that are multiples of the tile, at
    most 32 partial slices, and no chunk shorter than the minimum unless one chunk covers everything."""
    cases = [(length, q, mn, other, target)
             for length in (1, 7, 8, 31, 32, 33, 255, 256, 257, 1000, 4096, 8192, 14336, 100003)
             for q, mn in ((8, 64), (32, 128), (256, 1024))
             for other in (1, 3, 16, 256, 5000)
             for target in (1, 528, 4 * 132)]
    got = plan_host([f"s {' '.join(map(str, c))}" for c in cases])
    for (length, q, mn, other, target), line in zip(cases, got):
        splits, chunk = map(int, line.split())
        _check_split(length, q, splits, chunk)
        if splits > 1:
            assert chunk >= mn or length < 2 * mn, (length, q, mn, splits, chunk)
            assert splits * other <= max(target, other) + other * q, (length, splits, other, target)  # ~target blocks
    assert plan_host(["s 0 8 64 1 528"]) == ["1 8"]  # an empty reduction: one (empty) chunk


def test_plan_kernel_splits_at_production_shapes(plan_host):
    """The three split reductions at the H200 shapes (132 SMs) and reduced ones: chunks are whole kernel tiles
    (rowdot: 256 columns; coldot: 32 staged rows; IA3: one row per warp of 8) and the workspace is splits x output."""
    shapes = [(m, n) for m in (1, 16, 100, 2048, 8192) for n in (64, 1000, 4096, 11008, 14336)]
    lines = ([f"r {m} {n} {r} 132" for m, n in shapes for r in (1, 16, 64)]
             + [f"c {m} {n} {r} 132" for m, n in shapes for r in (1, 16, 64)]
             + [f"i {m} {n} 132" for m, n in shapes])
    got = plan_host(lines)
    for req, line in zip(lines, got):
        kind, m, n = req.split()[0], int(req.split()[1]), int(req.split()[2])
        splits, chunk = map(int, line.split())
        length, quantum = {"r": (n, 256), "c": (m, 32), "i": (m, 8)}[kind]
        _check_split(length, quantum, splits, chunk)
    # M = 8192, K = 4096, r = 16 on 132 SMs: the rowdot splits K in 3 (256 row blocks x 3 ~ 4 per SM, >= 1024
    # columns each); the coldot's 16 column blocks x 16 splits ~ 2 per SM; the IA3 backward's 16 x 32 ~ 4 per SM.
    assert plan_host(["r 8192 4096 16 132", "c 8192 4096 16 132", "i 8192 4096 132"]) == ["3 1536", "16 512",
                                                                                          "32 256"]
    # Decode-sized M: the row-sum reductions take one split (nothing to sum); the shrink still splits K into
    # 1024-column chunks (one row block alone would leave the GPU idle).
    assert plan_host(["r 16 4096 16 132", "c 16 4096 16 132", "i 16 4096 132"]) == ["4 1024", "1 32", "1 16"]
    assert plan_host(["w 1 4096 100", "w 3 256 100"]) == ["0", "300"]


def test_plan_vector_path_needs_aligned_base_and_rows(plan_host):
    """16-byte accesses only when the base and every row start are 16-byte aligned; nullptr never."""
    cases = {(4096, 4096, 2): 1, (4096 + 2, 4096, 2): 0, (4096, 4100, 2): 0, (4096, 4104, 2): 1, (4096, 4, 4): 1,
             (4096, 6, 4): 0, (4096 + 8, 8, 2): 0, (4096 + 16, 8, 2): 1, (0, 8, 2): 0, (4096, 0, 2): 1,
             (4096, 1, 4): 0, (4096 + 16, 2, 4): 0}
    got = plan_host([f"v {a} {ld} {es}" for a, ld, es in cases])
    assert [int(g) for g in got] == list(cases.values())
    assert plan_host(["a 0", "a 4096", "a 4098", "a 4104", "a 4112", "a 4352"]) == ["256", "256", "2", "8", "16",
                                                                                   "256"]


def test_plan_gemm_key_separates_every_field(plan_host):
    """The cuBLASLt plan cache key: equal for equal problems, different when any field differs (so a cached
    descriptor / algorithm is never reused for a problem it was not built for)."""
    base = [0, 1, 0, 4096, 8192, 4096, 4096, 4096, 4096, 2, 256, 256, 256, 0, 0, 1, 33554432, 0]
    variants = [base]
    for i in range(17):
        v = list(base)
        v[i] = v[i] + 1 if i not in (1, 2, 14, 15) else 1 - v[i]
        variants.append(v)
    # Fields that could run together without separators.
    variants += [[0, 1, 0, 40, 968192, 4096] + base[6:], [0, 1, 0, 409, 68192, 4096] + base[6:]]
    keys = plan_host(["k " + " ".join(map(str, v)) for v in variants] + ["k " + " ".join(map(str, base))])
    assert keys[-1] == keys[0]
    assert len(set(keys[:-1])) == len(variants)


# ---------------------------------------------------------------------------------------------------------------
# CPU: the Python side with the extension absent
# ---------------------------------------------------------------------------------------------------------------

HAS_EXT = torch.cuda.is_available() and _cuda.available()
needs_ext = pytest.mark.skipif(not HAS_EXT, reason="needs a CUDA device and the built extension fastpeft._C")


@pytest.mark.skipif(HAS_EXT, reason="checks the behaviour without the extension")
def test_wrappers_raise_clearly_without_extension():
    assert _cuda.available() is False
    reason = _cuda.unavailable_reason()
    assert isinstance(reason, str) and reason
    x = torch.randn(2, 4)
    with pytest.raises(RuntimeError, match="cuda backend is unavailable"):
        _cuda.lora_fwd_cuda(x, torch.randn(3, 4), None, torch.randn(2, 4), None, torch.randn(3, 2), 1.0, 0.0, 0)
    with pytest.raises(RuntimeError, match="unavailable"):
        _cuda.ia3_fwd_cuda(x, torch.randn(3, 4), None, torch.ones(3), False)


def test_import_does_not_initialise_cuda():
    code = ("import torch, fastpeft, fastpeft._cuda as c, fastpeft._dispatch as d\n"
            "c.available(); d.describe(); fastpeft.backend_info()\n"
            "assert not torch.cuda.is_initialized(), 'CUDA initialised'\nprint('ok')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"


def test_dispatch_buckets():
    assert _dispatch.bucket(1, 4096, 4096) == "m<=1,n4096,k4096"
    assert _dispatch.bucket(16, 4096, 14336) == "m<=16,n4096,k16384"
    assert _dispatch.bucket(17, 4000, 4096, 16) == "m<=256,n4096,k4096,r16"
    assert _dispatch.bucket(8193, 1, 1) == "m>8192,n1,k1"
    assert _dispatch.bucket(0, 0, 0) == "m<=1,n1,k1"


def test_dispatch_table_record_lookup_export_load(tmp_path, monkeypatch):
    _dispatch.clear()
    try:
        key_bucket = _dispatch.bucket(2048, 4096, 4096, 16)
        _dispatch.record("FakeGPU", torch.bfloat16, "lora", key_bucket, "triton", "unit test",
                         timings_ms={"triton": 1.0, "cuda/accum": 1.2})
        _dispatch.record("FakeGPU", torch.bfloat16, "lora", _dispatch.bucket(1, 4096, 4096, 16), "cuda",
                         "unit test", variant="decode")
        path = tmp_path / "table.json"
        data = _dispatch.export_table(str(path))
        assert set(data) == {_dispatch.table_key("FakeGPU", torch.bfloat16, "lora", key_bucket),
                             _dispatch.table_key("FakeGPU", "bfloat16", "lora", _dispatch.bucket(1, 4096, 4096, 16))}
        desc = _dispatch.describe()
        assert desc["entries"] and desc["committed_entries"] == len(_dispatch.committed())
        _dispatch.clear()
        assert _dispatch.export_table() == {}
        assert _dispatch.load_table(str(path)) == 2
        e = _dispatch.export_table()[_dispatch.table_key("FakeGPU", "bfloat16", "lora", key_bucket)]
        assert e["backend"] == "triton" and "loaded from table.json" in e["reason"]
        with pytest.raises(ValueError, match="backend"):
            _dispatch.record("FakeGPU", torch.float16, "lora", key_bucket, "cudnn", "bad")
        with pytest.raises(ValueError, match="variant"):
            _dispatch.record("FakeGPU", torch.float16, "lora", key_bucket, "cuda", "bad", variant="fast")
        bad = tmp_path / "bad.json"
        bad.write_text('{"k": {"backend": "nope"}}')
        with pytest.raises(ValueError, match="bad entry"):
            _dispatch.load_table(str(bad))
    finally:
        _dispatch.clear()


def test_dispatch_cpu_tensors_never_measured_or_chosen(monkeypatch):
    _dispatch.set_autotune(True)
    try:
        x, w = torch.randn(4, 8), torch.randn(6, 8)
        assert _dispatch.choose("lora", x, w, None, torch.randn(2, 8), None, torch.randn(6, 2),
                                candidates=lambda: ("triton", "cuda")) is None
        assert _dispatch.export_table() == {}
    finally:
        _dispatch.set_autotune(None)


def test_backend_info_reports_cuda_reason_and_dispatch():
    import fastpeft
    info = fastpeft.backend_info()
    cuda = info["backends"]["cuda"]
    assert cuda["available"] == _cuda.available() or not torch.cuda.is_available()
    if not cuda["available"]:
        assert cuda["reason"]
    assert "dispatch" in info and "default" in info["dispatch"]


def test_cuda_variant_and_operands_are_decided_by_select_backend(monkeypatch):
    """The cuda LoRA forward variant is chosen in select_backend (decode for M <= 16 on a row-major weight, accum
    otherwise: a transposed (Conv1D) weight view is never streamed by the decode kernel); float64 and empty feature
    dims are refused by the registry predicate (auto then runs torch; an explicit backend raises) - the wrappers
    never fall back to the reference."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from fastpeft import _backend
    from fastpeft.ops._registry import KERNEL_DTYPES

    assert set(KERNEL_DTYPES) == {torch.float32, torch.float16, torch.bfloat16}
    monkeypatch.setattr(_backend, "_why_not", lambda b, op, dev: None if b.split(":")[0] in ("torch", "cuda")
                        else "absent")
    monkeypatch.setattr(_backend, "_measured_choice", lambda op, dev, args: None)
    monkeypatch.setattr(_backend, "_AUTO_CACHE", {})

    def args(m, w, dt=torch.float32, adt=torch.float32):
        x = torch.empty(m, w.shape[1], dtype=dt, device="cuda")
        return x, (x, w, None, torch.empty(2, w.shape[1], dtype=adt, device="cuda"), None,
                   torch.empty(w.shape[0], 2, dtype=adt, device="cuda"))

    with FakeTensorMode():
        w = torch.empty(6, 8, device="cuda")
        for m, wt, want in ((4, w, "cuda:decode"), (17, w, "cuda:accum"),
                            (4, torch.empty(8, 6, device="cuda").t(), "cuda:accum")):
            x, a = args(m, wt)
            assert _backend.select_backend("lora", x, "auto", dispatch_args=a) == want
            assert _backend.select_backend("lora", x, "cuda", dispatch_args=a) == want
        x, a = args(17, w)
        with pytest.raises(RuntimeError, match="decode.*at most 16 rows"):
            _backend.select_backend("lora", x, "cuda:decode", dispatch_args=a)
        assert _backend.select_backend("lora", x, "cuda:kaug", dispatch_args=a) == "cuda:kaug"
        for bad, what in ((args(4, w, adt=torch.float64), "lora_A has dtype torch.float64"),
                          (args(4, w, dt=torch.float64), "x has dtype torch.float64"),
                          (args(4, torch.empty(0, 8, device="cuda")), "empty feature dimension")):
            x, a = bad
            assert _backend.select_backend("lora", x, "auto", dispatch_args=a) == "torch"
            with pytest.raises(RuntimeError, match=what):
                _backend.select_backend("lora", x, "cuda", dispatch_args=a)


# ---------------------------------------------------------------------------------------------------------------
# CPU: csrc/ext.cpp against the Python side, through .ci/check_ext_loaded.py
# ---------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ext_check():
    """Run .ci/check_ext_loaded.py once (a subprocess: it defines ops in torch.ops.fastpeft): against the real
    extension when it loads here, else with ext.cpp's schemas defined in Python (--simulate).
    Returns ({group: [(ok, what), ...]}, the script's output)."""
    script = os.path.join(ROOT, ".ci", "check_ext_loaded.py")
    cmd = [sys.executable, script, "--quick"] + ([] if _cuda.available() else ["--simulate"])
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=600)
    log = out.stdout + out.stderr
    groups: dict = {}
    for m in re.finditer(r"^check_ext: (OK  |FAIL) \[(\w+)\] (.*)$", out.stdout, re.M):
        groups.setdefault(m.group(2), []).append((m.group(1) == "OK  ", m.group(3)))
    assert out.returncode in (0, 1) and groups, log[-4000:]
    return groups, log


def _assert_group(ext_check, group, min_checks):
    groups, log = ext_check
    lines = groups.get(group, [])
    failed = [what for ok, what in lines if not ok]
    assert len(lines) >= min_checks and not failed, f"[{group}] failed: {failed}\n{log[-4000:]}"


def test_ext_cpp_declarations_match_cpp_kernels_and_python_side(ext_check):
    """Every m.def of ext.cpp has a CUDA m.impl whose C++ signature is the schema's (TORCH_LIBRARY checks that only
    when the .so loads), and fastpeft._cuda's OPS, fake kernels (parameter names) and calls name exactly those."""
    _assert_group(ext_check, "decl", 4 + 2 * len(_cuda.OPS))


def test_wrappers_and_fakes_bind_to_the_schemas_on_fake_cuda_tensors(ext_check):
    """The wrappers and fake kernels of fastpeft._cuda on fake CUDA tensors (no GPU needed): every output and
    gradient has the reference's shape and dtype; CPU tensors get the dispatcher's clear error."""
    for group, n in (("fake", 2), ("autograd", 1), ("cpu", 2), ("info", 1)):
        _assert_group(ext_check, group, n)


def test_backend_selects_the_extension_for_cuda_tensors(ext_check):
    """fastpeft._backend finds the extension's ops for "lora" and "ia3" (<op>_fwd_cuda / <op>_bwd_cuda) and auto
    picks it for CUDA tensors (it once looked up <op>_cuda, so a GPU would never have run the extension)."""
    _assert_group(ext_check, "backend", 4)


# ---------------------------------------------------------------------------------------------------------------
# GPU: every op against the fp64 reference
# ---------------------------------------------------------------------------------------------------------------

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# (M, K, N, r): odd sizes, r = 1, M = 0 and 1, decode sizes and a larger one; the last two drive the split
# reductions (split-K shrink with a partial last 256-column tile, split-M column sums with a partial last chunk),
# several column blocks, and the 16-byte (K, N multiples of 8) and scalar (K odd) paths (common/plan.h).
LORA_SHAPES = [(1, 64, 48, 4), (0, 32, 16, 2), (3, 33, 70, 1), (16, 128, 96, 8), (37, 129, 67, 5),
               (300, 256, 200, 16), (65, 80, 512, 40), (70, 2312, 264, 16), (530, 2309, 136, 24)]


_check = assert_fa_rule


def _lora_inputs(M, K, N, r, dtype, adt, bias, adalora, device="cuda", wt=False):
    x = torch.randn(M, K, device=device, dtype=dtype)
    if wt:  # Conv1D-style: weight is a transposed view of a (K, N) buffer
        weight = (torch.randn(K, N, device=device, dtype=dtype) / K ** 0.5).t()
    else:
        weight = torch.randn(N, K, device=device, dtype=dtype) / K ** 0.5
    b = torch.randn(N, device=device, dtype=dtype) if bias else None
    A = torch.randn(r, K, device=device, dtype=adt) / K ** 0.5
    B = torch.randn(N, r, device=device, dtype=adt)
    E = torch.randn(r, device=device, dtype=adt) if adalora else None
    return x, weight, b, A, E, B


def _lora_variants(M):
    return (["decode"] if M <= 16 else []) + ["accum", "kaug"]


def _run_lora_fwd(variant, x, weight, b, A, E, B, s, p, seed):
    if variant == "decode":
        return torch.ops.fastpeft.lora_decode_cuda(x, weight, b, A, E, B, s, p, seed)
    fold = _cuda.FOLD_KAUG if variant == "kaug" else _cuda.FOLD_ACCUM
    return torch.ops.fastpeft.lora_fwd_cuda(x, weight, b, A, E, B, s, p, seed, fold)


@needs_ext
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", LORA_SHAPES)
@pytest.mark.parametrize("adapter_fp32", [False, True])
def test_lora_fwd_bwd_vs_fp64(dtype, shape, adapter_fp32):
    M, K, N, r = shape
    adt = torch.float32 if adapter_fp32 else dtype
    for variant in _lora_variants(M):
        for bias, adalora, p, wt in [(True, False, 0.0, False), (False, True, 0.1, False), (True, True, 0.3, True)]:
            x, weight, b, A, E, B = _lora_inputs(M, K, N, r, dtype, adt, bias, adalora, wt=wt)
            s, seed = 1.7, 1234 + M
            y, S = _run_lora_fwd(variant, x, weight, b, A, E, B, s, p, seed)
            y64, S64 = lora_fwd_ref(x, weight, b, A, E, B, s, p, seed, upcast=True)
            y_t, S_t = lora_fwd_ref(x, weight, b, A, E, B, s, p, seed)
            tag = f"{variant} {dtype} adt={adt} {shape} bias={bias} E={adalora} p={p} wt={wt}"
            assert y.dtype == dtype and S.dtype == torch.float32
            _check(y, y64, y_t, MATMUL_FACTOR, f"y {tag}")
            _check(S, S64, S_t, MATMUL_FACTOR, f"S {tag}")
            dy = torch.randn(M, N, device="cuda", dtype=dtype)
            for needs_dx in (True, False):
                outs = torch.ops.fastpeft.lora_bwd_cuda(dy, x, weight, A, E, B, S, s, p, seed, needs_dx, bias)
                ref64 = lora_bwd_ref(dy.double(), x.double(), weight.double(), A.double(),
                                     E.double() if E is not None else None, B.double(), S64, s, p, seed,
                                     needs_dx, bias)
                ref_t = lora_bwd_ref(dy, x, weight, A, E, B, S_t, s, p, seed, needs_dx, bias)
                for name, o, r64, rt in zip(("dx", "dA", "dE", "dB", "dbias"), outs, ref64, ref_t):
                    assert o.dtype == rt.dtype, f"{name} {tag}: dtype {o.dtype} != {rt.dtype}"
                    if rt.numel() == 0:
                        assert o.shape == rt.shape, f"{name} {tag}: {o.shape} != {rt.shape}"
                        continue
                    _check(o, r64, rt, GRAD_FACTOR, f"{name} {tag} needs_dx={needs_dx}")


@needs_ext
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("p", [0.0, 0.25])
def test_lora_through_autograd_matches_torch_backend(dtype, p):
    from fastpeft import functional as Fn
    M, K, N, r = 45, 96, 80, 8
    x, weight, b, A, E, B = _lora_inputs(M, K, N, r, dtype, torch.float32, True, False)
    grads = {}
    for backend in ("cuda", "torch"):
        xs = x.clone().requires_grad_(True)
        As, Bs, bs = A.clone().requires_grad_(True), B.clone().requires_grad_(True), b.clone().requires_grad_(True)
        y = Fn.lora_linear(xs, weight, bs, As, Bs, scaling=2.0, dropout_p=p, seed=7, backend=backend)
        y.float().square().sum().backward()
        grads[backend] = (y.detach(), xs.grad, As.grad, Bs.grad, bs.grad)
    for name, c, t in zip(("y", "dx", "dA", "dB", "dbias"), grads["cuda"], grads["torch"]):
        tol = max(ELEMENTWISE[dtype][1], 1e-5) * (8 if dtype == torch.float32 else 2)
        assert rel_err(c, t) <= tol, f"{name}: {rel_err(c, t):.3e} > {tol:.1e}"


@needs_ext
@pytest.mark.parametrize("variant", ["decode", "accum", "kaug"])
def test_dropout_mask_is_the_shared_stream(variant):
    # With A = I (r = K) and x = 1, S = drop(x) exactly: the forward's mask must be the reference mask bit for bit.
    M, K = (9, 37) if variant == "decode" else (70, 37)  # K: a partial group of 8 and a partial warp tile
    p, seed = 0.4, 2**33 + 99
    x = torch.ones(M, K, device="cuda", dtype=torch.float32)
    weight = torch.zeros(5, K, device="cuda")
    A = torch.eye(K, device="cuda")
    B = torch.zeros(5, K, device="cuda")
    _, S = _run_lora_fwd(variant, x, weight, None, A, None, B, 1.0, p, seed)
    keep = drop_ref.dropout_keep_mask(seed, (M, K), p, "cuda")
    expected = torch.where(keep, torch.full_like(x, drop_ref.dropout_scale(p)), torch.zeros_like(x))
    assert torch.equal(S, expected)
    # Backward regenerates the same mask: dx's LoRA term is mask ⊙ (dS A) · scale; with W = 0, B = I-ish, dA too.
    B = torch.eye(5, K, device="cuda")
    dy = torch.randn(M, 5, device="cuda")
    dx, dA, _, _, _ = torch.ops.fastpeft.lora_bwd_cuda(dy, x, weight, A, None, B, S, 1.0, p, seed, True, False)
    rdx, rdA, _, _, _ = lora_bwd_ref(dy, x, weight, A, None, B, S, 1.0, p, seed, True, False)
    assert torch.equal(dx == 0, rdx == 0)
    assert torch.allclose(dx, rdx, rtol=1e-5, atol=1e-6)
    assert torch.allclose(dA, rdA, rtol=1e-5, atol=1e-5)


@needs_ext
def test_dropout_mask_equals_triton_stream():
    try:
        from fastpeft.kernels.lora import lora_fwd_triton
    except Exception as e:  # the Triton path is another issue's; skip if it is not there
        pytest.skip(f"fastpeft.kernels.lora not importable: {e}")
    M, K, p, seed = 33, 40, 0.3, 5
    x = torch.ones(M, K, device="cuda")
    weight, A, B = torch.zeros(3, K, device="cuda"), torch.eye(K, device="cuda"), torch.zeros(3, K, device="cuda")
    _, s_cuda = _cuda.lora_fwd_cuda(x, weight, None, A, None, B, 1.0, p, seed)
    _, s_tri = lora_fwd_triton(x, weight, None, A, None, B, 1.0, p, seed)
    assert torch.equal(s_cuda, s_tri.float())


@needs_ext
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("feedforward", [False, True])
@pytest.mark.parametrize("shape", [(1, 64, 48), (0, 16, 8), (37, 129, 67), (300, 256, 200), (600, 264, 520)])
@pytest.mark.parametrize("l_fp32", [False, True])
def test_ia3_fwd_bwd_vs_fp64(dtype, feedforward, shape, l_fp32):
    M, K, N = shape
    ldt = torch.float32 if l_fp32 else dtype
    for bias, wt in [(True, False), (False, True)]:
        x = torch.randn(M, K, device="cuda", dtype=dtype)
        weight = (torch.randn(K, N, device="cuda", dtype=dtype).t() if wt
                  else torch.randn(N, K, device="cuda", dtype=dtype)) / K ** 0.5
        b = torch.randn(N, device="cuda", dtype=dtype) if bias else None
        l = 1 + 0.5 * torch.randn(K if feedforward else N, device="cuda", dtype=ldt)
        tag = f"{dtype} ff={feedforward} {shape} l={ldt} bias={bias} wt={wt}"
        y, saved = _cuda.ia3_fwd_cuda(x, weight, b, l, feedforward)
        y64, z64 = ia3_fwd_ref(x, weight, b, l, feedforward, upcast=True)
        y_t, z_t = ia3_fwd_ref(x, weight, b, l, feedforward)
        assert y.dtype == dtype and saved.shape == z_t.shape
        _check(y, y64, y_t, MATMUL_FACTOR, f"y {tag}")
        if not feedforward:
            _check(saved, z64, z_t, MATMUL_FACTOR, f"z {tag}")
        y_inf = torch.ops.fastpeft.ia3_fwd_cuda(x, weight, b, l, feedforward, False)[0]  # the save_z=False form
        _check(y_inf, y64, y_t, MATMUL_FACTOR, f"y (inference) {tag}")
        dy = torch.randn(M, N, device="cuda", dtype=dtype)
        xx = x if feedforward else x.new_empty(0)
        for needs_dx in (True, False):
            outs = _cuda.ia3_bwd_cuda(dy, xx, weight, l, saved, feedforward, needs_dx, bias)
            ref64 = ia3_bwd_ref(dy.double(), xx.double(), weight.double(), l.double(),
                                z64 if not feedforward else z64, feedforward, needs_dx, bias)
            ref_t = ia3_bwd_ref(dy, xx, weight, l, z_t, feedforward, needs_dx, bias)
            for name, o, r64, rt in zip(("dx", "dl", "dbias"), outs, ref64, ref_t):
                assert o.dtype == rt.dtype and o.shape == rt.shape, f"{name} {tag}: {o.dtype}{o.shape}"
                if rt.numel():
                    _check(o, r64, rt, GRAD_FACTOR, f"{name} {tag} needs_dx={needs_dx}")


@needs_ext
def test_opcheck_every_op():
    from torch.library import opcheck
    dev = "cuda"
    x, weight, b, A, E, B = _lora_inputs(5, 24, 20, 4, torch.bfloat16, torch.float32, True, True)
    opcheck(torch.ops.fastpeft.lora_fwd_cuda.default, (x, weight, b, A, E, B, 2.0, 0.1, 3, 0))
    opcheck(torch.ops.fastpeft.lora_fwd_cuda.default, (x, weight, b, A, E, B, 2.0, 0.1, 3, 1))
    opcheck(torch.ops.fastpeft.lora_decode_cuda.default, (x, weight, b, A, E, B, 2.0, 0.1, 3))
    _, S = torch.ops.fastpeft.lora_fwd_cuda(x, weight, b, A, E, B, 2.0, 0.1, 3, 0)
    dy = torch.randn(5, 20, device=dev, dtype=torch.bfloat16)
    for needs_dx, has_bias in [(True, True), (False, False)]:
        opcheck(torch.ops.fastpeft.lora_bwd_cuda.default, (dy, x, weight, A, E, B, S, 2.0, 0.1, 3, needs_dx, has_bias))
        opcheck(torch.ops.fastpeft.lora_bwd_cuda.default,
                (dy, x, weight, A, None, B, S, 2.0, 0.0, 3, needs_dx, has_bias))
    l_out, l_in = torch.rand(20, device=dev), torch.rand(24, device=dev)
    for ff, l in [(False, l_out), (True, l_in)]:
        for save in (True, False):
            opcheck(torch.ops.fastpeft.ia3_fwd_cuda.default, (x, weight, b, l, ff, save))
        _, saved = torch.ops.fastpeft.ia3_fwd_cuda(x, weight, b, l, ff, True)
        xx = x if ff else x.new_empty(0)
        for needs_dx in (True, False):
            opcheck(torch.ops.fastpeft.ia3_bwd_cuda.default, (dy, xx, weight, l, saved, ff, needs_dx, True))
    x0 = x[:0]
    opcheck(torch.ops.fastpeft.lora_fwd_cuda.default, (x0, weight, b, A, E, B, 2.0, 0.0, 3, 0))


_CHECKS_OP = r"""
#include <torch/library.h>
#include "common/checks.h"
namespace {
// fastpeft's argument checks, as the extension's ops call them, behind an op registered for CPU
at::Tensor checked(const at::Tensor& x, const at::Tensor& B, int64_t r, double p, int64_t seed) {
  const char* op = "lora_fwd_cuda";
  fastpeft::check_dropout(op, p, seed);
  fastpeft::check_dim(op, "x", x, 2);
  fastpeft::check_float_dtype(op, "x", x);
  fastpeft::check_contiguous(op, "x", x);
  fastpeft::check_same_dtype(op, "lora_B", B, x.scalar_type(), "x");
  fastpeft::check_shape(op, "lora_B", B, {x.size(1), r});
  return x;
}
}  // namespace
TORCH_LIBRARY(fastpeft_checks_test, m) { m.def("checked(Tensor x, Tensor B, int r, float p, int seed) -> Tensor"); }
TORCH_LIBRARY_IMPL(fastpeft_checks_test, CPU, m) { m.impl("checked", &checked); }
"""


def test_cpp_checks_raise_through_the_dispatcher_on_cpu(tmp_path):
    """The extension's argument checks (csrc/common/checks.h) compiled into a CPU op and called through torch's
    dispatcher raise RuntimeError with the op, the argument and the value - the throw path the first GPU run saw
    segfault in test_cpp_checks_name_the_argument works here, so that crash is in the CUDA build or its ops."""
    from torch.utils import cpp_extension
    cuda_inc = next((d for d in (os.path.join(os.environ.get("CUDA_HOME", "/usr/local/cuda"), "include"),
                                 "/usr/local/cuda/include") if os.path.isfile(os.path.join(d, "cuda_runtime_api.h"))),
                    None)
    if shutil.which(os.environ.get("CXX", "g++")) is None or cuda_inc is None or \
            not cpp_extension.is_ninja_available():
        pytest.skip("needs a host C++ compiler, ninja and the CUDA runtime headers (checks.h includes launch.h)")
    if not hasattr(torch.ops, "fastpeft_checks_test") or not hasattr(torch.ops.fastpeft_checks_test, "checked"):
        cpp_extension.load_inline("fastpeft_checks_test", cpp_sources=[_CHECKS_OP], is_python_module=False,
                                  extra_include_paths=[CSRC, cuda_inc], build_directory=str(tmp_path))
    f = torch.ops.fastpeft_checks_test.checked
    x, B = torch.zeros(3, 12), torch.zeros(12, 2)
    assert f(x, B, 2, 0.1, 7) is not None
    cases = [((x, B.t().contiguous(), 2, 0.0, 0), r"lora_fwd_cuda: lora_B must have shape \[12, 2\], got \[2, 12\]"),
             ((x, B, 2, 1.0, 0), r"dropout_p must be in \[0, 1\), got 1"),
             ((x, B, 2, 0.0, -1), r"seed must be in \[0, 2\*\*63\), got -1"),
             ((x[0], B, 2, 0.0, 0), r"x must be 2-D, got shape \[12\]"),
             ((x.double(), B, 2, 0.0, 0), r"x must be float32, float16 or bfloat16, got Double"),
             ((torch.zeros(12, 3).t(), B, 2, 0.0, 0), r"x must be contiguous, got strides \[1, 3\]"),
             ((x, B.half(), 2, 0.0, 0), r"lora_B must have the dtype of x \(Float\), got Half")]
    for args, msg in cases:
        with pytest.raises(RuntimeError, match=msg):
            f(*args)


@needs_ext
def test_cpp_checks_name_the_argument():
    x, weight, b, A, E, B = _lora_inputs(4, 16, 12, 2, torch.float16, torch.float16, True, True)
    f = torch.ops.fastpeft.lora_fwd_cuda
    with pytest.raises(RuntimeError, match="lora_B must have shape"):
        f(x, weight, b, A, E, B.t().contiguous(), 1.0, 0.0, 0, 0)
    with pytest.raises(RuntimeError, match="lora_E must have shape"):
        f(x, weight, b, A, E[:1], B, 1.0, 0.0, 0, 0)
    with pytest.raises(RuntimeError, match="bias must have the dtype of x"):
        f(x, weight, b.float(), A, E, B, 1.0, 0.0, 0, 0)
    with pytest.raises(RuntimeError, match="dropout_p must be in"):
        f(x, weight, b, A, E, B, 1.0, 1.0, 0, 0)
    with pytest.raises(RuntimeError, match="x must be a CUDA tensor"):
        f(x.cpu(), weight, b, A, E, B, 1.0, 0.0, 0, 0)
    with pytest.raises(RuntimeError, match="x must be contiguous"):
        f(torch.randn(16, 4, device="cuda", dtype=torch.float16).t(), weight, b, A, E, B, 1.0, 0.0, 0, 0)
    with pytest.raises(RuntimeError, match="fold must be"):
        f(x, weight, b, A, E, B, 1.0, 0.0, 0, 7)
    with pytest.raises(RuntimeError, match="at most 16 rows"):
        torch.ops.fastpeft.lora_decode_cuda(torch.randn(17, 16, device="cuda", dtype=torch.float16), weight, b, A,
                                            E, B, 1.0, 0.0, 0)
    with pytest.raises(RuntimeError, match="ia3_l must have shape"):
        torch.ops.fastpeft.ia3_fwd_cuda(x, weight, b, torch.ones(16, device="cuda"), False, True)


@needs_ext
def test_autotune_records_a_measured_choice():
    _dispatch.clear()
    _dispatch.set_autotune(True)
    try:
        x, weight, b, A, E, B = _lora_inputs(512, 256, 256, 8, torch.bfloat16, torch.bfloat16, True, False)
        from fastpeft import _backend
        args = (x, weight, b, A, E, B)
        chosen = _dispatch.choose("lora", *args, candidates=lambda: _backend._candidates("lora", x, args))
        table = _dispatch.export_table()
        if chosen is None:  # only one backend usable here: nothing to measure, nothing recorded
            assert table == {}
        else:
            (entry,) = table.values()
            backend, _, variant = chosen.partition(":")
            assert entry["backend"] == backend and (entry["variant"] or "") == variant
            assert entry["timings_ms"] and "autotuned" in entry["reason"]
            assert _dispatch.describe()["entries"]
    finally:
        _dispatch.set_autotune(None)
        _dispatch.clear()


@needs_ext
@pytest.mark.parametrize("M", [1, 16, 300])
def test_lora_fwd_under_cuda_graph(M):
    # The decode path (M <= 16) and the cuBLASLt path must be capturable: allocations come from the graph's pool,
    # everything runs on the current stream.
    x, weight, b, A, E, B = _lora_inputs(M, 256, 192, 8, torch.bfloat16, torch.float32, True, False)
    eager, _ = _cuda.lora_fwd_cuda(x, weight, b, A, E, B, 2.0, 0.0, 0)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    g = torch.cuda.CUDAGraph()
    with torch.cuda.stream(s):
        _cuda.lora_fwd_cuda(x, weight, b, A, E, B, 2.0, 0.0, 0)  # warm-up (heuristic cache, workspace)
        torch.cuda.synchronize()
        with torch.cuda.graph(g):
            out, _ = _cuda.lora_fwd_cuda(x, weight, b, A, E, B, 2.0, 0.0, 0)
    torch.cuda.current_stream().wait_stream(s)
    x.copy_(torch.randn_like(x))
    g.replay()
    torch.cuda.synchronize()
    ref, _ = _cuda.lora_fwd_cuda(x, weight, b, A, E, B, 2.0, 0.0, 0)
    atol, rtol = ELEMENTWISE[torch.bfloat16]
    assert torch.equal(out, ref)  # no atomics: the replay and an eager call sum in the same order
    assert not torch.allclose(out, eager, atol=atol, rtol=rtol)  # the replay really recomputed on the new x


@needs_ext
def test_split_reductions_are_deterministic():
    """The split reductions (shrink, dSe, dB, dAᵀ, IA3's dl / dbias) have no atomics: the same call twice gives the
    same bits, at shapes where every one of them is split across blocks (common/plan.h)."""
    x, weight, b, A, E, B = _lora_inputs(530, 2312, 264, 16, torch.bfloat16, torch.float32, True, False)
    dy = torch.randn(530, 264, device="cuda", dtype=torch.bfloat16)
    runs = []
    for _ in range(2):
        y, S = _cuda.lora_fwd_cuda(x, weight, b, A, E, B, 2.0, 0.1, 7)
        runs.append((y, S) + tuple(_cuda.lora_bwd_cuda(dy, x, weight, A, E, B, S, 2.0, 0.1, 7, True, True)))
    for a, c in zip(*runs):
        assert torch.equal(a, c)
    l = torch.rand(264, device="cuda", dtype=torch.float32) + 0.5
    outs = []
    for _ in range(2):
        y, z = _cuda.ia3_fwd_cuda(x, weight, b, l, False)  # output mode: l scales the 264 output features
        outs.append(tuple(_cuda.ia3_bwd_cuda(dy, x, weight, l, z, False, True, True)))
    for a, c in zip(*outs):
        assert torch.equal(a, c)


@needs_ext
def test_torch_compile_through_the_cuda_backend():
    from fastpeft import functional as Fn
    x, weight, b, A, E, B = _lora_inputs(40, 64, 48, 4, torch.float16, torch.float32, True, False)
    A.requires_grad_(True)
    B.requires_grad_(True)

    def f(x, A, B):
        return Fn.lora_linear(x, weight, b, A, B, scaling=2.0, backend="cuda")
    compiled = torch.compile(f, fullgraph=True)
    y_c = compiled(x, A, B)
    y_e = f(x, A, B)
    atol, rtol = ELEMENTWISE[torch.float16]
    torch.testing.assert_close(y_c, y_e, atol=atol, rtol=rtol)
    (gA_c, gB_c) = torch.autograd.grad(y_c.float().sum(), (A, B))
    (gA_e, gB_e) = torch.autograd.grad(y_e.float().sum(), (A, B))
    atol, rtol = ELEMENTWISE[torch.float32]
    torch.testing.assert_close(gA_c, gA_e, atol=atol, rtol=rtol)
    torch.testing.assert_close(gB_c, gB_e, atol=atol, rtol=rtol)
