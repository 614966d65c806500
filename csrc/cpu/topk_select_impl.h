// topk_select kernel bodies, one chunk of kTopkChunk elements per call. No include guard
// on purpose: included once per instruction set through cpu/isa_dispatch.h (see
// quantize_pack_impl.h). The selection logic lives in topk_select.cpp; these are the
// passes over memory: scan (candidates and max key), histogram and count (the exact
// fallback) and write (payload entries and the residual).

// v at element i: x (kTopkPlain, kTopkVGiven: x already holds v) or x + residual.
template <typename XT, int MODE>
GZ_INLINE typename V::F topk_load_v(const TopkArgs& a, int64_t i) {
  typename V::F v = V::load_x(static_cast<const XT*>(a.x) + i);
  if constexpr (MODE == kTopkEf) v = V::add(v, V::load(a.residual + i));
  return v;
}

template <typename XT, int MODE>
GZ_INLINE float topk_scalar_v(const TopkArgs& a, int64_t i) {
  float v = to_float(static_cast<const XT*>(a.x)[i]);
  if constexpr (MODE == kTopkEf) v = core::fadd(v, a.residual[i]);
  return v;
}

// Prefetches the x and residual lines kPrefetchAhead elements past element i, once per 16
// elements (a cache line of float32): the scan and write passes stream both.
template <typename XT, int MODE>
GZ_INLINE void topk_prefetch(const TopkArgs& a, int64_t i) {
  if ((i & 15) != 0) return;
  __builtin_prefetch(static_cast<const XT*>(a.x) + i + kPrefetchAhead, 0, 3);
  if constexpr (MODE != kTopkPlain) __builtin_prefetch(a.residual + i + kPrefetchAhead, 0, 3);
}

GZ_INLINE int64_t chunk_end(const TopkArgs& a, int64_t c) {
  const int64_t e1 = (c + 1) * kTopkChunk;
  return e1 < a.n ? e1 : a.n;
}

// Chunk c: counts the candidates key >= t and finds the largest key. With `entries` (room
// for kTopkChunk), also keeps every entry key >= keep (keep <= t) as (offset, v). With
// WRITE (error feedback only), the fused scan: every entry it does not keep gets its
// unselected residual v now (finite: keep <= kTopkHugeKey), and the kept ones keep their
// old residual for topk_write_entries.
template <typename XT, int MODE, bool WRITE>
void topk_scan_t(const TopkArgs& a, int64_t c, uint32_t t, uint32_t keep, TopkEntry* entries,
                 int64_t* nentries, int64_t* count, uint32_t* max_key) {
  constexpr int W = V::W;
  const int64_t e0 = c * kTopkChunk, e1 = chunk_end(a, c);
  typename V::I m = V::set1i(0);
  int64_t cnt = 0, ne = 0;
  int64_t i = e0;
  alignas(64) float vs[W];
  for (; i + W <= e1; i += W) {
    topk_prefetch<XT, MODE>(a, i);
    const typename V::F v = topk_load_v<XT, MODE>(a, i);
    const typename V::I kk = V::key(v);
    m = V::max_u32(m, kk);
    cnt += __builtin_popcount(V::ge_u32_mask(kk, t));
    if (!entries) continue;
    const uint32_t sel = V::ge_u32_mask(kk, keep);
    if constexpr (WRITE) {
      if (!sel) {
        V::store(a.residual + i, v);
        continue;
      }
      V::store(a.residual + i, V::select(sel, V::load(a.residual + i), v));
    }
    if (sel) {
      V::store(vs, v);
      for (uint32_t s = sel; s; s &= s - 1) {
        const int j = __builtin_ctz(s);
        entries[ne++] = {static_cast<uint32_t>(i - e0 + j), vs[j]};
      }
    }
  }
  uint32_t mk = V::reduce_max_u32(m);
  for (; i < e1; ++i) {
    const float v = topk_scalar_v<XT, MODE>(a, i);
    const uint32_t kk = core::magnitude_key(v);
    mk = kk > mk ? kk : mk;
    cnt += kk >= t;
    if (!entries) continue;
    if (kk >= keep) entries[ne++] = {static_cast<uint32_t>(i - e0), v};
    else if constexpr (WRITE) a.residual[i] = v;
  }
  *nentries = ne;
  *count = cnt;
  *max_key = mk;
}

template <typename XT, int MODE>
void topk_histogram_t(const TopkArgs& a, int64_t c, const RadixLevel& level, uint32_t* hist) {
  constexpr int W = V::W;
  const int64_t e0 = c * kTopkChunk, e1 = chunk_end(a, c);
  alignas(64) uint32_t lanes[W];
  int64_t i = e0;
  for (; i + W <= e1; i += W) {
    V::store(reinterpret_cast<float*>(lanes), V::from_bits(V::key(topk_load_v<XT, MODE>(a, i))));
    for (int j = 0; j < W; ++j)
      if (level.matches(lanes[j])) ++hist[level.bin(lanes[j])];
  }
  for (; i < e1; ++i) {
    const uint32_t kk = core::magnitude_key(topk_scalar_v<XT, MODE>(a, i));
    if (level.matches(kk)) ++hist[level.bin(kk)];
  }
}

template <typename XT, int MODE>
void topk_count_t(const TopkArgs& a, int64_t c, uint32_t T, int64_t* gt, int64_t* eq) {
  constexpr int W = V::W;
  const int64_t e0 = c * kTopkChunk, e1 = chunk_end(a, c);
  int64_t g = 0, q = 0;
  int64_t i = e0;
  for (; i + W <= e1; i += W) {
    const typename V::I kk = V::key(topk_load_v<XT, MODE>(a, i));
    g += __builtin_popcount(V::gt_u32_mask(kk, T));
    q += __builtin_popcount(V::eq_u32_mask(kk, T));
  }
  for (; i < e1; ++i) {
    const uint32_t kk = core::magnitude_key(topk_scalar_v<XT, MODE>(a, i));
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

// The threshold rule for one entry's key: above T always, equal to T while the tie budget
// lasts (callers walk upwards, so ties go to the lowest indices).
inline bool topk_threshold_takes(uint32_t key, uint32_t T, int64_t& tie_budget) {
  if (key > T) return true;
  if (key != T || tie_budget <= 0) return false;
  --tie_budget;
  return true;
}

// Final pass over chunk c: selects per `rule` (ties to the lowest index while
// `tie_budget` lasts), writes the chunk's entries from payload slot `out_pos` on, and the
// residual: v - decode for selected entries, v elsewhere (old residual where not finite).
template <typename XT, int MODE>
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
    topk_prefetch<XT, MODE>(a, i);
    const F v = topk_load_v<XT, MODE>(a, i);
    const uint32_t sel = select_mask(V::key(v), i, W);
    if constexpr (MODE != kTopkPlain) {
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
    const float v = topk_scalar_v<XT, MODE>(a, i);
    const uint32_t kk = core::magnitude_key(v);
    const bool sel = rule.mode == TopkSelectRule::kFill
                         ? kk >= rule.T || i < rule.fill_end
                         : topk_threshold_takes(kk, rule.T, tie_budget);
    const float dec = sel ? topk_emit(o, pos++, i, v) : 0.0f;
    if constexpr (MODE != kTopkPlain) a.residual[i] = core::residual_update(v, dec, a.residual[i]);
  }
}

// The list path's final pass over chunk c (threshold rule only): the kept entries are
// the only ones the rule can select, so only they are visited. Writes the chunk's payload
// entries from slot `out_pos` on and, after a fused scan, the kept entries' residuals.
void topk_write_entries(const TopkArgs& a, int64_t c, const TopkEntry* entries, int64_t ne,
                        const TopkSelectRule& rule, int64_t tie_budget, int64_t out_pos,
                        const TopkOutput& o) {
  const int64_t e0 = c * kTopkChunk;
  int64_t pos = out_pos;
  for (int64_t j = 0; j < ne; ++j) {
    const int64_t i = e0 + entries[j].off;
    const float v = entries[j].v;
    if (topk_threshold_takes(core::magnitude_key(v), rule.T, tie_budget)) {
      const float dec = topk_emit(o, pos++, i, v);
      if (a.residual) a.residual[i] = core::residual_update(v, dec, a.residual[i]);
    } else if (a.residual && core::is_finite(v)) {
      a.residual[i] = v;  // unselected: v where finite, else the old residual stays
    }
  }
}

template <typename XT, int MODE>
void topk_scan_fused_t(const TopkArgs& a, int64_t c, uint32_t t, uint32_t keep,
                       TopkEntry* entries, int64_t* ne, int64_t* count, uint32_t* max_key) {
  topk_scan_t<XT, MODE, MODE == kTopkEf>(a, c, t, keep, entries, ne, count, max_key);
}
template <typename XT, int MODE>
void topk_scan_read_t(const TopkArgs& a, int64_t c, uint32_t t, uint32_t keep,
                      TopkEntry* entries, int64_t* ne, int64_t* count, uint32_t* max_key) {
  topk_scan_t<XT, MODE, false>(a, c, t, keep, entries, ne, count, max_key);
}

#define GZ_TOPK_DISPATCH(FN, ...)                                                        \
  do {                                                                                   \
    if (a.v_given) {                                                                     \
      FN<float, kTopkVGiven>(__VA_ARGS__);                                               \
      break;                                                                             \
    }                                                                                    \
    const bool ef = a.residual != nullptr;                                               \
    switch (a.x_dtype) {                                                                 \
      case Dtype::kFloat:                                                                \
        ef ? FN<float, kTopkEf>(__VA_ARGS__) : FN<float, kTopkPlain>(__VA_ARGS__);       \
        break;                                                                           \
      case Dtype::kHalf:                                                                 \
        ef ? FN<c10::Half, kTopkEf>(__VA_ARGS__) : FN<c10::Half, kTopkPlain>(__VA_ARGS__); \
        break;                                                                           \
      default:                                                                           \
        ef ? FN<c10::BFloat16, kTopkEf>(__VA_ARGS__)                                     \
           : FN<c10::BFloat16, kTopkPlain>(__VA_ARGS__);                                 \
    }                                                                                    \
  } while (0)

// write_residual (error feedback only, entries given): the fused scan.
void topk_scan_chunk(const TopkArgs& a, int64_t c, uint32_t t, uint32_t keep, TopkEntry* entries,
                     bool write_residual, int64_t* nentries, int64_t* count, uint32_t* max_key) {
  if (write_residual && entries)
    GZ_TOPK_DISPATCH(topk_scan_fused_t, a, c, t, keep, entries, nentries, count, max_key);
  else
    GZ_TOPK_DISPATCH(topk_scan_read_t, a, c, t, keep, entries, nentries, count, max_key);
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
