// The CPU Philox noise stream of philox_noise.cpp, for the kernels that add noise to their results
// (per_sample.cpp): element j of the stream for (seed, offset) is tl.randn(seed, offset + j),
// bit-identical to the Triton and reference streams.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>

namespace dpsat_fast {
namespace cpu {

// t += noise_std * xi in place, t contiguous and float32/float64/bfloat16/float16 (checked).
void add_noise_(at::Tensor& t, int64_t seed, int64_t offset, double noise_std);

// seed >= 0, offset >= 0, offset + numel <= 2**63 (TORCH_CHECK, naming op).
void check_seed_offset(const char* op, int64_t seed, int64_t offset, int64_t numel);

}  // namespace cpu
}  // namespace dpsat_fast
