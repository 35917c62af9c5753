// CUDA noise kernels: element j of a tensor receives tl.randn(seed, offset + j) (csrc/philox.h).
//
// Device code and plain C++ launchers only: this header and noise_kernels.cu include CUDA headers but
// nothing from torch, so nvcc compiles them on machines without a CUDA torch (CI does, compile-only).
// The torch glue that registers them as dpsat_fast ops is noise_cuda_ops.cpp.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace dpsat_fast {
namespace cuda {

enum class NoiseDtype { kFloat32, kFloat64, kBFloat16, kFloat16 };

// data <- (data + noise_std * xi) * scale over n contiguous elements of `dtype`; fp32 arithmetic
// (fp64 for kFloat64), one rounding on store. Returns the launch error (cudaSuccess if none).
cudaError_t launch_add_noise_and_scale(void* data, NoiseDtype dtype, int64_t n, uint64_t seed,
                                       uint64_t offset, double noise_std, double scale,
                                       cudaStream_t stream);

// out[j] = tl.randn(seed, offset + j) as float32.
cudaError_t launch_philox_normal(float* out, int64_t n, uint64_t seed, uint64_t offset,
                                 cudaStream_t stream);

// out[k * n + j] = word k of tl.randint4x(seed, offset + j), as int64 holding a uint32.
cudaError_t launch_philox_uint32(int64_t* out, int64_t n, uint64_t seed, uint64_t offset,
                                 cudaStream_t stream);

}  // namespace cuda
}  // namespace dpsat_fast
