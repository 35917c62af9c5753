// CUDA noise kernels (see noise_kernels.cuh). Grid-stride loops over int64 indices; the Philox stream
// and the Box-Muller transform are those of csrc/philox.h, shared with the CPU kernels.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "cuda/noise_kernels.cuh"
#include "philox.h"

namespace dpsat_fast {
namespace cuda {
namespace {

constexpr int kThreads = 256;

template <typename T>
struct Acc {
  using type = float;
};
template <>
struct Acc<double> {
  using type = double;
};

template <typename T>
__device__ __forceinline__ typename Acc<T>::type load_acc(const T* p) {
  return static_cast<typename Acc<T>::type>(*p);
}
template <>
__device__ __forceinline__ float load_acc(const __nv_bfloat16* p) {
  return __bfloat162float(*p);
}
template <>
__device__ __forceinline__ float load_acc(const __half* p) {
  return __half2float(*p);
}

template <typename T, typename A>
__device__ __forceinline__ void store(T* p, A v) {
  *p = static_cast<T>(v);
}
template <>
__device__ __forceinline__ void store(__nv_bfloat16* p, float v) {
  *p = __float2bfloat16_rn(v);
}
template <>
__device__ __forceinline__ void store(__half* p, float v) {
  *p = __float2half_rn(v);
}

template <typename T>
__global__ void add_noise_and_scale_kernel(T* data, int64_t n, uint64_t seed, uint64_t offset,
                                           typename Acc<T>::type noise_std,
                                           typename Acc<T>::type scale) {
  using A = typename Acc<T>::type;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t j = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; j < n; j += stride) {
    const A noise = noise_std * static_cast<A>(philox::randn(seed, offset + static_cast<uint64_t>(j)));
    store(data + j, (load_acc(data + j) + noise) * scale);
  }
}

__global__ void philox_normal_kernel(float* out, int64_t n, uint64_t seed, uint64_t offset) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t j = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; j < n; j += stride) {
    out[j] = philox::randn(seed, offset + static_cast<uint64_t>(j));
  }
}

__global__ void philox_uint32_kernel(int64_t* out, int64_t n, uint64_t seed, uint64_t offset) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t j = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; j < n; j += stride) {
    const philox::Philox4 r = philox::randint4x(seed, offset + static_cast<uint64_t>(j));
    out[j] = r.x;
    out[n + j] = r.y;
    out[2 * n + j] = r.z;
    out[3 * n + j] = r.w;
  }
}

unsigned blocks_for(int64_t n) {
  const int64_t blocks = (n + kThreads - 1) / kThreads;
  return static_cast<unsigned>(blocks < 65535 * 16 ? blocks : 65535 * 16);  // grid-stride beyond
}

template <typename T>
cudaError_t launch_typed(void* data, int64_t n, uint64_t seed, uint64_t offset, double noise_std,
                         double scale, cudaStream_t stream) {
  using A = typename Acc<T>::type;
  add_noise_and_scale_kernel<T><<<blocks_for(n), kThreads, 0, stream>>>(
      static_cast<T*>(data), n, seed, offset, static_cast<A>(noise_std), static_cast<A>(scale));
  return cudaGetLastError();
}

}  // namespace

cudaError_t launch_add_noise_and_scale(void* data, NoiseDtype dtype, int64_t n, uint64_t seed,
                                       uint64_t offset, double noise_std, double scale,
                                       cudaStream_t stream) {
  if (n == 0) return cudaSuccess;
  switch (dtype) {
    case NoiseDtype::kFloat32:
      return launch_typed<float>(data, n, seed, offset, noise_std, scale, stream);
    case NoiseDtype::kFloat64:
      return launch_typed<double>(data, n, seed, offset, noise_std, scale, stream);
    case NoiseDtype::kBFloat16:
      return launch_typed<__nv_bfloat16>(data, n, seed, offset, noise_std, scale, stream);
    case NoiseDtype::kFloat16:
      return launch_typed<__half>(data, n, seed, offset, noise_std, scale, stream);
  }
  return cudaErrorInvalidValue;
}

cudaError_t launch_philox_normal(float* out, int64_t n, uint64_t seed, uint64_t offset,
                                 cudaStream_t stream) {
  if (n == 0) return cudaSuccess;
  philox_normal_kernel<<<blocks_for(n), kThreads, 0, stream>>>(out, n, seed, offset);
  return cudaGetLastError();
}

cudaError_t launch_philox_uint32(int64_t* out, int64_t n, uint64_t seed, uint64_t offset,
                                 cudaStream_t stream) {
  if (n == 0) return cudaSuccess;
  philox_uint32_kernel<<<blocks_for(n), kThreads, 0, stream>>>(out, n, seed, offset);
  return cudaGetLastError();
}

}  // namespace cuda
}  // namespace dpsat_fast
