"""Launch policy of the Triton kernels: environment knobs, the launch target (the GPU a launch is sized for), device
helpers and the block-size heuristics of the skinny kernels.

Nothing here initialises CUDA at import; what asks the device something (SM count, capability, shared memory) is
cached and called only from launchers.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import functools
import os
import types
from typing import Optional

import torch
import triton
import triton.language as tl

from . import _cost

# ---------------------------------------------------------------------------------------------------------------
# environment knobs
# ---------------------------------------------------------------------------------------------------------------


def interpret_mode() -> bool:
    """True when Triton runs kernels in its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _tma_env() -> str:
    """``FASTPEFT_TRITON_TMA``: ``auto`` (default: TMA on sm90+ when the layout allows), ``0`` (never), ``1``
    (always when the layout allows, also in the interpreter - how the tests exercise the descriptor path)."""
    v = os.environ.get("FASTPEFT_TRITON_TMA", "auto").strip().lower() or "auto"
    if v not in ("auto", "0", "1"):
        raise ValueError(f"FASTPEFT_TRITON_TMA must be auto, 0 or 1, got {v!r}")
    return v


def autotune_enabled() -> bool:
    """``FASTPEFT_TRITON_AUTOTUNE`` (default 1).  0 takes the first configuration that fits instead of timing all of
    them: for correctness runs (the GPU tests set it), where tuning only costs compile and benchmark time."""
    v = os.environ.get("FASTPEFT_TRITON_AUTOTUNE", "1").strip().lower() or "1"
    if v not in ("0", "1"):
        raise ValueError(f"FASTPEFT_TRITON_AUTOTUNE must be 0 or 1, got {v!r}")
    return v == "1"


# In-kernel tensor descriptors (TMA on Hopper) exist in triton >= 3.4 (`tl.make_tensor_descriptor`); older
# versions and other vendors take the pointer path.  Checked once, at import, without touching a device.
HAS_TENSOR_DESCRIPTOR = hasattr(tl, "make_tensor_descriptor") and hasattr(triton, "set_allocator")


# The variants every Triton launcher takes: "cublas" (the frozen layer's cuBLAS GEMMs + skinny kernels) and "fused"
# (the Triton GEMM of _gemm.py with the adapter in its prologue / epilogue).
VARIANTS = ("cublas", "fused")


def check_variant(variant: Optional[str]) -> str:
    """`variant` (None: ``"cublas"``), or ``ValueError`` naming the valid ones."""
    v = variant or "cublas"
    if v not in VARIANTS:
        raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
    return v


# ---------------------------------------------------------------------------------------------------------------
# the launch target
# ---------------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class LaunchTarget:
    """The GPU a launch is sized for: block sizes, grids, configuration pruning and the TMA decision read it.

    Launchers take ``target=None`` and resolve it with :func:`launch_target`: the tensors' own CUDA device, or
    ``None`` for CPU tensors in the interpreter (small blocks, so tests run several tiles).  The compile check
    (``.ci/compile_triton.py``) passes an explicit target with ``compile_only=True``: CPU tensors then stand for
    tensors of that GPU, so what it compiles is what a real launch there would use.
    """

    num_sms: int
    smem_per_block: int  # opt-in max dynamic shared memory per block, bytes
    capability_major: int
    compile_only: bool = False


# Assumed for fake CUDA tensors when no GPU exists (the cost model traces H200 shapes on CPU): an H200.
_FAKE_CUDA_TARGET = LaunchTarget(num_sms=132, smem_per_block=227 * 1024, capability_major=9)


@functools.lru_cache(maxsize=None)
def _device_target(index: int) -> LaunchTarget:
    props = torch.cuda.get_device_properties(index)
    smem = int(getattr(props, "shared_memory_per_block_optin", 0) or 48 * 1024)
    return LaunchTarget(props.multi_processor_count, smem, props.major)


def launch_target(device: torch.device, target: Optional[LaunchTarget] = None) -> Optional[LaunchTarget]:
    """`target` when given, else that of a CUDA `device` (the fake H200 without a GPU), else None (interpreter)."""
    if target is not None:
        return target
    if device.type != "cuda":
        return None
    if not torch.cuda.is_available():
        return _FAKE_CUDA_TARGET
    return _device_target(device.index if device.index is not None else torch.cuda.current_device())


def num_sms(tgt: Optional[LaunchTarget]) -> int:
    """Programs a persistent grid launches: the SM count on a GPU, a small number in the interpreter (so the
    persistent tile loop runs more than once per program in tests)."""
    return tgt.num_sms if tgt is not None else 3


def smem_limit(tgt: Optional[LaunchTarget]) -> int:
    """Max dynamic shared memory per block in bytes, minus a reserve for the epilogue's scratch and TMA barriers;
    unlimited in the interpreter."""
    return tgt.smem_per_block - 1024 if tgt is not None else 1 << 30


# The target of the GEMM launch in progress, for the autotuner's prune hook: Triton calls the hook with the kernel's
# arguments only, so the launcher sets it here around the launch (see ``_gemm.gemm``).
_PRUNE_TARGET: contextvars.ContextVar = contextvars.ContextVar("fastpeft_prune_target", default=None)


# ---------------------------------------------------------------------------------------------------------------
# device helpers
# ---------------------------------------------------------------------------------------------------------------


def is_fake(t: torch.Tensor) -> bool:
    """True for tensors without data (meta, or FakeTensor under FakeTensorMode): launchers report their kernels to
    the cost model (``_cost``) and return correctly shaped outputs without launching."""
    if type(t) is torch.Tensor or type(t) is torch.nn.Parameter:  # the launch path's common case, checked cheaply
        return t.is_meta
    if t.is_meta:
        return True
    from torch._subclasses.fake_tensor import FakeTensor
    return isinstance(t, FakeTensor)


def span(t: torch.Tensor) -> int:
    """Bytes of `t`'s elements (what one pass over it moves)."""
    return t.numel() * t.element_size()


def launch_ok(name: str, first: torch.Tensor, *, bytes_read: int, bytes_written: int, flops: int,
              launches: int = 1, fma_flops: int = 0, int_ops: int = 0) -> bool:
    """Report one kernel launch to the cost model (when it records) and say whether to really launch it (not for
    fake / meta tensors).  `flops`: tensor-core (or elementwise) work; `fma_flops`: ieee fp32 dots, which run on the
    CUDA cores (``kernels._tl.dot_flops`` splits a dot's flops); `int_ops`: integer lane instructions (the dropout
    mask's, ``kernels._mask.mask_int_ops``)."""
    if _cost.active():
        _cost.report(name, bytes_read=bytes_read, bytes_written=bytes_written, flops=flops, launches=launches,
                     fma_flops=fma_flops, int_ops=int_ops)
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


def use_tma(a: torch.Tensor, b_view_rowmajor: torch.Tensor | None, target: Optional[LaunchTarget] = None) -> bool:
    """Whether the GEMM kernel reads its A operand and (row-major view of) its B operand with tensor descriptors.
    `b_view_rowmajor` is None when B has no unit-stride dimension (then the pointer path runs)."""
    mode = _tma_env()
    if mode == "0" or not HAS_TENSOR_DESCRIPTOR or b_view_rowmajor is None:
        return False
    if not (_tma_2d_ok(a) and _tma_2d_ok(b_view_rowmajor)):
        return False
    tgt = launch_target(a.device, target)
    if a.device.type == "cuda":
        # auto: NVIDIA Hopper or newer only (ROCm also reports major 9 for gfx94x, which has no TMA engine)
        if mode == "auto" and (torch.version.hip is not None or tgt.capability_major < 9):
            return False
        if not is_fake(a):
            _ensure_allocator()
        return True
    compile_only = tgt is not None and tgt.compile_only
    return mode == "1" and (interpret_mode() or compile_only)


# ---------------------------------------------------------------------------------------------------------------
# block sizes and program counts of the skinny (rank-r and reduction) kernels
# ---------------------------------------------------------------------------------------------------------------


def cdiv(a: int, b: int) -> int:
    """ceil(a / b) of host ints.  The launchers' grid arithmetic uses this, not ``triton.cdiv``: since Triton 3.7
    that is a constexpr function whose host call unwraps its arguments (~1.5 µs a call on this repo's CI machine,
    ~30 calls per LoRA training step)."""
    return -(-a // b)


def split_count(n_blocks_other: int, n_blocks_split: int, target_programs: int) -> int:
    """How many chunks to split a reduction dimension into so that (other blocks) x (chunks) reaches about
    `target_programs`, never more chunks than blocks."""
    want = cdiv(target_programs, max(1, n_blocks_other))
    return max(1, min(n_blocks_split, want))


def target_programs(tgt: Optional[LaunchTarget]) -> int:
    """Programs the skinny kernels aim for: two waves of the SMs (the memory system needs several loads in
    flight per SM), a handful in the interpreter."""
    if _test_shape["programs"] is not None:
        return _test_shape["programs"]
    return 2 * tgt.num_sms if tgt is not None else 4


def skinny_blocks(tgt: Optional[LaunchTarget], dropout: bool = False) -> tuple[int, int, int]:
    """(BLOCK_M, BLOCK_K, num_warps) of the skinny kernels; chosen on the host, not autotuned, because their
    partial-sum buffers are sized from them.  These kernels are memory-bound: the number of programs in flight
    (`target_programs`) matters more than the tile, and a 64x128 tile of a 16-bit operand is a 16 KB load.  With
    dropout the Philox state (4 words per 8 elements, plus the 16-bit lanes being interleaved) must fit in registers
    next to the tile: 64x64 over 8 warps is 16 elements per thread.  Block sizes stay multiples of 8 (the mask's
    Philox groups)."""
    if _test_shape["blocks"] is not None:
        return _test_shape["blocks"]
    if tgt is None:
        return 16, 16, 4
    return (64, 64, 8) if dropout else (64, 128, 4)


def da_blocks(tgt: Optional[LaunchTarget], dropout: bool = False, with_dx: bool = False) -> tuple[int, int, int]:
    """(BLOCK_M, BLOCK_K, num_warps) of the LoRA dA pass (``kernels.lora._lora_da_kernel``).  Every program re-reads
    the dY pass's dSe partials for its rows (n_chunks x BLOCK_M x r fp32 per M block) next to its x tile, so the
    partials' L2 traffic is (K / BLOCK_K) times their size: at q_proj 8192 (11 partials of 512 KiB) 176 MiB with
    128-wide tiles, 352 MiB with dropout's 64-wide ones, against a 64 MiB pass over x.  256-wide tiles halve or
    quarter it at the same HBM traffic and a similar program count (272 at K = 4096, M = 8192); 8 warps with dropout
    (64 x 256 mask bits: 64 per thread).  Chosen by that arithmetic and the compile check's register / shared-memory
    report (``.ci/compile_triton.py``), not timed.  `with_dx`: the pass that also updates dX (the default backward).
    The interpreter and forced test shapes keep ``skinny_blocks``."""
    if _test_shape["blocks"] is not None or tgt is None:
        return skinny_blocks(tgt, dropout)
    if with_dx:
        # the pass also adds the rank-r term into dX: its fp32 product and the dX tile sit beside x's, so 128-wide
        # tiles over 8 warps (32 of each per thread)
        return 64, 128, 8
    return (64, 256, 8) if dropout else (64, 256, 4)


def shrink_expand_blocks(tgt: Optional[LaunchTarget], m: int, n: int, dropout: bool = False
                         ) -> tuple[int, int, int, int, int]:
    """(BLOCK_M, BLOCK_K, BLOCK_N, num_warps, N splits) of the LoRA forward's single launch after the GEMM
    (``kernels.lora._lora_shrink_expand_kernel``: S for a block of rows over all of K, then y += S Bᵀ over its N
    range).  Each program computes S once for its rows, so rows, not K, carry the parallelism: BLOCK_M is the
    largest of 64 / 32 / 16 whose row blocks cover the SMs; where even 16-row blocks do not (M < 16·SMs), the N
    range is split too, and each split re-reads its rows of x (an L2 hit: a row block's splits are adjacent in
    launch order).  BLOCK_K / warps are the skinny kernels' (the shrink's x tile; with dropout fewer warps for a
    16-row tile), BLOCK_N the expand's.  With dropout each split regenerates its rows' mask (the cost model prices
    it: at M = 2048 on an H200, two splits, the mask outweighs the launch's bytes).  In tests
    (``forced_launch_shape``) BLOCK_M is the forced one and the splits fill ``target_programs``."""
    bm, bk, warps = skinny_blocks(tgt, dropout)
    bn = skinny_blocks(tgt)[1]
    n_blocks = cdiv(max(n, 1), bn)
    if _test_shape["blocks"] is None and tgt is not None:
        want = tgt.num_sms
        while bm > 16 and cdiv(m, bm) < want:
            bm //= 2
        if dropout:
            # at least one Philox group (8 elements of a row) per thread: a smaller tile has each call computed by
            # several threads (16 x 64 over 8 warps: 48 integer instructions per element in the sm_90 SASS, 19 at
            # 32 x 64 - kernels._mask.mask_int_ops)
            warps = max(1, min(warps, bm * bk // (8 * 32)))
    else:
        want = target_programs(tgt)
    splits = max(1, min(n_blocks, cdiv(want, cdiv(max(m, 1), bm))))
    nb_per = cdiv(n_blocks, splits)
    return bm, bk, bn, warps, cdiv(n_blocks, nb_per)


# Test hook: force the skinny kernels' block sizes and program target, so that small test shapes get the block-count
# structure of production shapes (several N blocks per dY program, several K blocks per shrink split, splits > 1).
_test_shape: dict = {"blocks": None, "programs": None}


@contextlib.contextmanager
def forced_launch_shape(blocks: tuple[int, int, int] | None = None, programs: int | None = None):
    """Within the block, ``skinny_blocks`` returns `blocks` and ``target_programs`` returns `programs` (tests only)."""
    old = dict(_test_shape)
    _test_shape.update(blocks=blocks, programs=programs)
    clear_launch_plans()
    try:
        yield
    finally:
        _test_shape.update(old)
        clear_launch_plans()


# ---------------------------------------------------------------------------------------------------------------
# launch plans
# ---------------------------------------------------------------------------------------------------------------

# Every launcher's shape arithmetic (block sizes, grids, split counts, precisions, constexpr arguments and the cost
# model's byte / flop report) depends only on shapes, dtypes, flags and the target, so it is computed once per such
# key.  Recomputing it per call cost the LoRA forward's launcher ~19 of its 45 µs of Python and the backward's ~50
# of 87 (this repo's 2-core CI machine, benchmarks/results/cpu-host); on the first GPU run the layer at q_proj
# M = 2048 was host-bound (benchmarks/results/h100-2026-12-06).
_PLAN_CACHES: list = []
PLAN_CACHE_SIZE = 1024  # distinct shapes per launcher (variable sequence lengths); least recently used dropped


class Plan(types.SimpleNamespace):
    """A launcher's memoised launch arithmetic: ``grid``, ``meta`` (the constexpr keyword arguments and
    ``num_warps``), ``report`` (the cost model's byte / flop / integer counts: ``launch_ok``'s keywords) and the
    scalar arguments the launch takes (split counts, the dropout threshold).  Shared between calls: read only."""


def launch_plan(fn):
    """Decorator: memoise a launcher's plan function, ``fn(*hashable key parts) -> plan`` (cleared whenever the
    block-size heuristics change, see ``forced_launch_shape``)."""
    cached = functools.lru_cache(maxsize=PLAN_CACHE_SIZE)(fn)
    _PLAN_CACHES.append(cached)
    return cached


def clear_launch_plans() -> None:
    """Forget every memoised launch plan."""
    for c in _PLAN_CACHES:
        c.cache_clear()
