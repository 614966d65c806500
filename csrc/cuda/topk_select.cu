// CUDA kernels of gradzip::topk_select: the k entries of largest |v| (v = x + residual),
// by radix select on the 31-bit magnitude key, then one ordered compaction pass that writes
// the payload (ascending indices and values) and the error-feedback residual.
//
// Every kernel reads its control data (threshold, ranks, which source to read) from a small
// state struct in device memory written by the kernel before it, so the host launches a
// fixed sequence without ever waiting for the GPU: no host synchronisation, and the sizes
// of all outputs and work buffers follow from (numel, k, value format) alone.
//
//   init      zero the state and histograms, write the header            1 block
//   sample    approximate mode: threshold t = the approximate_rank-th    1 block x 1024
//             largest key of the 16384 sampled positions (radix select in shared memory)
//   hist p    p = 0, 1, 2: histogram of key bits [30:20], [19:10], [9:0] grid-stride,
//             among keys matching the digits found so far (and >= t)      256 threads
//   find p    pick the bin holding the rank-th largest key; decide what  1 block
//             the next pass reads
//   count     per chunk: how many keys are in S and in W (below)         1 block / chunk
//   scan      exclusive scans over chunks -> output offsets              1 block x 1024
//   write     in index order: select, write index + value, residual      1 block / chunk
//   int8      int8 values only: one scale from the selected amax         grid-stride
//
// The selection is always "S, plus the lowest-index q entries of W":
//   exact, or approximate with >= k candidates: S = {key > T}, W = {key == T}, q = k - |S|
//     (T = the k-th largest key; ties go to the lower index, as reference.select_indices);
//   approximate with fewer than k candidates: S = {key >= t}, W = {key < t}, q = k - |S|
//     (every candidate, then the lowest-index non-candidates: the reference's fill rule).
// Approximate mode with >= k candidates is the exact top-k (reference.select_indices), so
// it only has to be found faster: the first pass appends the candidates' keys to a buffer
// and the later passes read that buffer instead of the whole tensor. Exact mode does the
// same for the second pass when the first digit's bin is small enough. Whichever source a
// pass reads, the histogram counts are the same, so the result does not depend on it.
#include <torch/library.h>

#include <algorithm>
#include <atomic>

#include "core/checks.h"
#include "cuda/common.cuh"

namespace gradzip {
namespace cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kTile = kThreads * kVec;  // elements per block per step
constexpr int kSampleThreads = 1024;
constexpr int kSampleSmem = core::kSampleSize * 4;  // the sampled keys, in dynamic shared memory
constexpr int kScanThreads = 1024;
constexpr int kMaxChunks = 4096;        // the scan runs in one block: bounded work
constexpr int kHistTotal = 4096;        // 2048 + 1024 + 1024 bins

__host__ __device__ constexpr int pass_bins(int pass) { return pass == 0 ? 2048 : 1024; }
__host__ __device__ constexpr int pass_shift(int pass) { return pass == 0 ? 20 : pass == 1 ? 10 : 0; }
__host__ __device__ constexpr int pass_hist_offset(int pass) { return pass == 0 ? 0 : pass == 1 ? 2048 : 3072; }

struct TopkState {
  uint32_t lo;      // candidates are keys >= lo (approximate threshold t; 0 in exact mode)
  uint32_t prefix;  // key bits found so far by the radix passes
  uint32_t mask;    // which bits of `prefix` are found
  uint32_t s_lo;    // S = {key >= s_lo}
  uint32_t w_lo;    // W = {w_lo <= key < w_hi}
  uint32_t w_hi;
  uint32_t amax_key;  // int8 values: largest key among the selected entries
  int32_t done;       // S, W, q are final; later radix kernels do nothing
  int32_t src;        // the next histogram pass reads: 0 the tensor, 1 the key buffer
  int32_t compact;    // the next pass over the tensor appends matching keys to the buffer
  int64_t rank;       // rank (1-based, from the top) still sought among matching keys
  int64_t q;          // how many entries of W are taken, lowest index first
  unsigned long long nbuf;  // keys appended to the buffer (may exceed its capacity)
};

struct TopkArgs {
  const void* x;
  float* residual;  // nullptr without error feedback
  int64_t n;
  int64_t k;
  bool x_vec, r_vec;
  bool approx;
  uint8_t value_format;
  int index_bytes;  // 4 or 8
  uint32_t seed_key;
  int64_t sample_rank;
  TopkState* state;
  unsigned long long* hist;  // kHistTotal bins, one histogram per pass
  uint32_t* buf;             // candidate keys
  int64_t cap;               // buffer capacity
  int64_t ntiles;
  int64_t tiles_per_chunk;
  int64_t nchunks;
  unsigned long long* chunk_s;  // per chunk: |S|, |W|
  unsigned long long* chunk_w;
  unsigned long long* off_w;    // per chunk: W entries before it, selected entries before it
  unsigned long long* off_sel;
  float* tmp_values;  // int8 values: the selected v in payload order
  uint8_t* payload;
  int64_t indices_offset, values_offset, scale_offset;
  HeaderWords header;
};

// ---- init -------------------------------------------------------------------------------
__global__ void __launch_bounds__(kThreads) topk_init_kernel(const TopkArgs a) {
  for (int i = threadIdx.x; i < kHistTotal; i += blockDim.x) a.hist[i] = 0;
  if (threadIdx.x == 0) {
    TopkState s;
    memset(&s, 0, sizeof(s));
    s.rank = a.k;
    s.compact = a.approx ? 1 : 0;  // approximate: the first pass collects the candidates
    *a.state = s;
  }
  write_header(a.payload, a.header);
}

// ---- sample (approximate mode) ----------------------------------------------------------
template <int DT>
__device__ __forceinline__ float load_v1(const TopkArgs& a, int64_t i) {
  float x;
  if constexpr (DT == kF32) {
    x = __ldg(static_cast<const float*>(a.x) + i);
  } else {
    x = convert16<DT>(__ldg(static_cast<const uint16_t*>(a.x) + i));
  }
  return a.residual != nullptr ? core::nan_fadd(x, a.residual[i]) : x;
}

template <int DT>
__global__ void __launch_bounds__(kSampleThreads) topk_sample_kernel(const TopkArgs a) {
  GZ_DYNAMIC_SHARED(uint32_t, sample_keys);  // kSampleSize keys (64 KB)
  __shared__ uint32_t hist[2048];
  __shared__ uint32_t sh_prefix, sh_mask;
  __shared__ long long sh_rank;
  const int t = threadIdx.x;
  const int64_t s = core::sample_count(a.n);
  for (int64_t j = t; j < s; j += kSampleThreads)
    sample_keys[j] =
        core::magnitude_key(load_v1<DT>(a, core::sample_position(a.n, a.seed_key, j)));
  if (t == 0) {
    sh_prefix = 0;
    sh_mask = 0;
    sh_rank = a.sample_rank;
  }
  for (int pass = 0; pass < 3; ++pass) {
    const int nb = pass_bins(pass), shift = pass_shift(pass);
    for (int b = t; b < nb; b += kSampleThreads) hist[b] = 0;
    __syncthreads();
    const uint32_t prefix = sh_prefix, mask = sh_mask;
    for (int64_t j = t; j < s; j += kSampleThreads) {
      const uint32_t key = sample_keys[j];
      if ((key & mask) == prefix) atomicAdd(&hist[(key >> shift) & uint32_t(nb - 1)], 1u);
    }
    __syncthreads();
    if (warp_id() == 0) {
      const int64_t rank = sh_rank;
      int d;
      int64_t r;
      warp_find_bin(hist, nb, rank, &d, &r, nullptr);
      if (lane_id() == 0) {
        sh_prefix = prefix | (uint32_t(d) << shift);
        sh_mask = mask | (uint32_t(nb - 1) << shift);
        sh_rank = r;
      }
    }
    __syncthreads();
  }
  if (t == 0) a.state->lo = sh_prefix;
}

// ---- radix histogram passes --------------------------------------------------------------
// Loads 8 keys of the tensor (v = x + residual) or of the key buffer.
template <int DT>
__device__ __forceinline__ void load_keys(const TopkArgs& a, bool from_buf, int64_t e0, int nv,
                                          uint32_t (&key)[kVec]) {
  if (from_buf) {
    const uint32_t* p = a.buf + e0;
    if (nv == kVec) {  // the buffer is 16-byte aligned and e0 is a multiple of 8
      const uint4 u0 = reinterpret_cast<const uint4*>(p)[0];
      const uint4 u1 = reinterpret_cast<const uint4*>(p)[1];
      key[0] = u0.x; key[1] = u0.y; key[2] = u0.z; key[3] = u0.w;
      key[4] = u1.x; key[5] = u1.y; key[6] = u1.z; key[7] = u1.w;
    } else {
#pragma unroll
      for (int i = 0; i < kVec; ++i) key[i] = i < nv ? p[i] : 0u;
    }
  } else {
    float v[kVec], r_old[kVec];
    load_v8<DT>(a.x, a.residual, e0, nv, a.x_vec, a.r_vec, v, r_old);
#pragma unroll
    for (int i = 0; i < kVec; ++i) key[i] = core::magnitude_key(v[i]);
  }
}

template <int DT>
__global__ void __launch_bounds__(kThreads) topk_hist_kernel(const TopkArgs a, int pass) {
  __shared__ uint32_t hist[2048];
  __shared__ TopkState st;
  const int t = threadIdx.x, lane = lane_id();
  if (t == 0) st = *a.state;
  __syncthreads();
  if (st.done) return;  // the whole block leaves together
  const int nb = pass_bins(pass), shift = pass_shift(pass);
  for (int b = t; b < nb; b += kThreads) hist[b] = 0;
  __syncthreads();

  const bool from_buf = st.src == 1;
  const bool compact = st.compact != 0 && !from_buf;
  const int64_t nsrc = from_buf ? (st.nbuf < uint64_t(a.cap) ? int64_t(st.nbuf) : a.cap) : a.n;
  const int64_t ntiles = (nsrc + kTile - 1) / kTile;
  for (int64_t tile = blockIdx.x; tile < ntiles; tile += gridDim.x) {
    const int64_t e0 = tile * kTile + int64_t(t) * kVec;
    const int nv = valid_count(nsrc, e0);
    uint32_t key[kVec];
    load_keys<DT>(a, from_buf, e0, nv, key);
#pragma unroll
    for (int i = 0; i < kVec; ++i) {
      const bool match = i < nv && key[i] >= st.lo && (key[i] & st.mask) == st.prefix;
      if (match) atomicAdd(&hist[(key[i] >> shift) & uint32_t(nb - 1)], 1u);
      if (compact) {  // block-uniform: every lane takes part in the ballot
        const unsigned ballot = __ballot_sync(kFullMask, match);
        if (ballot != 0) {
          const int leader = __ffs(ballot) - 1;
          unsigned long long base = 0;
          if (lane == leader) base = atomicAdd(&a.state->nbuf, (unsigned long long)__popc(ballot));
          base = __shfl_sync(kFullMask, base, leader);
          if (match) {
            const unsigned long long slot = base + __popc(ballot & ((1u << lane) - 1u));
            if (slot < (unsigned long long)a.cap) a.buf[slot] = key[i];
          }
        }
      }
    }
  }
  __syncthreads();
  unsigned long long* out = a.hist + pass_hist_offset(pass);
  for (int b = t; b < nb; b += kThreads)
    if (hist[b] != 0) atomicAdd(&out[b], (unsigned long long)hist[b]);
}

__global__ void __launch_bounds__(kThreads) topk_find_kernel(const TopkArgs a, int pass) {
  __shared__ unsigned long long hist[2048];
  const int nb = pass_bins(pass), shift = pass_shift(pass);
  const unsigned long long* in = a.hist + pass_hist_offset(pass);
  for (int b = threadIdx.x; b < nb; b += kThreads) hist[b] = in[b];
  __syncthreads();
  if (warp_id() != 0) return;
  TopkState s = *a.state;
  if (s.done) return;
  int d;
  int64_t r;
  uint64_t total;
  warp_find_bin(hist, nb, s.rank, &d, &r, &total);
  if (lane_id() != 0) return;
  if (pass == 0 && a.approx && total < uint64_t(a.k)) {
    // Fewer than k candidates: all of them, then the lowest-index non-candidates.
    s.s_lo = s.lo;
    s.w_lo = 0;
    s.w_hi = s.lo;
    s.q = a.k - int64_t(total);
    s.done = 1;
    *a.state = s;
    return;
  }
  s.prefix |= uint32_t(d) << shift;
  s.mask |= uint32_t(nb - 1) << shift;
  s.rank = r;
  if (pass == 0) {
    if (a.approx) {  // the candidates were collected by pass 0, unless too many
      s.src = s.nbuf <= (unsigned long long)a.cap ? 1 : 0;
      s.compact = 0;
    } else {  // collect the keys of the chosen bin in pass 1 if they fit
      s.src = 0;
      s.compact = hist[d] <= (unsigned long long)a.cap ? 1 : 0;
      s.nbuf = 0;
    }
  } else if (pass == 1) {
    if (s.src == 0 && s.compact) s.src = 1;
    s.compact = 0;
  } else {  // all 31 bits known: T = prefix, and `rank` entries equal to T are taken
    s.s_lo = s.prefix + 1u;
    s.w_lo = s.prefix;
    s.w_hi = s.prefix + 1u;
    s.q = s.rank;
    s.done = 1;
  }
  *a.state = s;
}

// ---- ordered compaction -----------------------------------------------------------------
__device__ __forceinline__ void chunk_tiles(const TopkArgs& a, int64_t* begin, int64_t* end) {
  *begin = int64_t(blockIdx.x) * a.tiles_per_chunk;
  const int64_t e = *begin + a.tiles_per_chunk;
  *end = e < a.ntiles ? e : a.ntiles;
}

template <int DT>
__global__ void __launch_bounds__(kThreads) topk_count_kernel(const TopkArgs a) {
  __shared__ uint64_t scratch[kThreads / 32];
  const uint32_t s_lo = a.state->s_lo, w_lo = a.state->w_lo, w_hi = a.state->w_hi;
  int64_t tb, te;
  chunk_tiles(a, &tb, &te);
  uint64_t cs = 0, cw = 0;
  for (int64_t tile = tb; tile < te; ++tile) {
    const int64_t e0 = tile * kTile + int64_t(threadIdx.x) * kVec;
    const int nv = valid_count(a.n, e0);
    uint32_t key[kVec];
    load_keys<DT>(a, false, e0, nv, key);
#pragma unroll
    for (int i = 0; i < kVec; ++i) {
      cs += (i < nv && key[i] >= s_lo) ? 1 : 0;
      cw += (i < nv && key[i] >= w_lo && key[i] < w_hi) ? 1 : 0;
    }
  }
  const uint64_t ts = block_sum<kThreads>(cs, scratch);
  const uint64_t tw = block_sum<kThreads>(cw, scratch);
  if (threadIdx.x == 0) {
    a.chunk_s[blockIdx.x] = ts;
    a.chunk_w[blockIdx.x] = tw;
  }
}

__global__ void __launch_bounds__(kScanThreads) topk_scan_kernel(const TopkArgs a) {
  __shared__ uint64_t scratch[kScanThreads / 32];
  const int64_t q = a.state->q;
  uint64_t carry_w = 0, carry_sel = 0;
  for (int64_t base = 0; base < a.nchunks; base += kScanThreads) {
    const int64_t c = base + threadIdx.x;
    const bool in = c < a.nchunks;
    const uint64_t cw = in ? a.chunk_w[c] : 0, cs = in ? a.chunk_s[c] : 0;
    uint64_t tot;
    const uint64_t ew = carry_w + block_exclusive_scan<kScanThreads>(cw, &tot, scratch);
    carry_w += tot;
    // W entries of this chunk that are taken: those whose W-rank is below q.
    const int64_t left = q - int64_t(ew);
    const uint64_t take = left <= 0 ? 0 : (uint64_t(left) < cw ? uint64_t(left) : cw);
    const uint64_t es = carry_sel + block_exclusive_scan<kScanThreads>(cs + take, &tot, scratch);
    carry_sel += tot;
    if (in) {
      a.off_w[c] = ew;
      a.off_sel[c] = es;
    }
  }
}

template <int DT>
__global__ void __launch_bounds__(kThreads) topk_write_kernel(const TopkArgs a) {
  __shared__ uint64_t scratch[kThreads / 32];
  const int t = threadIdx.x;
  const uint32_t s_lo = a.state->s_lo, w_lo = a.state->w_lo, w_hi = a.state->w_hi;
  const int64_t q = a.state->q;
  const int64_t off_w = int64_t(a.off_w[blockIdx.x]);
  const int64_t off_sel = int64_t(a.off_sel[blockIdx.x]);
  const uint64_t q_chunk = q - off_w <= 0 ? 0 : uint64_t(q - off_w);  // W entries taken here
  uint8_t* indices = a.payload + a.indices_offset;
  uint8_t* values = a.payload + a.values_offset;
  uint32_t amax_key = 0;

  int64_t tb, te;
  chunk_tiles(a, &tb, &te);
  uint64_t s_before = 0, w_before = 0;  // S and W entries of this chunk before the tile
  for (int64_t tile = tb; tile < te; ++tile) {
    const int64_t e0 = tile * kTile + int64_t(t) * kVec;
    const int nv = valid_count(a.n, e0);
    float v[kVec], r_old[kVec];
    load_v8<DT>(a.x, a.residual, e0, nv, a.x_vec, a.r_vec, v, r_old);
    bool in_s[kVec], in_w[kVec];
    uint32_t cs = 0, cw = 0;
#pragma unroll
    for (int i = 0; i < kVec; ++i) {
      const uint32_t key = core::magnitude_key(v[i]);
      in_s[i] = i < nv && key >= s_lo;
      in_w[i] = i < nv && key >= w_lo && key < w_hi;
      cs += in_s[i];
      cw += in_w[i];
    }
    // Both counts in one scan: each is at most 2048 per tile, far from the 32-bit split.
    uint64_t tot;
    const uint64_t ex = block_exclusive_scan<kThreads>((uint64_t(cs) << 32) | cw, &tot, scratch);
    uint64_t sb = s_before + (ex >> 32);
    uint64_t wb = w_before + (ex & 0xFFFFFFFFu);
    float r_new[kVec];
#pragma unroll
    for (int i = 0; i < kVec; ++i) {
      const bool sel = in_s[i] || (in_w[i] && wb < q_chunk);
      float dec = 0.0f;
      bool keep_old = false;
      if (sel) {
        const int64_t pos = off_sel + int64_t(sb) + int64_t(wb < q_chunk ? wb : q_chunk);
        const int64_t index = e0 + i;
        if (pos < a.k) {  // always true when the counts are consistent; never write past k
          if (a.index_bytes == 8) reinterpret_cast<int64_t*>(indices)[pos] = index;
          else reinterpret_cast<int32_t*>(indices)[pos] = static_cast<int32_t>(index);
          if (a.value_format == format::kValueFp32) {
            reinterpret_cast<float*>(values)[pos] = core::canonical_nan(v[i]);
            dec = v[i];
          } else if (a.value_format == format::kValueBf16) {
            const uint16_t b = core::bf16_bits(v[i]);
            reinterpret_cast<uint16_t*>(values)[pos] = b;
            dec = core::bf16_bits_to_float(b);
          } else {  // int8: quantized once the amax of all selected values is known
            a.tmp_values[pos] = v[i];
            const uint32_t key = core::magnitude_key(v[i]);
            amax_key = key > amax_key ? key : amax_key;
            keep_old = true;  // topk_int8_kernel updates this residual entry
          }
        }
      }
      r_new[i] = keep_old ? r_old[i] : core::residual_update(v[i], dec, r_old[i]);
      sb += in_s[i];
      wb += in_w[i];
    }
    if (a.residual != nullptr) store8(a.residual, e0, nv, a.r_vec, r_new);
    s_before += tot >> 32;
    w_before += tot & 0xFFFFFFFFu;
  }
  if (a.value_format == format::kValueInt8) {
#pragma unroll
    for (int o = 16; o >= 1; o >>= 1) {
      const uint32_t other = __shfl_xor_sync(kFullMask, amax_key, o);
      amax_key = other > amax_key ? other : amax_key;
    }
    if (lane_id() == 0 && amax_key != 0) atomicMax(&a.state->amax_key, amax_key);
  }
}

// int8 values: the rules of reference._quantize_values_int8 (one block, qmax 127), and the
// residual of the selected entries (left untouched by topk_write_kernel).
__global__ void __launch_bounds__(kThreads) topk_int8_kernel(const TopkArgs a) {
  const float amax = core::amax_from_key(a.state->amax_key);
  const core::BlockParams p = core::absmax_params_exact(amax, 8);
  if (blockIdx.x == 0 && threadIdx.x == 0)
    *reinterpret_cast<float*>(a.payload + a.scale_offset) = p.scale;
  int8_t* values = reinterpret_cast<int8_t*>(a.payload + a.values_offset);
  const uint8_t* indices = a.payload + a.indices_offset;
  for (int64_t j = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; j < a.k;
       j += int64_t(gridDim.x) * blockDim.x) {
    const float v = a.tmp_values[j];
    const float q = core::quantize_value(v, p.inv, 127.0f, false, 0.0f);
    values[j] = static_cast<int8_t>(static_cast<int>(q));
    if (a.residual != nullptr) {
      const int64_t i = a.index_bytes == 8 ? reinterpret_cast<const int64_t*>(indices)[j]
                                           : reinterpret_cast<const int32_t*>(indices)[j];
      a.residual[i] = core::residual_update(v, core::fmul(q, p.scale), a.residual[i]);
    }
  }
}

// ---- host -------------------------------------------------------------------------------
int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// The sample kernel's 64 KB of dynamic shared memory is above the default 48 KB limit: opt
// in once per device and dtype (sm_80 and newer allow at least 99 KB per block). Once, so
// that a call captured in a CUDA graph after a warm-up makes no such API call.
template <int DT>
void allow_sample_smem() {
#if !defined(GZ_CUDA_EMULATION)
  constexpr int kMaxDevices = 64;
  static std::atomic<bool> done[kMaxDevices];
  const int dev = c10::cuda::current_device();
  if (dev < kMaxDevices && done[dev].load()) return;
  C10_CUDA_CHECK(cudaFuncSetAttribute(topk_sample_kernel<DT>,
                                      cudaFuncAttributeMaxDynamicSharedMemorySize, kSampleSmem));
  if (dev < kMaxDevices) done[dev].store(true);
#endif
}

// Launches KERNEL<dtype>; SMEM is the dynamic shared memory in bytes.
#define GZ_DISPATCH_DT(dt, KERNEL, GRID, BLOCK, SMEM, STREAM, ...)                      \
  do {                                                                                  \
    switch (dt) {                                                                       \
      case kF32: GZ_LAUNCH(GRID, BLOCK, SMEM, STREAM, KERNEL<kF32>)(__VA_ARGS__); break;       \
      case kF16: GZ_LAUNCH(GRID, BLOCK, SMEM, STREAM, KERNEL<kF16>)(__VA_ARGS__); break;       \
      case kBF16: GZ_LAUNCH(GRID, BLOCK, SMEM, STREAM, KERNEL<kBF16>)(__VA_ARGS__); break;     \
    }                                                                                   \
    C10_CUDA_KERNEL_LAUNCH_CHECK();                                                     \
  } while (0)

// Launches the kernels writing x's payload into `payload` (16-byte aligned, zero-filled,
// the layout's size). Arguments already checked.
void topk_select_launch(const at::Tensor& x_in, int64_t k,
                        const std::optional<at::Tensor>& residual, bool exact,
                        int64_t value_format, int64_t seed, const at::Tensor& payload) {
  const at::Tensor x = x_in.contiguous();
  const int64_t n = x.numel();  // >= k >= 1
  const uint8_t vf = static_cast<uint8_t>(value_format);
  const auto layout = format::topk_layout(n, k, vf);

  TopkArgs a;
  a.x = x.data_ptr();
  a.residual = residual.has_value() ? residual->data_ptr<float>() : nullptr;
  a.n = n;
  a.k = k;
  a.x_vec = aligned16(a.x);
  a.r_vec = a.residual != nullptr && aligned16(a.residual);
  a.approx = !exact;
  a.value_format = vf;
  a.index_bytes = format::index_bytes(format::index_format_for(n));
  a.seed_key = core::seed_key(static_cast<uint32_t>(seed));
  a.sample_rank = core::approximate_rank(n, k);
  a.ntiles = ceil_div(n, kTile);
  a.tiles_per_chunk = ceil_div(a.ntiles, kMaxChunks);
  a.nchunks = ceil_div(a.ntiles, a.tiles_per_chunk);
  // Room for the approximate candidates (about 1.25 k + n / 1024 of them) with a wide
  // margin, and for the exact mode's first-digit bin in typical gradients.
  a.cap = std::min<int64_t>(n, 2 * k + n / 256 + 4096);
  a.payload = payload.data_ptr<uint8_t>();
  a.indices_offset = layout.indices_offset;
  a.values_offset = layout.values_offset;
  a.scale_offset = layout.scale_offset;
  a.header = header_words(format::make_topk_header(n, k, vf, !exact));

  // One workspace: state | histograms | per-chunk counts and offsets | key buffer | int8 values.
  const int64_t state_bytes = 256;
  static_assert(sizeof(TopkState) <= 256, "state size");
  const int64_t hist_bytes = kHistTotal * 8;
  const int64_t chunk_bytes = format::align16(a.nchunks * 8);
  const int64_t buf_bytes = format::align16(a.cap * 4);
  const int64_t tmp_bytes = vf == format::kValueInt8 ? format::align16(k * 4) : 0;
  at::Tensor ws = at::empty({state_bytes + hist_bytes + 4 * chunk_bytes + buf_bytes + tmp_bytes},
                            x.options().dtype(at::kByte));
  uint8_t* w = ws.data_ptr<uint8_t>();
  TORCH_CHECK(aligned16(w) && aligned16(a.payload), "allocation is not 16-byte aligned");
  a.state = reinterpret_cast<TopkState*>(w);
  w += state_bytes;
  a.hist = reinterpret_cast<unsigned long long*>(w);
  w += hist_bytes;
  a.chunk_s = reinterpret_cast<unsigned long long*>(w);
  a.chunk_w = reinterpret_cast<unsigned long long*>(w + chunk_bytes);
  a.off_w = reinterpret_cast<unsigned long long*>(w + 2 * chunk_bytes);
  a.off_sel = reinterpret_cast<unsigned long long*>(w + 3 * chunk_bytes);
  w += 4 * chunk_bytes;
  a.buf = reinterpret_cast<uint32_t*>(w);
  w += buf_bytes;
  a.tmp_values = tmp_bytes ? reinterpret_cast<float*>(w) : nullptr;

  const cudaStream_t s = current_stream();
  const DType dt = dtype_of(x);
  GZ_LAUNCH(1, kThreads, 0, s, topk_init_kernel)(a);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  if (a.approx) {
    switch (dt) {
      case kF32: allow_sample_smem<kF32>(); break;
      case kF16: allow_sample_smem<kF16>(); break;
      case kBF16: allow_sample_smem<kBF16>(); break;
    }
    GZ_DISPATCH_DT(dt, topk_sample_kernel, 1, kSampleThreads, kSampleSmem, s, a);
  }
  const int64_t hist_grid = std::min<int64_t>(std::max(a.ntiles, ceil_div(a.cap, kTile)),
                                              int64_t(num_sms()) * 8);
  for (int pass = 0; pass < 3; ++pass) {
    GZ_DISPATCH_DT(dt, topk_hist_kernel, static_cast<unsigned>(hist_grid), kThreads, 0, s, a,
                   pass);
    GZ_LAUNCH(1, kThreads, 0, s, topk_find_kernel)(a, pass);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  const unsigned chunks = static_cast<unsigned>(a.nchunks);
  GZ_DISPATCH_DT(dt, topk_count_kernel, chunks, kThreads, 0, s, a);
  GZ_LAUNCH(1, kScanThreads, 0, s, topk_scan_kernel)(a);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  GZ_DISPATCH_DT(dt, topk_write_kernel, chunks, kThreads, 0, s, a);
  if (vf == format::kValueInt8) {
    const int64_t grid = std::min<int64_t>(ceil_div(k, kThreads), int64_t(num_sms()) * 8);
    GZ_LAUNCH(static_cast<unsigned>(grid), kThreads, 0, s, topk_int8_kernel)(a);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
}

at::Tensor topk_select_cuda(const at::Tensor& x, int64_t k,
                            const std::optional<at::Tensor>& residual, bool exact,
                            int64_t value_format, int64_t seed) {
  checks::check_topk_args(x, k, residual, value_format, seed);
  TORCH_CHECK_VALUE(on_device(x), "x must be a CUDA tensor for the CUDA kernel, got ",
                    x.device());
  GZ_DEVICE_GUARD(x);
  const int64_t bytes =
      format::topk_layout(x.numel(), k, static_cast<uint8_t>(value_format)).total_bytes;
  // Zero-filled: the section padding is part of the payload bytes.
  at::Tensor payload = at::zeros({bytes}, x.options().dtype(at::kByte));
  topk_select_launch(x, k, residual, exact, value_format, seed, payload);
  return payload;
}

// The out= form: `out` is zero-filled (the padding) and written in place, or, when it is
// not 16-byte aligned (the kernels' index and value stores need that), filled from an
// aligned temporary with one device copy.
void topk_select_out_cuda(const at::Tensor& x, int64_t k,
                          const std::optional<at::Tensor>& residual, bool exact,
                          int64_t value_format, int64_t seed, const at::Tensor& out) {
  checks::check_topk_args(x, k, residual, value_format, seed);
  TORCH_CHECK_VALUE(on_device(x), "x must be a CUDA tensor for the CUDA kernel, got ",
                    x.device());
  const int64_t bytes =
      format::topk_layout(x.numel(), k, static_cast<uint8_t>(value_format)).total_bytes;
  checks::check_payload_out(out, bytes, x, residual);
  GZ_DEVICE_GUARD(x);
  if (aligned16(out.data_ptr())) {
    out.zero_();
    topk_select_launch(x, k, residual, exact, value_format, seed, out);
  } else {
    const at::Tensor tmp = at::zeros({bytes}, out.options());
    topk_select_launch(x, k, residual, exact, value_format, seed, tmp);
    out.copy_(tmp);
  }
}

}  // namespace
}  // namespace cuda
}  // namespace gradzip

GZ_REGISTER_CUDA_OP("topk_select", &gradzip::cuda::topk_select_cuda)
GZ_REGISTER_CUDA_OUT_OP("topk_select", &gradzip::cuda::topk_select_out_cuda)
