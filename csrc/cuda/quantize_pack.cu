// CUDA kernel of gradzip::quantize_pack: v = x + residual, per-block scale, codes bit-packed
// into the payload, residual = v - decode, in one pass over memory and one launch.
//
// Launch shape: one thread block ("CTA") per tile of NT * 8 elements, NT = max(256, block/8)
// threads, each thread owning 8 consecutive elements. A quantization block of `block`
// elements is therefore G = block / 8 consecutive threads, and a tile holds whole blocks.
//  * 8/4/2 bits: the block's amax is the max of the elements' magnitude keys over the G
//    threads (xor shuffles inside a warp, plus shared memory across warps when G > 32); an
//    integer max is exact in any order, and a NaN key (above inf's) gives a NaN amax.
//  * 1 bit: the scale is the sum of |v| in reference.block_abs_sum's fixed order, which
//    runs sequentially through the block. The tile's |v| are staged in shared memory and one
//    warp per block sums them exactly as the reference does: lane j adds elements j, j+32,
//    ... in order, then a shuffle-down tree 16, 8, 4, 2, 1.
// Each thread then writes `bits` bytes of codes (8 codes), its residual (two 128-bit
// stores) and, once per block, the scale. Block 0 writes the header and the (< 16-byte)
// zero padding of the two sections, so the payload needs no memset and no host copy: the
// op makes no host synchronisation and can be captured in a CUDA graph.
#include <torch/library.h>

#include "core/checks.h"
#include "cuda/common.cuh"

namespace gradzip {
namespace cuda {
namespace {

constexpr int kMaxThreads = 512;  // block 4096 / 8

struct QuantizeArgs {
  const void* x;
  float* residual;  // nullptr without error feedback
  uint8_t* payload;
  int64_t n;
  int64_t nblocks;
  int64_t codes_offset;
  int64_t total_bytes;
  int log2_block;
  uint32_t seed_key;
  bool stochastic;
  bool x_vec, r_vec;
  HeaderWords header;
};

// Packs 8 codes of BITS bits (element i at bit i*BITS, least significant first) and stores
// them at byte e0*BITS/8 of the codes section: 8, 4, 2 or 1 bytes, naturally aligned.
template <int BITS>
__device__ __forceinline__ void store_codes(uint8_t* codes, int64_t e0, const uint32_t (&c)[kVec]) {
  uint8_t* p = codes + (e0 * BITS) / 8;
  if constexpr (BITS == 8) {
    const uint32_t lo = c[0] | (c[1] << 8) | (c[2] << 16) | (c[3] << 24);
    const uint32_t hi = c[4] | (c[5] << 8) | (c[6] << 16) | (c[7] << 24);
    *reinterpret_cast<uint2*>(p) = make_uint2(lo, hi);
  } else {
    uint32_t word = 0;
#pragma unroll
    for (int i = 0; i < kVec; ++i) word |= c[i] << (i * BITS);
    if constexpr (BITS == 4) *reinterpret_cast<uint32_t*>(p) = word;
    if constexpr (BITS == 2) *reinterpret_cast<uint16_t*>(p) = static_cast<uint16_t>(word);
    if constexpr (BITS == 1) *p = static_cast<uint8_t>(word);
  }
}

template <int BITS, int DT>
__global__ void __launch_bounds__(kMaxThreads)
quantize_pack_kernel(const QuantizeArgs a) {
  // 1-bit only: the tile's |v| (at most 4096 floats = 16 KB) and its blocks' scales.
  __shared__ __align__(16) float stage[BITS == 1 ? 4096 : 4];
  __shared__ float tile_scale[BITS == 1 ? 64 : 1];
  __shared__ uint32_t warp_kmax[kMaxThreads / 32];

  const int t = threadIdx.x;
  const int nt = blockDim.x;
  const int block = 1 << a.log2_block;
  const int log2_group = a.log2_block - 3;  // threads per quantization block: block / 8
  const int group = 1 << log2_group;
  const int64_t tile_base = int64_t(blockIdx.x) * nt * kVec;
  const int64_t e0 = tile_base + int64_t(t) * kVec;
  const int nv = valid_count(a.n, e0);
  const int64_t blk = e0 >> a.log2_block;  // this thread's quantization block
  const bool group_leader = (t & (group - 1)) == 0;

  float* scales = reinterpret_cast<float*>(a.payload + format::kHeaderBytes);
  uint8_t* codes = a.payload + a.codes_offset;

  if (blockIdx.x == 0) {
    write_header(a.payload, a.header);
    zero_bytes(a.payload, format::kHeaderBytes + 4 * a.nblocks, a.codes_offset);
    // Threads write whole 8-code groups, so codes end at ceil(n / 8) * BITS bytes.
    zero_bytes(a.payload, a.codes_offset + (a.n + kVec - 1) / kVec * BITS, a.total_bytes);
  }

  float v[kVec], r_old[kVec];
  load_v8<DT>(a.x, a.residual, e0, nv, a.x_vec, a.r_vec, v, r_old);

  uint32_t code[kVec];
  float dec[kVec];
  if constexpr (BITS == 1) {
    // Stage |v| (+0.0 past the end, as the reference pads) in element order.
    float4* st4 = reinterpret_cast<float4*>(stage) + 2 * t;
    st4[0] = make_float4(core::abs_bits(v[0]), core::abs_bits(v[1]), core::abs_bits(v[2]),
                         core::abs_bits(v[3]));
    st4[1] = make_float4(core::abs_bits(v[4]), core::abs_bits(v[5]), core::abs_bits(v[6]),
                         core::abs_bits(v[7]));
    __syncthreads();
    const int lane = lane_id();
    const int nwarps = nt / 32;
    const int tile_blocks = (nt * kVec) >> a.log2_block;
    for (int bb = warp_id(); bb < tile_blocks; bb += nwarps) {
      const float* s = stage + (bb << a.log2_block);
      // Terms are >= +0, inf or NaN: no invalid operation, so the plain sum equals the
      // reference's except for which NaN comes out, and a NaN scale is stored canonical.
      float acc = s[lane];
      for (int j = lane + 32; j < block; j += 32) acc = core::fadd(acc, s[j]);
#pragma unroll
      for (int h = 16; h >= 1; h >>= 1) acc = core::fadd(acc, __shfl_down_sync(kFullMask, acc, h));
      const int64_t gblk = (tile_base >> a.log2_block) + bb;
      if (lane == 0 && gblk < a.nblocks) {
        const int64_t start = gblk << a.log2_block;
        const int64_t len = a.n - start < block ? a.n - start : block;
        const float scale = core::canonical_nan(core::fdiv(acc, static_cast<float>(len)));
        tile_scale[bb] = scale;
        scales[gblk] = scale;
      }
    }
    __syncthreads();
    const float scale = nv > 0 ? tile_scale[t >> log2_group] : 0.0f;
#pragma unroll
    for (int i = 0; i < kVec; ++i) {
      code[i] = i < nv ? core::sign_code(v[i]) : 0u;
      dec[i] = core::sign_decode(code[i], scale);
    }
  } else {
    // amax through magnitude keys: an integer max, exact in any order, with every NaN
    // above inf (core::amax_from_key turns a NaN key into the canonical NaN amax).
    uint32_t kmax = 0;
#pragma unroll
    for (int i = 0; i < kVec; ++i) kmax = umax(kmax, core::magnitude_key(v[i]));
    if (group <= 32) {
      for (int o = group >> 1; o >= 1; o >>= 1) kmax = umax(kmax, __shfl_xor_sync(kFullMask, kmax, o));
    } else {
#pragma unroll
      for (int o = 16; o >= 1; o >>= 1) kmax = umax(kmax, __shfl_xor_sync(kFullMask, kmax, o));
      if (lane_id() == 0) warp_kmax[warp_id()] = kmax;
      __syncthreads();
      const int first = (t >> log2_group) * (group / 32);
      kmax = warp_kmax[first];
      for (int w = 1; w < group / 32; ++w) kmax = umax(kmax, warp_kmax[first + w]);
    }
    const float amax = core::amax_from_key(kmax);
    const core::BlockParams p = core::absmax_params_exact(amax, BITS);
    if (group_leader && blk < a.nblocks) scales[blk] = p.scale;
    const float qmax = static_cast<float>(core::qmax_of(BITS));
    // core::uniform in two halves: the 8 indices share their high 32 bits (e0 % 8 == 0).
    const uint32_t k2 = core::hash32_high_key(a.seed_key, static_cast<uint32_t>(uint64_t(e0) >> 32));
#pragma unroll
    for (int i = 0; i < kVec; ++i) {
      const uint32_t h = core::hash32_low(a.seed_key, k2, static_cast<uint32_t>(e0 + i));
      const float u = a.stochastic ? static_cast<float>(h >> 8) * core::kUniformScale : 0.0f;
      const float q = core::quantize_value(v[i], p.inv, qmax, a.stochastic, u);
      code[i] = i < nv ? static_cast<uint32_t>(static_cast<int>(q) + core::qmax_of(BITS)) : 0u;
      dec[i] = core::fmul(q, p.scale);
    }
  }

  if (nv > 0) store_codes<BITS>(codes, e0, code);
  if (a.residual != nullptr && nv > 0) {
    float r_new[kVec];
#pragma unroll
    for (int i = 0; i < kVec; ++i) r_new[i] = core::residual_update(v[i], dec[i], r_old[i]);
    store8(a.residual, e0, nv, a.r_vec, r_new);
  }
}

template <int BITS>
void launch_bits(DType dt, const QuantizeArgs& a, int64_t tiles, int threads, cudaStream_t s) {
  const dim3 grid(static_cast<unsigned>(tiles)), block(threads);
  switch (dt) {
    case kF32: GZ_LAUNCH(grid, block, 0, s, quantize_pack_kernel<BITS, kF32>)(a); break;
    case kF16: GZ_LAUNCH(grid, block, 0, s, quantize_pack_kernel<BITS, kF16>)(a); break;
    case kBF16: GZ_LAUNCH(grid, block, 0, s, quantize_pack_kernel<BITS, kBF16>)(a); break;
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// Launches the kernel writing x's payload into `payload` (16-byte aligned, the layout's
// size). Arguments already checked.
void quantize_pack_launch(const at::Tensor& x_in, int64_t bits, int64_t block,
                          const std::optional<at::Tensor>& residual, bool stochastic,
                          int64_t seed, const at::Tensor& payload) {
  const at::Tensor x = x_in.contiguous();
  const int64_t n = x.numel();
  const auto layout = format::dense_layout(n, static_cast<int>(bits), block);

  QuantizeArgs a;
  a.x = x.data_ptr();
  a.residual = residual.has_value() ? residual->data_ptr<float>() : nullptr;
  a.payload = payload.data_ptr<uint8_t>();
  a.n = n;
  a.nblocks = format::num_blocks(n, block);
  a.codes_offset = layout.codes_offset;
  a.total_bytes = layout.total_bytes;
  a.log2_block = 0;
  while ((int64_t(1) << a.log2_block) < block) ++a.log2_block;
  a.seed_key = core::seed_key(static_cast<uint32_t>(seed));
  a.stochastic = stochastic;
  a.x_vec = aligned16(a.x);
  a.r_vec = a.residual != nullptr && aligned16(a.residual);
  a.header = header_words(format::make_dense_header(n, static_cast<int>(bits),
                                                    static_cast<int>(block), stochastic));
  TORCH_CHECK(aligned16(a.payload), "payload buffer is not 16-byte aligned");

  const int threads = block / kVec > 256 ? static_cast<int>(block / kVec) : 256;
  const int64_t tile = int64_t(threads) * kVec;
  const int64_t tiles = n == 0 ? 1 : (n + tile - 1) / tile;  // block 0 writes the header
  TORCH_CHECK_VALUE(tiles <= 0x7FFFFFFF, "tensor of ", n, " elements is too large");
  const cudaStream_t s = current_stream();
  const DType dt = dtype_of(x);
  switch (bits) {
    case 8: launch_bits<8>(dt, a, tiles, threads, s); break;
    case 4: launch_bits<4>(dt, a, tiles, threads, s); break;
    case 2: launch_bits<2>(dt, a, tiles, threads, s); break;
    default: launch_bits<1>(dt, a, tiles, threads, s); break;
  }
}

at::Tensor quantize_pack_cuda(const at::Tensor& x, int64_t bits, int64_t block,
                              const std::optional<at::Tensor>& residual, bool stochastic,
                              int64_t seed) {
  checks::check_quantize_args(x, bits, block, residual, stochastic, seed);
  TORCH_CHECK_VALUE(on_device(x), "x must be a CUDA tensor for the CUDA kernel, got ",
                    x.device());
  GZ_DEVICE_GUARD(x);
  const int64_t bytes = format::dense_layout(x.numel(), static_cast<int>(bits), block).total_bytes;
  at::Tensor payload = at::empty({bytes}, x.options().dtype(at::kByte));
  quantize_pack_launch(x, bits, block, residual, stochastic, seed, payload);
  return payload;
}

// The out= form. The kernel's vector stores need a 16-byte aligned payload; a buffer at
// another offset gets the payload through an aligned temporary and one device copy.
void quantize_pack_out_cuda(const at::Tensor& x, int64_t bits, int64_t block,
                            const std::optional<at::Tensor>& residual, bool stochastic,
                            int64_t seed, const at::Tensor& out) {
  checks::check_quantize_args(x, bits, block, residual, stochastic, seed);
  TORCH_CHECK_VALUE(on_device(x), "x must be a CUDA tensor for the CUDA kernel, got ",
                    x.device());
  const int64_t bytes = format::dense_layout(x.numel(), static_cast<int>(bits), block).total_bytes;
  checks::check_payload_out(out, bytes, x, residual);
  GZ_DEVICE_GUARD(x);
  if (aligned16(out.data_ptr())) {
    quantize_pack_launch(x, bits, block, residual, stochastic, seed, out);
  } else {
    const at::Tensor tmp = at::empty({bytes}, out.options());
    quantize_pack_launch(x, bits, block, residual, stochastic, seed, tmp);
    out.copy_(tmp);
  }
}

}  // namespace
}  // namespace cuda
}  // namespace gradzip

GZ_REGISTER_CUDA_OP("quantize_pack", &gradzip::cuda::quantize_pack_cuda)
GZ_REGISTER_CUDA_OUT_OP("quantize_pack", &gradzip::cuda::quantize_pack_out_cuda)
