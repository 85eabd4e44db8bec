"""Shared pieces of the fastpeft Triton kernels: the dropout mask, tile ordering, launch heuristics, autotune configs.

Nothing here initialises CUDA at import.  Everything that asks the device something (SM count, capability) is
cached and called only from launchers.

Tuning status (read this before trusting any number): the autotune configurations below are chosen from the
Hopper guidance in ``shared/reference/performance.md`` §1 and §3 and Triton's persistent-matmul tutorials.  They were
NOT measured: no GPU was available in the task that wrote them (every kernel was verified on CPU under
``TRITON_INTERPRET=1`` only).  Record the winning configuration beside its measurement when a GPU run picks one.
What is known without a GPU: every configuration of every kernel variant compiles for sm_90 (triton 3.9 and 3.6)
without spills and within shared memory, with wgmma and TMA where intended (``.ci/compile_triton.py``; the numbers
are in ``benchmarks/results/triton-compile-sm90/``).
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os

import torch
import triton
import triton.language as tl

# ---------------------------------------------------------------------------------------------------------------
# environment
# ---------------------------------------------------------------------------------------------------------------


def interpret_mode() -> bool:
    """True when Triton runs kernels in its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


# In-kernel tensor descriptors (TMA on Hopper) exist in triton >= 3.4 (`tl.make_tensor_descriptor`); older
# versions and other vendors take the pointer path.  Checked once, at import, without touching a device.
HAS_TENSOR_DESCRIPTOR = hasattr(tl, "make_tensor_descriptor") and hasattr(triton, "set_allocator")
logger = logging.getLogger("fastpeft")
# Reasons of TMA launches that failed and fell back to the pointer path, each warned about once (a failure affects
# only its own launch: the next launch tries TMA again, so an OOM during one autotune does not disable it for good).
_tma_failures: dict[str, int] = {}


def _tma_env() -> str:
    """``FASTPEFT_TRITON_TMA``: ``auto`` (default: TMA on sm90+ when the layout allows), ``0`` (never), ``1``
    (always when the layout allows, also in the interpreter - how the tests exercise the descriptor path)."""
    v = os.environ.get("FASTPEFT_TRITON_TMA", "auto").strip().lower() or "auto"
    if v not in ("auto", "0", "1"):
        raise ValueError(f"FASTPEFT_TRITON_TMA must be auto, 0 or 1, got {v!r}")
    return v


# Compile-only mode, set by ``.ci/compile_triton.py`` (never in normal use): launchers treat CPU tensors as tensors of
# a GPU with this many SMs, so the block sizes, grids and configurations compiled for the GPU target are the ones a
# real launch on that GPU would use.  None: CPU tensors get the interpreter's small blocks.
_aot_num_sms: int | None = None
# ... and the shared memory per block (bytes) that device has, for configuration pruning.
_aot_smem: int | None = None


def gpu_like(device: torch.device) -> bool:
    """Whether launch heuristics for `device` are the GPU ones (a CUDA device, or any device in compile-only mode)."""
    return device.type == "cuda" or _aot_num_sms is not None


@functools.lru_cache(maxsize=None)
def _device_caps(index: int) -> tuple[int, int]:
    """(SM count, compute-capability major) of CUDA device `index`."""
    props = torch.cuda.get_device_properties(index)
    return props.multi_processor_count, props.major


# Device caps assumed for fake CUDA tensors when no GPU exists (the cost model traces H200 shapes on CPU): an H200.
_FAKE_CUDA_CAPS = (132, 9)


def _caps(device: torch.device) -> tuple[int, int]:
    """(SM count, capability major) of a CUDA `device`; the compile-only / fake-tensor values without a GPU."""
    if _aot_num_sms is not None:
        return _aot_num_sms, 9
    if not torch.cuda.is_available():
        return _FAKE_CUDA_CAPS
    return _device_caps(device.index if device.index is not None else torch.cuda.current_device())


def num_sms(device: torch.device) -> int:
    """Programs a persistent grid launches: the SM count on CUDA, a small number in the interpreter (so the
    persistent tile loop runs more than once per program in tests)."""
    if device.type == "cuda":
        return _caps(device)[0]
    return _aot_num_sms if _aot_num_sms is not None else 3


def is_fake(t: torch.Tensor) -> bool:
    """True for tensors without data (meta, or FakeTensor under FakeTensorMode): launchers report their kernels to
    ``fastpeft._cost`` and return correctly shaped outputs without launching."""
    if t.device.type == "meta":
        return True
    from torch._subclasses.fake_tensor import FakeTensor
    return isinstance(t, FakeTensor)


def _span(t: torch.Tensor) -> int:
    """Bytes of `t`'s elements (what one pass over it moves)."""
    return t.numel() * t.element_size()


def launch_ok(name: str, first: torch.Tensor, *, bytes_read: int, bytes_written: int, flops: int,
              launches: int = 1) -> bool:
    """Report one kernel launch to the cost model (when it records) and say whether to really launch it (not for
    fake / meta tensors)."""
    from fastpeft import _cost
    if _cost.active():
        _cost.report(name, bytes_read=bytes_read, bytes_written=bytes_written, flops=flops, launches=launches)
    return not is_fake(first)


def capturing() -> bool:
    """True while the current CUDA stream is being captured into a graph (no autotuning, no host syncs then)."""
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


def device_ctx(t: torch.Tensor):
    """Launch on `t`'s GPU (Triton launches on the current device), a no-op for CPU and fake tensors."""
    if t.device.type == "cuda" and not is_fake(t) and t.device.index is not None \
            and t.device.index != torch.cuda.current_device():
        return torch.cuda.device(t.device)
    return contextlib.nullcontext()


def on_input_device(fn):
    """Decorator for launchers: run with the first argument's GPU as the current device."""
    @functools.wraps(fn)
    def wrapper(first, *args, **kwargs):
        with device_ctx(first):
            return fn(first, *args, **kwargs)
    return wrapper


_allocator_set = False


def _ensure_allocator() -> None:
    """In-kernel tensor descriptors need global scratch memory for the descriptors; Triton asks a user-set allocator
    for it.  Set one that allocates through torch's caching allocator (once, only when a TMA kernel launches)."""
    global _allocator_set
    if _allocator_set:
        return

    def _alloc(size: int, alignment: int, stream):  # noqa: ARG001 (signature fixed by triton)
        return torch.empty(size, device="cuda", dtype=torch.int8)

    triton.set_allocator(_alloc)
    _allocator_set = True


def _tma_2d_ok(t: torch.Tensor) -> bool:
    """A 2-D operand TMA can read: unit stride on the last dim, 16-byte aligned base and row stride."""
    es = t.element_size()
    return (t.dim() == 2 and t.stride(1) == 1 and (t.stride(0) * es) % 16 == 0 and t.data_ptr() % 16 == 0
            and t.shape[1] * es >= 16)


def use_tma(a: torch.Tensor, b_view_rowmajor: torch.Tensor | None) -> bool:
    """Whether the GEMM kernel should read its A operand and (row-major view of) its B operand with tensor
    descriptors.  `b_view_rowmajor` is None when B has no unit-stride dimension (then the pointer path runs)."""
    mode = _tma_env()
    if mode == "0" or not HAS_TENSOR_DESCRIPTOR or b_view_rowmajor is None:
        return False
    if not (_tma_2d_ok(a) and _tma_2d_ok(b_view_rowmajor)):
        return False
    if a.device.type == "cuda":
        # auto: NVIDIA Hopper or newer only (ROCm also reports major 9 for gfx94x, which has no TMA engine)
        if mode == "auto" and (torch.version.hip is not None or _caps(a.device)[1] < 9):
            return False
        if not is_fake(a):
            _ensure_allocator()
        return True
    return mode == "1" and (interpret_mode() or _aot_num_sms is not None)


# ---------------------------------------------------------------------------------------------------------------
# dtypes and precision
# ---------------------------------------------------------------------------------------------------------------

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


# Precisions below: "ieee" (exact fp32 products, allowed on every backend) or "default" (no input_precision passed:
# tf32 for fp32 operands on NVIDIA, ieee on AMD; ignored for 16-bit operands).  Never the literal "tf32", which
# Triton's AMD backend rejects on most chips.


def base_precision(dtype: torch.dtype) -> str:
    """Dot precision of the base GEMM.  fp32 follows torch's own matmul setting (ieee unless the user allowed
    tf32), so the Triton backend is as accurate as the torch backend it replaces."""
    if dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32:
        return "ieee"
    return "default"


def lora_epilogue_precision(x_dtype: torch.dtype, adapter_dtype: torch.dtype) -> str:
    """Dot precision of the rank-r term added in a GEMM epilogue.  With an fp32 base and fp32 adapters the term
    keeps the base's precision; with fp32 adapters on a 16-bit base it is added to an output rounded to 16 bits, so
    tf32 (2**-11 relative) is below that rounding; with 16-bit adapters the setting is ignored."""
    if adapter_dtype == torch.float32 and x_dtype == torch.float32:
        return base_precision(torch.float32)
    return "default"


def skinny_precision(adapter_dtype: torch.dtype) -> str:
    """Dot precision of the rank-r kernels (S, dS/dB, dA).  They produce the adapter's gradients, so fp32
    adapters get ieee fp32 (like torch's fp32 matmul); these kernels are memory-bound, so the cost is small."""
    return "ieee" if adapter_dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32 else "default"


# Triton's interpreter computes bf16 tl.dot wrongly (garbage; fp16 and fp32 are fine): in the interpreter, dots
# with a bf16 operand upcast both operands to fp32 (exact) and multiply in ieee fp32 - the products a GPU's bf16
# MMA makes, accumulated in fp32 - so the CPU tests cover the bf16 kernels too.  Never used on a GPU.
UPCAST_PREC = "upcast_f32"


def dot_prec(prec: str, *dtypes: torch.dtype) -> str:
    """`prec`, or the interpreter's bf16 workaround (`UPCAST_PREC`) when a dot operand may be bf16."""
    if interpret_mode() and torch.bfloat16 in dtypes:
        return UPCAST_PREC
    return prec


@triton.jit
def mma(a, b, acc, PREC: tl.constexpr):
    """acc + a @ b in fp32 with input precision PREC (see `dot_prec`)."""
    if PREC == "upcast_f32":
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    elif PREC == "default":
        return tl.dot(a, b, acc)
    else:
        return tl.dot(a, b, acc, input_precision=PREC)


@triton.jit
def scaled(v, s):
    """v * s with torch's result dtype (v's when the dtypes match, else fp32 - for fp16/bf16/fp32 operands),
    formed as one fp32 product rounded once: the same value a 16-bit multiply gives, and correct in the interpreter,
    whose bf16 elementwise arithmetic is broken like its bf16 dot."""
    prod = v.to(tl.float32) * s.to(tl.float32)
    if v.dtype == s.dtype:
        return prod.to(v.dtype)
    else:
        return prod


def pad_rank(r: int) -> int:
    """tl.dot needs every dimension >= 16 and power-of-two blocks: pad r to max(16, next power of two)."""
    return max(16, triton.next_power_of_2(int(r)))


# ---------------------------------------------------------------------------------------------------------------
# device helpers
# ---------------------------------------------------------------------------------------------------------------


def seed_arg(seed):
    """A kernel's `seed` argument: a host int (specialised as a scalar), or a 1-element int64 tensor on the device
    (read by the kernel: a seed drawn on the GPU, so a replayed CUDA graph uses the seed drawn in that replay)."""
    return seed if isinstance(seed, torch.Tensor) else int(seed)


@triton.jit
def load_seed(seed):
    """The seed value: `seed` itself, or the int64 it points to (a device-side seed, see ``seed_arg``)."""
    if seed.dtype.is_ptr():
        return tl.load(seed)
    else:
        return seed


@triton.jit
def dropout_keep(seed, offs_m, k_start, p16, BLOCK_K: tl.constexpr):
    """Keep-mask of the shared dropout stream (``fastpeft.ops.dropout``) for rows ``offs_m`` (BM,) and the BLOCK_K
    columns ``k_start .. k_start + BLOCK_K`` (k_start a multiple of 8): one ``tl.philox`` call per 8 columns of a row,
    on counter (k >> 3, m & 0xffffffff, m >> 32, 0); element k takes 16-bit half (k & 1) of word (k & 7) >> 1 and is
    kept when that value is >= p16 (the int threshold of ``dropout_threshold``).  Returns (BM, BLOCK_K) bool."""
    tl.static_assert(BLOCK_K % 8 == 0, "dropout column blocks must be whole groups of 8")
    seed = load_seed(seed)
    G: tl.constexpr = BLOCK_K // 8
    m64 = offs_m.to(tl.int64)
    zero = tl.zeros((offs_m.shape[0], G), dtype=tl.uint32)
    g = (k_start // 8 + tl.arange(0, G)).to(tl.int64)
    c0 = zero + (g & 0xFFFFFFFF).to(tl.uint32)[None, :]
    c1 = zero + (m64 & 0xFFFFFFFF).to(tl.uint32)[:, None]
    c2 = zero + (m64 >> 32).to(tl.uint32)[:, None]
    r0, r1, r2, r3 = tl.philox(seed, c0, c1, c2, zero)
    # The 8 16-bit lanes e0 .. e7 (e_j = half j & 1 of word j >> 1) back in k order.  tl.join(a, b) stacks on a NEW
    # LAST axis, so three nested joins give (BM, G, b0, b1, b2) with b0 from the innermost join and b2 from the
    # outermost, and the row-major reshape puts it at j = 4*b0 + 2*b1 + b2: the innermost joins must pair (e_j,
    # e_{j+4}), the middle ones (j, j+2), the outer one (j, j+1).  (The "obvious" nesting join(join(e0, e1), ..)
    # would give the bit-reversed order e0 e4 e2 e6 e1 e5 e3 e7; tests/test_triton_lora.py pins the order.)
    e0, e1 = r0 & 0xFFFF, r0 >> 16
    e2, e3 = r1 & 0xFFFF, r1 >> 16
    e4, e5 = r2 & 0xFFFF, r2 >> 16
    e6, e7 = r3 & 0xFFFF, r3 >> 16
    even = tl.join(tl.join(e0, e4), tl.join(e2, e6))  # b2 = 0: e0, e2, e4, e6
    odd = tl.join(tl.join(e1, e5), tl.join(e3, e7))   # b2 = 1: e1, e3, e5, e7
    u = tl.reshape(tl.join(even, odd), (offs_m.shape[0], BLOCK_K))
    return u.to(tl.int32) >= p16


@triton.jit
def tile_coords(tile_id, num_pid_m, num_pid_n, GROUP_M: tl.constexpr):
    """Grouped ("super-tile") order: GROUP_M row tiles walk the column tiles together so their A rows and B
    columns are reused from L2."""
    num_in_group = GROUP_M * num_pid_n
    group_id = tile_id // num_in_group
    first_m = group_id * GROUP_M
    group_size = tl.minimum(num_pid_m - first_m, GROUP_M)
    pid_m = first_m + ((tile_id % num_in_group) % group_size)
    pid_n = (tile_id % num_in_group) // group_size
    return pid_m, pid_n


def split_count(n_blocks_other: int, n_blocks_split: int, target_programs: int) -> int:
    """How many chunks to split a reduction dimension into so that (other blocks) x (chunks) reaches about
    `target_programs`, never more chunks than blocks."""
    want = triton.cdiv(target_programs, max(1, n_blocks_other))
    return max(1, min(n_blocks_split, want))


def target_programs(device: torch.device) -> int:
    """Programs the skinny kernels aim for: two waves of the SMs (the memory system needs several loads in
    flight per SM), a handful in the interpreter."""
    if _test_shape["programs"] is not None:
        return _test_shape["programs"]
    return 2 * num_sms(device) if gpu_like(device) else 4


# ---------------------------------------------------------------------------------------------------------------
# autotune configurations of the GEMM kernel (pointer and TMA paths share them)
# ---------------------------------------------------------------------------------------------------------------


def _cfg(bm, bn, bk, gm, stages, warps):
    return triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": gm},
                         num_stages=stages, num_warps=warps)


def gemm_configs() -> list:
    """The GEMM kernel's configurations.  NOT measured (no GPU in the task that wrote them); why each is here:"""
    if interpret_mode():
        # Interpreter: one small tile, so tests exercise several tiles, K iterations and masked tails.
        # (BLOCK_N = 64 so the epilogue's 4-way column split runs, see _epi_split.)
        return [_cfg(16, 64, 16, 2, 1, 4)]
    return [
        # Hopper large-M: the 128x256x64 wgmma tile with 3 stages and 8 warps is what Triton's persistent
        # TMA tutorials and performance.md §3 report near cuBLAS for K >= 2048.
        _cfg(128, 256, 64, 8, 3, 8),
        # Same depth, narrower N: more tiles (M=2048, N=4096 gives 512 instead of 256), better wave quantisation
        # over 132 SMs; 4 stages fit in shared memory at this size.
        _cfg(128, 128, 64, 8, 4, 8),
        # 4 warps on 128x128: fewer registers per tile for the epilogue's rank-r dot and dropout Philox.
        _cfg(128, 128, 64, 8, 4, 4),
        # Mid M (hundreds of rows): 64-row tiles double the tile count.
        _cfg(64, 128, 64, 8, 4, 4),
        # Decode (M <= 16-64): the GEMM is a weight stream; narrow N tiles and deep K give >= 1 tile per SM at
        # N=4096 and keep several weight loads in flight.
        _cfg(16, 64, 128, 1, 4, 4),
        _cfg(32, 32, 128, 1, 5, 4),
        # Only when nothing above fits the device's shared memory (see prune_gemm_configs).
        _cfg(*_PORTABLE_CFG),
    ]


# Portable fallback: 64x64x32 with 2 stages is 16 KB of 16-bit operands (32 KB fp32), below every CUDA GPU's shared
# memory per block (48 KB without opt-in).  Kept only when no other configuration fits the device (e.g. fp32 on a
# 99 KB-per-block consumer GPU, where the tiles above need 192-262 KB): slow there, but it runs.
_PORTABLE_CFG = (64, 64, 32, 8, 2, 4)


def _smem_estimate(c, es: int) -> int:
    """Shared memory of a configuration's pipelined A and B tiles (bytes): what Triton allocates for this kernel
    (the sm_90 compile check, .ci/compile_triton.py, reports exactly this for the pointer path, +32 B with TMA)."""
    bm, bn, bk = c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.kwargs["BLOCK_K"]
    return c.num_stages * (bm * bk + bk * bn) * es


def smem_limit(device: torch.device) -> int:
    """Max dynamic shared memory per block of `device` in bytes (opt-in limit), minus a reserve for the
    epilogue's scratch and TMA barriers.  Unlimited in the interpreter; the compile check sets ``_aot_smem``."""
    if device.type == "cuda":
        return _device_smem(device.index if device.index is not None else torch.cuda.current_device()) - 1024
    if _aot_smem is not None:
        return _aot_smem - 1024
    return 1 << 30


@functools.lru_cache(maxsize=None)
def _device_smem(index: int) -> int:
    props = torch.cuda.get_device_properties(index)
    return int(getattr(props, "shared_memory_per_block_optin", 0) or 48 * 1024)


def autotune_enabled() -> bool:
    """``FASTPEFT_TRITON_AUTOTUNE`` (default 1).  0 takes the first configuration that fits instead of timing all of
    them: for correctness runs (the GPU tests set it), where tuning only costs compile and benchmark time."""
    v = os.environ.get("FASTPEFT_TRITON_AUTOTUNE", "1").strip().lower() or "1"
    if v not in ("0", "1"):
        raise ValueError(f"FASTPEFT_TRITON_AUTOTUNE must be 0 or 1, got {v!r}")
    return v == "1"


def prune_gemm_configs(configs, named_args, **kwargs):
    """Drop configurations that cannot win for this M (so autotuning stays short) or whose pipelined stages do not
    fit in the device's shared memory (fp32 operands double the bytes).  The portable configuration is kept only
    when nothing else fits."""
    m = named_args["M"]
    a = named_args["a_ptr"]
    es = a.element_size()
    limit = smem_limit(a.device)
    keep, portable = [], []
    for c in configs:
        bm, bn, bk = c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.kwargs["BLOCK_K"]
        if (bm, bn, bk, c.kwargs["GROUP_M"], c.num_stages, c.num_warps) == _PORTABLE_CFG:
            portable.append(c)
            continue
        if m <= 64 and bm > 64:
            continue
        if m > 256 and bm < 64:
            continue
        if _smem_estimate(c, es) > limit:
            continue
        keep.append(c)
    if keep:
        # No timing inside a CUDA graph capture (the benchmark launches would be captured too).
        return keep if autotune_enabled() and not capturing() else keep[:1]
    return portable or [min(configs, key=lambda c: _smem_estimate(c, es))]


def m_bucket(m: int) -> int:
    """Autotune key for M: powers of two, so a training run (fixed M) tunes once and decoding lengths share."""
    return triton.next_power_of_2(max(1, int(m)))


# Block sizes of the skinny (rank-r) kernels; chosen on the host, not autotuned, because their partial-sum
# buffers are sized from them.  NOT measured.  These kernels are memory-bound: the number of programs in flight
# (target_programs) matters more than the tile, and a 64x128 tile of a 16-bit operand is a 16 KB load.
def skinny_blocks(device: torch.device, dropout: bool = False) -> tuple[int, int, int]:
    """(BLOCK_M, BLOCK_K, num_warps) of the skinny kernels.  With dropout the Philox state (4 words per 8
    elements, plus the 16-bit lanes being interleaved) must fit in registers next to the tile: 64x64 over 8 warps
    is 16 elements per thread.  Block sizes stay multiples of 8 (the mask's Philox groups).  Kept from the
    one-call-per-element stream; NOT re-measured."""
    if _test_shape["blocks"] is not None:
        return _test_shape["blocks"]
    if not gpu_like(device):
        return 16, 16, 4
    return (64, 64, 8) if dropout else (64, 128, 4)


# Test hook: force the skinny kernels' block sizes and program target, so that small test shapes get the block-count
# structure of production shapes (several N blocks per dY program, several K blocks per shrink split, splits > 1).
_test_shape: dict = {"blocks": None, "programs": None}


@contextlib.contextmanager
def forced_launch_shape(blocks: tuple[int, int, int] | None = None, programs: int | None = None):
    """Within the block, ``skinny_blocks`` returns `blocks` and ``target_programs`` returns `programs` (tests only)."""
    old = dict(_test_shape)
    _test_shape.update(blocks=blocks, programs=programs)
    try:
        yield
    finally:
        _test_shape.update(old)


# ---------------------------------------------------------------------------------------------------------------
# The GEMM kernel every op uses:  C[M, N] = prologue(A)[M, K] @ B[K, N]  + epilogue
# ---------------------------------------------------------------------------------------------------------------
#
#   prologue  (HAS_PRO):   A[:, k] <- (A[:, k] in pro's dtype * pro[k]) cast back to A's dtype    (IA3 input scale)
#   epilogue, in order, on the fp32 accumulator:
#     HAS_LORA:  += dropmask(m, n) * ((L[M, R] * lscale * rs[R]) @ Rm[R, N])
#                (the LoRA expand term; the dropout mask only on the dX side)
#     HAS_BIAS:  += bias[n]
#     WRITE_Z:   Z <- acc  (IA3's saved z = x Wᵀ + b)
#     HAS_DL:    part[pid_m, n] = Σ_m round(acc) * X2[m, n]                (IA3 input-mode dl, one row per M tile)
#     HAS_COL:   acc <- round(acc) * col[n]                              (IA3 output scale, input-mode dx scale)
#     STORE_C:   C <- acc
#
# The rank-r term sits after the K loop, so the main loop stays a plain pipelined GEMM (performance.md §1: putting
# it before the loop doubled the time).  Persistent: NUM_SMS programs walk the tiles in grouped order.
# USE_TMA reads A and B through tensor descriptors (TMA on Hopper); B_KCONTIG says which of B's dims is unit-stride
# on that path (True: B is the transpose of a row-major (N, K) tensor, like W in the forward).


# The dropout seed changes every step: not specialised on (seed % 16), which would compile each variant twice.
@triton.jit(do_not_specialize=["seed"])
def _gemm_kernel(
    a_ptr, b_ptr, c_ptr, M, N, K,
    stride_am, stride_ak, stride_bk, stride_bn, stride_cm, stride_cn,
    pro_ptr,
    l_ptr, stride_lm, stride_lr, lscale, rs_ptr, rm_ptr, stride_rr, stride_rn, R,
    seed, p16, drop_scale,
    bias_ptr, col_ptr,
    z_ptr, stride_zm, stride_zn,
    x2_ptr, stride_x2m, stride_x2n, part_ptr,
    M_BUCKET,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    NUM_SMS: tl.constexpr, R_PAD: tl.constexpr,
    HAS_PRO: tl.constexpr, HAS_LORA: tl.constexpr, HAS_RS: tl.constexpr, HAS_DROPOUT: tl.constexpr,
    HAS_BIAS: tl.constexpr, WRITE_Z: tl.constexpr, HAS_DL: tl.constexpr, HAS_COL: tl.constexpr,
    STORE_C: tl.constexpr,
    PREC: tl.constexpr, LORA_PREC: tl.constexpr, USE_TMA: tl.constexpr, B_KCONTIG: tl.constexpr,
    EPI_SPLIT: tl.constexpr,
):
    start = tl.program_id(0)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    num_tiles = num_pid_m * num_pid_n
    k_tiles = tl.cdiv(K, BLOCK_K)
    c_dtype = c_ptr.dtype.element_ty

    if USE_TMA:
        a_desc = tl.make_tensor_descriptor(a_ptr, shape=[M, K], strides=[stride_am, 1],
                                           block_shape=[BLOCK_M, BLOCK_K])
        if B_KCONTIG:
            b_desc = tl.make_tensor_descriptor(b_ptr, shape=[N, K], strides=[stride_bn, 1],
                                               block_shape=[BLOCK_N, BLOCK_K])
        else:
            b_desc = tl.make_tensor_descriptor(b_ptr, shape=[K, N], strides=[stride_bk, 1],
                                               block_shape=[BLOCK_K, BLOCK_N])

    for tile_id in range(start, num_tiles, NUM_SMS):
        pid_m, pid_n = tile_coords(tile_id, num_pid_m, num_pid_n, GROUP_M)
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        mask_m = offs_m < M
        mask_n = offs_n < N
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        if USE_TMA:
            for ki in range(k_tiles):
                off_k = ki * BLOCK_K
                a = a_desc.load([pid_m * BLOCK_M, off_k])
                if B_KCONTIG:
                    b = b_desc.load([pid_n * BLOCK_N, off_k]).T
                else:
                    b = b_desc.load([off_k, pid_n * BLOCK_N])
                if HAS_PRO:
                    offs_k = off_k + tl.arange(0, BLOCK_K)
                    pro = tl.load(pro_ptr + offs_k, mask=offs_k < K, other=0.0)
                    a = scaled(a.to(pro.dtype), pro[None, :]).to(a.dtype)
                acc = mma(a, b, acc, PREC)
        else:
            rm64 = offs_m.to(tl.int64)
            rn64 = offs_n.to(tl.int64)
            for ki in range(k_tiles):
                offs_k = ki * BLOCK_K + tl.arange(0, BLOCK_K)
                mask_k = offs_k < K
                rk64 = offs_k.to(tl.int64)
                a = tl.load(a_ptr + rm64[:, None] * stride_am + rk64[None, :] * stride_ak,
                            mask=mask_m[:, None] & mask_k[None, :], other=0.0)
                b = tl.load(b_ptr + rk64[:, None] * stride_bk + rn64[None, :] * stride_bn,
                            mask=mask_k[:, None] & mask_n[None, :], other=0.0)
                if HAS_PRO:
                    pro = tl.load(pro_ptr + offs_k, mask=mask_k, other=0.0)
                    a = scaled(a.to(pro.dtype), pro[None, :]).to(a.dtype)
                acc = mma(a, b, acc, PREC)

        # ---- epilogue, on EPI_SPLIT column sub-tiles (fewer live registers: the rank-r product and the Philox
        # state of the dropout mask are per element) ----
        if EPI_SPLIT == 1:
            _epilogue(acc, pid_m, offs_m, pid_n * BLOCK_N, M, N, c_ptr, stride_cm, stride_cn,
                      l_ptr, stride_lm, stride_lr, lscale, rs_ptr, rm_ptr, stride_rr, stride_rn, R,
                      seed, p16, drop_scale, bias_ptr, col_ptr, z_ptr, stride_zm, stride_zn,
                      x2_ptr, stride_x2m, stride_x2n, part_ptr,
                      BLOCK_N, R_PAD, HAS_LORA, HAS_RS, HAS_DROPOUT, HAS_BIAS, WRITE_Z, HAS_DL, HAS_COL,
                      STORE_C, LORA_PREC)
        elif EPI_SPLIT == 2:
            a0, a1 = _halves(acc, BLOCK_M, BLOCK_N)
            _epilogue(a0, pid_m, offs_m, pid_n * BLOCK_N, M, N, c_ptr, stride_cm, stride_cn,
                      l_ptr, stride_lm, stride_lr, lscale, rs_ptr, rm_ptr, stride_rr, stride_rn, R,
                      seed, p16, drop_scale, bias_ptr, col_ptr, z_ptr, stride_zm, stride_zn,
                      x2_ptr, stride_x2m, stride_x2n, part_ptr,
                      BLOCK_N // 2, R_PAD, HAS_LORA, HAS_RS, HAS_DROPOUT, HAS_BIAS, WRITE_Z, HAS_DL, HAS_COL,
                      STORE_C, LORA_PREC)
            _epilogue(a1, pid_m, offs_m, pid_n * BLOCK_N + BLOCK_N // 2, M, N, c_ptr, stride_cm, stride_cn,
                      l_ptr, stride_lm, stride_lr, lscale, rs_ptr, rm_ptr, stride_rr, stride_rn, R,
                      seed, p16, drop_scale, bias_ptr, col_ptr, z_ptr, stride_zm, stride_zn,
                      x2_ptr, stride_x2m, stride_x2n, part_ptr,
                      BLOCK_N // 2, R_PAD, HAS_LORA, HAS_RS, HAS_DROPOUT, HAS_BIAS, WRITE_Z, HAS_DL, HAS_COL,
                      STORE_C, LORA_PREC)
        else:
            tl.static_assert(EPI_SPLIT == 4, "EPI_SPLIT must be 1, 2 or 4")
            h0, h1 = _halves(acc, BLOCK_M, BLOCK_N)
            a0, a1 = _halves(h0, BLOCK_M, BLOCK_N // 2)
            a2, a3 = _halves(h1, BLOCK_M, BLOCK_N // 2)
            Q: tl.constexpr = BLOCK_N // 4
            _epilogue(a0, pid_m, offs_m, pid_n * BLOCK_N, M, N, c_ptr, stride_cm, stride_cn,
                      l_ptr, stride_lm, stride_lr, lscale, rs_ptr, rm_ptr, stride_rr, stride_rn, R,
                      seed, p16, drop_scale, bias_ptr, col_ptr, z_ptr, stride_zm, stride_zn,
                      x2_ptr, stride_x2m, stride_x2n, part_ptr,
                      Q, R_PAD, HAS_LORA, HAS_RS, HAS_DROPOUT, HAS_BIAS, WRITE_Z, HAS_DL, HAS_COL, STORE_C, LORA_PREC)
            _epilogue(a1, pid_m, offs_m, pid_n * BLOCK_N + Q, M, N, c_ptr, stride_cm, stride_cn,
                      l_ptr, stride_lm, stride_lr, lscale, rs_ptr, rm_ptr, stride_rr, stride_rn, R,
                      seed, p16, drop_scale, bias_ptr, col_ptr, z_ptr, stride_zm, stride_zn,
                      x2_ptr, stride_x2m, stride_x2n, part_ptr,
                      Q, R_PAD, HAS_LORA, HAS_RS, HAS_DROPOUT, HAS_BIAS, WRITE_Z, HAS_DL, HAS_COL, STORE_C, LORA_PREC)
            _epilogue(a2, pid_m, offs_m, pid_n * BLOCK_N + 2 * Q, M, N, c_ptr, stride_cm, stride_cn,
                      l_ptr, stride_lm, stride_lr, lscale, rs_ptr, rm_ptr, stride_rr, stride_rn, R,
                      seed, p16, drop_scale, bias_ptr, col_ptr, z_ptr, stride_zm, stride_zn,
                      x2_ptr, stride_x2m, stride_x2n, part_ptr,
                      Q, R_PAD, HAS_LORA, HAS_RS, HAS_DROPOUT, HAS_BIAS, WRITE_Z, HAS_DL, HAS_COL, STORE_C, LORA_PREC)
            _epilogue(a3, pid_m, offs_m, pid_n * BLOCK_N + 3 * Q, M, N, c_ptr, stride_cm, stride_cn,
                      l_ptr, stride_lm, stride_lr, lscale, rs_ptr, rm_ptr, stride_rr, stride_rn, R,
                      seed, p16, drop_scale, bias_ptr, col_ptr, z_ptr, stride_zm, stride_zn,
                      x2_ptr, stride_x2m, stride_x2n, part_ptr,
                      Q, R_PAD, HAS_LORA, HAS_RS, HAS_DROPOUT, HAS_BIAS, WRITE_Z, HAS_DL, HAS_COL, STORE_C, LORA_PREC)


@triton.jit
def _halves(x, BM: tl.constexpr, BN: tl.constexpr):
    """Split a (BM, BN) register tile into its left and right (BM, BN/2) halves."""
    x = tl.reshape(x, (BM, 2, BN // 2))
    x = tl.permute(x, (0, 2, 1))
    return tl.split(x)


@triton.jit
def _epilogue(acc, pid_m, offs_m, n0, M, N, c_ptr, stride_cm, stride_cn,
              l_ptr, stride_lm, stride_lr, lscale, rs_ptr, rm_ptr, stride_rr, stride_rn, R,
              seed, p16, drop_scale, bias_ptr, col_ptr, z_ptr, stride_zm, stride_zn,
              x2_ptr, stride_x2m, stride_x2n, part_ptr,
              WIDTH: tl.constexpr, R_PAD: tl.constexpr,
              HAS_LORA: tl.constexpr, HAS_RS: tl.constexpr, HAS_DROPOUT: tl.constexpr, HAS_BIAS: tl.constexpr,
              WRITE_Z: tl.constexpr, HAS_DL: tl.constexpr, HAS_COL: tl.constexpr, STORE_C: tl.constexpr,
              LORA_PREC: tl.constexpr):
    """The epilogue of the (rows offs_m) x (columns n0 .. n0 + WIDTH) part of a tile; `acc` is fp32 (BM, WIDTH)."""
    c_dtype = c_ptr.dtype.element_ty
    offs_n = n0 + tl.arange(0, WIDTH)
    mask_m = offs_m < M
    mask_n = offs_n < N
    rm64 = offs_m.to(tl.int64)
    rn64 = offs_n.to(tl.int64)
    mask_mn = mask_m[:, None] & mask_n[None, :]
    if HAS_LORA:
        offs_r = tl.arange(0, R_PAD)
        mask_r = offs_r < R
        lt = tl.load(l_ptr + rm64[:, None] * stride_lm + offs_r[None, :] * stride_lr,
                     mask=mask_m[:, None] & mask_r[None, :], other=0.0).to(tl.float32) * lscale
        if HAS_RS:
            rs = tl.load(rs_ptr + offs_r, mask=mask_r, other=0.0).to(tl.float32)
            lt = lt * rs[None, :]
        rt = tl.load(rm_ptr + offs_r[:, None] * stride_rr + rn64[None, :] * stride_rn,
                     mask=mask_r[:, None] & mask_n[None, :], other=0.0)
        if HAS_DROPOUT:
            # the mask applies to the rank-r term only, so it needs its own product (scale folded into L first)
            lora = mma((lt * drop_scale).to(rt.dtype), rt, tl.zeros(acc.shape, dtype=tl.float32), LORA_PREC)
            keep = dropout_keep(seed, offs_m, n0, p16, WIDTH)
            acc += tl.where(keep, lora, 0.0)
        else:
            acc = mma(lt.to(rt.dtype), rt, acc, LORA_PREC)
    if HAS_BIAS:
        bias = tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0)
        acc += bias.to(tl.float32)[None, :]
    if WRITE_Z:
        tl.store(z_ptr + rm64[:, None] * stride_zm + rn64[None, :] * stride_zn,
                 acc.to(z_ptr.dtype.element_ty), mask=mask_mn)
    if HAS_DL:
        x2 = tl.load(x2_ptr + rm64[:, None] * stride_x2m + rn64[None, :] * stride_x2n, mask=mask_mn, other=0.0)
        g = acc.to(c_dtype).to(tl.float32)
        dl_part = tl.sum(g * x2.to(tl.float32), axis=0)
        tl.store(part_ptr + pid_m.to(tl.int64) * N + offs_n, dl_part, mask=mask_n)
    if HAS_COL:
        col = tl.load(col_ptr + offs_n, mask=mask_n, other=0.0)
        acc = scaled(acc.to(c_dtype), col[None, :]).to(tl.float32)
    if STORE_C:
        tl.store(c_ptr + rm64[:, None] * stride_cm + rn64[None, :] * stride_cn, acc.to(c_dtype), mask=mask_mn)


def _epi_split(args) -> int:
    """Column sub-tiles of the epilogue.  The dropout mask (one Philox call per 8 columns, its 16-bit lanes
    interleaved back into (BM, width)) and the dropout term's second (BM, width) product need registers, so the dropout epilogue works on 32-column pieces; any other rank-r / reduction
    epilogue on 64-column pieces; a plain epilogue on the whole tile.  The interpreter uses 16-column pieces so
    the tests run the split path.  NOT measured: these widths come from register arithmetic only."""
    bn = args["BLOCK_N"]
    if interpret_mode():
        width = 16
    elif args["HAS_DROPOUT"]:
        width = 32
    elif args["HAS_LORA"] or args["HAS_DL"] or args["WRITE_Z"]:
        width = 64
    else:
        width = bn
    return max(1, min(4, bn // max(16, width)))


_gemm_autotuned = triton.autotune(
    configs=gemm_configs(),
    key=["M_BUCKET", "N", "K", "HAS_PRO", "HAS_LORA", "HAS_DROPOUT", "HAS_DL", "USE_TMA", "B_KCONTIG"],
    prune_configs_by={"early_config_prune": prune_gemm_configs},
    # The dl partial rows a config writes depend on its BLOCK_M: zero them before each benchmarked config.
    reset_to_zero=["part_ptr"],
)(triton.heuristics({"EPI_SPLIT": _epi_split})(_gemm_kernel))


def _dummy(device: torch.device) -> torch.Tensor:
    return torch.empty(1, device=device, dtype=torch.float32)


def gemm(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor | None, *, prec: str,
         pro: torch.Tensor | None = None,
         lora: tuple | None = None,
         bias: torch.Tensor | None = None, col: torch.Tensor | None = None,
         z: torch.Tensor | None = None, dl_x: torch.Tensor | None = None) -> torch.Tensor | None:
    """Launch the GEMM kernel: ``out[M, N] = prologue(a)[M, K] @ b[K, N] + epilogue`` (see the comment above).

    Args:
        a: (M, K), any strides.  b: (K, N), any strides (e.g. ``W.t()``).  out: (M, N) or None (then nothing is
            stored; used when only the dl reduction is wanted - pass `dl_x` and a dtype-carrying `z`-less call).
        prec: dot precision of the main loop ("ieee" or "default", see ``base_precision``).
        pro: (K,) prologue scale.
        lora: ``(L (M, R), lscale, rs (R,) | None, Rm (R, N), lora_prec, p16, seed, drop_scale)``: the epilogue
            adds ``mask ⊙ ((L · lscale · rs · drop_scale) @ Rm)``, the mask and drop_scale only when the int
            threshold p16 > 0 (``p16, drop_scale = fastpeft.ops.dropout.dropout_threshold(p)``).
        bias, col: (N,).  z: (M, N) output of the unscaled accumulator (+ bias).
        dl_x: (M, N) tensor whose product with the rounded accumulator is summed over M.
    Returns:
        The (cdiv(M, BLOCK_M), N) fp32 dl partial sums when `dl_x` is given (sum them over dim 0), else None.
    """
    m, k = a.shape
    n = b.shape[1]
    dev = a.device
    d = _dummy(dev)
    c = out if out is not None else torch.empty((1, 1), device=dev, dtype=a.dtype)
    has_lora = lora is not None
    if has_lora:
        L, lscale, rs, Rm, lora_prec, p16, seed, drop_scale = lora
        r = L.shape[1]
    else:
        L, lscale, rs, Rm, lora_prec, p16, seed, drop_scale, r = (d.view(1, 1), 1.0, None, d.view(1, 1), "default",
                                                                  0, 0, 1.0, 1)
    # TMA view of B: row-major (N, K) when b is the transpose of such a tensor, row-major (K, N) otherwise.
    if b.stride(0) == 1 and b.dim() == 2:
        b_rowmajor, b_kcontig = b.t(), True
    elif b.stride(1) == 1:
        b_rowmajor, b_kcontig = b, False
    else:
        b_rowmajor, b_kcontig = None, False
    tma = use_tma(a, b_rowmajor)
    nsm = num_sms(dev)
    part = None
    if dl_x is not None:
        # One partial row per M tile: BLOCK_M is only known once a config is picked, so size for the smallest
        # BLOCK_M a config kept for this M has; rows a larger tile leaves unwritten stay zero.
        min_bm = min(cfg.kwargs["BLOCK_M"] for cfg in prune_gemm_configs(gemm_configs(), {"M": m, "a_ptr": a}))
        part = torch.zeros((triton.cdiv(m, min_bm), n), device=dev, dtype=torch.float32)

    def grid(meta):
        tiles = triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"])
        return (max(1, min(nsm, tiles)),)

    args = (
        a, b, c, m, n, k,
        a.stride(0), a.stride(1), b.stride(0), b.stride(1), c.stride(0), c.stride(1),
        pro if pro is not None else d,
        L, L.stride(0), L.stride(1), float(lscale), rs if rs is not None else d, Rm, Rm.stride(0), Rm.stride(1), r,
        seed_arg(seed), int(p16), float(drop_scale),
        bias if bias is not None else d, col if col is not None else d,
        z if z is not None else c, (z.stride(0) if z is not None else 0), (z.stride(1) if z is not None else 0),
        dl_x if dl_x is not None else c, (dl_x.stride(0) if dl_x is not None else 0),
        (dl_x.stride(1) if dl_x is not None else 0), part if part is not None else d,
        m_bucket(m),
    )
    kwargs = dict(
        NUM_SMS=nsm, R_PAD=pad_rank(r),
        HAS_PRO=pro is not None, HAS_LORA=has_lora, HAS_RS=rs is not None, HAS_DROPOUT=has_lora and p16 > 0,
        HAS_BIAS=bias is not None, WRITE_Z=z is not None, HAS_DL=dl_x is not None, HAS_COL=col is not None,
        STORE_C=out is not None,
        PREC=dot_prec(prec, a.dtype), LORA_PREC=dot_prec(lora_prec, Rm.dtype), B_KCONTIG=b_kcontig,
    )
    # The pro/epilogue operands' traffic counts too: z written beside C (IA3 output mode) and dl_x read (input
    # mode's dl) are each a full (M, N) pass.
    extra_read = sum(_span(t) for t in (pro, bias, col, dl_x, rs) if t is not None)
    if has_lora:
        extra_read += _span(L) + _span(Rm)
    extra_written = (_span(z) if z is not None else 0) + (_span(part) if part is not None else 0)
    if not launch_ok("triton_gemm", a, bytes_read=(m * k + k * n) * a.element_size() + extra_read,
                     bytes_written=(m * n * c.element_size() if out is not None else 0) + extra_written,
                     flops=2 * m * n * k + (2 * m * n * r if has_lora else 0)):
        return part
    if tma:
        try:
            _gemm_autotuned[grid](*args, USE_TMA=True, **kwargs)
            return part
        except Exception as e:  # noqa: BLE001 - a compile/launch failure of the unmeasured TMA path
            # This launch falls back to the pointer path; the next one tries TMA again (a transient failure, e.g.
            # an OOM while autotuning, must not disable it for the process).  Warned once per reason.
            why = f"{type(e).__name__}: {e}"
            _tma_failures[why] = _tma_failures.get(why, 0) + 1
            if _tma_failures[why] == 1:
                logger.warning("fastpeft: a TMA GEMM launch failed (%s); this launch uses the pointer path "
                               "(FASTPEFT_TRITON_TMA=0 skips TMA)", why)
            if part is not None:
                part.zero_()
    _gemm_autotuned[grid](*args, USE_TMA=False, **kwargs)
    return part


def tuned_configs() -> list[dict]:
    """The GEMM configurations the autotuner picked so far in this process, one dict per tuning key, for a
    benchmark to record beside its measurements (the configs above are unmeasured until such a record exists).
    Empty when only one configuration exists (the interpreter), since nothing is tuned then."""
    out = []
    for key, cfg in getattr(_gemm_autotuned, "cache", {}).items():
        out.append({"key": [str(k) for k in key], "config": str(cfg)})
    return out
