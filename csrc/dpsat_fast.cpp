// Schemas of every dpsat_fast op, declared once; kernels register per device in csrc/cpu/ and
// csrc/cuda/ (and from Python: the Triton kernels for CUDA), fakes (meta functions) in
// dpsat_fast/ops/noise.py and dpsat_fast/ops/per_sample.py, which also holds the copy of these schemas
// that defines the ops when the extension is not built (tests/test_cpu_kernels.py checks they agree).
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

  // Per-sample gradient ops (docs/algorithms.md §3–4; documented in dpsat_fast/ops/per_sample.py). Weight
  // gradients G_i = g_iᵀ a_i: Linear a [B, T, D], g [B, T, P]; convolutions x [B, C, *S], g
  // [B, C_out, *S_out] with numeric symmetric padding. Results are float32 (float64 for float64
  // inputs); an output that was not asked for is an empty tensor. Noise xi[j] = tl.randn(seed,
  // offset + j) in row-major order of the parameter.
  m.def("linear_weight_sq_norms(Tensor a, Tensor g, str route, bool with_bias) -> (Tensor, Tensor)");
  m.def(
      "conv_weight_sq_norms(Tensor x, Tensor g, int[] weight_shape, int[] stride, int[] padding, "
      "int[] dilation, int groups, str route, bool with_bias) -> (Tensor, Tensor)");
  // (per-example weight grads [B, *weight_shape], bias grads [B, C_out], their squared norms [B])
  m.def(
      "conv_per_example_grads(Tensor x, Tensor g, int[] weight_shape, int[] stride, int[] padding, "
      "int[] dilation, int groups, bool with_bias) -> (Tensor, Tensor, Tensor, Tensor)");
  m.def(
      "linear_clipped_sum_with_noise(Tensor a, Tensor g, Tensor scale, bool with_bias, int seed, "
      "int weight_offset, int bias_offset, float noise_std) -> (Tensor, Tensor)");
  m.def(
      "conv_clipped_sum_with_noise(Tensor x, Tensor g, Tensor scale, int[] weight_shape, int[] stride, "
      "int[] padding, int[] dilation, int groups, bool with_bias, int seed, int weight_offset, "
      "int bias_offset, float noise_std) -> (Tensor, Tensor)");
  // norm layers: (dw [B, C], db [B, C], ‖dw_i‖² [B], ‖db_i‖² [B]) from x̂ and g viewed as [B, T, C]
  m.def(
      "affine_per_example_grads(Tensor xhat, Tensor g, bool with_weight, bool with_bias) "
      "-> (Tensor, Tensor, Tensor, Tensor)");
  // Σ_i scale_i grads_i + noise_std xi: grads [B, K] -> [K]
  m.def(
      "per_example_clipped_sum_with_noise(Tensor grads, Tensor scale, int seed, int offset, "
      "float noise_std) -> Tensor");
  // DP-SAT's multi-tensor passes: Σ_k ‖t_k‖² (0-dim float32, float64 if any input is), and
  // backup <- params, params <- params + alpha direction (alpha a one-element tensor)
  m.def("multi_tensor_sq_norm(Tensor[] tensors) -> Tensor");
  m.def(
      "multi_tensor_perturb_(Tensor(a!)[] params, Tensor(b!)[] backup, Tensor[] direction, "
      "Tensor alpha) -> ()");
  // "avx512", "avx2" or "default": no tensors, so one kernel for every device.
  m.def("cpu_capability() -> str", &dpsat_fast::cpu_capability);
}
