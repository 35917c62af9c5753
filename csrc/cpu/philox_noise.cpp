// CPU kernels for counter-based Gaussian noise (dpsat_fast::add_noise_and_scale_ and friends).
//
// Element j of a tensor receives the normal tl.randn(seed, offset + j) (see csrc/philox.h), so the
// result depends only on (seed, offset, j): never on the thread count or the block size. Noise is
// generated per block of kBlock elements into an L1-resident buffer and consumed at once, so no
// noise tensor is materialized.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <string>
#include <type_traits>

#include "cpu/noise.h"
#include "cpu/philox_x86.h"
#include "philox.h"

namespace dpsat_fast {
namespace {

constexpr int64_t kBlock = 512;  // normals per block: the fp32 buffer stays in L1
constexpr int64_t kGrainSize = 1 << 15;

template <typename To, typename From>
inline To bit_cast(From from) {
  static_assert(sizeof(To) == sizeof(From), "bit_cast needs equal sizes");
  To to;
  std::memcpy(&to, &from, sizeof(To));
  return to;
}

// log(u) for a normal float u in (0, 1], evaluated in fp64 and rounded once, so it is the correctly
// rounded logf except in the rare ties of double rounding. u = 2^e m with m in [sqrt(1/2), sqrt(2)),
// log m = 2 atanh(s) = 2 (s + s^3/3 + s^5/5 + ...), s = (m - 1) / (m + 1), |s| <= 0.1716; nine terms
// leave a relative error below 1e-15. Branch-free so that the loop calling it vectorizes.
inline float log_unit_interval(float u) {
  const uint32_t bits = bit_cast<uint32_t>(u);
  const int32_t biased_exponent = static_cast<int32_t>(bits >> 23);
  const float mantissa = bit_cast<float>((bits & 0x007FFFFFu) | 0x3F800000u);  // [1, 2)
  const bool halve = mantissa > 1.41421356f;
  const double m = halve ? 0.5 * mantissa : mantissa;
  const double e = static_cast<double>(biased_exponent - 127 + (halve ? 1 : 0));
  const double s = (m - 1.0) / (m + 1.0);
  const double z = s * s;
  double p = 1.0 / 17.0;
  p = p * z + 1.0 / 15.0;
  p = p * z + 1.0 / 13.0;
  p = p * z + 1.0 / 11.0;
  p = p * z + 1.0 / 9.0;
  p = p * z + 1.0 / 7.0;
  p = p * z + 1.0 / 5.0;
  p = p * z + 1.0 / 3.0;
  p = p * z + 1.0;
  constexpr double kLn2 = 0.69314718055994530942;
  return static_cast<float>(e * kLn2 + 2.0 * s * p);
}

// cos(theta) for a float theta in [0, 2 pi), evaluated in fp64 and rounded once. theta = k pi/2 + r
// with |r| <= pi/4 (Cody-Waite with fdlibm's two-part pi/2, exact products since k <= 4), then the
// fdlibm __kernel_sin/__kernel_cos polynomials and the quadrant's sign and swap.
inline float cos_zero_to_two_pi(float theta) {
  constexpr double kTwoOverPi = 6.36619772367581382433e-01;
  constexpr double kPiOver2Hi = 1.57079632673412561417e+00;
  constexpr double kPiOver2Lo = 6.07710050650619224932e-11;
  constexpr double kRoundMagic = 6755399441055744.0;  // 1.5 * 2^52: adding it rounds to an integer
  const double x = theta;
  const double shifted = x * kTwoOverPi + kRoundMagic;
  const double k = shifted - kRoundMagic;
  const uint32_t quadrant = static_cast<uint32_t>(bit_cast<uint64_t>(shifted)) & 3u;
  const double r = (x - k * kPiOver2Hi) - k * kPiOver2Lo;
  const double z = r * r;
  double sin_poly = 1.58969099521155010221e-10;
  sin_poly = sin_poly * z - 2.50507602534068634195e-08;
  sin_poly = sin_poly * z + 2.75573137070700676789e-06;
  sin_poly = sin_poly * z - 1.98412698298579493134e-04;
  sin_poly = sin_poly * z + 8.33333333332248946124e-03;
  sin_poly = sin_poly * z - 1.66666666666666324348e-01;
  const double sin_r = r + r * z * sin_poly;
  double cos_poly = -1.13596475577881948265e-11;
  cos_poly = cos_poly * z + 2.08757232129817482790e-09;
  cos_poly = cos_poly * z - 2.75573143513906633035e-07;
  cos_poly = cos_poly * z + 2.48015872894767294178e-05;
  cos_poly = cos_poly * z - 1.38888888888741095749e-03;
  cos_poly = cos_poly * z + 4.16666666666666019037e-02;
  const double cos_r = (1.0 - 0.5 * z) + z * z * cos_poly;
  // cos(r + q pi/2) = cos r, -sin r, -cos r, sin r for q = 0, 1, 2, 3.
  const double magnitude = (quadrant & 1u) ? sin_r : cos_r;
  const double value = ((quadrant + 1u) & 2u) ? -magnitude : magnitude;
  return static_cast<float>(value);
}

#if defined(__GNUC__) || defined(__clang__)
#define DPSAT_ALWAYS_INLINE inline __attribute__((always_inline))
#else
#define DPSAT_ALWAYS_INLINE inline
#endif

// out[i] = sqrt(-2 log u1[i]) cos(theta[i]); inlined into each ISA's caller so it vectorizes there.
DPSAT_ALWAYS_INLINE void box_muller(int64_t n, const float* u1, const float* theta, float* out) {
  for (int64_t i = 0; i < n; ++i) {
    const float radius = std::sqrt(-2.0f * log_unit_interval(u1[i]));
    out[i] = radius * cos_zero_to_two_pi(theta[i]);
  }
}

// out[i] = tl.randn(seed, offset + i) for i < n <= kBlock, one version per instruction set.
void fill_normals_generic(uint64_t seed, uint64_t offset, int64_t n, float* out) {
  alignas(64) float u1[kBlock];
  alignas(64) float theta[kBlock];
  for (int64_t i = 0; i < n; ++i) {
    const philox::Philox4 r = philox::randint4x(seed, offset + static_cast<uint64_t>(i));
    const float u = philox::uint32_to_uniform(r.x);
    u1[i] = u > philox::kMinUniform ? u : philox::kMinUniform;
    theta[i] = philox::kTwoPi * philox::uint32_to_uniform(r.y);
  }
  box_muller(n, u1, theta, out);
}

#ifdef DPSAT_HAVE_X86_KERNELS
DPSAT_TARGET_AVX512 void fill_normals_avx512(uint64_t seed, uint64_t offset, int64_t n,
                                             float* out) {
  alignas(64) float u1[kBlock];
  alignas(64) float theta[kBlock];
  cpu::philox_box_muller_inputs_avx512(seed, offset, n, u1, theta);
  box_muller(n, u1, theta, out);
}

DPSAT_TARGET_AVX2 void fill_normals_avx2(uint64_t seed, uint64_t offset, int64_t n, float* out) {
  alignas(64) float u1[kBlock];
  alignas(64) float theta[kBlock];
  cpu::philox_box_muller_inputs_avx2(seed, offset, n, u1, theta);
  box_muller(n, u1, theta, out);
}
#endif

using FillNormalsFn = void (*)(uint64_t, uint64_t, int64_t, float*);

struct FillNormalsImpl {
  FillNormalsFn fn;
  const char* capability;
};

// The widest instruction set the CPU has, capped by DPSAT_FAST_CPU_CAPABILITY (avx512, avx2 or
// default) as ATEN_CPU_CAPABILITY caps torch's kernels; every version produces the same bits.
FillNormalsImpl select_fill_normals() {
#ifdef DPSAT_HAVE_X86_KERNELS
  const char* env = std::getenv("DPSAT_FAST_CPU_CAPABILITY");
  const std::string cap = (env == nullptr || *env == '\0') ? "avx512" : env;
  __builtin_cpu_init();  // needed before __builtin_cpu_supports in a static initializer
  if (cap == "avx512" && __builtin_cpu_supports("avx512f")) {
    return {&fill_normals_avx512, "avx512"};
  }
  if ((cap == "avx512" || cap == "avx2") && __builtin_cpu_supports("avx2")) {
    return {&fill_normals_avx2, "avx2"};
  }
#endif
  return {&fill_normals_generic, "default"};
}

const FillNormalsImpl kFillNormals = select_fill_normals();

void fill_normals(uint64_t seed, uint64_t offset, int64_t n, float* out) {
  kFillNormals.fn(seed, offset, n, out);
}

void check_seed_offset(const char* op, int64_t seed, int64_t offset, int64_t numel) {
  TORCH_CHECK(seed >= 0, op, ": seed must be non-negative, got ", seed);
  TORCH_CHECK(offset >= 0, op, ": offset must be non-negative, got ", offset);
  // the last counter, offset + numel - 1, must fit in int64
  TORCH_CHECK(numel == 0 || numel - 1 <= std::numeric_limits<int64_t>::max() - offset, op,
              ": offset + numel must not exceed 2**63, got offset ", offset, " and numel ", numel);
}

template <typename scalar_t>
void add_noise_and_scale_kernel(scalar_t* data, int64_t numel, uint64_t seed, uint64_t offset,
                                double noise_std, double scale) {
  using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
  const acc_t std_acc = static_cast<acc_t>(noise_std);
  const acc_t scale_acc = static_cast<acc_t>(scale);
  at::parallel_for(0, numel, kGrainSize, [&](int64_t begin, int64_t end) {
    alignas(64) float xi[kBlock];
    for (int64_t start = begin; start < end; start += kBlock) {
      const int64_t n = std::min(kBlock, end - start);
      fill_normals(seed, offset + static_cast<uint64_t>(start), n, xi);
      scalar_t* block = data + start;
      for (int64_t i = 0; i < n; ++i) {
        const acc_t noise = std_acc * static_cast<acc_t>(xi[i]);
        block[i] = static_cast<scalar_t>((static_cast<acc_t>(block[i]) + noise) * scale_acc);
      }
    }
  });
}

void add_noise_and_scale_cpu(at::Tensor& grad, int64_t seed, int64_t offset, double noise_std,
                             double scale) {
  constexpr const char* op = "dpsat_fast::add_noise_and_scale_";
  TORCH_CHECK(grad.device().is_cpu(), op, ": grad must be a CPU tensor, got ", grad.device());
  TORCH_CHECK(grad.is_contiguous(), op, ": grad must be contiguous");
  const at::ScalarType dtype = grad.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kDouble || dtype == at::kBFloat16 ||
                  dtype == at::kHalf,
              op, ": grad must be float32, float64, bfloat16 or float16, got ", dtype);
  TORCH_CHECK(std::isfinite(noise_std) && noise_std >= 0.0, op,
              ": noise_std must be finite and non-negative, got ", noise_std);
  TORCH_CHECK(std::isfinite(scale), op, ": scale must be finite, got ", scale);
  check_seed_offset(op, seed, offset, grad.numel());
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kBFloat16, at::kHalf, dtype, "add_noise_and_scale_cpu", [&] {
        add_noise_and_scale_kernel<scalar_t>(grad.mutable_data_ptr<scalar_t>(), grad.numel(),
                                             static_cast<uint64_t>(seed),
                                             static_cast<uint64_t>(offset), noise_std, scale);
      });
}

void philox_normal_cpu(at::Tensor& out, int64_t seed, int64_t offset) {
  constexpr const char* op = "dpsat_fast::philox_normal_";
  TORCH_CHECK(out.device().is_cpu(), op, ": out must be a CPU tensor, got ", out.device());
  TORCH_CHECK(out.is_contiguous(), op, ": out must be contiguous");
  TORCH_CHECK(out.scalar_type() == at::kFloat, op, ": out must be float32, got ",
              out.scalar_type());
  check_seed_offset(op, seed, offset, out.numel());
  float* data = out.mutable_data_ptr<float>();
  at::parallel_for(0, out.numel(), kGrainSize, [&](int64_t begin, int64_t end) {
    for (int64_t start = begin; start < end; start += kBlock) {
      fill_normals(static_cast<uint64_t>(seed), static_cast<uint64_t>(offset + start),
                   std::min(kBlock, end - start), data + start);
    }
  });
}

void philox_uint32_cpu(at::Tensor& out, int64_t seed, int64_t offset) {
  constexpr const char* op = "dpsat_fast::philox_uint32_";
  TORCH_CHECK(out.device().is_cpu(), op, ": out must be a CPU tensor, got ", out.device());
  TORCH_CHECK(out.is_contiguous(), op, ": out must be contiguous");
  TORCH_CHECK(out.scalar_type() == at::kLong, op, ": out must be int64, got ", out.scalar_type());
  TORCH_CHECK(out.dim() == 2 && out.size(0) == 4, op, ": out must have shape (4, n), got ",
              out.sizes());
  const int64_t n = out.size(1);
  check_seed_offset(op, seed, offset, n);
  int64_t* data = out.mutable_data_ptr<int64_t>();
  at::parallel_for(0, n, kGrainSize, [&](int64_t begin, int64_t end) {
    for (int64_t j = begin; j < end; ++j) {
      const philox::Philox4 r =
          philox::randint4x(static_cast<uint64_t>(seed), static_cast<uint64_t>(offset + j));
      data[j] = r.x;
      data[n + j] = r.y;
      data[2 * n + j] = r.z;
      data[3 * n + j] = r.w;
    }
  });
}

}  // namespace

namespace cpu {
void add_noise_(at::Tensor& t, int64_t seed, int64_t offset, double noise_std) {
  add_noise_and_scale_cpu(t, seed, offset, noise_std, 1.0);
}

void check_seed_offset(const char* op, int64_t seed, int64_t offset, int64_t numel) {
  dpsat_fast::check_seed_offset(op, seed, offset, numel);
}
}  // namespace cpu

std::string cpu_capability() {
  return kFillNormals.capability;
}

TORCH_LIBRARY_IMPL(dpsat_fast, CPU, m) {
  m.impl("add_noise_and_scale_", &add_noise_and_scale_cpu);
  m.impl("philox_normal_", &philox_normal_cpu);
  m.impl("philox_uint32_", &philox_uint32_cpu);
}

}  // namespace dpsat_fast
