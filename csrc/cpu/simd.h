// Vector building blocks of the CPU kernels, one struct per instruction set:
// simd::Scalar (portable, one lane), simd::Avx2 (8 lanes) and simd::Avx512 (16 lanes).
//
// Kernels are templates over one of these structs, compiled once per instruction set
// (see GZ_TARGET_BEGIN_* below) and picked at run time by cpu::active_isa(), so a
// distributable build needs no -march flag. Every operation here is an exactly rounded
// IEEE operation or an integer operation, so all three produce the same bits as the scalar
// math of core/quant.h (this file never emits a fused multiply-add).
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstdint>
#include <cstring>

#include "core/quant.h"

#if defined(__x86_64__) || defined(_M_X64)
#define GZ_X86 1
#include <immintrin.h>
#else
#define GZ_X86 0
#endif

#define GZ_INLINE inline __attribute__((always_inline))

// GCC 12 reports its own _mm512_undefined_* helpers as "may be used uninitialized" once
// inlined; the warning is about the intrinsics headers, not this code.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC diagnostic ignored "-Wuninitialized"
#endif

// Regions of code compiled for one instruction set. Everything defined between BEGIN and
// END (the ISA structs and the kernel templates instantiated with them) gets the target;
// code outside stays baseline x86-64. "fma" is deliberately absent.
#if GZ_X86
#if defined(__clang__)
#define GZ_TARGET_BEGIN_AVX2 \
  _Pragma("clang attribute push(__attribute__((target(\"avx2,f16c,popcnt\"))), apply_to = function)")
#define GZ_TARGET_BEGIN_AVX512                                                                 \
  _Pragma("clang attribute push(__attribute__((target(\"avx512f,avx512bw,avx512vl,avx512dq,avx2,f16c,popcnt\"))), apply_to = function)")
#define GZ_TARGET_END _Pragma("clang attribute pop")
#else
#define GZ_TARGET_BEGIN_AVX2 \
  _Pragma("GCC push_options") _Pragma("GCC target(\"avx2,f16c,popcnt\")")
#define GZ_TARGET_BEGIN_AVX512 \
  _Pragma("GCC push_options")  \
  _Pragma("GCC target(\"avx512f,avx512bw,avx512vl,avx512dq,avx2,f16c,popcnt\")")
#define GZ_TARGET_END _Pragma("GCC pop_options")
#endif
#endif

namespace gradzip {
namespace cpu {

// ---- run-time instruction-set choice (isa.cpp) ---------------------------------------
enum class Isa : int { kScalar = 0, kAvx2 = 1, kAvx512 = 2 };

// The instruction set the kernels use: the best one this CPU supports, unless lowered
// by the GRADZIP_CPU_ISA environment variable or gradzip::_cpu_set_isa (for tests).
Isa active_isa();
const char* isa_name(Isa isa);

// Element types of x / out, as template parameters.
enum class Dtype : int { kFloat = 0, kHalf = 1, kBFloat16 = 2 };

// float -> bfloat16 as torch's .to(torch.bfloat16) does it: round to nearest even, and
// every NaN becomes 0xFFFF.
GZ_INLINE uint16_t bf16_bits_from_float(float f) {
  uint32_t u = core::float_bits(f);
  if ((u & 0x7FFFFFFFu) > 0x7F800000u) return 0xFFFFu;
  return static_cast<uint16_t>((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
}
GZ_INLINE float float_from_bf16_bits(uint16_t b) {
  uint32_t u = uint32_t(b) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
GZ_INLINE float to_float(float x) { return x; }
GZ_INLINE float to_float(c10::Half x) { return static_cast<float>(x); }
GZ_INLINE float to_float(c10::BFloat16 x) { return float_from_bf16_bits(x.x); }
GZ_INLINE void from_float(float f, float* p) { *p = f; }
GZ_INLINE void from_float(float f, c10::Half* p) { *p = c10::Half(f); }
GZ_INLINE void from_float(float f, c10::BFloat16* p) {
  p->x = bf16_bits_from_float(f);
}
GZ_INLINE float float_from_bits(uint32_t u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
template <typename T>
GZ_INLINE T load_unaligned(const void* p) {
  T v;
  std::memcpy(&v, p, sizeof(T));
  return v;
}
template <typename T>
GZ_INLINE void store_unaligned(void* p, T v) {
  std::memcpy(p, &v, sizeof(T));
}

// The streaming kernels (quantize_pack, dense dequantize_accumulate) prefetch their input
// streams this many elements ahead of the block they work on, one block's worth per block.
// With the hardware prefetchers alone the memory pipeline idled while a block was computed
// from L1. Measured on the build machine (1 thread, 2^26 float32, block 128, best of 5):
// quantize int8 + EF 59 -> 47 ms on the AVX2 path and 55 -> 51 ms on AVX-512 (every bit width
// gained alike); dequantize_accumulate of 8 int8 payloads 79 -> 69 ms (AVX2) and 77 -> 67 ms
// (AVX-512). 256 to 512 elements ahead were best, 1024 less, 2048 no better than none; the
// non-temporal hint (locality 0) made it slower. Every result is the same: a prefetch is a
// hint and reads nothing into the computation.
constexpr int64_t kPrefetchAhead = 512;

GZ_INLINE void prefetch_bytes(const void* p, int64_t bytes) {
  const char* c = static_cast<const char*>(p);
  for (int64_t o = 0; o < bytes; o += 64) __builtin_prefetch(c + o, 0, 3);
}

namespace simd {

// Bit masks of lanes (bit j = lane j) are returned as uint32_t by every ISA.

// ---- one lane ---------------------------------------------------------------------------
struct Scalar {
  static constexpr int W = 1;
  static constexpr bool lut_decodes(int) { return false; }  // see Avx2::decode_table
  using F = float;
  using I = uint32_t;
  static GZ_INLINE F zero() { return 0.0f; }
  static GZ_INLINE F set1(float a) { return a; }
  static GZ_INLINE I set1i(uint32_t a) { return a; }
  static GZ_INLINE F load(const float* p) { return *p; }
  static GZ_INLINE void store(float* p, F v) { *p = v; }
  // Streaming (non-temporal) store of a full vector at an address aligned to W floats:
  // write-only, no read of the line first, not kept in cache. Callers end with
  // stream_fence(). The scalar form is a plain store.
  static GZ_INLINE void stream(float* p, F v) { *p = v; }
  static GZ_INLINE void stream_fence() {}
  template <typename T>
  static GZ_INLINE F load_x(const T* p) { return to_float(*p); }
  template <typename T>
  static GZ_INLINE void store_x(T* p, F v) { from_float(v, p); }
  static GZ_INLINE F add(F a, F b) { return core::fadd(a, b); }
  static GZ_INLINE F sub(F a, F b) { return core::fsub(a, b); }
  static GZ_INLINE F mul(F a, F b) { return core::fmul(a, b); }
  static GZ_INLINE F neg(F a) { return float_from_bits(core::float_bits(a) ^ 0x80000000u); }
  static GZ_INLINE F abs(F a) { return float_from_bits(core::float_bits(a) & 0x7FFFFFFFu); }
  static GZ_INLINE F round_even(F a) { return core::round_even(a); }
  static GZ_INLINE F floor(F a) { return floorf(a); }
  // quant.h's clamp: q < lo ? lo : q, then q > hi ? hi : q (inputs are never NaN here).
  static GZ_INLINE F clamp(F a, F lo, F hi) {
    a = a < lo ? lo : a;
    return a > hi ? hi : a;
  }
  static GZ_INLINE I key(F v) { return core::magnitude_key(v); }
  // |v|'s bits (sign cleared), NaN payloads kept: the max over a block is > 0x7F800000
  // exactly when the block holds a NaN, which core::amax_from_key makes canonical.
  static GZ_INLINE I abs_bits(F v) { return core::float_bits(v) & 0x7FFFFFFFu; }
  static GZ_INLINE I max_u32(I a, I b) { return a > b ? a : b; }
  static GZ_INLINE uint32_t reduce_max_u32(I a) { return a; }
  static GZ_INLINE I cvt_i32(F a) { return static_cast<uint32_t>(static_cast<int32_t>(a)); }
  static GZ_INLINE F cvt_f32(I a) { return static_cast<float>(static_cast<int32_t>(a)); }
  static GZ_INLINE I add_i(I a, I b) { return a + b; }
  static GZ_INLINE F from_bits(I a) { return float_from_bits(a); }
  static GZ_INLINE I bits(F a) { return core::float_bits(a); }
  static GZ_INLINE uint32_t finite_mask(F a) { return core::is_finite(a) ? 1u : 0u; }
  static GZ_INLINE uint32_t lt_zero_mask(F a) { return a < 0.0f ? 1u : 0u; }
  static GZ_INLINE uint32_t ge_u32_mask(I a, uint32_t t) { return a >= t ? 1u : 0u; }
  static GZ_INLINE uint32_t gt_u32_mask(I a, uint32_t t) { return a > t ? 1u : 0u; }
  static GZ_INLINE uint32_t eq_u32_mask(I a, uint32_t t) { return a == t ? 1u : 0u; }
  static GZ_INLINE F select(uint32_t m, F a, F b) { return m ? a : b; }  // m ? a : b
  // v < 0 ? neg : pos per lane (core::sign_code's test: -0.0 and NaN take pos).
  static GZ_INLINE F sign_select(F v, F neg, F pos) { return v < 0.0f ? neg : pos; }
  // uniform(seed, i) for the W indices lo0 .. lo0 + W - 1 sharing one high word (k2).
  static GZ_INLINE F uniform(uint32_t k1, uint32_t k2, uint32_t lo0) {
    return static_cast<float>(core::hash32_low(k1, k2, lo0) >> 8) * core::kUniformScale;
  }
  // 32 codes (0 .. 2^BITS - 1) -> 32 * BITS / 8 bytes, element j at bit (j*BITS) % 8 of
  // byte (j*BITS) / 8.
  template <int BITS>
  static GZ_INLINE void pack32(const I* c, uint8_t* dst) {
    constexpr int per = 8 / BITS;
    for (int b = 0; b < 32 / per; ++b) {
      uint32_t byte = 0;
      for (int j = 0; j < per; ++j) byte |= c[b * per + j] << (j * BITS);
      dst[b] = static_cast<uint8_t>(byte);
    }
  }
  // Codes of the W elements starting at element e (a multiple of W) of a code section.
  template <int BITS>
  static GZ_INLINE I unpack(const uint8_t* codes, int64_t e) {
    constexpr int per = 8 / BITS;
    return (codes[e / per] >> ((e % per) * BITS)) & ((1u << BITS) - 1u);
  }
  // Sign bits (1 = negative) of the W elements starting at element e of a 1-bit section.
  static GZ_INLINE uint32_t unpack_signs(const uint8_t* codes, int64_t e) {
    return (codes[e >> 3] >> (e & 7)) & 1u;
  }
  // Lanes whose sign bit (from element e on) is set take a, the others b.
  static GZ_INLINE F select_signs(const uint8_t* codes, int64_t e, F a, F b) {
    return select(unpack_signs(codes, e), a, b);
  }
};

}  // namespace simd
}  // namespace cpu
}  // namespace gradzip

#if GZ_X86
GZ_TARGET_BEGIN_AVX2
namespace gradzip {
namespace cpu {
namespace simd {

// ---- AVX2 + F16C: 8 lanes -------------------------------------------------------------
struct Avx2 {
  static constexpr int W = 8;
  // 1- and 2-bit codes decode by table lookup (decode_table / decode_lut): vpermilps picks
  // each lane's value from a 4-entry table by the low 2 bits of its index, so a code needs
  // only a shift to be decoded (no mask, int-to-float conversion, multiply or blend).
  static constexpr bool lut_decodes(int bits) { return bits <= 2; }
  using F = __m256;
  using I = __m256i;
  static GZ_INLINE F zero() { return _mm256_setzero_ps(); }
  static GZ_INLINE F set1(float a) { return _mm256_set1_ps(a); }
  static GZ_INLINE I set1i(uint32_t a) { return _mm256_set1_epi32(static_cast<int>(a)); }
  static GZ_INLINE F load(const float* p) { return _mm256_loadu_ps(p); }
  static GZ_INLINE void store(float* p, F v) { _mm256_storeu_ps(p, v); }
  static GZ_INLINE void stream(float* p, F v) { _mm256_stream_ps(p, v); }
  static GZ_INLINE void stream_fence() { _mm_sfence(); }
  static GZ_INLINE F load_x(const float* p) { return _mm256_loadu_ps(p); }
  static GZ_INLINE F load_x(const c10::Half* p) {
    return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  }
  static GZ_INLINE F load_x(const c10::BFloat16* p) {
    __m256i w = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
    return _mm256_castsi256_ps(_mm256_slli_epi32(w, 16));
  }
  static GZ_INLINE void store_x(float* p, F v) { _mm256_storeu_ps(p, v); }
  static GZ_INLINE void store_x(c10::Half* p, F v) {
    _mm_storeu_si128(reinterpret_cast<__m128i*>(p),
                     _mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
  }
  static GZ_INLINE void store_x(c10::BFloat16* p, F v) {
    __m256i u = _mm256_castps_si256(v);
    __m256i r = _mm256_add_epi32(
        u, _mm256_add_epi32(_mm256_set1_epi32(0x7FFF),
                            _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1))));
    r = _mm256_srli_epi32(r, 16);
    __m256 nan = _mm256_cmp_ps(v, v, _CMP_UNORD_Q);
    r = _mm256_blendv_epi8(r, _mm256_set1_epi32(0xFFFF), _mm256_castps_si256(nan));
    __m128i packed = _mm_packus_epi32(_mm256_castsi256_si128(r), _mm256_extracti128_si256(r, 1));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(p), packed);
  }
  static GZ_INLINE F add(F a, F b) { return _mm256_add_ps(a, b); }
  static GZ_INLINE F sub(F a, F b) { return _mm256_sub_ps(a, b); }
  static GZ_INLINE F mul(F a, F b) { return _mm256_mul_ps(a, b); }
  static GZ_INLINE F neg(F a) { return _mm256_xor_ps(a, _mm256_set1_ps(-0.0f)); }
  static GZ_INLINE F abs(F a) {
    return _mm256_castsi256_ps(
        _mm256_and_si256(_mm256_castps_si256(a), _mm256_set1_epi32(0x7FFFFFFF)));
  }
  static GZ_INLINE F round_even(F a) {
    return _mm256_round_ps(a, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  }
  static GZ_INLINE F floor(F a) {
    return _mm256_round_ps(a, _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC);
  }
  // max then min: for non-NaN input the same as quant.h's two comparisons, -0.0 included.
  static GZ_INLINE F clamp(F a, F lo, F hi) { return _mm256_min_ps(_mm256_max_ps(a, lo), hi); }
  // core::magnitude_key: sign cleared, every NaN mapped to the canonical NaN's key.
  static GZ_INLINE I key(F v) {
    const __m256i k = _mm256_and_si256(_mm256_castps_si256(v), _mm256_set1_epi32(0x7FFFFFFF));
    const __m256i nan = _mm256_cmpgt_epi32(k, _mm256_set1_epi32(0x7F800000));
    return _mm256_blendv_epi8(k, _mm256_set1_epi32(0x7FC00000), nan);
  }
  static GZ_INLINE I abs_bits(F v) {
    return _mm256_and_si256(_mm256_castps_si256(v), _mm256_set1_epi32(0x7FFFFFFF));
  }
  static GZ_INLINE I max_u32(I a, I b) { return _mm256_max_epu32(a, b); }
  static GZ_INLINE uint32_t reduce_max_u32(I a) {
    __m128i m = _mm_max_epu32(_mm256_castsi256_si128(a), _mm256_extracti128_si256(a, 1));
    m = _mm_max_epu32(m, _mm_shuffle_epi32(m, 0x4E));
    m = _mm_max_epu32(m, _mm_shuffle_epi32(m, 0xB1));
    return static_cast<uint32_t>(_mm_cvtsi128_si32(m));
  }
  static GZ_INLINE I cvt_i32(F a) { return _mm256_cvtps_epi32(a); }  // a is integral
  static GZ_INLINE F cvt_f32(I a) { return _mm256_cvtepi32_ps(a); }
  static GZ_INLINE I add_i(I a, I b) { return _mm256_add_epi32(a, b); }
  static GZ_INLINE F from_bits(I a) { return _mm256_castsi256_ps(a); }
  static GZ_INLINE I bits(F a) { return _mm256_castps_si256(a); }
  // Unsigned compares through the sign-flip trick (AVX2 has only signed compares).
  static GZ_INLINE __m256i flip(I a) { return _mm256_xor_si256(a, _mm256_set1_epi32(INT32_MIN)); }
  static GZ_INLINE uint32_t mask_of(__m256i m) {
    return static_cast<uint32_t>(_mm256_movemask_ps(_mm256_castsi256_ps(m)));
  }
  static GZ_INLINE uint32_t finite_mask(F a) {
    // key < 0x7F800000 (both fit in int32, so a signed compare is exact)
    return mask_of(_mm256_cmpgt_epi32(_mm256_set1_epi32(0x7F800000), key(a)));
  }
  static GZ_INLINE uint32_t lt_zero_mask(F a) {
    return static_cast<uint32_t>(
        _mm256_movemask_ps(_mm256_cmp_ps(a, _mm256_setzero_ps(), _CMP_LT_OQ)));
  }
  static GZ_INLINE uint32_t gt_u32_mask(I a, uint32_t t) {
    return mask_of(_mm256_cmpgt_epi32(flip(a), flip(set1i(t))));
  }
  static GZ_INLINE uint32_t eq_u32_mask(I a, uint32_t t) {
    return mask_of(_mm256_cmpeq_epi32(a, set1i(t)));
  }
  static GZ_INLINE uint32_t ge_u32_mask(I a, uint32_t t) {
    return t == 0 ? 0xFFu : gt_u32_mask(a, t - 1);
  }
  static GZ_INLINE __m256i lane_mask(uint32_t m) {
    const __m256i bit = _mm256_setr_epi32(1, 2, 4, 8, 16, 32, 64, 128);
    __m256i v = _mm256_and_si256(_mm256_set1_epi32(static_cast<int>(m)), bit);
    return _mm256_cmpeq_epi32(v, bit);
  }
  static GZ_INLINE F select(uint32_t m, F a, F b) {
    return _mm256_blendv_ps(b, a, _mm256_castsi256_ps(lane_mask(m)));
  }
  static GZ_INLINE F sign_select(F v, F neg, F pos) {
    return _mm256_blendv_ps(pos, neg, _mm256_cmp_ps(v, _mm256_setzero_ps(), _CMP_LT_OQ));
  }
  static GZ_INLINE I lowbias32(I x) {
    x = _mm256_xor_si256(x, _mm256_srli_epi32(x, 16));
    x = _mm256_mullo_epi32(x, _mm256_set1_epi32(static_cast<int>(core::kLowbiasMul1)));
    x = _mm256_xor_si256(x, _mm256_srli_epi32(x, 15));
    x = _mm256_mullo_epi32(x, _mm256_set1_epi32(static_cast<int>(core::kLowbiasMul2)));
    x = _mm256_xor_si256(x, _mm256_srli_epi32(x, 16));
    return x;
  }
  static GZ_INLINE F uniform(uint32_t k1, uint32_t k2, uint32_t lo0) {
    // core::hash32_low for lo0 + lane, then core::uniform's top-24-bits scaling.
    I lo = _mm256_add_epi32(set1i(lo0), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
    I h = lowbias32(_mm256_add_epi32(lowbias32(_mm256_xor_si256(lo, set1i(k2))), set1i(k1)));
    return _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_srli_epi32(h, 8)),
                         _mm256_set1_ps(core::kUniformScale));
  }
  // 32 codes (4 vectors, each < 256) as 32 bytes in element order.
  static GZ_INLINE __m256i codes_to_bytes(const I* c) {
    __m256i ab = _mm256_packs_epi32(c[0], c[1]);
    __m256i cd = _mm256_packs_epi32(c[2], c[3]);
    __m256i abcd = _mm256_packus_epi16(ab, cd);
    return _mm256_permutevar8x32_epi32(abcd, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
  }
  template <int BITS>
  static GZ_INLINE void pack32(const I* c, uint8_t* dst) {
    __m256i b = codes_to_bytes(c);
    if constexpr (BITS == 8) {
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst), b);
    } else if constexpr (BITS == 4) {
      __m256i p = _mm256_maddubs_epi16(b, _mm256_set1_epi16(0x1001));  // b0 + 16 b1
      __m128i o = _mm_packus_epi16(_mm256_castsi256_si128(p), _mm256_extracti128_si256(p, 1));
      _mm_storeu_si128(reinterpret_cast<__m128i*>(dst), o);
    } else {  // 2 bits
      __m256i p = _mm256_maddubs_epi16(b, _mm256_set1_epi16(0x0401));  // b0 + 4 b1
      __m256i d = _mm256_madd_epi16(p, _mm256_set1_epi32(0x00100001));  // p0 + 16 p1
      __m128i w = _mm_packus_epi32(_mm256_castsi256_si128(d), _mm256_extracti128_si256(d, 1));
      _mm_storel_epi64(reinterpret_cast<__m128i*>(dst), _mm_packus_epi16(w, w));
    }
  }
  template <int BITS>
  static GZ_INLINE I unpack(const uint8_t* codes, int64_t e) {
    if constexpr (BITS == 8) {
      return _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(codes + e)));
    } else if constexpr (BITS == 4) {  // 8 codes in 32 bits: broadcast, shift lane j by 4j
      __m256i w = _mm256_set1_epi32(load_unaligned<int32_t>(codes + e / 2));
      w = _mm256_srlv_epi32(w, _mm256_setr_epi32(0, 4, 8, 12, 16, 20, 24, 28));
      return _mm256_and_si256(w, _mm256_set1_epi32(0xF));
    } else {  // 2 bits: 8 codes in 16 bits (in both halves of each lane; shifts < 16)
      __m256i w = _mm256_set1_epi16(load_unaligned<int16_t>(codes + e / 4));
      w = _mm256_srlv_epi32(w, _mm256_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14));
      return _mm256_and_si256(w, _mm256_set1_epi32(3));
    }
  }
  // The decode table of one payload's block, the same 4 entries in each 128-bit half:
  // 1 bit: [s, -s, s, -s] (index bit 0 = the sign bit); 2 bits: (c - 1) * s for c = 0..3,
  // the very products the reference computes (core::fmul of the same operands).
  template <int BITS>
  static GZ_INLINE F decode_table(F s, F ns) {
    if constexpr (BITS == 1) {
      return _mm256_unpacklo_ps(s, ns);
    } else {
      return _mm256_mul_ps(_mm256_setr_ps(-1.0f, 0.0f, 1.0f, 2.0f, -1.0f, 0.0f, 1.0f, 2.0f), s);
    }
  }
  // The 32 bits of codes at byte p, in every lane.
  static GZ_INLINE I broadcast32(const uint8_t* p) {
    return _mm256_set1_epi32(load_unaligned<int32_t>(p));
  }
  // Vector u of the codes in `word` (as broadcast32 loaded them): lane j's code shifted to
  // bit 0 (the bits above it are ignored by the lookup), then looked up.
  template <int BITS, int U>
  static GZ_INLINE F decode_lut(I word, F table) {
    constexpr int b = BITS, o = U * 8 * BITS;
    const __m256i sh = _mm256_setr_epi32(o, o + b, o + 2 * b, o + 3 * b, o + 4 * b, o + 5 * b,
                                         o + 6 * b, o + 7 * b);
    return _mm256_permutevar_ps(table, _mm256_srlv_epi32(word, sh));
  }
  static GZ_INLINE uint32_t unpack_signs(const uint8_t* codes, int64_t e) { return codes[e >> 3]; }
  // Lanes whose sign bit in the 1-bit section (element e on) is set take a, others b: the
  // byte shifted so that lane j's bit lands in the lane's sign bit, which blendv reads.
  static GZ_INLINE F select_signs(const uint8_t* codes, int64_t e, F a, F b) {
    const __m256i w = _mm256_set1_epi32(codes[e >> 3]);
    const __m256i m = _mm256_sllv_epi32(w, _mm256_setr_epi32(31, 30, 29, 28, 27, 26, 25, 24));
    return _mm256_blendv_ps(b, a, _mm256_castsi256_ps(m));
  }
};

}  // namespace simd
}  // namespace cpu
}  // namespace gradzip
GZ_TARGET_END

GZ_TARGET_BEGIN_AVX512
namespace gradzip {
namespace cpu {
namespace simd {

// ---- AVX-512 (F, BW, VL, DQ): 16 lanes --------------------------------------------------
struct Avx512 {
  static constexpr int W = 16;
  // 2-bit codes decode by table lookup as on AVX2 (Avx2::decode_table); 1-bit ones by a
  // mask blend, which AVX-512 does in one instruction.
  static constexpr bool lut_decodes(int bits) { return bits == 2; }
  using F = __m512;
  using I = __m512i;
  static GZ_INLINE F zero() { return _mm512_setzero_ps(); }
  static GZ_INLINE F set1(float a) { return _mm512_set1_ps(a); }
  static GZ_INLINE I set1i(uint32_t a) { return _mm512_set1_epi32(static_cast<int>(a)); }
  static GZ_INLINE F load(const float* p) { return _mm512_loadu_ps(p); }
  static GZ_INLINE void store(float* p, F v) { _mm512_storeu_ps(p, v); }
  static GZ_INLINE void stream(float* p, F v) { _mm512_stream_ps(p, v); }
  static GZ_INLINE void stream_fence() { _mm_sfence(); }
  static GZ_INLINE F load_x(const float* p) { return _mm512_loadu_ps(p); }
  static GZ_INLINE F load_x(const c10::Half* p) {
    return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  }
  static GZ_INLINE F load_x(const c10::BFloat16* p) {
    __m512i w = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
    return _mm512_castsi512_ps(_mm512_slli_epi32(w, 16));
  }
  static GZ_INLINE void store_x(float* p, F v) { _mm512_storeu_ps(p, v); }
  static GZ_INLINE void store_x(c10::Half* p, F v) {
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(p),
                        _mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
  }
  static GZ_INLINE void store_x(c10::BFloat16* p, F v) {
    __m512i u = _mm512_castps_si512(v);
    __m512i r = _mm512_add_epi32(
        u, _mm512_add_epi32(_mm512_set1_epi32(0x7FFF),
                            _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1))));
    r = _mm512_srli_epi32(r, 16);
    __mmask16 nan = _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
    r = _mm512_mask_blend_epi32(nan, r, _mm512_set1_epi32(0xFFFF));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), _mm512_cvtepi32_epi16(r));
  }
  static GZ_INLINE F add(F a, F b) { return _mm512_add_ps(a, b); }
  static GZ_INLINE F sub(F a, F b) { return _mm512_sub_ps(a, b); }
  static GZ_INLINE F mul(F a, F b) { return _mm512_mul_ps(a, b); }
  static GZ_INLINE F neg(F a) {
    return _mm512_castsi512_ps(
        _mm512_xor_si512(_mm512_castps_si512(a), _mm512_set1_epi32(INT32_MIN)));
  }
  static GZ_INLINE F abs(F a) {
    return _mm512_castsi512_ps(
        _mm512_and_si512(_mm512_castps_si512(a), _mm512_set1_epi32(0x7FFFFFFF)));
  }
  static GZ_INLINE F round_even(F a) {
    return _mm512_roundscale_ps(a, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  }
  static GZ_INLINE F floor(F a) {
    return _mm512_roundscale_ps(a, _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC);
  }
  static GZ_INLINE F clamp(F a, F lo, F hi) { return _mm512_min_ps(_mm512_max_ps(a, lo), hi); }
  // core::magnitude_key: sign cleared, every NaN mapped to the canonical NaN's key.
  static GZ_INLINE I key(F v) {
    const __m512i k = _mm512_and_si512(_mm512_castps_si512(v), _mm512_set1_epi32(0x7FFFFFFF));
    const __mmask16 nan = _mm512_cmpgt_epu32_mask(k, _mm512_set1_epi32(0x7F800000));
    return _mm512_mask_mov_epi32(k, nan, _mm512_set1_epi32(0x7FC00000));
  }
  static GZ_INLINE I abs_bits(F v) {
    return _mm512_and_si512(_mm512_castps_si512(v), _mm512_set1_epi32(0x7FFFFFFF));
  }
  static GZ_INLINE I max_u32(I a, I b) { return _mm512_max_epu32(a, b); }
  static GZ_INLINE uint32_t reduce_max_u32(I a) { return _mm512_reduce_max_epu32(a); }
  static GZ_INLINE I cvt_i32(F a) { return _mm512_cvtps_epi32(a); }  // a is integral
  static GZ_INLINE F cvt_f32(I a) { return _mm512_cvtepi32_ps(a); }
  static GZ_INLINE I add_i(I a, I b) { return _mm512_add_epi32(a, b); }
  static GZ_INLINE F from_bits(I a) { return _mm512_castsi512_ps(a); }
  static GZ_INLINE I bits(F a) { return _mm512_castps_si512(a); }
  static GZ_INLINE uint32_t finite_mask(F a) {
    return _mm512_cmplt_epu32_mask(key(a), _mm512_set1_epi32(0x7F800000));
  }
  static GZ_INLINE uint32_t lt_zero_mask(F a) {
    return _mm512_cmp_ps_mask(a, _mm512_setzero_ps(), _CMP_LT_OQ);
  }
  static GZ_INLINE uint32_t ge_u32_mask(I a, uint32_t t) {
    return _mm512_cmpge_epu32_mask(a, set1i(t));
  }
  static GZ_INLINE uint32_t gt_u32_mask(I a, uint32_t t) {
    return _mm512_cmpgt_epu32_mask(a, set1i(t));
  }
  static GZ_INLINE uint32_t eq_u32_mask(I a, uint32_t t) {
    return _mm512_cmpeq_epu32_mask(a, set1i(t));
  }
  static GZ_INLINE F select(uint32_t m, F a, F b) {
    return _mm512_mask_blend_ps(static_cast<__mmask16>(m), b, a);
  }
  static GZ_INLINE F sign_select(F v, F neg, F pos) {
    return _mm512_mask_blend_ps(_mm512_cmp_ps_mask(v, _mm512_setzero_ps(), _CMP_LT_OQ), pos,
                                neg);
  }
  static GZ_INLINE I lowbias32(I x) {
    x = _mm512_xor_si512(x, _mm512_srli_epi32(x, 16));
    x = _mm512_mullo_epi32(x, _mm512_set1_epi32(static_cast<int>(core::kLowbiasMul1)));
    x = _mm512_xor_si512(x, _mm512_srli_epi32(x, 15));
    x = _mm512_mullo_epi32(x, _mm512_set1_epi32(static_cast<int>(core::kLowbiasMul2)));
    x = _mm512_xor_si512(x, _mm512_srli_epi32(x, 16));
    return x;
  }
  static GZ_INLINE F uniform(uint32_t k1, uint32_t k2, uint32_t lo0) {
    I lo = _mm512_add_epi32(
        set1i(lo0), _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15));
    I h = lowbias32(_mm512_add_epi32(lowbias32(_mm512_xor_si512(lo, set1i(k2))), set1i(k1)));
    return _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_srli_epi32(h, 8)),
                         _mm512_set1_ps(core::kUniformScale));
  }
  template <int BITS>
  static GZ_INLINE void pack32(const I* c, uint8_t* dst) {
    if constexpr (BITS == 8) {
      _mm_storeu_si128(reinterpret_cast<__m128i*>(dst), _mm512_cvtepi32_epi8(c[0]));
      _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + 16), _mm512_cvtepi32_epi8(c[1]));
    } else if constexpr (BITS == 4) {
      // In each 64-bit lane: c_even | c_odd << 4 in the low byte.
      for (int g = 0; g < 2; ++g) {
        __m512i y = _mm512_or_si512(c[g], _mm512_srli_epi64(c[g], 28));
        _mm_storel_epi64(reinterpret_cast<__m128i*>(dst + 8 * g), _mm512_cvtepi64_epi8(y));
      }
    } else {  // 2 bits
      __m128i b0 = _mm512_cvtepi32_epi8(c[0]);
      __m128i b1 = _mm512_cvtepi32_epi8(c[1]);
      __m256i b = _mm256_inserti128_si256(_mm256_castsi128_si256(b0), b1, 1);
      __m256i p = _mm256_maddubs_epi16(b, _mm256_set1_epi16(0x0401));
      __m256i d = _mm256_madd_epi16(p, _mm256_set1_epi32(0x00100001));
      _mm_storel_epi64(reinterpret_cast<__m128i*>(dst), _mm256_cvtepi32_epi8(d));
    }
  }
  template <int BITS>
  static GZ_INLINE I unpack(const uint8_t* codes, int64_t e) {
    if constexpr (BITS == 8) {
      return _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(codes + e)));
    } else if constexpr (BITS == 4) {  // 16 codes in 64 bits: lanes 0-7 the low word
      const __m512i q = _mm512_castsi128_si512(
          _mm_loadl_epi64(reinterpret_cast<const __m128i*>(codes + e / 2)));
      const __m512i w = _mm512_permutexvar_epi32(
          _mm512_setr_epi32(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1), q);
      return _mm512_and_si512(
          _mm512_srlv_epi32(w, _mm512_setr_epi32(0, 4, 8, 12, 16, 20, 24, 28, 0, 4, 8, 12, 16,
                                                 20, 24, 28)),
          _mm512_set1_epi32(0xF));
    } else {  // 2 bits: 16 codes in 32 bits
      __m512i w = _mm512_set1_epi32(load_unaligned<int32_t>(codes + e / 4));
      w = _mm512_srlv_epi32(
          w, _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30));
      return _mm512_and_si512(w, _mm512_set1_epi32(3));
    }
  }
  // See Avx2::decode_table (2 bits only here): the 4 entries in each 128-bit quarter.
  template <int BITS>
  static GZ_INLINE F decode_table(F s, F) {
    static_assert(BITS == 2, "AVX-512 looks up 2-bit codes only");
    return _mm512_mul_ps(_mm512_setr_ps(-1.0f, 0.0f, 1.0f, 2.0f, -1.0f, 0.0f, 1.0f, 2.0f,
                                        -1.0f, 0.0f, 1.0f, 2.0f, -1.0f, 0.0f, 1.0f, 2.0f),
                         s);
  }
  static GZ_INLINE I broadcast32(const uint8_t* p) {
    return _mm512_set1_epi32(load_unaligned<int32_t>(p));
  }
  template <int BITS, int U>
  static GZ_INLINE F decode_lut(I word, F table) {
    static_assert(BITS == 2 && U == 0, "16 lanes of 2-bit codes fill one 32-bit word");
    const __m512i sh = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26,
                                         28, 30);
    return _mm512_permutevar_ps(table, _mm512_srlv_epi32(word, sh));
  }
  static GZ_INLINE uint32_t unpack_signs(const uint8_t* codes, int64_t e) {
    return load_unaligned<uint16_t>(codes + (e >> 3));
  }
  static GZ_INLINE F select_signs(const uint8_t* codes, int64_t e, F a, F b) {
    return select(unpack_signs(codes, e), a, b);
  }
};

}  // namespace simd
}  // namespace cpu
}  // namespace gradzip
GZ_TARGET_END
#endif  // GZ_X86
