// Per-element and per-block math of the three ops, shared by every C++/CUDA kernel.
// This is python/gradzip/reference.py written once for host and device. The arithmetic
// is pinned down for bit-exactness: float32, every operation rounded on its own (files
// including this are compiled with -ffp-contract=off / --fmad=false), one correctly
// rounded division per block, round-half-to-even.
#pragma once

#include <cmath>
#include <cstdint>

#include "core/macros.h"

#if defined(__CUDACC__)
#include <cuda_runtime.h>
#endif

namespace gradzip {
namespace core {

// ---- float primitives: explicitly IEEE round-to-nearest, never contracted -----------
GZ_HOST_DEVICE float fmul(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fmul_rn(a, b);
#else
  return a * b;
#endif
}
GZ_HOST_DEVICE float fadd(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fadd_rn(a, b);
#else
  return a + b;
#endif
}
GZ_HOST_DEVICE float fsub(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fsub_rn(a, b);
#else
  return a - b;
#endif
}
GZ_HOST_DEVICE float fdiv(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fdiv_rn(a, b);
#else
  return a / b;
#endif
}
// Round half to even (the default IEEE rounding mode).
GZ_HOST_DEVICE float round_even(float x) {
#if defined(__CUDA_ARCH__)
  return rintf(x);
#else
  return std::nearbyint(x);
#endif
}
GZ_HOST_DEVICE bool is_finite(float x) {
#if defined(__CUDA_ARCH__)
  return isfinite(x);
#else
  return std::isfinite(x);
#endif
}
GZ_HOST_DEVICE uint32_t float_bits(float x) {
#if defined(__CUDA_ARCH__)
  return static_cast<uint32_t>(__float_as_uint(x));
#else
  uint32_t u;
  __builtin_memcpy(&u, &x, 4);
  return u;
#endif
}
// max that propagates NaN (like torch.amax): NaN if either operand is NaN.
GZ_HOST_DEVICE float nan_max(float a, float b) {
  return (a != a || b != b) ? (a != a ? a : b) : (a > b ? a : b);
}

// ---- counter-based random numbers (reference.hash32 / reference.uniform) ------------
// Multipliers of lowbias32, named so that vectorised copies use the same constants.
constexpr uint32_t kLowbiasMul1 = 0x7FEB352Du;
constexpr uint32_t kLowbiasMul2 = 0x846CA68Bu;
// 2^-24: uniform() scales the top 24 bits of the hash by it (exact in float32).
constexpr float kUniformScale = 5.9604644775390625e-08f;

GZ_HOST_DEVICE uint32_t lowbias32(uint32_t x) {
  x ^= x >> 16;
  x *= kLowbiasMul1;
  x ^= x >> 15;
  x *= kLowbiasMul2;
  x ^= x >> 16;
  return x;
}

// Per-seed key, hoisted out of element loops: k1 = lowbias32(seed ^ golden).
GZ_HOST_DEVICE uint32_t seed_key(uint32_t seed) { return lowbias32(seed ^ 0x9E3779B9u); }

// hash32 in two halves, for loops whose indices share their high 32 bits (a block never
// straddles a multiple of 2^32): k2 = hash32_high_key(k1, index >> 32) once per block, then
// hash32_low(k1, k2, uint32(index)) per element. hash32 == hash32_low(k1, hash32_high_key).
GZ_HOST_DEVICE uint32_t hash32_high_key(uint32_t k1, uint32_t hi) { return lowbias32(hi ^ k1); }
GZ_HOST_DEVICE uint32_t hash32_low(uint32_t k1, uint32_t k2, uint32_t lo) {
  return lowbias32(lowbias32(lo ^ k2) + k1);
}

GZ_HOST_DEVICE uint32_t hash32(uint32_t k1, uint64_t index) {
  uint32_t lo = static_cast<uint32_t>(index);
  uint32_t hi = static_cast<uint32_t>(index >> 32);
  uint32_t k2 = lowbias32(hi ^ k1);
  return lowbias32(lowbias32(lo ^ k2) + k1);
}

// Uniform float in [0, 1): top 24 bits of the hash times 2^-24 (exact in float32).
GZ_HOST_DEVICE float uniform(uint32_t k1, uint64_t index) {
  return static_cast<float>(hash32(k1, index) >> 8) * kUniformScale;
}

// ---- dense quantization -------------------------------------------------------------
GZ_HOST_DEVICE int qmax_of(int bits) { return (1 << (bits - 1)) - 1; }

// Per-block parameters of the 8/4/2-bit symmetric absmax quantizer.
struct BlockParams {
  float scale;  // stored in the payload; decode = q * scale
  float inv;    // multiplier for v; 0 when the block's codes are all zero
};

// amax: NaN-propagating max |v| over the block.
GZ_HOST_DEVICE BlockParams absmax_params(float amax, int bits) {
  const float qmax = static_cast<float>(qmax_of(bits));
  BlockParams p;
  if (!is_finite(amax)) {  // inf or NaN: codes 0, scale inf/NaN -> decodes to NaN
    p.scale = fdiv(amax, qmax);
    p.inv = 0.0f;
    return p;
  }
  float inv = fdiv(qmax, amax);
  if (amax == 0.0f || !is_finite(inv)) {  // zero block, or amax so small inv overflows
    p.scale = 0.0f;
    p.inv = 0.0f;
    return p;
  }
  p.scale = fdiv(amax, qmax);
  p.inv = inv;
  return p;
}

// Signed code q in [-qmax, qmax] for one element. u is uniform(seed, i) when stochastic.
GZ_HOST_DEVICE float quantize_value(float v, float inv, float qmax, bool stochastic, float u) {
  if (inv == 0.0f) return 0.0f;
  float t = fmul(v, inv);
  float q = stochastic ? floorf(fadd(t, u)) : round_even(t);
  q = q < -qmax ? -qmax : q;
  q = q > qmax ? qmax : q;
  return q;
}

// Error-feedback update: v - decoded where finite, else keep the old residual.
GZ_HOST_DEVICE float residual_update(float v, float decoded, float old_residual) {
  float r = fsub(v, decoded);
  return is_finite(r) ? r : old_residual;
}

// 1-bit: code 1 where v < 0; decode +-scale.
GZ_HOST_DEVICE uint32_t sign_code(float v) { return v < 0.0f ? 1u : 0u; }
GZ_HOST_DEVICE float sign_decode(uint32_t bit, float scale) { return bit ? -scale : scale; }

// Order key of |v| for top-k (reference.magnitude_key): sign bit cleared; every NaN gets
// the canonical quiet NaN's key 0x7FC00000 (> inf's 0x7F800000), whatever its bits.
constexpr uint32_t kCanonicalNanBits = 0x7FC00000u;
GZ_HOST_DEVICE uint32_t magnitude_key(float v) {
  const uint32_t k = float_bits(v) & 0x7FFFFFFFu;
  return k > 0x7F800000u ? kCanonicalNanBits : k;
}

// Every NaN written into a payload is the canonical quiet NaN (docs/format.md).
GZ_HOST_DEVICE float float_from_bits(uint32_t u) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(u);
#else
  float f;
  __builtin_memcpy(&f, &u, 4);
  return f;
#endif
}
GZ_HOST_DEVICE float canonical_nan(float v) {
  return v != v ? float_from_bits(kCanonicalNanBits) : v;
}
// bfloat16 bits of v, rounded to nearest even; NaN -> the canonical 0x7FC0.
GZ_HOST_DEVICE uint16_t bf16_bits(float v) {
  const uint32_t u = float_bits(v);
  if ((u & 0x7FFFFFFFu) > 0x7F800000u) return 0x7FC0u;
  return static_cast<uint16_t>((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
}

// max |v| of a block from the largest magnitude_key of its elements. The max of keys is
// order-independent (any reduction tree or thread layout gives it) and NaN keys exceed
// inf's, so a block holding a NaN gets a NaN amax: the canonical quiet NaN 0x7FC00000,
// which is what torch's NaN-propagating amax (the reference) returns whatever NaN it saw.
GZ_HOST_DEVICE float amax_from_key(uint32_t max_key) {
  const uint32_t bits = max_key > 0x7F800000u ? 0x7FC00000u : max_key;
#if defined(__CUDA_ARCH__)
  return __uint_as_float(bits);
#else
  float f;
  __builtin_memcpy(&f, &bits, 4);
  return f;
#endif
}

// Sum of |v| over one block in the fixed order of reference.block_abs_sum: 32 lanes, lane j
// adds elements j, j+32, ... in order, then a shuffle-down tree (h = 16, 8, 4, 2, 1).
// Scalar form for host code and tests; vector and warp implementations must match it.
template <typename Load>
GZ_HOST_DEVICE float block_abs_sum(Load load, int64_t len) {
  float lane[32];
  for (int j = 0; j < 32; ++j) lane[j] = j < len ? fabsf(load(j)) : 0.0f;
  for (int64_t s = 32; s < len; s += 32)
    for (int j = 0; j < 32 && s + j < len; ++j) lane[j] = fadd(lane[j], fabsf(load(s + j)));
  for (int h = 16; h >= 1; h >>= 1)
    for (int j = 0; j < h; ++j) lane[j] = fadd(lane[j], lane[j + h]);
  return lane[0];
}

// ---- approximate top-k sampling (reference.sample_positions / approximate_rank) ------
constexpr int64_t kSampleSize = 16384;
constexpr int kSampleShift = 14;
static_assert((int64_t(1) << kSampleShift) == kSampleSize, "kSampleShift: log2(kSampleSize)");

GZ_HOST_DEVICE int64_t sample_count(int64_t n) { return n < kSampleSize ? n : kSampleSize; }

// Stratum j of s is [floor(j*n/s), floor((j+1)*n/s)). Every term is non-negative, so the
// full sample (s == kSampleSize, a power of two) divides by shifting, and a stratum of
// fewer than 2^32 elements (n < 2^46) takes the hash modulo in 32 bits: the same values
// as the plain 64-bit divisions (a fifth of a small top-k call's time on CPU).
GZ_HOST_DEVICE int64_t sample_position(int64_t n, uint32_t k1, int64_t j) {
  const int64_t s = sample_count(n);
  int64_t start, stop;
  if (s == kSampleSize) {
    start = (j * n) >> kSampleShift;
    stop = ((j + 1) * n) >> kSampleShift;
  } else {
    start = j * n / s;
    stop = (j + 1) * n / s;
  }
  const int64_t size = stop - start;
  const uint32_t h = hash32(k1, static_cast<uint64_t>(j));
  if (size <= 0xFFFFFFFFll) return start + static_cast<int64_t>(h % static_cast<uint32_t>(size));
  return start + static_cast<int64_t>(h) % size;
}

GZ_HOST_DEVICE int64_t approximate_rank(int64_t n, int64_t k) {
  const int64_t s = sample_count(n);
  const int64_t r = (5 * k * s + 4 * n - 1) / (4 * n) + 16;
  return r < s ? r : s;
}

}  // namespace core
}  // namespace gradzip
