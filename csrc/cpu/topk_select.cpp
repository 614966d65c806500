// gradzip::topk_select on CPU: the k entries of largest |v| (v = x + residual), with the
// residual update, byte-identical to gradzip.reference.topk_select.
//
// Both modes start from the reference's sampled threshold t (16384 strided-hash positions):
//   1. scan: one pass reads v, counts the candidates key >= t per chunk, keeps them as
//      (offset, v) entries (about 1.3% of n), and finds the largest key. With error
//      feedback and float32/bfloat16 values the scan is *fused* with the residual update:
//      every entry it does not keep cannot be selected on the usual path, so it gets its
//      unselected residual (v) at once, and the pass that follows touches only the kept
//      entries: one read of x and of the residual and one write of the residual in all;
//   2. select: the k-th largest key T and the tie rule (key == T entries go to the lowest
//      indices) from a radix select over the kept entries (approximate mode: the
//      reference's rule exactly; exact mode: t from a deeper sample rank, so that almost
//      always at least k candidates pass it and the top-k lie among them);
//   3. write: each chunk's selected entries at its prefix-sum slot, and the residual of
//      the kept entries.
// When that cannot work (too few candidates in exact mode, more candidates than we keep,
// or the approximate rule's fill), the slow path: v is materialised (a fused scan already
// overwrote part of the residual, but v and every old residual still needed can be
// recovered, see below), then a radix select over all of v (three histogram passes and a
// counting pass; exact, never approximated) or the fill rule, and a write pass over all
// elements.
// Results do not depend on the thread layout: chunks are fixed, and everything per chunk
// is combined in chunk order.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cstring>
#include <functional>
#include <memory>
#include <mutex>
#include <optional>
#include <vector>

#include "core/checks.h"
#include "core/format.h"
#include "core/quant.h"

#define GZ_KERNEL_IMPL "cpu/topk_select_impl.h"
#include "cpu/isa_dispatch.h"

namespace gradzip {
namespace cpu {
namespace {

constexpr int kBins = 2048;

// The three levels of the radix select over 31-bit keys: bits 30..20, 19..9, 8..0.
RadixLevel radix_level(int level, uint32_t prefix) {
  static const int shifts[3] = {20, 9, 0};
  static const uint32_t masks[3] = {0x7FF, 0x7FF, 0x1FF};
  RadixLevel l;
  l.shift = shifts[level];
  l.mask = masks[level];
  l.prefix_shift = level == 0 ? 32 : shifts[level - 1];
  l.prefix = prefix;
  return l;
}

struct RadixResult {
  uint32_t T;        // the k-th largest key
  int64_t ties;      // how many entries with key == T the top-k takes
};

// k-th largest of a key multiset given as per-chunk histogram passes:
// fill(c, level, hist) adds chunk c's matching keys to hist.
RadixResult radix_select(int64_t nchunks, int64_t k,
                         const std::function<void(int64_t, const RadixLevel&, uint32_t*)>& fill) {
  uint32_t prefix = 0;
  int64_t remaining = k;
  for (int level = 0; level < 3; ++level) {
    const RadixLevel l = radix_level(level, prefix);
    std::vector<int64_t> hist(kBins, 0);
    std::mutex mu;
    at::parallel_for(0, nchunks, 1, [&](int64_t c0, int64_t c1) {
      std::vector<uint32_t> local(kBins, 0);
      for (int64_t c = c0; c < c1; ++c) fill(c, l, local.data());
      std::lock_guard<std::mutex> guard(mu);
      for (int b = 0; b < kBins; ++b) hist[b] += local[b];
    });
    int b = static_cast<int>(l.mask);
    for (; b > 0 && hist[b] < remaining; --b) remaining -= hist[b];
    prefix = level == 0 ? uint32_t(b) : (prefix << (level == 1 ? 11 : 9)) | uint32_t(b);
  }
  return {prefix, remaining};
}

// v = x + residual at one element, for the passes that read single elements (the sample,
// the walk to the fill boundary) rather than whole chunks.
float v_at(const TopkArgs& a, int64_t e) {
  if (a.v_given) return static_cast<const float*>(a.x)[e];
  float v;
  switch (a.x_dtype) {
    case Dtype::kFloat: v = static_cast<const float*>(a.x)[e]; break;
    case Dtype::kHalf: v = to_float(static_cast<const c10::Half*>(a.x)[e]); break;
    default: v = to_float(static_cast<const c10::BFloat16*>(a.x)[e]);
  }
  return a.residual ? core::fadd(v, a.residual[e]) : v;
}

// The rank-th largest (1-based) of `keys` (magnitude keys, < 2^31), reordering them: a
// histogram of the top 11 bits finds the bin that holds it, and only that bin's keys are
// ordered (std::nth_element over the whole sample took half of a small top-k call).
uint32_t kth_largest_key(std::vector<uint32_t>& keys, int64_t rank) {
  constexpr int kShift = 20;  // 31-bit keys: bins of the top 11 bits
  std::vector<int64_t> hist(size_t(1) << (31 - kShift), 0);
  for (const uint32_t key : keys) ++hist[key >> kShift];
  uint32_t bin = static_cast<uint32_t>(hist.size() - 1);
  int64_t above = 0;  // keys in bins above `bin`
  for (; bin > 0 && above + hist[bin] < rank; --bin) above += hist[bin];
  const auto end = std::partition(keys.begin(), keys.end(),
                                  [bin](uint32_t key) { return (key >> kShift) == bin; });
  const auto nth = keys.begin() + (rank - above - 1);
  std::nth_element(keys.begin(), nth, end, std::greater<uint32_t>());
  return *nth;
}

// k-th largest key of the reference's sample (positions from core::sample_position).
uint32_t sample_threshold(const TopkArgs& a, uint32_t k1, int64_t rank) {
  const int64_t s = core::sample_count(a.n);
  std::vector<uint32_t> keys(static_cast<size_t>(s));
  at::parallel_for(0, s, 1024, [&](int64_t j0, int64_t j1) {
    for (int64_t j = j0; j < j1; ++j) {
      const int64_t p = core::sample_position(a.n, k1, j);
      keys[static_cast<size_t>(j)] = core::magnitude_key(v_at(a, p));
    }
  });
  return kth_largest_key(keys, rank);
}

struct ChunkScan {
  std::vector<TopkEntry> entries;  // key >= keep, in index order (when stored)
  int64_t count = 0;               // candidates: key >= t
  bool stored = false;
  uint32_t max_key = 0;
};

// Writes the payload of x into p (format::topk_layout(...).total_bytes bytes, any
// alignment: every store into it is unaligned-safe). Arguments already checked.
void topk_select_into(const at::Tensor& x, int64_t k, const std::optional<at::Tensor>& residual,
                      bool exact, int64_t value_format, int64_t seed, uint8_t* p) {
  const at::Tensor xc = x.contiguous();
  const int64_t n = xc.numel();
  const uint8_t vf = static_cast<uint8_t>(value_format);
  const format::TopkLayout layout = format::topk_layout(n, k, vf);
  const format::Header h = format::make_topk_header(n, k, vf, !exact);
  std::memcpy(p, &h, sizeof(h));
  const bool index64 = h.index_format == format::kIndexInt64;
  // Zero padding after each section (part of the format).
  const int64_t idx_end = layout.indices_offset + k * (index64 ? 8 : 4);
  std::memset(p + idx_end, 0, static_cast<size_t>(layout.values_offset - idx_end));
  const int64_t val_end = layout.values_offset + k * format::value_bytes(vf);
  std::memset(p + val_end, 0, static_cast<size_t>(layout.total_bytes - val_end));

  TopkArgs a;
  a.x = xc.data_ptr();
  a.x_dtype = dtype_of(xc);
  a.residual = residual.has_value() ? residual->data_ptr<float>() : nullptr;
  a.n = n;
  const Isa isa = active_isa();
  const int64_t nchunks = (n + kTopkChunk - 1) / kTopkChunk;
  auto chunk_len = [&](int64_t c) { return std::min(n, (c + 1) * kTopkChunk) - c * kTopkChunk; };

  // ---- 1. sampled threshold and scan ----------------------------------------------------
  const uint32_t k1 = core::seed_key(static_cast<uint32_t>(seed));
  const int64_t s = core::sample_count(n);
  // Exact mode only needs t low enough that >= k candidates pass: a deeper rank
  // (about 1.5 k s / n + 64) makes a shortfall (and the slower fallback) very unlikely.
  const int64_t rank = exact ? std::min(s, (3 * k * s + 2 * n - 1) / (2 * n) + 64)
                             : core::approximate_rank(n, k);
  const uint32_t t = sample_threshold(a, k1, rank);
  // Entries kept in memory at most (beyond it: the slow path).
  const int64_t budget = std::min(n, 3 * k + 128 * (n / s) + 4096);
  // The fused scan (see the top): error feedback, and values whose decode of a finite v
  // below 2**127 is finite (int8's scale could be inf or NaN: its slow path needs every
  // old residual). It also keeps the huge and non-finite v below t, whose residual the
  // write may need.
  const bool fuse = a.residual != nullptr && vf != format::kValueInt8;
  const uint32_t keep = fuse ? std::min(t, kTopkHugeKey) : t;
  std::vector<ChunkScan> scans(static_cast<size_t>(nchunks));
  std::atomic<int64_t> kept{0};
  at::parallel_for(0, nchunks, 1, [&](int64_t c0, int64_t c1) {
    std::unique_ptr<TopkEntry[]> buf(new TopkEntry[kTopkChunk]);
    for (int64_t c = c0; c < c1; ++c) {
      ChunkScan& cs = scans[static_cast<size_t>(c)];
      cs.stored = kept.load(std::memory_order_relaxed) < budget;
      int64_t ne = 0;
      GZ_ISA_CALL(isa, topk_scan_chunk, a, c, t, keep, cs.stored ? buf.get() : nullptr, fuse,
                  &ne, &cs.count, &cs.max_key);
      if (cs.stored) {
        cs.entries.assign(buf.get(), buf.get() + ne);
        kept.fetch_add(ne, std::memory_order_relaxed);
      }
    }
  });
  int64_t ncand = 0, nkept = 0;
  bool all_stored = true, any_fused = false;
  uint32_t max_key = 0;
  for (const ChunkScan& cs : scans) {
    ncand += cs.count;
    nkept += static_cast<int64_t>(cs.entries.size());
    all_stored = all_stored && cs.stored;
    any_fused = any_fused || (fuse && cs.stored);
    max_key = std::max(max_key, cs.max_key);
  }
  // The usual path: the top-k lie among the kept entries (every entry not kept has a
  // smaller key than each kept one), and the rule is the threshold rule.
  const bool fill = !exact && ncand < k;
  const bool list_path = !fill && all_stored && nkept >= k;
  at::Tensor v_buf;
  if (!list_path && any_fused) {
    // Slow path after a fused scan: materialise v. In a fused chunk, the residual of an
    // entry not kept is v (finite, below 2**127: any decode of it is finite, so its old
    // residual is never needed again), and each kept entry still has its old residual
    // and v in the entry. Other chunks: v = x + residual, nothing written yet.
    v_buf = at::empty({n}, xc.options().dtype(at::kFloat));
    float* V = v_buf.data_ptr<float>();
    at::parallel_for(0, nchunks, 1, [&](int64_t c0, int64_t c1) {
      for (int64_t c = c0; c < c1; ++c) {
        const ChunkScan& cs = scans[static_cast<size_t>(c)];
        const int64_t e0 = c * kTopkChunk, e1 = e0 + chunk_len(c);
        if (cs.stored) {
          std::memcpy(V + e0, a.residual + e0, static_cast<size_t>(e1 - e0) * sizeof(float));
          for (const TopkEntry& en : cs.entries) V[e0 + en.off] = en.v;
        } else {
          for (int64_t e = e0; e < e1; ++e) V[e] = v_at(a, e);
        }
      }
    });
    // From here on v is read from V; the write pass reads the residual only as the old
    // residual, which every element it may select or leave non-finite still holds.
    a.x = V;
    a.x_dtype = Dtype::kFloat;
    a.v_given = true;
  }

  // ---- 2. the selection rule, and each chunk's share of the k slots ---------------------
  TopkSelectRule rule;
  std::vector<int64_t> take(static_cast<size_t>(nchunks)), ties(static_cast<size_t>(nchunks), 0);
  if (fill) {
    // Reference: every candidate plus the lowest-index non-candidates up to k, i.e.
    // everything below fill_end (where the non-candidates number k - ncand) + candidates.
    const int64_t need = k - ncand;
    rule.mode = TopkSelectRule::kFill;
    rule.T = t;
    int64_t before = 0, c = 0;
    for (; c < nchunks; ++c) {
      const int64_t non = chunk_len(c) - scans[static_cast<size_t>(c)].count;
      if (before + non >= need) break;
      before += non;
    }
    // Walk chunk c element by element to the need-th non-candidate.
    int64_t e = c * kTopkChunk, cand_below = 0;
    for (; before < need; ++e) {
      if (core::magnitude_key(v_at(a, e)) >= t) ++cand_below;
      else ++before;
    }
    rule.fill_end = e;
    for (int64_t cc = 0; cc < nchunks; ++cc) {
      const int64_t e0 = cc * kTopkChunk;
      const int64_t cnt = scans[static_cast<size_t>(cc)].count;
      if (e0 + chunk_len(cc) <= e) take[static_cast<size_t>(cc)] = chunk_len(cc);
      else if (e0 >= e) take[static_cast<size_t>(cc)] = cnt;
      else take[static_cast<size_t>(cc)] = (e - e0) + (cnt - cand_below);
    }
  } else {
    rule.mode = TopkSelectRule::kThreshold;
    rule.fill_end = 0;
    std::vector<int64_t> gt(static_cast<size_t>(nchunks)), eq(static_cast<size_t>(nchunks));
    RadixResult rr;
    if (list_path) {
      // The top-k lie among the kept entries: select over them only.
      rr = radix_select(nchunks, k, [&](int64_t c, const RadixLevel& l, uint32_t* hist) {
        for (const TopkEntry& en : scans[static_cast<size_t>(c)].entries) {
          const uint32_t key = core::magnitude_key(en.v);
          if (l.matches(key)) ++hist[l.bin(key)];
        }
      });
      at::parallel_for(0, nchunks, 1, [&](int64_t c0, int64_t c1) {
        for (int64_t c = c0; c < c1; ++c) {
          int64_t g = 0, q = 0;
          for (const TopkEntry& en : scans[static_cast<size_t>(c)].entries) {
            const uint32_t key = core::magnitude_key(en.v);
            g += key > rr.T;
            q += key == rr.T;
          }
          gt[static_cast<size_t>(c)] = g;
          eq[static_cast<size_t>(c)] = q;
        }
      });
    } else {
      // Exact fallback over all of v.
      rr = radix_select(nchunks, k, [&](int64_t c, const RadixLevel& l, uint32_t* hist) {
        GZ_ISA_CALL(isa, topk_histogram_chunk, a, c, l, hist);
      });
      at::parallel_for(0, nchunks, 1, [&](int64_t c0, int64_t c1) {
        for (int64_t c = c0; c < c1; ++c)
          GZ_ISA_CALL(isa, topk_count_chunk, a, c, rr.T, &gt[static_cast<size_t>(c)],
                      &eq[static_cast<size_t>(c)]);
      });
    }
    rule.T = rr.T;
    int64_t ties_left = rr.ties;
    for (int64_t c = 0; c < nchunks; ++c) {
      const size_t cc = static_cast<size_t>(c);
      ties[cc] = std::min(ties_left, eq[cc]);
      ties_left -= ties[cc];
      take[cc] = gt[cc] + ties[cc];
    }
  }

  // ---- 3. write the entries and the residual --------------------------------------------
  TopkOutput o;
  o.indices = p + layout.indices_offset;
  o.index64 = index64;
  o.values = p + layout.values_offset;
  o.value_format = vf;
  o.int8_inv = 0.0f;
  o.int8_scale = 0.0f;
  if (vf == format::kValueInt8) {
    // amax of the selected values is the largest key overall: the top-k always holds it.
    const core::BlockParams bp = core::absmax_params(core::amax_from_key(max_key), 8);
    o.int8_inv = bp.inv;
    o.int8_scale = bp.scale;
    store_unaligned<float>(p + layout.scale_offset, bp.scale);
  }
  std::vector<int64_t> start(static_cast<size_t>(nchunks));
  int64_t total = 0;
  for (int64_t c = 0; c < nchunks; ++c) {
    start[static_cast<size_t>(c)] = total;
    total += take[static_cast<size_t>(c)];
  }
  TORCH_CHECK(total == k, "gradzip topk_select: internal error, selected ", total, " of k=", k);
  // Only the kept entries can be selected on the list path: unless the residual still
  // needs v everywhere (error feedback without a fused scan), write from them alone.
  const bool from_entries = list_path && (fuse || a.residual == nullptr);
  at::parallel_for(0, nchunks, 1, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) {
      const size_t cc = static_cast<size_t>(c);
      if (from_entries)
        GZ_ISA_CALL(isa, topk_write_entries, a, c, scans[cc].entries.data(),
                    static_cast<int64_t>(scans[cc].entries.size()), rule, ties[cc], start[cc],
                    o);
      else
        GZ_ISA_CALL(isa, topk_write_chunk, a, c, rule, ties[cc], start[cc], o);
    }
  });
}

}  // namespace

at::Tensor topk_select_cpu(const at::Tensor& x, int64_t k, const std::optional<at::Tensor>& residual,
                           bool exact, int64_t value_format, int64_t seed) {
  checks::check_topk_args(x, k, residual, value_format, seed);
  const int64_t bytes =
      format::topk_layout(x.numel(), k, static_cast<uint8_t>(value_format)).total_bytes;
  at::Tensor payload = at::empty({bytes}, x.options().dtype(at::kByte));
  topk_select_into(x, k, residual, exact, value_format, seed, payload.data_ptr<uint8_t>());
  return payload;
}

// The out= form: the same bytes, written into a caller-owned buffer.
void topk_select_out_cpu(const at::Tensor& x, int64_t k, const std::optional<at::Tensor>& residual,
                         bool exact, int64_t value_format, int64_t seed, const at::Tensor& out) {
  checks::check_topk_args(x, k, residual, value_format, seed);
  const int64_t bytes =
      format::topk_layout(x.numel(), k, static_cast<uint8_t>(value_format)).total_bytes;
  checks::check_payload_out(out, bytes, x, residual);
  topk_select_into(x, k, residual, exact, value_format, seed, out.data_ptr<uint8_t>());
}

}  // namespace cpu
}  // namespace gradzip

TORCH_LIBRARY_IMPL(gradzip, CPU, m) {
  m.impl("topk_select", &gradzip::cpu::topk_select_cpu);
  m.impl("topk_select.out", &gradzip::cpu::topk_select_out_cpu);
}
