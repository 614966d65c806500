// CUDA kernels of gradzip::dequantize_accumulate: out += alpha * sum_w decode(payload_w) for
// W payloads of one codec, reading each payload once and writing `out` once.
//
// Validation first. A corrupt payload must raise a ValueError before `out` is touched, and
// only the host can raise, so the op makes exactly one host synchronisation: a small check
// kernel copies the W 64-byte headers into one buffer and, for top-k payloads whose header
// is self-consistent, checks every index (in [0, numel), strictly ascending) into a flag
// per payload; one device-to-host copy of that buffer (W * 68 bytes) then lets the shared
// C++ checks (core/checks.h, the same as the CPU kernel's) validate the headers and raise.
// The kernels are launched only after that, with sizes and offsets the host has checked,
// so no read or write can leave the payloads or `out` whatever their bytes are.
//
// Dense payloads: one block per tile of 2048 elements, 8 consecutive elements per thread;
// per payload a thread reads one scale and `bits` bytes of codes (one aligned load), so W
// payloads are read with W coalesced loads per thread and `out` once (128-bit accesses).
// Top-k payloads: the same tiles. Indices are sorted, so a tile's entries of payload w are
// the range [lower_bound(tile start), lower_bound(tile end)) of its indices, found by a
// binary search per (payload, tile boundary) in a small kernel. A block adds its entries
// into a float32 tile in shared memory payload by payload (entries of one payload have
// distinct indices; a barrier separates payloads), so the sum order is the reference's
// ((0 + d_0) + d_1) + ... and the result is the same on every run, without atomics.
#include <torch/library.h>

#include <algorithm>

#include "core/checks.h"
#include "cuda/common.cuh"

namespace gradzip {
namespace cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kTile = kThreads * kVec;
constexpr int kFlagRange = 1;   // an index outside [0, numel)
constexpr int kFlagOrder = 2;   // indices not strictly ascending

struct AccumulateArgs {
  const uint8_t* payloads;  // [W, P], rows 16-byte aligned
  int64_t W, P;
  void* out;
  int64_t n;
  bool out_vec;
  float alpha;
  bool overwrite;  // out = (+0) + alpha * acc: out written, never read (_dequantize_sum)
  // dense
  int log2_block;
  int64_t codes_offset;
  // top-k
  int64_t k;
  int64_t indices_offset, values_offset, scale_offset;
  uint8_t value_format;
  int64_t* bounds;  // [W, ntiles + 1]: first entry of each payload at or after a tile
  int64_t ntiles;
};

// ---- validation ---------------------------------------------------------------------------
// Just enough of format::validate to know that the index section lies inside the row; the
// host repeats the full validation (core/checks.h) on the copied header before trusting it.
__device__ __forceinline__ bool topk_header_in_bounds(const format::Header& h, int64_t P) {
  if (h.magic != format::kMagic || h.version != format::kVersion ||
      h.codec != format::kCodecTopk)
    return false;
  if (h.value_format < format::kValueFp32 || h.value_format > format::kValueInt8) return false;
  if (h.numel >= (uint64_t(1) << 62) || h.k < 1 || h.k > h.numel || h.k > uint64_t(P))
    return false;
  if (h.index_format != format::index_format_for(int64_t(h.numel))) return false;
  const auto l = format::topk_layout(int64_t(h.numel), int64_t(h.k), h.value_format);
  return h.total_bytes == uint64_t(P) && l.total_bytes == P;
}

__device__ __forceinline__ int64_t load_index(const uint8_t* indices, int index_bytes, int64_t j) {
  return index_bytes == 8 ? reinterpret_cast<const int64_t*>(indices)[j]
                          : int64_t(reinterpret_cast<const int32_t*>(indices)[j]);
}

__global__ void __launch_bounds__(kThreads)
accumulate_check_kernel(const uint8_t* payloads, int64_t W, int64_t P, uint8_t* headers,
                        uint32_t* flags) {
  __shared__ __align__(16) uint8_t raw[format::kHeaderBytes];
  for (int64_t w = blockIdx.y; w < W; w += gridDim.y) {
    const uint8_t* row = payloads + w * P;
    __syncthreads();  // `raw` is reused across payloads
    if (threadIdx.x < format::kHeaderBytes) raw[threadIdx.x] = row[threadIdx.x];  // P >= 64
    __syncthreads();
    if (blockIdx.x == 0 && threadIdx.x < format::kHeaderBytes)
      headers[w * format::kHeaderBytes + threadIdx.x] = raw[threadIdx.x];
    format::Header h;
    memcpy(&h, raw, sizeof(h));
    if (!topk_header_in_bounds(h, P)) continue;  // dense, or rejected by the host checks
    const int ib = format::index_bytes(h.index_format);
    const uint8_t* indices = row + format::kHeaderBytes;
    const int64_t k = int64_t(h.k), numel = int64_t(h.numel);
    for (int64_t j = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; j < k;
         j += int64_t(gridDim.x) * blockDim.x) {
      const int64_t i = load_index(indices, ib, j);
      uint32_t bad = (i < 0 || i >= numel) ? kFlagRange : 0u;
      if (j + 1 < k && !(i < load_index(indices, ib, j + 1))) bad |= kFlagOrder;
      if (bad) atomicOr(&flags[w], bad);
    }
  }
}

// ---- `out`, 8 elements as float32 ----------------------------------------------------------
template <int ODT>
__device__ __forceinline__ void load_out8(const AccumulateArgs& a, int64_t e0, int nv,
                                          float (&f)[kVec]) {
  if constexpr (ODT == kF32) {
    load8_rw(static_cast<const float*>(a.out), e0, nv, a.out_vec, f);
  } else {
    const uint16_t* p = static_cast<const uint16_t*>(a.out) + e0;
    if (a.out_vec && nv == kVec) {
      const uint4 u = *reinterpret_cast<const uint4*>(p);
      const uint32_t w[4] = {u.x, u.y, u.z, u.w};
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        f[2 * i] = convert16<ODT>(static_cast<uint16_t>(w[i] & 0xFFFFu));
        f[2 * i + 1] = convert16<ODT>(static_cast<uint16_t>(w[i] >> 16));
      }
    } else {
#pragma unroll
      for (int i = 0; i < kVec; ++i) f[i] = i < nv ? convert16<ODT>(p[i]) : 0.0f;
    }
  }
}

template <int ODT>
__device__ __forceinline__ uint16_t from_float16(float f) {
  return ODT == kF16 ? core::float_to_half_bits(f) : core::float_to_bf16_bits(f);
}

// out = to_out_dtype(float32(out) + alpha * acc), as reference.dequantize_accumulate
// (float32(out) taken as +0 without reading out when a.overwrite).
template <int ODT>
__device__ __forceinline__ void update_out8(const AccumulateArgs& a, int64_t e0, int nv,
                                            const float (&acc)[kVec]) {
  float o[kVec];
  if (a.overwrite) {
#pragma unroll
    for (int i = 0; i < kVec; ++i) o[i] = 0.0f;
  } else {
    load_out8<ODT>(a, e0, nv, o);
  }
#pragma unroll
  for (int i = 0; i < kVec; ++i) o[i] = core::nan_fadd(o[i], core::nan_fmul(a.alpha, acc[i]));
  if constexpr (ODT == kF32) {
    store8(static_cast<float*>(a.out), e0, nv, a.out_vec, o);
  } else {
    uint16_t* p = static_cast<uint16_t*>(a.out) + e0;
    uint16_t h[kVec];
#pragma unroll
    for (int i = 0; i < kVec; ++i) h[i] = from_float16<ODT>(o[i]);
    if (a.out_vec && nv == kVec) {
      *reinterpret_cast<uint4*>(p) =
          make_uint4(h[0] | (uint32_t(h[1]) << 16), h[2] | (uint32_t(h[3]) << 16),
                     h[4] | (uint32_t(h[5]) << 16), h[6] | (uint32_t(h[7]) << 16));
    } else {
#pragma unroll
      for (int i = 0; i < kVec; ++i)
        if (i < nv) p[i] = h[i];
    }
  }
}

// ---- dense ---------------------------------------------------------------------------------
// The 8 codes (BITS bytes) of elements e0..e0+7. A thread past the last full group still
// reads whole bytes inside the zero-padded codes section (it ends at a 16-byte boundary
// at or after ceil(numel / 8) * BITS bytes), so the load stays inside the payload.
template <int BITS>
__device__ __forceinline__ uint64_t load_codes(const uint8_t* codes, int64_t e0) {
  const uint8_t* p = codes + (e0 * BITS) / 8;
  if constexpr (BITS == 8) {
    const uint2 u = __ldg(reinterpret_cast<const uint2*>(p));
    return uint64_t(u.x) | (uint64_t(u.y) << 32);
  } else if constexpr (BITS == 4) {
    return __ldg(reinterpret_cast<const uint32_t*>(p));
  } else if constexpr (BITS == 2) {
    return __ldg(reinterpret_cast<const unsigned short*>(p));
  } else {
    return __ldg(p);
  }
}

template <int BITS, int ODT>
__global__ void __launch_bounds__(kThreads) accumulate_dense_kernel(const AccumulateArgs a) {
  const int64_t e0 = int64_t(blockIdx.x) * kTile + int64_t(threadIdx.x) * kVec;
  const int nv = valid_count(a.n, e0);
  if (nv == 0) return;  // no barriers in this kernel
  const int64_t blk = e0 >> a.log2_block;  // the 8 elements share one scale (block >= 32)
  constexpr int kQmax = BITS == 1 ? 0 : (1 << (BITS - 1)) - 1;
  constexpr uint32_t kMask = (1u << BITS) - 1u;
  float acc[kVec];
#pragma unroll
  for (int i = 0; i < kVec; ++i) acc[i] = 0.0f;
#pragma unroll 4
  for (int64_t w = 0; w < a.W; ++w) {
    const uint8_t* row = a.payloads + w * a.P;
    const float scale = __ldg(reinterpret_cast<const float*>(row + format::kHeaderBytes) + blk);
    const uint64_t c = load_codes<BITS>(row + a.codes_offset, e0);
#pragma unroll
    for (int i = 0; i < kVec; ++i) {
      const uint32_t code = static_cast<uint32_t>(c >> (i * BITS)) & kMask;
      float d;
      if constexpr (BITS == 1) {
        d = code ? core::neg_bits(scale) : scale;
      } else {
        d = core::nan_fmul(static_cast<float>(static_cast<int>(code) - kQmax), scale);
      }
      acc[i] = core::nan_fadd(acc[i], d);
    }
  }
  update_out8<ODT>(a, e0, nv, acc);
}

// ---- top-k ---------------------------------------------------------------------------------
template <int IB>
__global__ void __launch_bounds__(kThreads) accumulate_bounds_kernel(const AccumulateArgs a) {
  const int64_t per = a.ntiles + 1;
  const int64_t total = a.W * per;
  for (int64_t e = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; e < total;
       e += int64_t(gridDim.x) * blockDim.x) {
    const int64_t w = e / per, c = e % per;
    const int64_t target = c * kTile < a.n ? c * kTile : a.n;
    const uint8_t* indices = a.payloads + w * a.P + a.indices_offset;
    int64_t lo = 0, hi = a.k;  // first j with index[j] >= target
    while (lo < hi) {
      const int64_t mid = lo + (hi - lo) / 2;
      if (load_index(indices, IB, mid) < target) lo = mid + 1;
      else hi = mid;
    }
    a.bounds[e] = lo;
  }
}

template <int IB, int ODT>
__global__ void __launch_bounds__(kThreads) accumulate_sparse_kernel(const AccumulateArgs a) {
  __shared__ float acc[kTile];
  const int64_t tile_start = int64_t(blockIdx.x) * kTile;
  const int64_t per = a.ntiles + 1;
  for (int i = threadIdx.x; i < kTile; i += kThreads) acc[i] = 0.0f;
  __syncthreads();
  for (int64_t w = 0; w < a.W; ++w) {
    const uint8_t* row = a.payloads + w * a.P;
    const uint8_t* indices = row + a.indices_offset;
    const uint8_t* values = row + a.values_offset;
    const float vscale = a.value_format == format::kValueInt8
                             ? *reinterpret_cast<const float*>(row + a.scale_offset) : 0.0f;
    const int64_t lo = a.bounds[w * per + blockIdx.x], hi = a.bounds[w * per + blockIdx.x + 1];
    for (int64_t j = lo + threadIdx.x; j < hi; j += kThreads) {
      const int64_t off = load_index(indices, IB, j) - tile_start;
      float d;
      if (a.value_format == format::kValueFp32) {
        d = reinterpret_cast<const float*>(values)[j];
      } else if (a.value_format == format::kValueBf16) {
        d = core::bf16_bits_to_float(reinterpret_cast<const uint16_t*>(values)[j]);
      } else {
        d = core::nan_fmul(static_cast<float>(reinterpret_cast<const int8_t*>(values)[j]), vscale);
      }
      if (off >= 0 && off < kTile) acc[off] = core::nan_fadd(acc[off], d);  // validated; kept as a guard
    }
    __syncthreads();
  }
  const int64_t e0 = tile_start + int64_t(threadIdx.x) * kVec;
  const int nv = valid_count(a.n, e0);
  if (nv == 0) return;
  float mine[kVec];
#pragma unroll
  for (int i = 0; i < kVec; ++i) mine[i] = acc[threadIdx.x * kVec + i];
  update_out8<ODT>(a, e0, nv, mine);
}

// ---- host ----------------------------------------------------------------------------------
int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

template <int BITS>
void launch_dense(DType odt, const AccumulateArgs& a, cudaStream_t s) {
  const dim3 grid(static_cast<unsigned>(a.ntiles)), block(kThreads);
  switch (odt) {
    case kF32: GZ_LAUNCH(grid, block, 0, s, accumulate_dense_kernel<BITS, kF32>)(a); break;
    case kF16: GZ_LAUNCH(grid, block, 0, s, accumulate_dense_kernel<BITS, kF16>)(a); break;
    case kBF16: GZ_LAUNCH(grid, block, 0, s, accumulate_dense_kernel<BITS, kBF16>)(a); break;
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <int IB>
void launch_sparse(DType odt, const AccumulateArgs& a, cudaStream_t s) {
  const int64_t nb = a.W * (a.ntiles + 1);
  const int64_t bgrid = std::min<int64_t>(ceil_div(nb, kThreads), int64_t(num_sms()) * 8);
  GZ_LAUNCH(static_cast<unsigned>(bgrid), kThreads, 0, s, accumulate_bounds_kernel<IB>)(a);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  const dim3 grid(static_cast<unsigned>(a.ntiles)), block(kThreads);
  switch (odt) {
    case kF32: GZ_LAUNCH(grid, block, 0, s, accumulate_sparse_kernel<IB, kF32>)(a); break;
    case kF16: GZ_LAUNCH(grid, block, 0, s, accumulate_sparse_kernel<IB, kF16>)(a); break;
    case kBF16: GZ_LAUNCH(grid, block, 0, s, accumulate_sparse_kernel<IB, kBF16>)(a); break;
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// overwrite: out = (+0) + alpha * sum with out never read, the bits of zeroing it first.
void dequantize_cuda(const at::Tensor& payloads_in, const at::Tensor& out, double alpha,
                     bool overwrite) {
  checks::check_accumulate_args(payloads_in, out);
  TORCH_CHECK_VALUE(on_device(out), "out must be a CUDA tensor for the CUDA kernel, got ",
                    out.device());
  GZ_DEVICE_GUARD(out);
  const int64_t W = payloads_in.size(0), P = payloads_in.size(1), n = out.numel();
  TORCH_CHECK_VALUE(P >= format::kHeaderBytes, "truncated payload: ", P,
                    " bytes is shorter than the 64-byte header");
  at::Tensor payloads = payloads_in.contiguous();
  if (!aligned16(payloads.data_ptr())) payloads = payloads.clone();  // a fresh, aligned copy
  const uint8_t* base = payloads.data_ptr<uint8_t>();
  const cudaStream_t s = current_stream();

  // Headers and index flags, copied to the host in one transfer (the one host sync).
  const int64_t flags_at = W * format::kHeaderBytes;
  at::Tensor staging = at::zeros({flags_at + W * 4}, payloads.options());
  {
    const int64_t max_k = (P - format::kHeaderBytes) / 4 + 1;
    const dim3 grid(static_cast<unsigned>(std::min<int64_t>(ceil_div(max_k, kThreads), 256)),
                    static_cast<unsigned>(std::min<int64_t>(W, 65535)));
    uint8_t* st = staging.data_ptr<uint8_t>();
    GZ_LAUNCH(grid, kThreads, 0, s, accumulate_check_kernel)(
        base, W, P, st, reinterpret_cast<uint32_t*>(st + flags_at));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  const at::Tensor host = staging.cpu();
  const uint8_t* hb = host.data_ptr<uint8_t>();
  const format::Header h = checks::check_headers(hb, W, format::kHeaderBytes, P, n);
  if (h.codec == format::kCodecTopk) {
    for (int64_t w = 0; w < W; ++w) {
      uint32_t f;
      std::memcpy(&f, hb + flags_at + 4 * w, 4);
      TORCH_CHECK_VALUE(!(f & kFlagRange), "payload ", w,
                        ": corrupt gradzip top-k payload: index out of range");
      TORCH_CHECK_VALUE(!(f & kFlagOrder), "payload ", w,
                        ": corrupt gradzip top-k payload: indices not strictly ascending");
    }
  }
  if (n == 0) return;

  AccumulateArgs a;
  a.payloads = base;
  a.W = W;
  a.P = P;
  a.out = out.data_ptr();
  a.n = n;
  a.out_vec = aligned16(a.out);
  a.alpha = static_cast<float>(alpha);
  a.overwrite = overwrite;
  a.ntiles = ceil_div(n, kTile);
  TORCH_CHECK_VALUE(a.ntiles <= 0x7FFFFFFF, "out of ", n, " elements is too large");
  const DType odt = dtype_of(out);
  if (h.codec == format::kCodecDense) {
    a.log2_block = 0;
    while ((uint32_t(1) << a.log2_block) < h.block) ++a.log2_block;
    a.codes_offset = format::dense_layout(n, h.bits, h.block).codes_offset;
    switch (h.bits) {
      case 8: launch_dense<8>(odt, a, s); break;
      case 4: launch_dense<4>(odt, a, s); break;
      case 2: launch_dense<2>(odt, a, s); break;
      default: launch_dense<1>(odt, a, s); break;
    }
    return;
  }
  const auto l = format::topk_layout(n, int64_t(h.k), h.value_format);
  a.k = int64_t(h.k);
  a.indices_offset = l.indices_offset;
  a.values_offset = l.values_offset;
  a.scale_offset = l.scale_offset;
  a.value_format = h.value_format;
  at::Tensor bounds = at::empty({W * (a.ntiles + 1)}, out.options().dtype(at::kLong));
  a.bounds = bounds.data_ptr<int64_t>();
  if (h.index_format == format::kIndexInt64) launch_sparse<8>(odt, a, s);
  else launch_sparse<4>(odt, a, s);
}

void dequantize_accumulate_cuda(const at::Tensor& payloads, const at::Tensor& out,
                                double alpha) {  // same C++ signature as the CPU kernel
  dequantize_cuda(payloads, out, alpha, /*overwrite=*/false);
}

void dequantize_sum_cuda(const at::Tensor& payloads, const at::Tensor& out, double alpha) {
  dequantize_cuda(payloads, out, alpha, /*overwrite=*/true);
}

}  // namespace
}  // namespace cuda
}  // namespace gradzip

GZ_REGISTER_CUDA_OP("dequantize_accumulate", &gradzip::cuda::dequantize_accumulate_cuda)
GZ_REGISTER_CUDA_OP("_dequantize_sum", &gradzip::cuda::dequantize_sum_cuda)
