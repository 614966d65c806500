// Bit-level float helpers that make a GPU reproduce the reference (run on an x86 CPU)
// bit for bit where IEEE 754 leaves the result open.
//
// * Payloads hold only the canonical NaN (docs/format.md); core::canonical_nan and
//   core::bf16_bits (csrc/core/quant.h) give it. absmax_params_exact below is
//   core::absmax_params with that rule applied to the scale, since a GPU's division of a
//   NaN returns 0x7FFFFFFF.
// * Outside payloads (accumulate's `out`), the kernels match x86 too: there an arithmetic
//   result that is NaN carries the payload of its first NaN operand (quietened) and an
//   invalid operation (inf - inf, 0 * inf) gives 0xFFC00000, where NVIDIA GPUs return
//   0x7FFFFFFF for every NaN result. The nan_* operations rebuild x86's result from the
//   native one; on an x86 host they are the identity.
// * 16-bit conversions as torch does them on the CPU: float32 -> bfloat16 rounds to nearest
//   even and turns every NaN into 0xFFFF; float32 <-> float16 follows the F16C
//   instructions (round to nearest even; a NaN keeps its sign and the top of its payload,
//   quietened). Measured with torch 2.x on x86-64; tests/test_cuda_build.py checks them.
#pragma once

#include <cstdint>

#include "core/macros.h"
#include "core/quant.h"

namespace gradzip {
namespace core {

constexpr uint32_t kQuietBit = 0x00400000u;
constexpr uint32_t kX86DefaultNan = 0xFFC00000u;  // x86 result of an invalid operation

GZ_HOST_DEVICE float bits_float(uint32_t u) { return float_from_bits(u); }

GZ_HOST_DEVICE bool is_nan_bits(uint32_t u) { return (u & 0x7FFFFFFFu) > 0x7F800000u; }

// |x| and -x by their sign bit, as torch.abs and unary minus do on x86 (the PTX abs/neg
// instructions leave NaN bits unspecified).
GZ_HOST_DEVICE float abs_bits(float x) { return bits_float(float_bits(x) & 0x7FFFFFFFu); }
GZ_HOST_DEVICE float neg_bits(float x) { return bits_float(float_bits(x) ^ 0x80000000u); }

// The x86 SSE/AVX NaN rule applied to a native result r = a (op) b: a NaN first operand
// wins, then a NaN second operand, both quietened; a NaN produced from non-NaN operands is
// the default NaN. Otherwise r itself.
GZ_HOST_DEVICE float x86_nan_result(float a, float b, float r) {
  const uint32_t ua = float_bits(a), ub = float_bits(b), ur = float_bits(r);
  if (is_nan_bits(ua)) return bits_float(ua | kQuietBit);
  if (is_nan_bits(ub)) return bits_float(ub | kQuietBit);
  if (is_nan_bits(ur)) return bits_float(kX86DefaultNan);
  return r;
}

GZ_HOST_DEVICE float nan_fadd(float a, float b) { return x86_nan_result(a, b, fadd(a, b)); }
GZ_HOST_DEVICE float nan_fsub(float a, float b) { return x86_nan_result(a, b, fsub(a, b)); }
GZ_HOST_DEVICE float nan_fmul(float a, float b) { return x86_nan_result(a, b, fmul(a, b)); }
GZ_HOST_DEVICE float nan_fdiv(float a, float b) { return x86_nan_result(a, b, fdiv(a, b)); }

// absmax_params with the payload's NaN rule: a block holding a NaN stores the canonical
// NaN as its scale (on x86, canonical amax / qmax already is; a GPU would give 0x7FFFFFFF).
GZ_HOST_DEVICE BlockParams absmax_params_exact(float amax, int bits) {
  BlockParams p = absmax_params(amax, bits);
  p.scale = canonical_nan(p.scale);
  return p;
}

// ---- 16-bit floats, as raw bits -----------------------------------------------------
GZ_HOST_DEVICE float bf16_bits_to_float(uint16_t h) { return bits_float(uint32_t(h) << 16); }

// torch's float32 -> bfloat16 conversion (for accumulate's `out`; payloads use bf16_bits).
GZ_HOST_DEVICE uint16_t float_to_bf16_bits(float f) {
  const uint32_t u = float_bits(f);
  if (is_nan_bits(u)) return 0xFFFFu;
  // Round to nearest even on the 16 dropped bits; a carry into the exponent is correct
  // (it rounds up to the next binade, or to inf past the largest finite bfloat16).
  return static_cast<uint16_t>((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
}

GZ_HOST_DEVICE float half_bits_to_float(uint16_t h) {
  const uint32_t sign = uint32_t(h & 0x8000u) << 16;
  const uint32_t exp = (h >> 10) & 0x1Fu;
  const uint32_t mant = h & 0x3FFu;
  if (exp == 0x1Fu)  // inf, or NaN quietened with its payload moved to the top
    return bits_float(sign | 0x7F800000u | (mant << 13) | (mant ? kQuietBit : 0u));
  if (exp == 0) {  // zero or subnormal: mant * 2^-24, exact in float32
    return bits_float(sign | float_bits(fmul(static_cast<float>(mant), 5.9604644775390625e-08f)));
  }
  return bits_float(sign | ((exp + 112u) << 23) | (mant << 13));
}

GZ_HOST_DEVICE uint16_t float_to_half_bits(float f) {
  const uint32_t u = float_bits(f);
  const uint32_t sign = (u >> 16) & 0x8000u;
  const uint32_t a = u & 0x7FFFFFFFu;
  uint32_t h;
  if (a > 0x7F800000u) {  // NaN: quiet, top 10 payload bits
    h = 0x7E00u | ((a >> 13) & 0x3FFu);
  } else if (a >= 0x47800000u) {  // >= 65536 (or inf): inf
    h = 0x7C00u;
  } else if (a < 0x38800000u) {
    // Below 2^-14 the result is subnormal (or zero): adding 0.5 lines the float16 ulp
    // (2^-24) up with float32's last mantissa bit at exponent -1, so the hardware add
    // rounds to nearest even for us; the low mantissa bits are then the float16 bits.
    const float shifted = fadd(bits_float(a), 0.5f);
    h = float_bits(shifted) - 0x3F000000u;
  } else {
    // Normal: rebias the exponent (127 -> 15) and round the 13 dropped bits to nearest
    // even; a carry into the exponent is correct (65520 and above round to inf).
    const uint32_t odd = (a >> 13) & 1u;
    h = (a - 0x38000000u + 0x0FFFu + odd) >> 13;
  }
  return static_cast<uint16_t>(sign | h);
}

}  // namespace core
}  // namespace gradzip
