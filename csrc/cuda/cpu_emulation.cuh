// Runs the CUDA kernels' own source on the CPU, for testing on machines without a GPU.
//
// Never part of the extension: setup.py compiles csrc/cuda/*.cu with nvcc, where this file
// is not included. tests/test_cuda_build.py compiles the same .cu files as C++ with
// GZ_CUDA_EMULATION defined, which maps the CUDA constructs the kernels use onto CPU
// threads: every CUDA thread of a block is an OS thread, blocks run one after another
// (so `__shared__` variables can be function statics), __syncthreads is a barrier over the
// block, and warp shuffles / ballots exchange values through a per-warp slot array between
// two barriers over the warp's 32 threads. The ops register as torch.ops.gradzip_cuda_emu.*
// on CPU tensors.
//
// What this checks: the kernels' indexing, tiling, barrier and shuffle structure, atomics,
// the host-side launch shapes and workspace layout, against the reference. What it cannot:
// the device floating-point intrinsics (the core headers' host branch runs instead; their
// equivalence is tested separately), memory coalescing, real concurrency between blocks,
// and timing. A barrier that some threads never reach (a divergent __syncthreads or
// shuffle, i.e. a kernel bug) is reported as an error after a timeout instead of hanging.
#pragma once

#include <ATen/ATen.h>
#include <pthread.h>

#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <cstring>
#include <functional>
#include <memory>
#include <mutex>
#include <vector>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__ static
#define __align__(n) __attribute__((aligned(n)))

struct dim3 {
  unsigned x, y, z;
  dim3(unsigned a = 1, unsigned b = 1, unsigned c = 1) : x(a), y(b), z(c) {}
};
struct alignas(8) uint2 { unsigned x, y; };
struct alignas(16) uint4 { unsigned x, y, z, w; };
struct alignas(16) float4 { float x, y, z, w; };
inline uint2 make_uint2(unsigned a, unsigned b) { return {a, b}; }
inline uint4 make_uint4(unsigned a, unsigned b, unsigned c, unsigned d) { return {a, b, c, d}; }
inline float4 make_float4(float a, float b, float c, float d) { return {a, b, c, d}; }
using cudaStream_t = void*;

namespace gradzip {
namespace emu {

// A reusable barrier that threads may leave (a CUDA thread that returns stops counting),
// and that breaks instead of hanging when not every thread arrives.
class Barrier {
 public:
  explicit Barrier(int n) : expected_(n) {}
  void arrive_and_wait() {
    std::unique_lock<std::mutex> lock(m_);
    if (broken_) return;
    const uint64_t gen = generation_;
    if (++arrived_ == expected_) {
      release();
      return;
    }
    if (!cv_.wait_for(lock, std::chrono::seconds(60),
                      [&] { return generation_ != gen || broken_; })) {
      broken_ = true;
      cv_.notify_all();
    }
  }
  void arrive_and_drop() {
    std::unique_lock<std::mutex> lock(m_);
    --expected_;
    if (expected_ > 0 && arrived_ == expected_) release();
  }
  bool broken() {
    std::unique_lock<std::mutex> lock(m_);
    return broken_;
  }

 private:
  void release() {
    arrived_ = 0;
    ++generation_;
    cv_.notify_all();
  }
  std::mutex m_;
  std::condition_variable cv_;
  int expected_;
  int arrived_ = 0;
  uint64_t generation_ = 0;
  bool broken_ = false;
};

struct BlockState {
  std::unique_ptr<Barrier> block_barrier;
  std::vector<std::unique_ptr<Barrier>> warp_barriers;
  std::vector<uint64_t> slots;  // 32 per warp
  std::vector<unsigned char> dynamic_smem;
};

inline thread_local dim3 t_thread_idx;
inline thread_local dim3 t_block_idx;
inline dim3 g_block_dim;
inline dim3 g_grid_dim;
inline BlockState* g_block = nullptr;

inline int lane() { return static_cast<int>(t_thread_idx.x % 32); }
inline int warp() { return static_cast<int>(t_thread_idx.x / 32); }

template <class T>
T exchange(T v, int src, bool take) {
  static_assert(sizeof(T) <= 8, "shuffle of a value wider than 64 bits");
  uint64_t* slots = &g_block->slots[warp() * 32];
  uint64_t bits = 0;
  std::memcpy(&bits, &v, sizeof(T));
  slots[lane()] = bits;
  g_block->warp_barriers[warp()]->arrive_and_wait();
  const uint64_t got = take ? slots[src] : bits;
  g_block->warp_barriers[warp()]->arrive_and_wait();
  T out;
  std::memcpy(&out, &got, sizeof(T));
  return out;
}

struct ThreadArgs {
  std::function<void()>* body;
  unsigned tid;
  dim3 bid;
};

inline void* thread_main(void* p) {
  auto* a = static_cast<ThreadArgs*>(p);
  t_thread_idx = dim3(a->tid, 0, 0);
  t_block_idx = a->bid;
  (*a->body)();
  g_block->warp_barriers[warp()]->arrive_and_drop();
  g_block->block_barrier->arrive_and_drop();
  return nullptr;
}

// Runs fn(args...) for every thread of every block (1-D blocks, whole warps).
template <class... P, class... A>
void launch(void (*fn)(P...), dim3 grid, dim3 block, size_t smem, A... args) {
  TORCH_CHECK(block.y == 1 && block.z == 1 && block.x % 32 == 0 && block.x > 0,
              "emulation supports 1-D blocks of whole warps");
  g_grid_dim = grid;
  g_block_dim = block;
  std::function<void()> body = [&] { fn(args...); };
  for (unsigned bz = 0; bz < grid.z; ++bz)
    for (unsigned by = 0; by < grid.y; ++by)
      for (unsigned bx = 0; bx < grid.x; ++bx) {
        BlockState state;
        state.block_barrier = std::make_unique<Barrier>(static_cast<int>(block.x));
        for (unsigned w = 0; w < block.x / 32; ++w)
          state.warp_barriers.push_back(std::make_unique<Barrier>(32));
        state.slots.assign(block.x, 0);
        state.dynamic_smem.assign(smem, 0);
        g_block = &state;
        std::vector<ThreadArgs> targs(block.x);
        std::vector<pthread_t> threads(block.x);
        pthread_attr_t attr;
        pthread_attr_init(&attr);
        pthread_attr_setstacksize(&attr, 1 << 18);
        for (unsigned t = 0; t < block.x; ++t) {
          targs[t] = ThreadArgs{&body, t, dim3(bx, by, bz)};
          TORCH_CHECK(pthread_create(&threads[t], &attr, thread_main, &targs[t]) == 0,
                      "emulation: cannot start a thread");
        }
        for (auto& th : threads) pthread_join(th, nullptr);
        pthread_attr_destroy(&attr);
        bool broken = state.block_barrier->broken();
        for (auto& b : state.warp_barriers) broken = broken || b->broken();
        g_block = nullptr;
        TORCH_CHECK(!broken, "emulated kernel: a barrier or warp shuffle was not reached by "
                             "every thread of block (", bx, ", ", by, ")");
      }
}

template <class... P>
auto launcher(void (*fn)(P...), dim3 grid, dim3 block, size_t smem) {
  return [=](auto... args) { launch(fn, grid, block, smem, static_cast<P>(args)...); };
}

}  // namespace emu
}  // namespace gradzip

#define threadIdx (::gradzip::emu::t_thread_idx)
#define blockIdx (::gradzip::emu::t_block_idx)
#define blockDim (::gradzip::emu::g_block_dim)
#define gridDim (::gradzip::emu::g_grid_dim)

inline void __syncthreads() { ::gradzip::emu::g_block->block_barrier->arrive_and_wait(); }

template <class T>
T __shfl_sync(unsigned, T v, int src) { return ::gradzip::emu::exchange(v, src & 31, true); }
template <class T>
T __shfl_up_sync(unsigned, T v, unsigned d) {
  const int l = ::gradzip::emu::lane();
  return ::gradzip::emu::exchange(v, l - static_cast<int>(d), l >= static_cast<int>(d));
}
template <class T>
T __shfl_down_sync(unsigned, T v, unsigned d) {
  const int l = ::gradzip::emu::lane();
  return ::gradzip::emu::exchange(v, l + static_cast<int>(d), l + static_cast<int>(d) < 32);
}
template <class T>
T __shfl_xor_sync(unsigned, T v, int m) {
  return ::gradzip::emu::exchange(v, ::gradzip::emu::lane() ^ m, true);
}
inline unsigned __ballot_sync(unsigned, int pred) {
  using namespace ::gradzip::emu;
  uint64_t* slots = &g_block->slots[warp() * 32];
  slots[lane()] = pred ? 1u : 0u;
  g_block->warp_barriers[warp()]->arrive_and_wait();
  unsigned mask = 0;
  for (int i = 0; i < 32; ++i) mask |= slots[i] ? (1u << i) : 0u;
  g_block->warp_barriers[warp()]->arrive_and_wait();
  return mask;
}
inline int __popc(unsigned x) { return __builtin_popcount(x); }
inline int __ffs(int x) { return __builtin_ffs(x); }
inline int __clz(int x) { return x == 0 ? 32 : __builtin_clz(static_cast<unsigned>(x)); }
template <class T>
T __ldg(const T* p) { return *p; }

inline unsigned atomicAdd(unsigned* p, unsigned v) {
  return __atomic_fetch_add(p, v, __ATOMIC_SEQ_CST);
}
inline unsigned long long atomicAdd(unsigned long long* p, unsigned long long v) {
  return __atomic_fetch_add(p, v, __ATOMIC_SEQ_CST);
}
inline unsigned atomicOr(unsigned* p, unsigned v) { return __atomic_fetch_or(p, v, __ATOMIC_SEQ_CST); }
inline unsigned atomicMax(unsigned* p, unsigned v) {
  unsigned old = __atomic_load_n(p, __ATOMIC_SEQ_CST);
  while (old < v && !__atomic_compare_exchange_n(p, &old, v, false, __ATOMIC_SEQ_CST,
                                                 __ATOMIC_SEQ_CST)) {
  }
  return old;
}

#define C10_CUDA_KERNEL_LAUNCH_CHECK() \
  do {                                 \
  } while (0)
