// gradzip::dequantize_accumulate on CPU: out += alpha * sum_w decode(payloads[w]) in one
// pass over out, for dense (quantized) and sparse (top-k) payloads. Bit-identical to
// gradzip.reference.dequantize_accumulate: per element acc = ((0 + d0) + d1) + ... in
// payload order, then out = round(float32(out) + float32(alpha) * acc).
//
// Sparse payloads are summed without atomics: `out` is cut into fixed ranges, each range
// is owned by one task, and each payload's ascending indices for the range are found by
// binary search, so every run and every thread count gives the same bits.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cstring>
#include <type_traits>
#include <vector>

#include "core/checks.h"
#include "core/format.h"
#include "core/quant.h"

#define GZ_KERNEL_IMPL "cpu/dequantize_accumulate_impl.h"
#include "cpu/isa_dispatch.h"

namespace gradzip {
namespace cpu {
namespace {

// Elements of out per sparse task: the fp32 range buffer (64 KiB) stays in L2.
constexpr int64_t kSparseRange = int64_t(1) << 14;
// An overwriting decode into a float32 out of at least this many bytes writes it with
// streaming stores (DenseAccArgs::stream, SparseAccArgs::stream): an out this large does
// not stay in cache for whoever reads it next, and the stores then need no read of each
// line first.
constexpr int64_t kStreamMinBytes = int64_t(4) << 20;

// Whether an overwriting decode of n elements into an out of this dtype streams its stores
// (the dense path also needs aligned vector stores, see DenseAccArgs::stream).
bool streams_out(bool overwrite, Dtype out_dtype, int64_t n) {
  return overwrite && out_dtype == Dtype::kFloat && n * int64_t(sizeof(float)) >= kStreamMinBytes;
}

GZ_INLINE int64_t index_at(const SparseAccArgs& a, const uint8_t* idx, int64_t j) {
  return a.index64 ? load_unaligned<int64_t>(idx + 8 * j)
                   : static_cast<int64_t>(load_unaligned<int32_t>(idx + 4 * j));
}

// First j in [0, k) with idx[j] >= e (indices validated ascending).
int64_t lower_bound_index(const SparseAccArgs& a, const uint8_t* idx, int64_t e) {
  int64_t lo = 0, hi = a.k;
  while (lo < hi) {
    const int64_t mid = lo + (hi - lo) / 2;
    if (index_at(a, idx, mid) < e) lo = mid + 1;
    else hi = mid;
  }
  return lo;
}

// Refuses indices out of [0, n) or not strictly ascending before anything is written,
// so corrupt bytes can neither write out of bounds nor leave `out` half updated.
void validate_sparse_indices(const SparseAccArgs& a) {
  constexpr int64_t kSegment = int64_t(1) << 16;
  const int64_t segs = (a.k + kSegment - 1) / kSegment;
  // Lowest 2 * (payload, segment) task + problem (0 out of range, 1 not ascending), so the
  // message names the first bad payload whatever the thread layout.
  std::atomic<int64_t> first_bad{INT64_MAX};
  at::parallel_for(0, a.W * segs, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t w = t / segs, s = t % segs;
      const uint8_t* idx = a.payloads + w * a.stride + a.indices_offset;
      const int64_t j0 = s * kSegment, j1 = std::min(a.k, j0 + kSegment);
      int64_t prev = j0 > 0 ? index_at(a, idx, j0 - 1) : -1;
      int64_t problem = -1;
      for (int64_t j = j0; j < j1 && problem < 0; ++j) {
        const int64_t e = index_at(a, idx, j);
        if (e < 0 || e >= a.n) problem = 0;
        else if (e <= prev) problem = 1;
        prev = e;
      }
      if (problem >= 0) {
        const int64_t code = 2 * t + problem;
        int64_t cur = first_bad.load();
        while (code < cur && !first_bad.compare_exchange_weak(cur, code)) {
        }
      }
    }
  });
  const int64_t bad = first_bad.load();
  if (bad != INT64_MAX) {
    const int64_t w = (bad / 2) / segs;
    TORCH_CHECK_VALUE(bad % 2 != 0, "payload ", w,
                      ": corrupt gradzip top-k payload: index out of range");
    TORCH_CHECK_VALUE(false, "payload ", w,
                      ": corrupt gradzip top-k payload: indices not strictly ascending");
  }
}

GZ_INLINE float sparse_value(const SparseAccArgs& a, const uint8_t* row, int64_t j, float scale) {
  const uint8_t* vals = row + a.values_offset;
  switch (a.value_format) {
    case format::kValueFp32: return load_unaligned<float>(vals + 4 * j);
    case format::kValueBf16: return float_from_bf16_bits(load_unaligned<uint16_t>(vals + 2 * j));
    default: return core::fmul(static_cast<float>(static_cast<int8_t>(vals[j])), scale);
  }
}

void accumulate_sparse(const SparseAccArgs& a, Isa isa) {
  validate_sparse_indices(a);
  const int64_t nranges = (a.n + kSparseRange - 1) / kSparseRange;
  at::parallel_for(0, nranges, 1, [&](int64_t r0, int64_t r1) {
    std::vector<float> acc(static_cast<size_t>(kSparseRange));
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t e0 = r * kSparseRange, e1 = std::min(a.n, e0 + kSparseRange);
      std::fill(acc.begin(), acc.begin() + (e1 - e0), 0.0f);
      for (int64_t w = 0; w < a.W; ++w) {
        const uint8_t* row = a.payloads + w * a.stride;
        const uint8_t* idx = row + a.indices_offset;
        const float scale =
            a.value_format == format::kValueInt8 ? load_unaligned<float>(row + a.scale_offset) : 0.f;
        for (int64_t j = lower_bound_index(a, idx, e0); j < a.k; ++j) {
          const int64_t e = index_at(a, idx, j);
          if (e >= e1) break;
          float& s = acc[static_cast<size_t>(e - e0)];
          s = core::fadd(s, sparse_value(a, row, j, scale));
        }
      }
      GZ_ISA_CALL(isa, sparse_finish_range, a, acc.data(), e0, e1);
    }
  });
}

// overwrite: out = (+0) + alpha * sum, out never read (what zeroing it first would give,
// in one pass instead of two).
void dequantize_cpu(const at::Tensor& payloads, const at::Tensor& out, double alpha,
                    bool overwrite) {
  checks::check_accumulate_args(payloads, out);
  const at::Tensor rows = payloads.stride(1) == 1 ? payloads : payloads.contiguous();
  const int64_t W = rows.size(0), length = rows.size(1);
  const uint8_t* base = rows.data_ptr<uint8_t>();
  const int64_t stride = rows.stride(0);
  const format::Header h = checks::check_headers(base, W, stride, length, out.numel());
  const int64_t n = static_cast<int64_t>(h.numel);
  const Isa isa = active_isa();
  const float alpha32 = static_cast<float>(alpha);  // the reference's float32(alpha)
  if (n == 0) return;
  if (h.codec == format::kCodecDense) {
    const format::DenseLayout l = format::dense_layout(n, h.bits, h.block);
    DenseAccArgs a;
    a.payloads = base;
    a.stride = stride;
    a.W = W;
    a.n = n;
    a.bits = h.bits;
    a.block = h.block;
    a.scales_offset = l.scales_offset;
    a.codes_offset = l.codes_offset;
    a.out = out.data_ptr();
    a.out_dtype = dtype_of(out);
    a.alpha = alpha32;
    a.overwrite = overwrite;
    a.stream = streams_out(overwrite, a.out_dtype, n) && h.block % 16 == 0 &&
               reinterpret_cast<uintptr_t>(a.out) % 64 == 0;
    const int64_t nb = format::num_blocks(n, h.block);
    const int64_t grain = std::max<int64_t>(1, (int64_t(1) << 16) / h.block);
    at::parallel_for(0, nb, grain, [&](int64_t b0, int64_t b1) {
      std::vector<float> scales(static_cast<size_t>(W));
      GZ_ISA_CALL(isa, dense_accumulate_blocks, a, b0, b1, scales.data());
    });
    return;
  }
  const format::TopkLayout l = format::topk_layout(n, static_cast<int64_t>(h.k), h.value_format);
  SparseAccArgs a;
  a.payloads = base;
  a.stride = stride;
  a.W = W;
  a.n = n;
  a.k = static_cast<int64_t>(h.k);
  a.index64 = h.index_format == format::kIndexInt64;
  a.value_format = h.value_format;
  a.indices_offset = l.indices_offset;
  a.values_offset = l.values_offset;
  a.scale_offset = l.scale_offset;
  a.out = out.data_ptr();
  a.out_dtype = dtype_of(out);
  a.alpha = alpha32;
  a.overwrite = overwrite;
  a.stream = streams_out(overwrite, a.out_dtype, n);
  accumulate_sparse(a, isa);
}

}  // namespace

void dequantize_accumulate_cpu(const at::Tensor& payloads, const at::Tensor& out, double alpha) {
  dequantize_cpu(payloads, out, alpha, /*overwrite=*/false);
}

void dequantize_sum_cpu(const at::Tensor& payloads, const at::Tensor& out, double alpha) {
  dequantize_cpu(payloads, out, alpha, /*overwrite=*/true);
}

}  // namespace cpu
}  // namespace gradzip

TORCH_LIBRARY_IMPL(gradzip, CPU, m) {
  m.impl("dequantize_accumulate", &gradzip::cpu::dequantize_accumulate_cpu);
  m.impl("_dequantize_sum", &gradzip::cpu::dequantize_sum_cpu);
}
