// topk_select kernel bodies, one chunk of kTopkChunk elements per call. No include guard
// on purpose: included once per instruction set through cpu/isa_dispatch.h (see
// quantize_pack_impl.h). The selection logic lives in topk_select.cpp; these are the
// passes over memory: scan (candidates and max key), histogram and count (the exact
// fallback) and write (payload entries and the residual).

template <typename XT, bool EF>
GZ_INLINE typename V::F topk_load_v(const TopkArgs& a, int64_t i) {
  typename V::F v = V::load_x(static_cast<const XT*>(a.x) + i);
  if constexpr (EF) v = V::add(v, V::load(a.residual + i));
  return v;
}

template <typename XT, bool EF>
GZ_INLINE float topk_scalar_v(const TopkArgs& a, int64_t i) {
  float v = to_float(static_cast<const XT*>(a.x)[i]);
  if constexpr (EF) v = core::fadd(v, a.residual[i]);
  return v;
}

// Prefetches the x and residual lines kPrefetchAhead elements past element i, once per 16
// elements (a cache line of float32): the scan and write passes stream both.
template <typename XT, bool EF>
GZ_INLINE void topk_prefetch(const TopkArgs& a, int64_t i) {
  if ((i & 15) != 0) return;
  __builtin_prefetch(static_cast<const XT*>(a.x) + i + kPrefetchAhead, 0, 3);
  if constexpr (EF) __builtin_prefetch(a.residual + i + kPrefetchAhead, 0, 3);
}

GZ_INLINE int64_t chunk_end(const TopkArgs& a, int64_t c) {
  const int64_t e1 = (c + 1) * kTopkChunk;
  return e1 < a.n ? e1 : a.n;
}

// Candidates key >= t of chunk c: counted, their keys appended to `keys` (when not null,
// room for kTopkChunk), and the chunk's largest key.
template <typename XT, bool EF>
void topk_scan_t(const TopkArgs& a, int64_t c, uint32_t t, uint32_t* keys, int64_t* count,
                 uint32_t* max_key) {
  constexpr int W = V::W;
  const int64_t e0 = c * kTopkChunk, e1 = chunk_end(a, c);
  typename V::I m = V::set1i(0);
  int64_t cnt = 0;
  int64_t i = e0;
  alignas(64) uint32_t lanes[W];
  for (; i + W <= e1; i += W) {
    topk_prefetch<XT, EF>(a, i);
    const typename V::I kk = V::key(topk_load_v<XT, EF>(a, i));
    m = V::max_u32(m, kk);
    const uint32_t sel = V::ge_u32_mask(kk, t);
    if (sel) {
      if (keys) {
        V::store(reinterpret_cast<float*>(lanes), V::from_bits(kk));
        for (uint32_t s = sel; s; s &= s - 1) keys[cnt++] = lanes[__builtin_ctz(s)];
      } else {
        cnt += __builtin_popcount(sel);
      }
    }
  }
  uint32_t mk = V::reduce_max_u32(m);
  for (; i < e1; ++i) {
    const uint32_t kk = core::magnitude_key(topk_scalar_v<XT, EF>(a, i));
    mk = kk > mk ? kk : mk;
    if (kk >= t) {
      if (keys) keys[cnt] = kk;
      ++cnt;
    }
  }
  *count = cnt;
  *max_key = mk;
}

template <typename XT, bool EF>
void topk_histogram_t(const TopkArgs& a, int64_t c, const RadixLevel& level, uint32_t* hist) {
  constexpr int W = V::W;
  const int64_t e0 = c * kTopkChunk, e1 = chunk_end(a, c);
  alignas(64) uint32_t lanes[W];
  int64_t i = e0;
  for (; i + W <= e1; i += W) {
    V::store(reinterpret_cast<float*>(lanes), V::from_bits(V::key(topk_load_v<XT, EF>(a, i))));
    for (int j = 0; j < W; ++j)
      if (level.matches(lanes[j])) ++hist[level.bin(lanes[j])];
  }
  for (; i < e1; ++i) {
    const uint32_t kk = core::magnitude_key(topk_scalar_v<XT, EF>(a, i));
    if (level.matches(kk)) ++hist[level.bin(kk)];
  }
}

template <typename XT, bool EF>
void topk_count_t(const TopkArgs& a, int64_t c, uint32_t T, int64_t* gt, int64_t* eq) {
  constexpr int W = V::W;
  const int64_t e0 = c * kTopkChunk, e1 = chunk_end(a, c);
  int64_t g = 0, q = 0;
  int64_t i = e0;
  for (; i + W <= e1; i += W) {
    const typename V::I kk = V::key(topk_load_v<XT, EF>(a, i));
    g += __builtin_popcount(V::gt_u32_mask(kk, T));
    q += __builtin_popcount(V::eq_u32_mask(kk, T));
  }
  for (; i < e1; ++i) {
    const uint32_t kk = core::magnitude_key(topk_scalar_v<XT, EF>(a, i));
    g += kk > T;
    q += kk == T;
  }
  *gt = g;
  *eq = q;
}

// One selected entry: its payload slot and the decoded value the residual subtracts.
GZ_INLINE float topk_emit(const TopkOutput& o, int64_t pos, int64_t index, float v) {
  if (o.index64) store_unaligned<int64_t>(o.indices + 8 * pos, index);
  else store_unaligned<int32_t>(o.indices + 4 * pos, static_cast<int32_t>(index));
  switch (o.value_format) {
    case format::kValueFp32:
      store_unaligned<float>(o.values + 4 * pos, core::canonical_nan(v));  // canonical NaN
      return v;
    case format::kValueBf16: {
      const uint16_t b = core::bf16_bits(v);  // payload NaNs are the canonical 0x7FC0
      store_unaligned<uint16_t>(o.values + 2 * pos, b);
      return float_from_bf16_bits(b);
    }
    default: {
      const float q = core::quantize_value(v, o.int8_inv, 127.0f, false, 0.0f);
      o.values[pos] = static_cast<uint8_t>(static_cast<int8_t>(q));
      return core::fmul(q, o.int8_scale);
    }
  }
}

// Final pass over chunk c: selects per `rule` (ties to the lowest index while
// `tie_budget` lasts), writes the chunk's entries from payload slot `out_pos` on, and the
// residual: v - decode for selected entries, v elsewhere (old residual where not finite).
template <typename XT, bool EF>
void topk_write_t(const TopkArgs& a, int64_t c, const TopkSelectRule& rule, int64_t tie_budget,
                  int64_t out_pos, const TopkOutput& o) {
  constexpr int W = V::W;
  using F = typename V::F;
  const int64_t e0 = c * kTopkChunk, e1 = chunk_end(a, c);
  const uint32_t full = W == 32 ? 0xFFFFFFFFu : ((1u << W) - 1u);
  int64_t pos = out_pos;
  alignas(64) float vs[W], rs[W], outs[W];
  auto select_mask = [&](typename V::I kk, int64_t i, int lanes) -> uint32_t {
    const uint32_t live = lanes == W ? full : ((1u << lanes) - 1u);
    uint32_t sel;
    if (rule.mode == TopkSelectRule::kFill) {
      sel = V::ge_u32_mask(kk, rule.T);
      if (i < rule.fill_end) {
        const int64_t below = rule.fill_end - i;
        sel |= below >= W ? full : ((1u << below) - 1u);
      }
    } else {
      sel = V::gt_u32_mask(kk, rule.T);
      uint32_t eq = V::eq_u32_mask(kk, rule.T) & live;
      for (; eq && tie_budget > 0; eq &= eq - 1, --tie_budget) sel |= eq & (0u - eq);
    }
    return sel & live;
  };
  int64_t i = e0;
  for (; i + W <= e1; i += W) {
    topk_prefetch<XT, EF>(a, i);
    const F v = topk_load_v<XT, EF>(a, i);
    const uint32_t sel = select_mask(V::key(v), i, W);
    if constexpr (EF) {
      const F r_old = V::load(a.residual + i);
      // Unselected: v - 0 = v, kept only where finite.
      const F r_new = V::select(V::finite_mask(v), v, r_old);
      if (!sel) {
        V::store(a.residual + i, r_new);
        continue;
      }
      V::store(vs, v);
      V::store(rs, r_old);
      V::store(outs, r_new);
      for (uint32_t s = sel; s; s &= s - 1) {
        const int j = __builtin_ctz(s);
        const float dec = topk_emit(o, pos++, i + j, vs[j]);
        outs[j] = core::residual_update(vs[j], dec, rs[j]);
      }
      V::store(a.residual + i, V::load(outs));
    } else {
      if (!sel) continue;
      V::store(vs, v);
      for (uint32_t s = sel; s; s &= s - 1) {
        const int j = __builtin_ctz(s);
        topk_emit(o, pos++, i + j, vs[j]);
      }
    }
  }
  for (; i < e1; ++i) {
    const float v = topk_scalar_v<XT, EF>(a, i);
    const uint32_t kk = core::magnitude_key(v);
    bool sel;
    if (rule.mode == TopkSelectRule::kFill) {
      sel = kk >= rule.T || i < rule.fill_end;
    } else {
      sel = kk > rule.T || (kk == rule.T && tie_budget > 0);
      if (kk == rule.T && tie_budget > 0) --tie_budget;
    }
    const float dec = sel ? topk_emit(o, pos++, i, v) : 0.0f;
    if constexpr (EF) a.residual[i] = core::residual_update(v, dec, a.residual[i]);
  }
}

#define GZ_TOPK_DISPATCH(FN, ...)                                                        \
  do {                                                                                   \
    const bool ef = a.residual != nullptr;                                               \
    switch (a.x_dtype) {                                                                 \
      case Dtype::kFloat:                                                                \
        ef ? FN<float, true>(__VA_ARGS__) : FN<float, false>(__VA_ARGS__);               \
        break;                                                                           \
      case Dtype::kHalf:                                                                 \
        ef ? FN<c10::Half, true>(__VA_ARGS__) : FN<c10::Half, false>(__VA_ARGS__);       \
        break;                                                                           \
      default:                                                                           \
        ef ? FN<c10::BFloat16, true>(__VA_ARGS__) : FN<c10::BFloat16, false>(__VA_ARGS__); \
    }                                                                                    \
  } while (0)

void topk_scan_chunk(const TopkArgs& a, int64_t c, uint32_t t, uint32_t* keys, int64_t* count,
                     uint32_t* max_key) {
  GZ_TOPK_DISPATCH(topk_scan_t, a, c, t, keys, count, max_key);
}
void topk_histogram_chunk(const TopkArgs& a, int64_t c, const RadixLevel& level, uint32_t* hist) {
  GZ_TOPK_DISPATCH(topk_histogram_t, a, c, level, hist);
}
void topk_count_chunk(const TopkArgs& a, int64_t c, uint32_t T, int64_t* gt, int64_t* eq) {
  GZ_TOPK_DISPATCH(topk_count_t, a, c, T, gt, eq);
}
void topk_write_chunk(const TopkArgs& a, int64_t c, const TopkSelectRule& rule,
                      int64_t tie_budget, int64_t out_pos, const TopkOutput& o) {
  GZ_TOPK_DISPATCH(topk_write_t, a, c, rule, tie_budget, out_pos, o);
}
#undef GZ_TOPK_DISPATCH
