// quantize_pack kernel body. No include guard on purpose: cpu/isa_dispatch.h includes this
// file once per instruction set, inside namespace gradzip::cpu::<isa> with `V` naming
// that set's simd struct and with the matching target attributes in force.
//
// One pass over memory per block: pass 1 reads x (+ residual) once into `vbuf` (the block,
// at most 16 KiB, stays in L1) while reducing max |v| (or the 32-lane |v| sums for 1 bit);
// pass 2 quantizes from vbuf, packs the codes and writes the residual.
//
// Pass 2 has a fast form for the usual block, whose largest |v| (or 1-bit |v| sum) is below
// 2^126: there |v| < 2^126 and every decoded value is at most 2^126 (1 + 2^-22) in
// magnitude, so v - decode is always finite and the residual is stored without the
// non-finite test (or a reload of the old residual) that core::residual_update makes.
// Either form gives the same bits; the test stays for blocks near the float32 range.
constexpr uint32_t kSafeKey = 0x7E800000u;  // bits of 2^126


// Packs `count` (< 32) trailing codes; the last byte's unused high bits are zero.
template <int BITS>
GZ_INLINE void pack_tail(const uint32_t* codes, int64_t count, uint8_t* dst) {
  constexpr int per = 8 / BITS;
  for (int64_t b = 0; b * per < count; ++b) {
    uint32_t byte = 0;
    for (int j = 0; j < per && b * per + j < count; ++j) byte |= codes[b * per + j] << (j * BITS);
    dst[b] = static_cast<uint8_t>(byte);
  }
}

template <typename XT, int BITS, bool EF, bool STOCH>
void quantize_blocks_t(const QuantizeArgs& a, int64_t b0, int64_t b1) {
  constexpr int W = V::W;
  using F = typename V::F;
  using I = typename V::I;
  alignas(64) float vbuf[format::kMaxBlock];
  const XT* x = static_cast<const XT*>(a.x);
  const int64_t block = a.block;
  for (int64_t b = b0; b < b1; ++b) {
    const int64_t start = b * block;
    const int64_t len = a.n - start < block ? a.n - start : block;
    const XT* xb = x + start;
    float* rb = EF ? a.residual + start : nullptr;
    uint8_t* cb = a.codes + start * BITS / 8;  // blocks start on byte boundaries (block >= 32)
    const int64_t nvec = len / W * W;
    const int64_t n32 = len & ~int64_t(31);
    if (start + kPrefetchAhead + len <= a.n) {
      prefetch_bytes(xb + kPrefetchAhead, len * int64_t(sizeof(XT)));
      if constexpr (EF) prefetch_bytes(rb + kPrefetchAhead, len * 4);
    }

    if constexpr (BITS == 1) {
      // ---- scaled sign: scale = block_abs_sum(v) / len in quant.h's 32-lane order -------
      F acc[32 / W];
      for (int g = 0; g < 32 / W; ++g) acc[g] = V::zero();
      for (int64_t i = 0; i < n32; i += 32) {
        for (int g = 0; g < 32 / W; ++g) {
          const int64_t off = i + g * W;
          F v = V::load_x(xb + off);
          if constexpr (EF) v = V::add(v, V::load(rb + off));
          V::store(vbuf + off, v);
          acc[g] = V::add(acc[g], V::abs(v));
        }
      }
      alignas(64) float lane[32];
      for (int g = 0; g < 32 / W; ++g) V::store(lane + g * W, acc[g]);
      // Lanes past a short block's end add nothing (+0.0), as in the reference's padding.
      for (int64_t i = n32; i < len; ++i) {
        float v = to_float(xb[i]);
        if constexpr (EF) v = core::fadd(v, rb[i]);
        vbuf[i] = v;
        lane[i - n32] = core::fadd(lane[i - n32], fabsf(v));
      }
      for (int h = 16; h >= 1; h >>= 1)
        for (int j = 0; j < h; ++j) lane[j] = core::fadd(lane[j], lane[j + h]);
      const float scale = core::fdiv(lane[0], static_cast<float>(len));
      store_unaligned<float>(a.scales + 4 * b, core::canonical_nan(scale));  // canonical NaN
      const F fs = V::set1(scale), fns = V::set1(core::sign_decode(1u, scale));
      // Every |v| <= the sum (a sum of terms >= 0 rounds to at least each term), and the
      // scale <= the sum: below 2^126 no residual can overflow (NaN fails the test).
      const bool safe = lane[0] < float_from_bits(kSafeKey);
      auto signs = [&](auto safe_tag) {
        constexpr bool SAFE = decltype(safe_tag)::value;
        for (int64_t i = 0; i < n32; i += 32) {
          uint32_t word = 0;
          for (int g = 0; g < 32 / W; ++g) {
            const int64_t off = i + g * W;
            F v = V::load(vbuf + off);
            uint32_t m = V::lt_zero_mask(v);
            word |= m << (g * W);
            if constexpr (EF) {
              F rn = V::sub(v, V::sign_select(v, fns, fs));
              if constexpr (SAFE) V::store(rb + off, rn);
              else V::store(rb + off, V::select(V::finite_mask(rn), rn, V::load(rb + off)));
            }
          }
          store_unaligned<uint32_t>(cb + i / 8, word);
        }
      };
      if (safe) signs(std::true_type{});
      else signs(std::false_type{});
      uint32_t tail[32];
      for (int64_t i = n32; i < len; ++i) {
        const uint32_t bit = core::sign_code(vbuf[i]);
        tail[i - n32] = bit;
        if constexpr (EF) rb[i] = core::residual_update(vbuf[i], core::sign_decode(bit, scale), rb[i]);
      }
      pack_tail<1>(tail, len - n32, cb + n32 / 8);
    } else {
      // ---- symmetric absmax ---------------------------------------------------------------
      // max |v| as the max of the magnitude keys (core::amax_from_key).
      // (|v|'s raw bits: a NaN's max is canonicalised once, by amax_from_key)
      I m = V::set1i(0);
      int64_t i1 = 0;
      for (; i1 < n32; i1 += 32) {  // 32 at a time: less loop overhead per element
        for (int g = 0; g < 32 / W; ++g) {
          const int64_t off = i1 + g * W;
          F v = V::load_x(xb + off);
          if constexpr (EF) v = V::add(v, V::load(rb + off));
          V::store(vbuf + off, v);
          m = V::max_u32(m, V::abs_bits(v));
        }
      }
      for (; i1 < nvec; i1 += W) {
        F v = V::load_x(xb + i1);
        if constexpr (EF) v = V::add(v, V::load(rb + i1));
        V::store(vbuf + i1, v);
        m = V::max_u32(m, V::abs_bits(v));
      }
      uint32_t mk = V::reduce_max_u32(m);
      for (int64_t i = nvec; i < len; ++i) {
        float v = to_float(xb[i]);
        if constexpr (EF) v = core::fadd(v, rb[i]);
        vbuf[i] = v;
        const uint32_t kk = core::magnitude_key(v);
        mk = kk > mk ? kk : mk;
      }
      const core::BlockParams p = core::absmax_params(core::amax_from_key(mk), BITS);
      store_unaligned<float>(a.scales + 4 * b, p.scale);
      constexpr int qmax = (1 << (BITS - 1)) - 1;
      if (p.inv == 0.0f) {
        // Every q is 0 (code qmax). The decode 0 * scale is 0 for a zero scale (residual
        // = v) and NaN for an inf/NaN scale (residual kept).
        uint32_t zeros[32];
        for (int j = 0; j < 32; ++j) zeros[j] = qmax;
        uint8_t pattern;
        pack_tail<BITS>(zeros, 8 / BITS, &pattern);
        std::memset(cb, pattern, static_cast<size_t>(n32 * BITS / 8));
        pack_tail<BITS>(zeros, len - n32, cb + n32 * BITS / 8);
        if constexpr (EF) {
          if (p.scale == 0.0f) std::memcpy(rb, vbuf, static_cast<size_t>(len) * sizeof(float));
        }
        continue;
      }
      const F finv = V::set1(p.inv), fscale = V::set1(p.scale);
      const F fq = V::set1(static_cast<float>(qmax)), fnq = V::set1(-static_cast<float>(qmax));
      const I iq = V::set1i(qmax);
      const uint32_t k2 =
          STOCH ? core::hash32_high_key(a.k1, static_cast<uint32_t>(uint64_t(start) >> 32)) : 0u;
      auto codes = [&](auto safe_tag) {
        constexpr bool SAFE = decltype(safe_tag)::value;
        for (int64_t i = 0; i < n32; i += 32) {
          I c[32 / W];
          for (int g = 0; g < 32 / W; ++g) {
            const int64_t off = i + g * W;
            F v = V::load(vbuf + off);
            F t = V::mul(v, finv);
            F q;
            if constexpr (STOCH) {
              q = V::floor(V::add(t, V::uniform(a.k1, k2, static_cast<uint32_t>(start + off))));
              q = V::clamp(q, fnq, fq);  // t + u may round up to qmax + 1
            } else {
              // No clamp needed: |v| <= amax, so |t| <= amax * fl(qmax / amax) rounded,
              // at most qmax (1 + 2^-24) rounded, which rounds to at most qmax (the
              // scalar tail's core::quantize_value clamps, to the same result).
              q = V::round_even(t);
            }
            c[g] = V::add_i(V::cvt_i32(q), iq);
            if constexpr (EF) {
              F rn = V::sub(v, V::mul(q, fscale));
              if constexpr (SAFE) V::store(rb + off, rn);
              else V::store(rb + off, V::select(V::finite_mask(rn), rn, V::load(rb + off)));
            }
          }
          V::template pack32<BITS>(c, cb + i * BITS / 8);
        }
      };
      if (mk < kSafeKey) codes(std::true_type{});
      else codes(std::false_type{});
      uint32_t tail[32];
      for (int64_t i = n32; i < len; ++i) {
        const float u = STOCH ? core::uniform(a.k1, static_cast<uint64_t>(start + i)) : 0.0f;
        const float q = core::quantize_value(vbuf[i], p.inv, static_cast<float>(qmax), STOCH, u);
        tail[i - n32] = static_cast<uint32_t>(static_cast<int32_t>(q) + qmax);
        if constexpr (EF) rb[i] = core::residual_update(vbuf[i], core::fmul(q, p.scale), rb[i]);
      }
      pack_tail<BITS>(tail, len - n32, cb + n32 * BITS / 8);
    }
  }
}

template <typename XT, int BITS>
void quantize_blocks_bits(const QuantizeArgs& a, int64_t b0, int64_t b1) {
  const bool ef = a.residual != nullptr;
  if (BITS > 1 && a.stochastic) {
    if (ef) quantize_blocks_t<XT, BITS, true, BITS != 1>(a, b0, b1);
    else quantize_blocks_t<XT, BITS, false, BITS != 1>(a, b0, b1);
  } else {
    if (ef) quantize_blocks_t<XT, BITS, true, false>(a, b0, b1);
    else quantize_blocks_t<XT, BITS, false, false>(a, b0, b1);
  }
}

template <typename XT>
void quantize_blocks_x(const QuantizeArgs& a, int64_t b0, int64_t b1) {
  switch (a.bits) {
    case 8: quantize_blocks_bits<XT, 8>(a, b0, b1); break;
    case 4: quantize_blocks_bits<XT, 4>(a, b0, b1); break;
    case 2: quantize_blocks_bits<XT, 2>(a, b0, b1); break;
    default: quantize_blocks_bits<XT, 1>(a, b0, b1); break;
  }
}

void quantize_blocks(const QuantizeArgs& a, int64_t b0, int64_t b1) {
  switch (a.x_dtype) {
    case Dtype::kFloat: quantize_blocks_x<float>(a, b0, b1); break;
    case Dtype::kHalf: quantize_blocks_x<c10::Half>(a, b0, b1); break;
    default: quantize_blocks_x<c10::BFloat16>(a, b0, b1); break;
  }
}
