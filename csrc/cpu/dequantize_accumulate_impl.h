// dequantize_accumulate kernel bodies. No include guard on purpose: included once per
// instruction set through cpu/isa_dispatch.h (see quantize_pack_impl.h).
//
// Dense: each W-lane vector of `out` is read once, the W payloads' codes for those lanes
// are decoded and summed in payload order in a register, and `out` is written once; a
// tile of 8 vectors is summed at a time, payload by payload.
// Sparse: the scatter-add into an fp32 range buffer happens in the op file; the final
// out = out + alpha * acc over the range is vectorised here.

// d = decode of payload row `row`'s W codes at element e of its block (scale s; ns = -s).
template <int BITS>
GZ_INLINE typename V::F decode_vec(const uint8_t* row, int64_t e, typename V::F s,
                                   typename V::F ns, typename V::I iq) {
  if constexpr (BITS == 1) {
    return V::select_signs(row, e, ns, s);
  } else {
    return V::mul(V::cvt_f32(V::add_i(V::template unpack<BITS>(row, e), iq)), s);
  }
}

// NV vectors (NV * W elements from element i of the block at `start`): the sums over the
// W payloads stay in NV registers while the loop runs over payloads, so each payload's
// scale is broadcast once per NV vectors and the loop costs little per element.
// VV is V, as a template parameter so that the lookup branch names members only the ISAs
// with V::lut_decodes(BITS) have.
// OVERWRITE (DenseAccArgs::overwrite) as a template parameter, so that the accumulating
// form compiles exactly as it would without it.
// STREAM (DenseAccArgs::stream; float out, OVERWRITE only): the aligned vector stores are
// streaming stores.
template <int BITS, int NV, typename OT, bool OVERWRITE, bool STREAM = false, typename VV = V>
GZ_INLINE void dense_tile(const DenseAccArgs& a, const float* sc, int64_t start, int64_t i,
                          int64_t code_off, OT* out) {
  constexpr int W = V::W;
  using F = typename V::F;
  constexpr int qmax = BITS > 1 ? (1 << (BITS - 1)) - 1 : 0;
  const typename V::I iq = V::set1i(static_cast<uint32_t>(-qmax));
  F acc[NV];
  for (int v = 0; v < NV; ++v) acc[v] = V::zero();  // the reference's ((0 + d0) + d1) + ...
  const uint8_t* row = a.payloads + code_off;
  // 1/2-bit codes by table lookup where the ISA does (V::lut_decodes): one 32-bit load of
  // codes serves kPer vectors; a tile of fewer vectors decodes as below.
  constexpr int kPer = BITS <= 2 ? 32 / (W * BITS) : 0;
  if constexpr (BITS <= 2 && VV::lut_decodes(BITS) && kPer > 0 && NV % kPer == 0) {
    for (int64_t w = 0; w < a.W; ++w, row += a.stride) {
      const F s = V::set1(sc[w]);
      const F table = VV::template decode_table<BITS>(s, V::neg(s));
      for (int v = 0; v < NV; v += kPer) {
        const typename VV::I word = VV::broadcast32(row + (i + v * W) * BITS / 8);
        acc[v] = V::add(acc[v], VV::template decode_lut<BITS, 0>(word, table));
        if constexpr (kPer >= 2)
          acc[v + 1] = V::add(acc[v + 1], VV::template decode_lut<BITS, 1>(word, table));
        if constexpr (kPer == 4) {
          acc[v + 2] = V::add(acc[v + 2], VV::template decode_lut<BITS, 2>(word, table));
          acc[v + 3] = V::add(acc[v + 3], VV::template decode_lut<BITS, 3>(word, table));
        }
      }
    }
  } else {
    for (int64_t w = 0; w < a.W; ++w, row += a.stride) {
      const F s = V::set1(sc[w]);
      const F ns = V::neg(s);
      for (int v = 0; v < NV; ++v)
        acc[v] = V::add(acc[v], decode_vec<BITS>(row, i + v * W, s, ns, iq));
    }
  }
  const F alpha = V::set1(a.alpha);
  for (int v = 0; v < NV; ++v) {
    OT* o = out + start + i + v * W;
    F old;
    if constexpr (OVERWRITE) old = V::zero();
    else old = V::load_x(o);
    if constexpr (STREAM) V::stream(o, V::add(old, V::mul(alpha, acc[v])));
    else V::store_x(o, V::add(old, V::mul(alpha, acc[v])));
  }
}

template <int BITS, typename OT, bool OVERWRITE, bool STREAM = false>
void dense_accumulate_t(const DenseAccArgs& a, int64_t b0, int64_t b1, float* sc) {
  constexpr int W = V::W;
  constexpr int qmax = BITS > 1 ? (1 << (BITS - 1)) - 1 : 0;
  constexpr int kTile = 8 * W;
  OT* out = static_cast<OT*>(a.out);
  for (int64_t b = b0; b < b1; ++b) {
    const int64_t start = b * a.block;
    const int64_t len = a.n - start < a.block ? a.n - start : a.block;
    const int64_t code_off = a.codes_offset + start * BITS / 8;
    for (int64_t w = 0; w < a.W; ++w)
      sc[w] = load_unaligned<float>(a.payloads + w * a.stride + a.scales_offset + 4 * b);
    if (start + kPrefetchAhead + len <= a.n) {  // see kPrefetchAhead (simd.h)
      for (int64_t w = 0; w < a.W; ++w)
        prefetch_bytes(a.payloads + w * a.stride + code_off + kPrefetchAhead * BITS / 8,
                       len * BITS / 8);
      if constexpr (!OVERWRITE) prefetch_bytes(out + start + kPrefetchAhead, len * int64_t(sizeof(OT)));
    }
    int64_t i = 0;
    for (; i + kTile <= len; i += kTile)
      dense_tile<BITS, 8, OT, OVERWRITE, STREAM>(a, sc, start, i, code_off, out);
    for (; i + 4 * W <= len; i += 4 * W)
      dense_tile<BITS, 4, OT, OVERWRITE, STREAM>(a, sc, start, i, code_off, out);
    for (; i + W <= len; i += W)
      dense_tile<BITS, 1, OT, OVERWRITE, STREAM>(a, sc, start, i, code_off, out);
    for (; i < len; ++i) {
      float acc = 0.0f;
      const uint8_t* row = a.payloads + code_off;
      for (int64_t w = 0; w < a.W; ++w, row += a.stride) {
        float d;
        if constexpr (BITS == 1) {
          d = core::sign_decode((row[i >> 3] >> (i & 7)) & 1u, sc[w]);
        } else {
          constexpr int per = 8 / BITS;
          const int code = (row[i / per] >> ((i % per) * BITS)) & ((1 << BITS) - 1);
          d = core::fmul(static_cast<float>(code - qmax), sc[w]);
        }
        acc = core::fadd(acc, d);
      }
      OT* o = out + start + i;
      from_float(core::fadd(OVERWRITE ? 0.0f : to_float(*o), core::fmul(a.alpha, acc)), o);
    }
  }
  if constexpr (STREAM) V::stream_fence();
}

template <typename OT, bool OVERWRITE, bool STREAM = false>
void dense_accumulate_ow(const DenseAccArgs& a, int64_t b0, int64_t b1, float* sc) {
  switch (a.bits) {
    case 8: dense_accumulate_t<8, OT, OVERWRITE, STREAM>(a, b0, b1, sc); break;
    case 4: dense_accumulate_t<4, OT, OVERWRITE, STREAM>(a, b0, b1, sc); break;
    case 2: dense_accumulate_t<2, OT, OVERWRITE, STREAM>(a, b0, b1, sc); break;
    default: dense_accumulate_t<1, OT, OVERWRITE, STREAM>(a, b0, b1, sc); break;
  }
}

template <typename OT>
void dense_accumulate_o(const DenseAccArgs& a, int64_t b0, int64_t b1, float* sc) {
  if constexpr (std::is_same_v<OT, float>) {
    if (a.stream) return dense_accumulate_ow<float, true, true>(a, b0, b1, sc);
  }
  if (a.overwrite) dense_accumulate_ow<OT, true>(a, b0, b1, sc);
  else dense_accumulate_ow<OT, false>(a, b0, b1, sc);
}

void dense_accumulate_blocks(const DenseAccArgs& a, int64_t b0, int64_t b1, float* sc) {
  switch (a.out_dtype) {
    case Dtype::kFloat: dense_accumulate_o<float>(a, b0, b1, sc); break;
    case Dtype::kHalf: dense_accumulate_o<c10::Half>(a, b0, b1, sc); break;
    default: dense_accumulate_o<c10::BFloat16>(a, b0, b1, sc); break;
  }
}

// STREAM (SparseAccArgs::stream; float out, OVERWRITE only): after a scalar head up to the
// first address aligned to a whole vector, the vector stores are streaming stores, which
// skip reading each line before writing it (measured on the AVX-512 machine, 64 MiB:
// 23 GB/s against 8 GB/s for ordinary stores).
template <typename OT, bool OVERWRITE, bool STREAM = false>
void sparse_finish_ow(const SparseAccArgs& a, const float* acc, int64_t e0, int64_t e1) {
  constexpr int W = V::W;
  OT* out = static_cast<OT*>(a.out);
  const typename V::F alpha = V::set1(a.alpha);
  auto one = [&](int64_t j) {
    const float old = OVERWRITE ? 0.0f : to_float(out[j]);
    from_float(core::fadd(old, core::fmul(a.alpha, acc[j - e0])), out + j);
  };
  int64_t i = e0;
  if constexpr (STREAM)
    for (; i < e1 && reinterpret_cast<uintptr_t>(out + i) % (W * sizeof(OT)) != 0; ++i) one(i);
  for (; i + W <= e1; i += W) {
    OT* o = out + i;
    typename V::F old;
    if constexpr (OVERWRITE) old = V::zero();
    else old = V::load_x(o);
    const typename V::F v = V::add(old, V::mul(alpha, V::load(acc + (i - e0))));
    if constexpr (STREAM) V::stream(o, v);
    else V::store_x(o, v);
  }
  for (; i < e1; ++i) one(i);
  if constexpr (STREAM) V::stream_fence();
}

template <typename OT>
void sparse_finish_t(const SparseAccArgs& a, const float* acc, int64_t e0, int64_t e1) {
  if constexpr (std::is_same_v<OT, float>) {
    if (a.stream) return sparse_finish_ow<float, true, true>(a, acc, e0, e1);
  }
  if (a.overwrite) sparse_finish_ow<OT, true>(a, acc, e0, e1);
  else sparse_finish_ow<OT, false>(a, acc, e0, e1);
}

void sparse_finish_range(const SparseAccArgs& a, const float* acc, int64_t e0, int64_t e1) {
  switch (a.out_dtype) {
    case Dtype::kFloat: sparse_finish_t<float>(a, acc, e0, e1); break;
    case Dtype::kHalf: sparse_finish_t<c10::Half>(a, acc, e0, e1); break;
    default: sparse_finish_t<c10::BFloat16>(a, acc, e0, e1); break;
  }
}
