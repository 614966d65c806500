// Arguments of the CPU kernels and their per-instruction-set entry points. Each op file
// (quantize_pack.cpp, topk_select.cpp, dequantize_accumulate.cpp) compiles its kernel
// template once per instruction set into namespaces scalar / avx2 / avx512 and calls the
// one cpu::active_isa() names, both through cpu/isa_dispatch.h.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <vector>

#include "cpu/simd.h"

namespace gradzip {
namespace cpu {

inline Dtype dtype_of(const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kFloat: return Dtype::kFloat;
    case at::kHalf: return Dtype::kHalf;
    default: return Dtype::kBFloat16;
  }
}

// ---- quantize_pack --------------------------------------------------------------------
struct QuantizeArgs {
  const void* x;      // n elements of x_dtype, contiguous
  Dtype x_dtype;
  float* residual;    // n floats, or nullptr
  int64_t n;
  int bits;
  int64_t block;
  bool stochastic;
  uint32_t k1;        // core::seed_key(seed)
  uint8_t* scales;    // nblocks floats, little-endian (any alignment: out= buffers)
  uint8_t* codes;     // code section
};

// ---- topk_select ----------------------------------------------------------------------
// The flat tensor is cut into chunks of kTopkChunk elements; per-chunk work is independent
// so that any thread layout gives the same result.
constexpr int64_t kTopkChunk = int64_t(1) << 16;

struct TopkArgs {
  const void* x;
  Dtype x_dtype;
  float* residual;  // nullptr without error feedback
  int64_t n;
  // x already holds v (float32), materialised after a fused scan; residual then holds the
  // old residual wherever the write pass may still need it (see topk_select.cpp).
  bool v_given = false;
};

// How a pass reads v: x alone, x + residual (error feedback), or x holding v with the
// residual read only for its update (TopkArgs::v_given).
constexpr int kTopkPlain = 0, kTopkEf = 1, kTopkVGiven = 2;

// |v| >= 2**127 (and every non-finite v): the scan keeps these in its entry list even
// below the threshold, so that no residual it overwrote is ever needed again (see
// topk_select.cpp, "fused scan").
constexpr uint32_t kTopkHugeKey = 0x7F000000u;

// One entry the scan keeps: its offset in the chunk and v.
struct TopkEntry {
  uint32_t off;
  float v;
};

// One level of the radix select over 31-bit magnitude keys: counts keys whose bits above
// `prefix_shift` equal `prefix` (all keys when prefix_shift is 32), binned by
// (key >> shift) & mask.
struct RadixLevel {
  int shift;
  uint32_t mask;
  int prefix_shift;
  uint32_t prefix;
  GZ_INLINE bool matches(uint32_t key) const {
    return prefix_shift >= 32 || (key >> prefix_shift) == prefix;
  }
  GZ_INLINE uint32_t bin(uint32_t key) const { return (key >> shift) & mask; }
};

// What the final pass selects in each chunk.
struct TopkSelectRule {
  // Mode kThreshold: key > T, or key == T while the chunk's tie budget lasts.
  // Mode kFill: index < fill_end, or key >= t.
  enum Mode { kThreshold, kFill } mode;
  uint32_t T;     // kThreshold: the k-th largest key; kFill: t
  int64_t fill_end;
};

struct TopkOutput {
  uint8_t* indices;  // int32 or int64 little-endian
  bool index64;
  uint8_t* values;
  int value_format;  // format::kValue*
  float int8_inv;    // int8 values: core::absmax_params(amax, 8)
  float int8_scale;
};

// ---- dequantize_accumulate ------------------------------------------------------------
struct DenseAccArgs {
  const uint8_t* payloads;  // W rows
  int64_t stride;           // bytes between rows
  int64_t W;
  int64_t n;
  int bits;
  int64_t block;
  int64_t scales_offset, codes_offset;
  void* out;
  Dtype out_dtype;
  float alpha;
  bool overwrite = false;  // out = (+0) + alpha * sum: out is written, never read
  // overwrite of a large float32 out whose base is 64-byte aligned (blocks are powers of
  // two >= 32): every vector store is aligned, so they can be streaming stores
  bool stream = false;
};

struct SparseAccArgs {
  const uint8_t* payloads;
  int64_t stride;
  int64_t W;
  int64_t n;
  int64_t k;
  bool index64;
  int value_format;
  int64_t indices_offset, values_offset, scale_offset;
  void* out;
  Dtype out_dtype;
  float alpha;
  bool overwrite = false;  // as DenseAccArgs::overwrite
  // overwrite of a large float32 out: streaming stores (see kStreamMinBytes)
  bool stream = false;
};

#define GZ_DECLARE_CPU_KERNELS(NS)                                                          \
  namespace NS {                                                                          \
  void quantize_blocks(const QuantizeArgs& a, int64_t b0, int64_t b1);                    \
  void topk_scan_chunk(const TopkArgs& a, int64_t c, uint32_t t, uint32_t keep,           \
                       TopkEntry* entries, bool write_residual, int64_t* nentries,          \
                       int64_t* count, uint32_t* max_key);                                \
  void topk_write_entries(const TopkArgs& a, int64_t c, const TopkEntry* entries,           \
                          int64_t nentries, const TopkSelectRule& rule, int64_t tie_budget, \
                          int64_t out_pos, const TopkOutput& o);                           \
  void topk_histogram_chunk(const TopkArgs& a, int64_t c, const RadixLevel& level,         \
                            uint32_t* hist);                                               \
  void topk_count_chunk(const TopkArgs& a, int64_t c, uint32_t T, int64_t* gt, int64_t* eq); \
  void topk_write_chunk(const TopkArgs& a, int64_t c, const TopkSelectRule& rule,           \
                        int64_t tie_budget, int64_t out_pos, const TopkOutput& o);         \
  void dense_accumulate_blocks(const DenseAccArgs& a, int64_t b0, int64_t b1, float* scales); \
  void sparse_finish_range(const SparseAccArgs& a, const float* acc, int64_t e0, int64_t e1); \
  }

GZ_DECLARE_CPU_KERNELS(scalar)
#if GZ_X86
GZ_DECLARE_CPU_KERNELS(avx2)
GZ_DECLARE_CPU_KERNELS(avx512)
#endif

}  // namespace cpu
}  // namespace gradzip
