// Host-side launch planning shared by the launchers and the host test (tests/test_cuda_ext.py compiles this header
// with g++): tile sizes, the 16-byte vector-path check, and the split of a reduction into per-block partials.
// Plain C++, no CUDA headers.
#pragma once

#include <stdint.h>

#include <cstdio>
#include <string>

namespace fastpeft {
namespace plan {

// Every kernel gives a lane 8 consecutive columns of a row: one Philox call's keep bits (common/philox.cuh), one
// 16-byte load of a 16-bit type (two of fp32).  A warp step covers kTileK = 256 consecutive columns.
constexpr int kG = 8;
constexpr int kTileK = 32 * kG;
constexpr int kRT = 16;  // adapter ranks per block (more ranks: more blocks along grid.y)

// rowdot: 8 warps x 4 rows per block; split-K in multiples of kTileK, at least kRowdotMinK columns per split.
constexpr int kRowdotWarps = 8;
constexpr int kRowdotRPW = 4;
constexpr int kRowdotRows = kRowdotWarps * kRowdotRPW;
constexpr int64_t kRowdotMinK = 1024;
// coldot: 4 warps per block share 256 columns and split the block's rows; split-M in multiples of kColRows.
constexpr int kColWarps = 4;
constexpr int kColRows = 32;  // rows of P staged in shared memory per step
constexpr int64_t kColMinM = 128;
// expand: 8 warps x 8 rows per block, 256 columns.
constexpr int kExpWarps = 8;
constexpr int kExpRPW = 8;
constexpr int kExpRows = kExpWarps * kExpRPW;
// IA3: the scale kernel's rows per block; the backward's 8 warps share 256 columns and split the rows.
constexpr int kScaleRows = 8;
constexpr int kIa3Warps = 8;
constexpr int64_t kIa3MinM = 64;
// Most partial slices a reduction is split into (bounds the fp32 workspace to kMaxSplits x the output).
constexpr int64_t kMaxSplits = 32;

inline int64_t cdiv(int64_t a, int64_t b) { return (a + b - 1) / b; }
inline int64_t imax(int64_t a, int64_t b) { return a > b ? a : b; }
inline int64_t imin(int64_t a, int64_t b) { return a < b ? a : b; }

// The 16-byte vector path is taken for a (rows x columns) operand when its base and every row start are 16-byte
// aligned: the base address, and the row stride `ld` (elements of `esize` bytes) times esize.  A lane's group of 8
// columns starts at a multiple of 8 elements, hence at a multiple of 16 bytes from its row start for esize >= 2.
// nullptr never takes it.
inline bool vec16(const void* p, int64_t ld, int esize) {
  return p != nullptr && reinterpret_cast<uintptr_t>(p) % 16u == 0u && (ld * esize) % 16 == 0;
}

// A reduction over `len` rows (or columns) cut into `splits` chunks of `chunk` (a multiple of `quantum`): about
// `target_blocks` blocks when each chunk has `other_blocks` blocks, no chunk shorter than `min_chunk` unless one
// chunk covers everything, at most kMaxSplits.  Invariants (checked by the host test): splits >= 1,
// chunk % quantum == 0, (splits - 1) * chunk < len <= splits * chunk (no empty chunk).
struct Split {
  int64_t splits;
  int64_t chunk;
};

inline Split split_reduction(int64_t len, int64_t quantum, int64_t min_chunk, int64_t other_blocks,
                             int64_t target_blocks) {
  if (len <= 0) return {1, quantum};
  int64_t want = imax(1, cdiv(target_blocks, imax(1, other_blocks)));
  want = imin(want, imax(1, len / imax(1, min_chunk)));
  want = imin(want, kMaxSplits);
  const int64_t chunk = cdiv(cdiv(len, want), quantum) * quantum;
  return {cdiv(len, chunk), chunk};
}

// The splits of each kernel, from the problem and the SM count (the workspace is splits x output when splits > 1).
inline Split rowdot_split(int64_t M, int64_t K, int r, int num_sms) {
  const int64_t blocks = cdiv(M, kRowdotRows) * cdiv(r, kRT);
  return split_reduction(K, kTileK, kRowdotMinK, blocks, 4LL * imax(1, num_sms));
}

// The coldot's partials are splits x C x r fp32 against M x C elements of X read: ~2 blocks per SM (its blocks are
// register-heavy, 3 fit) keeps them at splits * r * 4 / (M * esize) of that pass (1/16 at M = 8192, r = 16, bf16).
inline Split coldot_split(int64_t M, int64_t C, int r, int num_sms) {
  const int64_t blocks = cdiv(C, kTileK) * cdiv(r, kRT);
  return split_reduction(M, kColRows, kColMinM, blocks, 2LL * imax(1, num_sms));
}

inline Split ia3_bwd_split(int64_t M, int64_t C, int num_sms) {
  return split_reduction(M, kIa3Warps, kIa3MinM, cdiv(C, kTileK), 4LL * imax(1, num_sms));
}

// fp32 workspace (elements) a launcher needs for `out_elems` outputs split `s` ways: none when one split writes the
// output directly.
inline int64_t workspace_elems(const Split& s, int64_t out_elems) { return s.splits > 1 ? s.splits * out_elems : 0; }

// Largest power of two up to 256 dividing the address: the alignment cuBLASLt's heuristic is told about
// (it assumes 256 otherwise, and views at an offset are less aligned).
inline uint32_t ptr_alignment(const void* p) {
  const uintptr_t a = reinterpret_cast<uintptr_t>(p);
  uint32_t al = 256;
  while (al > 1 && (a % al) != 0) al >>= 1;
  return al;
}

// Key of a cached cuBLASLt plan (common/cublaslt.cpp): every input of the descriptors, layouts, preference and
// heuristic choice, none of the pointers themselves (only their alignments).  Fields are decimal and separated, so
// distinct problems get distinct keys.
struct GemmKey {
  int device;
  bool transa, transb;
  int64_t m, n, k, lda, ldb, ldd;
  int dtype;
  uint32_t al_a, al_b, al_d, al_bias;  // al_bias 0: no bias epilogue
  bool alpha_vec;                      // per-row alpha vector (device pointer mode)
  bool beta_nonzero;
  uint64_t workspace;
};

inline std::string gemm_key(const GemmKey& g) {
  char buf[400];
  std::snprintf(buf, sizeof(buf), "%d|%d,%d|%lld,%lld,%lld|%lld,%lld,%lld|%d|%u,%u,%u,%u|%d,%d|%llu", g.device,
                g.transa ? 1 : 0, g.transb ? 1 : 0, static_cast<long long>(g.m), static_cast<long long>(g.n),
                static_cast<long long>(g.k), static_cast<long long>(g.lda), static_cast<long long>(g.ldb),
                static_cast<long long>(g.ldd), g.dtype, g.al_a, g.al_b, g.al_d, g.al_bias, g.alpha_vec ? 1 : 0,
                g.beta_nonzero ? 1 : 0, static_cast<unsigned long long>(g.workspace));
  return std::string(buf);
}

}  // namespace plan
}  // namespace fastpeft
