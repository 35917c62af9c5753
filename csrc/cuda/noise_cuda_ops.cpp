// Torch glue for the CUDA noise kernels (noise_kernels.cu): argument checks and registration under
// the schemas of csrc/dpsat_fast.cpp. Built only against a CUDA torch (setup.py / CMake with CUDA).
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <cmath>
#include <limits>

#include "cuda/noise_kernels.cuh"

namespace dpsat_fast {
namespace {

void check_seed_offset(const char* op, int64_t seed, int64_t offset, int64_t numel) {
  TORCH_CHECK(seed >= 0, op, ": seed must be non-negative, got ", seed);
  TORCH_CHECK(offset >= 0, op, ": offset must be non-negative, got ", offset);
  TORCH_CHECK(numel == 0 || numel - 1 <= std::numeric_limits<int64_t>::max() - offset, op,
              ": offset + numel must not exceed 2**63, got offset ", offset, " and numel ", numel);
}

void check_launch(const char* op, cudaError_t err) {
  TORCH_CHECK(err == cudaSuccess, op, ": CUDA kernel launch failed: ", cudaGetErrorString(err));
}

void add_noise_and_scale_cuda(at::Tensor& grad, int64_t seed, int64_t offset, double noise_std,
                              double scale) {
  constexpr const char* op = "dpsat_fast::add_noise_and_scale_";
  TORCH_CHECK(grad.is_cuda(), op, ": grad must be a CUDA tensor, got ", grad.device());
  TORCH_CHECK(grad.is_contiguous(), op, ": grad must be contiguous");
  cuda::NoiseDtype dtype;
  switch (grad.scalar_type()) {
    case at::kFloat: dtype = cuda::NoiseDtype::kFloat32; break;
    case at::kDouble: dtype = cuda::NoiseDtype::kFloat64; break;
    case at::kBFloat16: dtype = cuda::NoiseDtype::kBFloat16; break;
    case at::kHalf: dtype = cuda::NoiseDtype::kFloat16; break;
    default:
      TORCH_CHECK(false, op, ": grad must be float32, float64, bfloat16 or float16, got ",
                  grad.scalar_type());
  }
  TORCH_CHECK(std::isfinite(noise_std) && noise_std >= 0.0, op,
              ": noise_std must be finite and non-negative, got ", noise_std);
  TORCH_CHECK(std::isfinite(scale), op, ": scale must be finite, got ", scale);
  check_seed_offset(op, seed, offset, grad.numel());
  const c10::cuda::CUDAGuard guard(grad.device());
  check_launch(op, cuda::launch_add_noise_and_scale(
                       grad.data_ptr(), dtype, grad.numel(), static_cast<uint64_t>(seed),
                       static_cast<uint64_t>(offset), noise_std, scale,
                       at::cuda::getCurrentCUDAStream()));
}

void philox_normal_cuda(at::Tensor& out, int64_t seed, int64_t offset) {
  constexpr const char* op = "dpsat_fast::philox_normal_";
  TORCH_CHECK(out.is_cuda() && out.scalar_type() == at::kFloat && out.is_contiguous(), op,
              ": out must be a contiguous float32 CUDA tensor");
  check_seed_offset(op, seed, offset, out.numel());
  const c10::cuda::CUDAGuard guard(out.device());
  check_launch(op, cuda::launch_philox_normal(out.data_ptr<float>(), out.numel(),
                                              static_cast<uint64_t>(seed),
                                              static_cast<uint64_t>(offset),
                                              at::cuda::getCurrentCUDAStream()));
}

void philox_uint32_cuda(at::Tensor& out, int64_t seed, int64_t offset) {
  constexpr const char* op = "dpsat_fast::philox_uint32_";
  TORCH_CHECK(out.is_cuda() && out.scalar_type() == at::kLong && out.is_contiguous() &&
                  out.dim() == 2 && out.size(0) == 4,
              op, ": out must be a contiguous int64 CUDA tensor of shape (4, n)");
  const int64_t n = out.size(1);
  check_seed_offset(op, seed, offset, n);
  const c10::cuda::CUDAGuard guard(out.device());
  check_launch(op, cuda::launch_philox_uint32(out.data_ptr<int64_t>(), n,
                                              static_cast<uint64_t>(seed),
                                              static_cast<uint64_t>(offset),
                                              at::cuda::getCurrentCUDAStream()));
}

}  // namespace

TORCH_LIBRARY_IMPL(dpsat_fast, CUDA, m) {
  m.impl("add_noise_and_scale_", &add_noise_and_scale_cuda);
  m.impl("philox_normal_", &philox_normal_cuda);
  m.impl("philox_uint32_", &philox_uint32_cuda);
}

}  // namespace dpsat_fast
