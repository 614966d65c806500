// Device plumbing shared by gradzip's CUDA kernels: 8-element vector loads and stores,
// warp and block reductions and scans, and the launch-side helpers. The arithmetic itself
// lives in csrc/core (shared with the CPU kernels); nothing here rounds a float.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <cstring>

#if defined(GZ_CUDA_EMULATION)
#include "cuda/cpu_emulation.cuh"
#else
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <cuda_runtime.h>
#endif

#include "core/float_bits.h"
#include "core/format.h"
#include "core/quant.h"

// The few host-side constructs that differ when the kernels are run by the CPU emulation
// of tests/test_cuda_build.py (cuda/cpu_emulation.cuh); identical CUDA code otherwise.
#if defined(GZ_CUDA_EMULATION)
#define GZ_LAUNCH(grid, block, smem, stream, ...) \
  ::gradzip::emu::launcher(&__VA_ARGS__, grid, block, smem)
#define GZ_DYNAMIC_SHARED(type, name) \
  type* name = reinterpret_cast<type*>(::gradzip::emu::g_block->dynamic_smem.data())
#define GZ_DEVICE_GUARD(tensor) \
  do {                          \
  } while (0)
#define GZ_REGISTER_CUDA_OP(name, fn) \
  TORCH_LIBRARY_FRAGMENT(gradzip_cuda_emu, m) { m.def(name, fn); }
// The emulation infers schemas from the functions: the out= overload is the op "<name>_out"
// there, taking out as its last positional argument.
#define GZ_REGISTER_CUDA_OUT_OP(name, fn) \
  TORCH_LIBRARY_FRAGMENT(gradzip_cuda_emu, m) { m.def(name "_out", fn); }
#else
// Launches KERNEL<<<grid, block, smem, stream>>>; the kernel comes last so that template
// arguments with commas need no parentheses.
#define GZ_LAUNCH(grid, block, smem, stream, ...) __VA_ARGS__<<<grid, block, smem, stream>>>
#define GZ_DYNAMIC_SHARED(type, name) extern __shared__ type name[]
#define GZ_DEVICE_GUARD(tensor) const c10::cuda::CUDAGuard gz_device_guard((tensor).device())
#define GZ_REGISTER_CUDA_OP(name, fn) \
  TORCH_LIBRARY_IMPL(gradzip, CUDA, m) { m.impl(name, fn); }
// The out= overload of op `name` (schema "<name>.out" in csrc/bindings.cpp).
#define GZ_REGISTER_CUDA_OUT_OP(name, fn) \
  TORCH_LIBRARY_IMPL(gradzip, CUDA, m) { m.impl(name ".out", fn); }
#endif

namespace gradzip {
namespace cuda {

#if defined(GZ_CUDA_EMULATION)
inline cudaStream_t current_stream() { return nullptr; }
inline bool on_device(const at::Tensor& t) { return t.is_cpu(); }
inline int num_sms() { return 2; }  // few blocks: the grid-stride loops take several turns
#else
inline cudaStream_t current_stream() { return at::cuda::getCurrentCUDAStream(); }
inline bool on_device(const at::Tensor& t) { return t.is_cuda(); }
inline int num_sms() { return at::cuda::getCurrentDeviceProperties()->multiProcessorCount; }
#endif

// Every kernel gives each thread 8 consecutive elements: 32 bytes of float32 (two 128-bit
// accesses) or 16 bytes of float16/bfloat16 (one), and a whole number of code bytes for
// every bit width (8 elements x bits / 8 = bits bytes).
constexpr int kVec = 8;
constexpr unsigned kFullMask = 0xFFFFFFFFu;

// Input dtypes by their storage: float32, or 16-bit patterns converted bitwise.
enum DType : int { kF32 = 0, kF16 = 1, kBF16 = 2 };

inline DType dtype_of(const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kFloat: return kF32;
    case at::kHalf: return kF16;
    case at::kBFloat16: return kBF16;
    default: TORCH_CHECK_TYPE(false, "unsupported dtype ", t.scalar_type());
  }
  return kF32;
}

inline bool aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15u) == 0; }

// The 64-byte payload header as a kernel argument: written by the kernel, so creating a
// payload needs no host-to-device copy (and can be captured in a CUDA graph).
struct HeaderWords {
  uint32_t w[16];
};
inline HeaderWords header_words(const format::Header& h) {
  static_assert(sizeof(HeaderWords) == sizeof(format::Header), "header size");
  HeaderWords out;
  std::memcpy(&out, &h, sizeof(out));
  return out;
}

// Threads 0..15 of the calling block write the header at the start of the payload.
__device__ __forceinline__ void write_header(uint8_t* payload, const HeaderWords& h) {
  if (threadIdx.x < 16) reinterpret_cast<uint32_t*>(payload)[threadIdx.x] = h.w[threadIdx.x];
}

// Zero bytes [begin, end) with the calling block's threads (section padding, < 16 bytes).
__device__ __forceinline__ void zero_bytes(uint8_t* p, int64_t begin, int64_t end) {
  for (int64_t i = begin + threadIdx.x; i < end; i += blockDim.x) p[i] = 0;
}

// ---- 8-element loads and stores -------------------------------------------------------
// `vec`: the base pointer is 16-byte aligned (checked on the host once per call). e0 is a
// multiple of 8, so every 8-element group of an aligned tensor is 16/32-byte aligned.
// Elements at or past `nv` read as +0.0 and are never written.

__device__ __forceinline__ float to_float(float v) { return v; }

template <int DT>
__device__ __forceinline__ float convert16(uint16_t h) {
  return DT == kF16 ? core::half_bits_to_float(h) : core::bf16_bits_to_float(h);
}

template <int DT>
__device__ __forceinline__ void load8(const void* base, int64_t e0, int nv, bool vec,
                                      float (&f)[kVec]) {
  if constexpr (DT == kF32) {
    const float* p = static_cast<const float*>(base) + e0;
    if (vec && nv == kVec) {
      const float4 a = __ldg(reinterpret_cast<const float4*>(p));
      const float4 b = __ldg(reinterpret_cast<const float4*>(p) + 1);
      f[0] = a.x; f[1] = a.y; f[2] = a.z; f[3] = a.w;
      f[4] = b.x; f[5] = b.y; f[6] = b.z; f[7] = b.w;
    } else {
#pragma unroll
      for (int i = 0; i < kVec; ++i) f[i] = i < nv ? __ldg(p + i) : 0.0f;
    }
  } else {
    const uint16_t* p = static_cast<const uint16_t*>(base) + e0;
    uint16_t h[kVec];
    if (vec && nv == kVec) {
      const uint4 a = __ldg(reinterpret_cast<const uint4*>(p));
      const uint32_t w[4] = {a.x, a.y, a.z, a.w};
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        h[2 * i] = static_cast<uint16_t>(w[i] & 0xFFFFu);
        h[2 * i + 1] = static_cast<uint16_t>(w[i] >> 16);
      }
    } else {
#pragma unroll
      for (int i = 0; i < kVec; ++i) h[i] = i < nv ? __ldg(p + i) : uint16_t(0);
    }
#pragma unroll
    for (int i = 0; i < kVec; ++i) f[i] = convert16<DT>(h[i]);
  }
}

// A float32 array that is read and then written in place (residual, out): plain loads,
// not the read-only path.
__device__ __forceinline__ void load8_rw(const float* base, int64_t e0, int nv, bool vec,
                                         float (&f)[kVec]) {
  const float* p = base + e0;
  if (vec && nv == kVec) {
    const float4 a = reinterpret_cast<const float4*>(p)[0];
    const float4 b = reinterpret_cast<const float4*>(p)[1];
    f[0] = a.x; f[1] = a.y; f[2] = a.z; f[3] = a.w;
    f[4] = b.x; f[5] = b.y; f[6] = b.z; f[7] = b.w;
  } else {
#pragma unroll
    for (int i = 0; i < kVec; ++i) f[i] = i < nv ? p[i] : 0.0f;
  }
}

__device__ __forceinline__ void store8(float* base, int64_t e0, int nv, bool vec,
                                       const float (&f)[kVec]) {
  float* p = base + e0;
  if (vec && nv == kVec) {
    reinterpret_cast<float4*>(p)[0] = make_float4(f[0], f[1], f[2], f[3]);
    reinterpret_cast<float4*>(p)[1] = make_float4(f[4], f[5], f[6], f[7]);
  } else {
#pragma unroll
    for (int i = 0; i < kVec; ++i)
      if (i < nv) p[i] = f[i];
  }
}

// v = float32(x) + residual for 8 elements (x86 NaN rule: see core/float_bits.h); the old
// residual is returned too, since error feedback keeps it where the new one is not finite.
template <int DT>
__device__ __forceinline__ void load_v8(const void* x, const float* residual, int64_t e0,
                                        int nv, bool x_vec, bool r_vec, float (&v)[kVec],
                                        float (&r_old)[kVec]) {
  load8<DT>(x, e0, nv, x_vec, v);
  if (residual != nullptr) {
    load8_rw(residual, e0, nv, r_vec, r_old);
#pragma unroll
    for (int i = 0; i < kVec; ++i) v[i] = core::nan_fadd(v[i], r_old[i]);
  } else {
#pragma unroll
    for (int i = 0; i < kVec; ++i) r_old[i] = 0.0f;
  }
}

__device__ __forceinline__ uint32_t umax(uint32_t a, uint32_t b) { return a > b ? a : b; }

__device__ __forceinline__ int valid_count(int64_t n, int64_t e0) {
  const int64_t left = n - e0;
  return left <= 0 ? 0 : (left >= kVec ? kVec : static_cast<int>(left));
}

// ---- warp and block collectives --------------------------------------------------------
// Every function here must be called by all threads of the warp (block) together.

__device__ __forceinline__ int lane_id() { return threadIdx.x & 31; }
__device__ __forceinline__ int warp_id() { return threadIdx.x >> 5; }

// Exclusive prefix sum over the block of one 64-bit value per thread; *total gets the sum
// over the block. `scratch` holds at least NT / 32 values; it may be reused after return.
template <int NT>
__device__ __forceinline__ uint64_t block_exclusive_scan(uint64_t v, uint64_t* total,
                                                         uint64_t* scratch) {
  static_assert(NT % 32 == 0 && NT <= 1024, "block size");
  constexpr int kWarps = NT / 32;
  const int lane = lane_id(), warp = warp_id();
  uint64_t x = v;
#pragma unroll
  for (int o = 1; o < 32; o <<= 1) {
    const uint64_t y = __shfl_up_sync(kFullMask, x, o);
    if (lane >= o) x += y;
  }
  if (lane == 31) scratch[warp] = x;
  __syncthreads();
  // Every warp scans the per-warp totals itself: no divergent branch around the shuffles.
  uint64_t w = lane < kWarps ? scratch[lane] : 0;
#pragma unroll
  for (int o = 1; o < 32; o <<= 1) {
    const uint64_t y = __shfl_up_sync(kFullMask, w, o);
    if (lane >= o) w += y;
  }
  const uint64_t prev = __shfl_sync(kFullMask, w, warp > 0 ? warp - 1 : 0);
  const uint64_t before = warp > 0 ? prev : 0;
  *total = __shfl_sync(kFullMask, w, kWarps - 1);
  __syncthreads();  // the caller may reuse `scratch`
  return before + x - v;
}

template <int NT>
__device__ __forceinline__ uint64_t block_sum(uint64_t v, uint64_t* scratch) {
  uint64_t total;
  block_exclusive_scan<NT>(v, &total, scratch);
  return total;
}

// Radix-select step run by one warp over a histogram in shared memory: the bin that holds
// the rank-th largest counted key (rank is 1-based from the top) and the rank within it.
// Lane j owns bins [j*per, (j+1)*per); counts above a lane come from the lanes above it.
// Returns false (and digit 0) only if the histogram holds fewer than rank keys, which the
// callers rule out; the result is then still a valid bin, so nothing goes out of bounds.
template <typename Count>
__device__ __forceinline__ bool warp_find_bin(const Count* hist, int nbins, int64_t rank,
                                              int* digit, int64_t* rank_in_bin,
                                              uint64_t* total_out) {
  const int lane = lane_id();
  const int per = nbins / 32;
  uint64_t mine = 0;
  for (int b = lane * per; b < (lane + 1) * per; ++b) mine += hist[b];
  uint64_t suffix = mine;  // keys in bins owned by this lane and the lanes above it
#pragma unroll
  for (int o = 1; o < 32; o <<= 1) {
    const uint64_t y = __shfl_down_sync(kFullMask, suffix, o);
    if (lane + o < 32) suffix += y;
  }
  const uint64_t total = __shfl_sync(kFullMask, suffix, 0);
  if (total_out) *total_out = total;
  const unsigned ballot = __ballot_sync(kFullMask, rank >= 1 && suffix >= uint64_t(rank));
  const bool found = ballot != 0;
  const int owner = found ? 31 - __clz(ballot) : 0;  // the highest lane still holding rank
  int d = 0;
  int64_t r = 1;
  if (lane == owner && found) {
    r = rank - static_cast<int64_t>(suffix - mine);
    d = lane * per;
    for (int b = (lane + 1) * per - 1; b >= lane * per; --b) {
      if (uint64_t(r) <= uint64_t(hist[b])) {
        d = b;
        break;
      }
      r -= static_cast<int64_t>(hist[b]);
    }
  }
  *digit = __shfl_sync(kFullMask, d, owner);
  *rank_in_bin = __shfl_sync(kFullMask, r, owner);
  return found;
}

}  // namespace cuda
}  // namespace gradzip
