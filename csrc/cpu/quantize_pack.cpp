// gradzip::quantize_pack on CPU: v = x + residual, blockwise absmax (8/4/2 bits) or scaled
// sign (1 bit) quantization, bit packing and the error-feedback residual update, fused
// into one pass over memory. Byte-identical to gradzip.reference.quantize_pack.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cstring>
#include <optional>
#include <type_traits>

#include "core/checks.h"
#include "core/format.h"
#include "core/quant.h"

#define GZ_KERNEL_IMPL "cpu/quantize_pack_impl.h"
#include "cpu/isa_dispatch.h"

namespace gradzip {
namespace cpu {

namespace {

// Writes the payload of x into p (format::dense_layout(...).total_bytes bytes, any
// alignment: every store into it is unaligned-safe). Arguments already checked.
void quantize_pack_into(const at::Tensor& x, int64_t bits, int64_t block,
                        const std::optional<at::Tensor>& residual, bool stochastic, int64_t seed,
                        uint8_t* p) {
  const at::Tensor xc = x.contiguous();
  const int64_t n = xc.numel();
  const format::DenseLayout layout = format::dense_layout(n, static_cast<int>(bits), block);
  const format::Header h =
      format::make_dense_header(n, static_cast<int>(bits), static_cast<int>(block), stochastic);
  std::memcpy(p, &h, sizeof(h));
  // Section padding is part of the format (zero bytes), so payloads compare byte for byte.
  const int64_t nb = format::num_blocks(n, block);
  const int64_t scales_end = layout.scales_offset + 4 * nb;
  std::memset(p + scales_end, 0, static_cast<size_t>(layout.codes_offset - scales_end));
  const int64_t codes_end = layout.codes_offset + format::code_bytes(n, static_cast<int>(bits));
  std::memset(p + codes_end, 0, static_cast<size_t>(layout.total_bytes - codes_end));
  if (n == 0) return;

  QuantizeArgs a;
  a.x = xc.data_ptr();
  a.x_dtype = dtype_of(xc);
  a.residual = residual.has_value() ? residual->data_ptr<float>() : nullptr;
  a.n = n;
  a.bits = static_cast<int>(bits);
  a.block = block;
  a.stochastic = stochastic;
  a.k1 = core::seed_key(static_cast<uint32_t>(seed));
  a.scales = p + layout.scales_offset;
  a.codes = p + layout.codes_offset;
  const Isa isa = active_isa();
  // ~64K elements per task: enough work to amortise scheduling, small enough to balance.
  const int64_t grain = std::max<int64_t>(1, (int64_t(1) << 16) / block);
  at::parallel_for(0, nb, grain, [&](int64_t b0, int64_t b1) {
    GZ_ISA_CALL(isa, quantize_blocks, a, b0, b1);
  });
}

}  // namespace

at::Tensor quantize_pack_cpu(const at::Tensor& x, int64_t bits, int64_t block,
                             const std::optional<at::Tensor>& residual, bool stochastic,
                             int64_t seed) {
  checks::check_quantize_args(x, bits, block, residual, stochastic, seed);
  const int64_t bytes = format::dense_layout(x.numel(), static_cast<int>(bits), block).total_bytes;
  at::Tensor payload = at::empty({bytes}, x.options().dtype(at::kByte));
  quantize_pack_into(x, bits, block, residual, stochastic, seed, payload.data_ptr<uint8_t>());
  return payload;
}

// The out= form: the same bytes, written into a caller-owned buffer (reused across calls,
// so no page of it is faulted in again).
void quantize_pack_out_cpu(const at::Tensor& x, int64_t bits, int64_t block,
                           const std::optional<at::Tensor>& residual, bool stochastic,
                           int64_t seed, const at::Tensor& out) {
  checks::check_quantize_args(x, bits, block, residual, stochastic, seed);
  const int64_t bytes = format::dense_layout(x.numel(), static_cast<int>(bits), block).total_bytes;
  checks::check_payload_out(out, bytes, x, residual);
  quantize_pack_into(x, bits, block, residual, stochastic, seed, out.data_ptr<uint8_t>());
}

}  // namespace cpu
}  // namespace gradzip

TORCH_LIBRARY_IMPL(gradzip, CPU, m) {
  m.impl("quantize_pack", &gradzip::cpu::quantize_pack_cpu);
  m.impl("quantize_pack.out", &gradzip::cpu::quantize_pack_out_cpu);
}
