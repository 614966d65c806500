// Run-time choice of the vector instruction set used by the CPU kernels, and the two
// operators that report (gradzip::_cpu_isa) and, for tests and benchmarks, lower it
// (gradzip::_cpu_set_isa). Every instruction set produces the same bytes, so the choice
// only changes speed.
#include <torch/library.h>

#include <atomic>
#include <cstdlib>
#include <cstring>
#include <string>

#include "cpu/simd.h"

namespace gradzip {
namespace cpu {
namespace {

Isa best_supported() {
#if GZ_X86
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
      __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq"))
    return Isa::kAvx512;
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("f16c")) return Isa::kAvx2;
#endif
  return Isa::kScalar;
}

bool parse_isa(const std::string& name, Isa* out) {
  if (name == "scalar") {
    *out = Isa::kScalar;
  } else if (name == "avx2") {
    *out = Isa::kAvx2;
  } else if (name == "avx512") {
    *out = Isa::kAvx512;
  } else {
    return false;
  }
  return true;
}

Isa initial_isa() {
  Isa best = best_supported();
  // GRADZIP_CPU_ISA may lower the choice (never raise it past what the CPU has).
  if (const char* env = std::getenv("GRADZIP_CPU_ISA")) {
    Isa want;
    if (parse_isa(env, &want) && static_cast<int>(want) < static_cast<int>(best)) return want;
  }
  return best;
}

std::atomic<int>& isa_slot() {
  static std::atomic<int> slot{static_cast<int>(initial_isa())};
  return slot;
}

}  // namespace

Isa active_isa() { return static_cast<Isa>(isa_slot().load(std::memory_order_relaxed)); }

const char* isa_name(Isa isa) {
  switch (isa) {
    case Isa::kAvx512:
      return "avx512";
    case Isa::kAvx2:
      return "avx2";
    default:
      return "scalar";
  }
}

std::string cpu_isa_op() { return isa_name(active_isa()); }

std::string cpu_set_isa_op(const std::string& name) {
  Isa want;
  TORCH_CHECK_VALUE(parse_isa(name, &want), "cpu isa must be 'scalar', 'avx2' or 'avx512', got '",
                    name, "'");
  TORCH_CHECK_VALUE(static_cast<int>(want) <= static_cast<int>(best_supported()),
                    "this CPU does not support '", name, "' (best: ",
                    isa_name(best_supported()), ")");
  Isa old = static_cast<Isa>(isa_slot().exchange(static_cast<int>(want)));
  return isa_name(old);
}

}  // namespace cpu
}  // namespace gradzip

TORCH_LIBRARY_FRAGMENT(gradzip, m) {
  // Vector instruction set the CPU kernels use: "avx512", "avx2" or "scalar".
  m.def("_cpu_isa() -> str", &gradzip::cpu::cpu_isa_op);
  // Lower (or restore) that choice, for tests that check every code path; returns the old one.
  m.def("_cpu_set_isa(str isa) -> str", &gradzip::cpu::cpu_set_isa_op);
}
