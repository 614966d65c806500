// Every gradzip operator schema, in one TORCH_LIBRARY. Kernels register per backend:
// csrc/cpu/*.cpp (CPU), csrc/cuda/*.cu (CUDA); fake kernels live in python/gradzip/ops.py.
#include <Python.h>
#include <torch/library.h>

#include <string>

#include "generated/build_info.h"

namespace gradzip {

std::string build_info() {
  // GRADZIP_BUILD_INFO is a JSON object written by setup.py; the vector ISA is chosen at
  // run time by the CPU kernels.
  std::string info = GRADZIP_BUILD_INFO;
  std::string compiler =
#if defined(__clang__)
      "clang " __clang_version__;
#elif defined(__GNUC__)
      "gcc " __VERSION__;
#else
      "unknown";
#endif
  info.pop_back();  // drop the closing brace, append compiler
  info += ", \"compiler\": \"" + compiler + "\"}";
  return info;
}

}  // namespace gradzip

TORCH_LIBRARY(gradzip, m) {
  // v = x + residual; quantize v to `bits` per element in blocks; residual = v - decode.
  m.def("quantize_pack(Tensor x, int bits, int block, Tensor(a!)? residual, bool stochastic, "
        "int seed) -> Tensor");
  // The same, written into `out`: a caller-owned 1-D uint8 buffer of exactly the payload's
  // size on x's device, contiguous, sharing no memory with x or residual (reused across
  // calls, so its pages are not faulted in again). Returns nothing: the caller has `out`.
  m.def("quantize_pack.out(Tensor x, int bits, int block, Tensor(a!)? residual, "
        "bool stochastic, int seed, *, Tensor(b!) out) -> ()");
  // The k entries of largest |v|; residual = v - decode (selected entries zeroed for fp32).
  // value_format: 1 fp32, 2 bf16, 3 int8 (format.h).
  m.def("topk_select(Tensor x, int k, Tensor(a!)? residual, bool exact, int value_format, "
        "int seed) -> Tensor");
  // The same, written into `out` (as quantize_pack.out).
  m.def("topk_select.out(Tensor x, int k, Tensor(a!)? residual, bool exact, int value_format, "
        "int seed, *, Tensor(b!) out) -> ()");
  // out += alpha * sum_w decode(payloads[w]); payloads is [W, P] uint8.
  m.def("dequantize_accumulate(Tensor payloads, Tensor(a!) out, float alpha) -> ()");
  // out = alpha * sum_w decode(payloads[w]), out written but never read: bit for bit what
  // out.zero_() and dequantize_accumulate give, in one pass. Private (the collectives'
  // decode into a buffer they own); CPU and CUDA kernels (Triton: Python zeroes first).
  m.def("_dequantize_sum(Tensor payloads, Tensor(a!) out, float alpha) -> ()");
  // JSON: what this binary was compiled with.
  m.def("_build_info() -> str", &gradzip::build_info);
}

// A Python module named _C so that `import gradzip._C` loads the operator library; the
// ops themselves are reached through torch.ops.gradzip (no pybind11 bindings needed).
extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
