// Schemas of every dpsat_fast op, declared once; kernels register per device in csrc/cpu/ and
// csrc/cuda/, fakes (meta functions) in dpsat_fast/ops/__init__.py.
#include <Python.h>
#include <torch/library.h>

#include <string>

namespace dpsat_fast {
// Instruction set of the CPU noise kernels in this process (csrc/cpu/philox_noise.cpp).
std::string cpu_capability();
}  // namespace dpsat_fast

extern "C" {
// An empty module named _C: `import dpsat_fast._C` loads this shared library, which runs the
// TORCH_LIBRARY static initializers below (the pytorch/extension-cpp pattern).
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {
      PyModuleDef_HEAD_INIT,
      "_C",  // name
      NULL,  // documentation
      -1,    // per-interpreter state size: none
      NULL,  // methods
  };
  return PyModule_Create(&module_def);
}
}

TORCH_LIBRARY(dpsat_fast, m) {
  // grad <- (grad + noise_std * xi) * scale, xi[j] = tl.randn(seed, offset + j) over the flattened
  // tensor; fp32 arithmetic (fp64 for float64 grad), one rounding on store.
  m.def(
      "add_noise_and_scale_(Tensor(a!) grad, int seed, int offset, float noise_std, float scale) "
      "-> ()");
  // out[j] = tl.randn(seed, offset + j); out is float32.
  m.def("philox_normal_(Tensor(a!) out, int seed, int offset) -> ()");
  // out[k, j] = word k of tl.randint4x(seed, offset + j) as a uint32 value; out is int64 (4, n).
  m.def("philox_uint32_(Tensor(a!) out, int seed, int offset) -> ()");
  // "avx512", "avx2" or "default": no tensors, so one kernel for every device.
  m.def("cpu_capability() -> str", &dpsat_fast::cpu_capability);
}
