// Counter-based Gaussian noise: Philox4x32-10 and Box-Muller, bit-compatible with Triton.
//
// Header-only and free of torch includes so that CPU kernels, CUDA kernels and tests share one
// definition. Element j of the noise stream for (seed, offset) is
//
//   (r0, r1, r2, r3) = Philox4x32-10(counter = (lo(offset + j), hi(offset + j), 0, 0),
//                                    key     = (lo(seed), hi(seed)))
//   u1 = max(1e-7, uniform(r0)),  u2 = uniform(r1)
//   xi = sqrt(-2 log u1) * cos(2 pi u2)                  (all fp32)
//
// which is exactly what `tl.randn(seed, offset + j)` computes (triton/language/random.py:
// randint4x, uint_to_uniform_float, pair_uniform_to_normal). Philox: Salmon et al., "Parallel
// random numbers: as easy as 1, 2, 3", SC 2011.
#pragma once

#include <cmath>
#include <cstdint>

#if defined(__CUDACC__) || defined(__HIPCC__)
#define DPSAT_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define DPSAT_HOST_DEVICE inline
#endif

namespace dpsat_fast {
namespace philox {

constexpr uint32_t kKeyA = 0x9E3779B9u;  // key bump per round: golden ratio
constexpr uint32_t kKeyB = 0xBB67AE85u;  // key bump per round: sqrt(3) - 1
constexpr uint32_t kRoundA = 0xD2511F53u;
constexpr uint32_t kRoundB = 0xCD9E8D57u;
constexpr int kRounds = 10;

// Largest float such that (2^31 - 1) * scale < 1 after rounding (Triton's constant).
constexpr float kUint32ToUniform = 4.6566127342e-10f;
constexpr float kMinUniform = 1.0e-7f;
constexpr float kTwoPi = 6.283185307179586f;

struct Philox4 {
  uint32_t x, y, z, w;
};

DPSAT_HOST_DEVICE uint32_t umulhi(uint32_t a, uint32_t b) {
#if defined(__CUDA_ARCH__)
  return __umulhi(a, b);
#else
  return static_cast<uint32_t>((static_cast<uint64_t>(a) * b) >> 32);
#endif
}

// Philox4x32 with kRounds rounds; the same round function and key schedule as Random123's
// philox4x32_R and Triton's philox_impl.
DPSAT_HOST_DEVICE Philox4 philox4x32(uint32_t c0, uint32_t c1, uint32_t c2, uint32_t c3,
                                     uint32_t k0, uint32_t k1) {
#if defined(__CUDA_ARCH__)
#pragma unroll
#endif
  for (int round = 0; round < kRounds; ++round) {
    const uint32_t next_c0 = umulhi(kRoundB, c2) ^ c1 ^ k0;
    const uint32_t next_c2 = umulhi(kRoundA, c0) ^ c3 ^ k1;
    c1 = kRoundB * c2;
    c3 = kRoundA * c0;
    c0 = next_c0;
    c2 = next_c2;
    k0 += kKeyA;
    k1 += kKeyB;
  }
  return Philox4{c0, c1, c2, c3};
}

// The four words Triton's randint4x(seed, offset) returns for one int64 offset.
DPSAT_HOST_DEVICE Philox4 randint4x(uint64_t seed, uint64_t offset) {
  return philox4x32(static_cast<uint32_t>(offset), static_cast<uint32_t>(offset >> 32), 0u, 0u,
                    static_cast<uint32_t>(seed), static_cast<uint32_t>(seed >> 32));
}

// Triton's uint_to_uniform_float: reinterpret as int32, fold negatives with x -> -x - 1 (= ~x),
// round to fp32 and scale into [0, 1).
DPSAT_HOST_DEVICE float uint32_to_uniform(uint32_t bits) {
  const uint32_t folded = (bits >> 31) ? ~bits : bits;
  return static_cast<float>(static_cast<int32_t>(folded)) * kUint32ToUniform;
}

// Triton's pair_uniform_to_normal, first output only, with the fp32 math library at hand (an ulp
// or two from the correctly rounded log/sqrt/cos that the CPU kernel and the reference use).
DPSAT_HOST_DEVICE float box_muller_first(float u1, float u2) {
  u1 = u1 > kMinUniform ? u1 : kMinUniform;
  const float theta = kTwoPi * u2;
  const float radius = sqrtf(-2.0f * logf(u1));
  return radius * cosf(theta);
}

// Element `offset` of the N(0, 1) stream for `seed`: tl.randn(seed, offset).
DPSAT_HOST_DEVICE float randn(uint64_t seed, uint64_t offset) {
  const Philox4 r = randint4x(seed, offset);
  return box_muller_first(uint32_to_uniform(r.x), uint32_to_uniform(r.y));
}

}  // namespace philox
}  // namespace dpsat_fast
