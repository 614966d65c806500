// One op's CPU kernel template, compiled once per vector instruction set, and the call
// that picks among them at run time (cpu::active_isa()).
//
// An op file includes everything its kernel body needs, then
//     #define GZ_KERNEL_IMPL "cpu/<op>_impl.h"
//     #include "cpu/isa_dispatch.h"
// and calls GZ_ISA_CALL(isa, kernel_function, args...). The body lands in namespaces
// cpu::scalar, cpu::avx2 and cpu::avx512, with `V` naming that set's simd struct and the
// set's target attributes in force, so a distributable build needs no -march flag.
//
// No include guard on purpose: each op file includes this once, with its own body.
#ifndef GZ_KERNEL_IMPL
#error "define GZ_KERNEL_IMPL (the op's *_impl.h) before including cpu/isa_dispatch.h"
#endif

#include "cpu/kernels.h"
#include "cpu/simd.h"

namespace gradzip::cpu::scalar {
using V = simd::Scalar;
#include GZ_KERNEL_IMPL
}  // namespace gradzip::cpu::scalar

#if GZ_X86
GZ_TARGET_BEGIN_AVX2
namespace gradzip::cpu::avx2 {
using V = simd::Avx2;
#include GZ_KERNEL_IMPL
}  // namespace gradzip::cpu::avx2
GZ_TARGET_END

GZ_TARGET_BEGIN_AVX512
namespace gradzip::cpu::avx512 {
using V = simd::Avx512;
#include GZ_KERNEL_IMPL
}  // namespace gradzip::cpu::avx512
GZ_TARGET_END
#endif

#undef GZ_KERNEL_IMPL

// Calls FN of the instruction set `isa` names (a value of cpu::Isa), from namespace
// gradzip::cpu.
#if GZ_X86
#define GZ_ISA_CALL(isa, FN, ...)                       \
  do {                                                  \
    if ((isa) == Isa::kAvx512) avx512::FN(__VA_ARGS__); \
    else if ((isa) == Isa::kAvx2) avx2::FN(__VA_ARGS__); \
    else scalar::FN(__VA_ARGS__);                       \
  } while (0)
#else
#define GZ_ISA_CALL(isa, FN, ...) scalar::FN(__VA_ARGS__)
#endif
