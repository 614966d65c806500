// Unit tests of the header-only core shared by the CPU and CUDA kernels (csrc/core).
// Expectations are independent of the code under test: layouts worked out by hand from
// docs/format.md, IEEE facts, and hash values produced by the Python reference
// (python/gradzip/reference.py), a separate implementation of the same specification.
#include <cmath>
#include <cstdio>
#include <cstring>
#include <limits>
#include <vector>

#include "core/format.h"
#include "core/quant.h"

namespace fmt = gradzip::format;
namespace core = gradzip::core;

static int g_failures = 0;
#define EXPECT(cond)                                                   \
  do {                                                                 \
    if (!(cond)) {                                                     \
      std::printf("FAIL %s:%d: %s\n", __FILE__, __LINE__, #cond);      \
      ++g_failures;                                                    \
    }                                                                  \
  } while (0)

static bool same_bits(float a, float b) { return core::float_bits(a) == core::float_bits(b); }

static void test_layout() {
  // 1000 elements, 4 bits, block 64: 16 scales = 64 bytes; 500 code bytes -> 512.
  auto d = fmt::dense_layout(1000, 4, 64);
  EXPECT(d.scales_offset == 64 && d.codes_offset == 128 && d.total_bytes == 640);
  // 1-bit, 33 elements, block 32: 2 scales (8 -> 16 bytes), 5 code bytes -> 16.
  d = fmt::dense_layout(33, 1, 32);
  EXPECT(d.codes_offset == 80 && d.total_bytes == 96);
  EXPECT(fmt::dense_layout(0, 8, 128).total_bytes == 64);
  // top-k 10 of 1000: int32 indices 40 -> 48 bytes; fp32 values 40 -> 48.
  auto t = fmt::topk_layout(1000, 10, fmt::kValueFp32);
  EXPECT(t.values_offset == 112 && t.scale_offset == -1 && t.total_bytes == 160);
  t = fmt::topk_layout(1000, 10, fmt::kValueInt8);  // 10 -> 16 value bytes, 16 for the scale
  EXPECT(t.scale_offset == 128 && t.total_bytes == 144);
  t = fmt::topk_layout(int64_t(1) << 31, 3, fmt::kValueBf16);  // int64 indices: 24 -> 32
  EXPECT(t.values_offset == 96 && t.total_bytes == 112);
  EXPECT(fmt::index_format_for((int64_t(1) << 31) - 1) == fmt::kIndexInt32);
}

static void test_validate() {
  auto h = fmt::make_dense_header(1000, 4, 64, false);
  EXPECT(fmt::validate(h, 640) == nullptr);
  EXPECT(fmt::validate(h, 639) != nullptr);  // truncated
  EXPECT(fmt::validate(h, 641) != nullptr);  // oversized
  EXPECT(fmt::validate(h, 10) != nullptr);   // shorter than the header
  auto bad = h;
  bad.magic ^= 1;
  EXPECT(fmt::validate(bad, 640) != nullptr);
  bad = h;
  bad.version = 2;
  EXPECT(fmt::validate(bad, 640) != nullptr);
  bad = h;
  bad.bits = 3;
  EXPECT(fmt::validate(bad, 640) != nullptr);
  bad = h;
  bad.block = 48;
  EXPECT(fmt::validate(bad, 640) != nullptr);
  bad = h;
  bad.reserved[5] = 1;
  EXPECT(fmt::validate(bad, 640) != nullptr);
  bad = h;
  bad.numel = 2000;  // the fields now imply 1152 bytes, not 640
  EXPECT(fmt::validate(bad, 640) != nullptr);
  auto t = fmt::make_topk_header(1000, 10, fmt::kValueFp32, false);
  EXPECT(fmt::validate(t, 160) == nullptr);
  auto tb = t;
  tb.k = 0;
  EXPECT(fmt::validate(tb, 160) != nullptr);
  tb = t;
  tb.k = 1001;
  EXPECT(fmt::validate(tb, 160) != nullptr);
  tb = t;
  tb.index_format = fmt::kIndexInt64;
  EXPECT(fmt::validate(tb, 160) != nullptr);
  tb = t;
  tb.value_format = 9;
  EXPECT(fmt::validate(tb, 160) != nullptr);
  EXPECT(fmt::same_codec(h, fmt::make_dense_header(1000, 4, 64, false)));
  EXPECT(!fmt::same_codec(h, fmt::make_dense_header(1000, 4, 128, false)));
  // Byte layout of the first fields (little-endian): magic spells "GZPK".
  unsigned char raw[64];
  std::memcpy(raw, &h, 64);
  EXPECT(std::memcmp(raw, "GZPK", 4) == 0 && raw[4] == 1 && raw[5] == 0 && raw[6] == 1);
}

static void test_hash() {
  // From python: gradzip.reference.hash32(seed, torch.tensor([...])).
  const uint64_t idx[6] = {0, 1, 2, 12345, (uint64_t(1) << 32) + 7, (uint64_t(1) << 40) + 3};
  const uint32_t seeds[3] = {0, 1, 0xDEADBEEFu};
  const uint32_t want[3][6] = {
      {3661557231u, 400195889u, 200551081u, 2153211980u, 4253720598u, 688998535u},
      {2956890094u, 2542518061u, 3248905428u, 2391221123u, 591066183u, 1917913659u},
      {2111179058u, 3906984242u, 951389140u, 1090749015u, 1726978466u, 1732347307u}};
  for (int s = 0; s < 3; ++s)
    for (int i = 0; i < 6; ++i) EXPECT(core::hash32(core::seed_key(seeds[s]), idx[i]) == want[s][i]);
  double sum = 0;
  float lo = 1, hi = 0;
  const uint32_t k1 = core::seed_key(7);
  const int n = 1 << 20;
  for (int i = 0; i < n; ++i) {
    float u = core::uniform(k1, i);
    sum += u;
    lo = u < lo ? u : lo;
    hi = u > hi ? u : hi;
  }
  EXPECT(lo >= 0.0f && hi < 1.0f);
  EXPECT(std::fabs(sum / n - 0.5) < 5.0 * 0.2887 / std::sqrt(double(n)));  // 5 standard errors
}

static void test_rounding() {
  EXPECT(core::round_even(0.5f) == 0.0f && core::round_even(1.5f) == 2.0f);
  EXPECT(core::round_even(2.5f) == 2.0f && core::round_even(-1.5f) == -2.0f);
  EXPECT(same_bits(core::round_even(-0.5f), -0.0f));
  EXPECT(core::quantize_value(200.0f, 1.0f, 127.0f, false, 0.0f) == 127.0f);   // clamp
  EXPECT(core::quantize_value(-200.0f, 1.0f, 127.0f, false, 0.0f) == -127.0f);
  EXPECT(core::quantize_value(0.25f, 1.0f, 7.0f, true, 0.75f) == 1.0f);        // floor(1.0)
  EXPECT(core::quantize_value(0.25f, 1.0f, 7.0f, true, 0.5f) == 0.0f);         // floor(0.75)
  EXPECT(core::quantize_value(5.0f, 0.0f, 7.0f, false, 0.0f) == 0.0f);         // zero block
}

static void test_block_params() {
  const float inf = std::numeric_limits<float>::infinity();
  auto p = core::absmax_params(127.0f, 8);
  EXPECT(p.scale == 1.0f && p.inv == 1.0f);
  p = core::absmax_params(0.0f, 4);
  EXPECT(p.scale == 0.0f && p.inv == 0.0f);
  p = core::absmax_params(inf, 4);
  EXPECT(std::isinf(p.scale) && p.inv == 0.0f);
  p = core::absmax_params(std::nanf(""), 2);
  EXPECT(std::isnan(p.scale) && p.inv == 0.0f);
  p = core::absmax_params(1e-45f, 8);  // 127 / denormal overflows: treated as a zero block
  EXPECT(p.scale == 0.0f && p.inv == 0.0f);
  p = core::absmax_params(3.0f, 2);  // ternary: qmax 1
  EXPECT(p.scale == 3.0f && same_bits(p.inv, 1.0f / 3.0f));
  EXPECT(core::residual_update(1.0f, 0.25f, 9.0f) == 0.75f);
  EXPECT(core::residual_update(inf, 0.0f, 9.0f) == 9.0f);
  EXPECT(core::residual_update(1.0f, std::nanf(""), 9.0f) == 9.0f);
  EXPECT(core::sign_code(-0.0f) == 0u && core::sign_code(-1e-30f) == 1u);
}

static void test_abs_sum() {
  // Integers: every order gives the exact sum.
  std::vector<float> v(4096);
  for (int i = 0; i < 4096; ++i) v[i] = float((i * 7) % 13) - 6.0f;
  double exact = 0;
  for (float x : v) exact += std::fabs(x);
  EXPECT(core::block_abs_sum([&](int64_t i) { return v[i]; }, 4096) == float(exact));
  // Order matters here: 1 + 2^-24 * 32 is 1 + 2^-19 only if the small terms are added
  // to each other first. Lane 0 holds 1.0; lanes 1..31 hold 2^-24 each: the tree adds
  // the small lanes together before they meet lane 0, so they survive.
  std::vector<float> w(32, std::ldexp(1.0f, -24));
  w[0] = 1.0f;
  float tree = core::block_abs_sum([&](int64_t i) { return w[i]; }, 32);
  EXPECT(tree == 1.0f + std::ldexp(1.0f, -24) * 30.0f ||
         tree == 1.0f + std::ldexp(1.0f, -24) * 32.0f);
  float seq = 0.0f;
  for (float x : w) seq += x;  // sequential order loses every small term
  EXPECT(seq == 1.0f && tree > seq);
  // Short block: missing lanes are zeros.
  EXPECT(core::block_abs_sum([&](int64_t i) { return v[i]; }, 5) ==
         std::fabs(v[0]) + std::fabs(v[1]) + std::fabs(v[2]) + std::fabs(v[3]) + std::fabs(v[4]));
}

static void test_topk_helpers() {
  const float inf = std::numeric_limits<float>::infinity();
  EXPECT(core::magnitude_key(std::nanf("")) > core::magnitude_key(inf));
  EXPECT(core::magnitude_key(inf) > core::magnitude_key(3.0f));
  EXPECT(core::magnitude_key(-3.0f) == core::magnitude_key(3.0f));
  EXPECT(core::magnitude_key(2.0f) > core::magnitude_key(1.9999999f));
  const uint32_t k1 = core::seed_key(3);
  for (int64_t n : {int64_t(1), int64_t(100), int64_t(16384), int64_t(1000003)}) {
    int64_t s = core::sample_count(n);
    for (int64_t j = 0; j < s; j += 1 + s / 97) {
      int64_t p = core::sample_position(n, k1, j);
      EXPECT(p >= j * n / s && p < (j + 1) * n / s);
    }
    int64_t r = core::approximate_rank(n, 1);
    EXPECT(r >= 1 && r <= s);
  }
  EXPECT(core::approximate_rank(1 << 24, (1 << 24) / 100) == 205 + 16);  // ceil(1.25*163.84)
}

int main() {
  test_layout();
  test_validate();
  test_hash();
  test_rounding();
  test_block_params();
  test_abs_sum();
  test_topk_helpers();
  if (g_failures) {
    std::printf("%d core check(s) failed\n", g_failures);
    return 1;
  }
  std::printf("all core checks passed\n");
  return 0;
}
