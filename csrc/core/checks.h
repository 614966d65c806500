// Argument checks shared by the CPU and CUDA operator implementations (host code only).
// They mirror python/gradzip/_checks.py for callers who reach torch.ops.gradzip.* directly;
// TORCH_CHECK_VALUE / TORCH_CHECK_TYPE surface in Python as ValueError / TypeError.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <cstring>
#include <optional>

#include "core/format.h"

namespace gradzip {
namespace checks {

inline void check_float_input(const at::Tensor& x, const char* name) {
  auto dt = x.scalar_type();
  TORCH_CHECK_TYPE(dt == at::kFloat || dt == at::kHalf || dt == at::kBFloat16, name,
                   " must be float32, float16 or bfloat16, got ", dt);
}

inline void check_seed(int64_t seed) {
  TORCH_CHECK_VALUE(seed >= 0 && seed < (int64_t(1) << 32), "seed must be in [0, 2**32), got ",
                    seed);
}

inline void check_residual(const std::optional<at::Tensor>& residual, const at::Tensor& x) {
  if (!residual.has_value()) return;
  const at::Tensor& r = *residual;
  TORCH_CHECK_TYPE(r.scalar_type() == at::kFloat, "residual must be float32, got ",
                   r.scalar_type());
  TORCH_CHECK_VALUE(r.device() == x.device(), "residual is on ", r.device(), " but x is on ",
                    x.device());
  TORCH_CHECK_VALUE(r.numel() == x.numel(), "residual has ", r.numel(), " elements but x has ",
                    x.numel());
  TORCH_CHECK_VALUE(r.is_contiguous(), "residual must be contiguous (it is updated in place)");
}

inline void check_quantize_args(const at::Tensor& x, int64_t bits, int64_t block,
                                const std::optional<at::Tensor>& residual, bool stochastic,
                                int64_t seed) {
  check_float_input(x, "x");
  TORCH_CHECK_VALUE(bits == 1 || bits == 2 || bits == 4 || bits == 8,
                    "bits must be one of (1, 2, 4, 8), got ", bits);
  TORCH_CHECK_VALUE(block >= format::kMinBlock && block <= format::kMaxBlock &&
                        (block & (block - 1)) == 0,
                    "block must be a power of two in [32, 4096], got ", block);
  TORCH_CHECK_VALUE(!(bits == 1 && stochastic),
                    "stochastic rounding is not defined for bits=1 (scaled sign)");
  check_seed(seed);
  check_residual(residual, x);
}

inline void check_topk_args(const at::Tensor& x, int64_t k,
                            const std::optional<at::Tensor>& residual, int64_t value_format,
                            int64_t seed) {
  check_float_input(x, "x");
  TORCH_CHECK_VALUE(k >= 1, "k must be at least 1, got ", k);
  TORCH_CHECK_VALUE(k <= x.numel(), "k=", k, " is larger than the tensor's ", x.numel(),
                    " elements");
  TORCH_CHECK_VALUE(value_format >= format::kValueFp32 && value_format <= format::kValueInt8,
                    "value_format must be 1 (fp32), 2 (bf16) or 3 (int8), got ", value_format);
  check_seed(seed);
  check_residual(residual, x);
}

// Byte range [first, last) that a tensor's elements occupy (empty tensors occupy none).
inline void byte_span(const at::Tensor& t, uintptr_t* first, uintptr_t* last) {
  *first = reinterpret_cast<uintptr_t>(t.data_ptr());
  int64_t extent = t.element_size();
  for (int64_t d = 0; d < t.dim(); ++d) extent += (t.size(d) - 1) * t.stride(d) * t.element_size();
  *last = *first + static_cast<uintptr_t>(extent);
}

// Whether two tensors' elements may share memory: their byte ranges intersect (whatever
// storages they belong to, so two views of one buffer made outside torch count too).
inline bool may_overlap(const at::Tensor& a, const at::Tensor& b) {
  if (a.numel() == 0 || b.numel() == 0) return false;
  uintptr_t a0, a1, b0, b1;
  byte_span(a, &a0, &a1);
  byte_span(b, &b0, &b1);
  return a0 < b1 && b0 < a1;
}

// A caller-owned payload buffer (the `out=` form of quantize_pack / topk_select): a 1-D,
// contiguous uint8 tensor of exactly `bytes` bytes on x's device that shares no memory
// with x or the residual. Mirrors python/gradzip/_checks.py check_payload_out.
inline void check_payload_out(const at::Tensor& out, int64_t bytes, const at::Tensor& x,
                              const std::optional<at::Tensor>& residual) {
  TORCH_CHECK_TYPE(out.scalar_type() == at::kByte, "out must be uint8 (a payload buffer), got ",
                   out.scalar_type());
  TORCH_CHECK_VALUE(out.dim() == 1, "out must be 1-D, got ", out.dim(), " dimensions");
  TORCH_CHECK_VALUE(out.numel() == bytes, "out has ", out.numel(), " bytes but the payload is ",
                    bytes, " bytes");
  TORCH_CHECK_VALUE(out.device() == x.device(), "out is on ", out.device(), " but x is on ",
                    x.device());
  TORCH_CHECK_VALUE(out.is_contiguous(), "out must be contiguous (the payload is written in place)");
  TORCH_CHECK_VALUE(!may_overlap(out, x), "out must not share memory with x");
  TORCH_CHECK_VALUE(!(residual.has_value() && may_overlap(out, *residual)),
                    "out must not share memory with residual");
}

inline void check_accumulate_args(const at::Tensor& payloads, const at::Tensor& out) {
  TORCH_CHECK_TYPE(payloads.scalar_type() == at::kByte, "payloads must be uint8, got ",
                   payloads.scalar_type());
  TORCH_CHECK_VALUE(payloads.dim() == 2, "payloads must be [W, P], got ", payloads.dim(),
                    " dimensions");
  TORCH_CHECK_VALUE(payloads.size(0) >= 1, "dequantize_accumulate needs at least one payload");
  check_float_input(out, "out");
  TORCH_CHECK_VALUE(out.is_contiguous(), "out must be contiguous (it is updated in place)");
  TORCH_CHECK_VALUE(payloads.device() == out.device(), "payloads are on ", payloads.device(),
                    " but out is on ", out.device());
}

// Validates W headers (host memory, row stride `stride` bytes) of payloads of `length`
// bytes each: every header valid, all of one codec, numel equal to out's.
inline format::Header check_headers(const uint8_t* headers, int64_t W, int64_t stride,
                                    int64_t length, int64_t out_numel) {
  TORCH_CHECK_VALUE(length >= format::kHeaderBytes, "truncated payload: ", length,
                    " bytes is shorter than the 64-byte header");
  format::Header first;
  for (int64_t w = 0; w < W; ++w) {
    format::Header h;
    std::memcpy(&h, headers + w * stride, sizeof(h));
    const char* err = format::validate(h, length);
    TORCH_CHECK_VALUE(err == nullptr, "payload ", w, ": ", err);
    if (w == 0) {
      first = h;
    } else {
      TORCH_CHECK_VALUE(format::same_codec(first, h), "payloads of mixed codecs or numels: ",
                        "payload ", w, " differs from payload 0");
    }
  }
  TORCH_CHECK_VALUE(int64_t(first.numel) == out_numel, "out has ", out_numel,
                    " elements but the payloads hold ", first.numel);
  return first;
}

}  // namespace checks
}  // namespace gradzip
