// Philox4x32-10 on AVX-512 (16 counters per vector) and AVX2 (8 counters), producing the two
// Box-Muller inputs of tl.randn: u1 = max(1e-7, uniform(r0)) and theta = 2 pi uniform(r1).
//
// Bit-identical to philox::randint4x and philox::uint32_to_uniform in csrc/philox.h; compilers do
// not vectorize the 32x32->64 multiplies of Philox well, hence intrinsics. Each function carries its
// own target attribute, so this header compiles without -mavx* flags; callers dispatch at run time.
#pragma once

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define DPSAT_HAVE_X86_KERNELS 1

#include <immintrin.h>

#include <cstdint>

#include "philox.h"

namespace dpsat_fast {
namespace cpu {

#define DPSAT_TARGET_AVX512 __attribute__((target("avx512f")))
#define DPSAT_TARGET_AVX2 __attribute__((target("avx2")))

// uniform(x) = fp32(x ^ (x >> 31, arithmetic)) * scale: the shift is all ones exactly when the
// int32 is negative, so the xor maps x to ~x = -x - 1 there and leaves x alone otherwise.
DPSAT_TARGET_AVX512 inline __m512 uniform_avx512(__m512i bits) {
  const __m512i folded = _mm512_xor_si512(bits, _mm512_srai_epi32(bits, 31));
  return _mm512_mul_ps(_mm512_cvtepi32_ps(folded), _mm512_set1_ps(philox::kUint32ToUniform));
}

DPSAT_TARGET_AVX2 inline __m256 uniform_avx2(__m256i bits) {
  const __m256i folded = _mm256_xor_si256(bits, _mm256_srai_epi32(bits, 31));
  return _mm256_mul_ps(_mm256_cvtepi32_ps(folded), _mm256_set1_ps(philox::kUint32ToUniform));
}

// hi and lo words of the 64-bit products m * x, lane by lane: the even lanes multiply in place,
// the odd lanes after a 32-bit shift, and the halves are blended back.
DPSAT_TARGET_AVX512 inline void mulhilo_avx512(__m512i m, __m512i x, __m512i* hi, __m512i* lo) {
  const __m512i even = _mm512_mul_epu32(m, x);
  const __m512i odd = _mm512_mul_epu32(m, _mm512_srli_epi64(x, 32));
  *hi = _mm512_mask_blend_epi32(0xAAAA, _mm512_srli_epi64(even, 32), odd);
  *lo = _mm512_mask_blend_epi32(0xAAAA, even, _mm512_slli_epi64(odd, 32));
}

DPSAT_TARGET_AVX2 inline void mulhilo_avx2(__m256i m, __m256i x, __m256i* hi, __m256i* lo) {
  const __m256i even = _mm256_mul_epu32(m, x);
  const __m256i odd = _mm256_mul_epu32(m, _mm256_srli_epi64(x, 32));
  *hi = _mm256_blend_epi32(_mm256_srli_epi64(even, 32), odd, 0xAA);
  *lo = _mm256_blend_epi32(even, _mm256_slli_epi64(odd, 32), 0xAA);
}

// For i < n: u1[i], theta[i] from counter offset + i. n need not be a multiple of 16.
DPSAT_TARGET_AVX512 inline void philox_box_muller_inputs_avx512(uint64_t seed, uint64_t offset,
                                                                int64_t n, float* u1,
                                                                float* theta) {
  const __m512i lane = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  const __m512i round_a = _mm512_set1_epi32(static_cast<int32_t>(philox::kRoundA));
  const __m512i round_b = _mm512_set1_epi32(static_cast<int32_t>(philox::kRoundB));
  __m512i keys0[philox::kRounds];
  __m512i keys1[philox::kRounds];
  uint32_t k0 = static_cast<uint32_t>(seed);
  uint32_t k1 = static_cast<uint32_t>(seed >> 32);
  for (int round = 0; round < philox::kRounds; ++round) {
    keys0[round] = _mm512_set1_epi32(static_cast<int32_t>(k0));
    keys1[round] = _mm512_set1_epi32(static_cast<int32_t>(k1));
    k0 += philox::kKeyA;
    k1 += philox::kKeyB;
  }
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    const uint64_t base = offset + static_cast<uint64_t>(i);
    const __m512i base_lo = _mm512_set1_epi32(static_cast<int32_t>(base));
    const __m512i base_hi = _mm512_set1_epi32(static_cast<int32_t>(base >> 32));
    __m512i c0 = _mm512_add_epi32(base_lo, lane);
    // the low word wrapped: carry into the high word
    const __mmask16 carry = _mm512_cmplt_epu32_mask(c0, base_lo);
    __m512i c1 = _mm512_mask_add_epi32(base_hi, carry, base_hi, _mm512_set1_epi32(1));
    __m512i c2 = _mm512_setzero_si512();
    __m512i c3 = _mm512_setzero_si512();
    for (int round = 0; round < philox::kRounds; ++round) {
      __m512i hi_a, lo_a, hi_b, lo_b;
      mulhilo_avx512(round_a, c0, &hi_a, &lo_a);
      mulhilo_avx512(round_b, c2, &hi_b, &lo_b);
      // 0x96 is the truth table of a ^ b ^ c
      c0 = _mm512_ternarylogic_epi32(hi_b, c1, keys0[round], 0x96);
      c2 = _mm512_ternarylogic_epi32(hi_a, c3, keys1[round], 0x96);
      c1 = lo_b;
      c3 = lo_a;
    }
    _mm512_storeu_ps(u1 + i,
                     _mm512_max_ps(uniform_avx512(c0), _mm512_set1_ps(philox::kMinUniform)));
    _mm512_storeu_ps(theta + i, _mm512_mul_ps(_mm512_set1_ps(philox::kTwoPi), uniform_avx512(c1)));
  }
  for (; i < n; ++i) {
    const philox::Philox4 r = philox::randint4x(seed, offset + static_cast<uint64_t>(i));
    const float u = philox::uint32_to_uniform(r.x);
    u1[i] = u > philox::kMinUniform ? u : philox::kMinUniform;
    theta[i] = philox::kTwoPi * philox::uint32_to_uniform(r.y);
  }
}

DPSAT_TARGET_AVX2 inline void philox_box_muller_inputs_avx2(uint64_t seed, uint64_t offset,
                                                            int64_t n, float* u1, float* theta) {
  const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  const __m256i sign = _mm256_set1_epi32(INT32_MIN);
  const __m256i round_a = _mm256_set1_epi32(static_cast<int32_t>(philox::kRoundA));
  const __m256i round_b = _mm256_set1_epi32(static_cast<int32_t>(philox::kRoundB));
  __m256i keys0[philox::kRounds];
  __m256i keys1[philox::kRounds];
  uint32_t k0 = static_cast<uint32_t>(seed);
  uint32_t k1 = static_cast<uint32_t>(seed >> 32);
  for (int round = 0; round < philox::kRounds; ++round) {
    keys0[round] = _mm256_set1_epi32(static_cast<int32_t>(k0));
    keys1[round] = _mm256_set1_epi32(static_cast<int32_t>(k1));
    k0 += philox::kKeyA;
    k1 += philox::kKeyB;
  }
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const uint64_t base = offset + static_cast<uint64_t>(i);
    const __m256i base_lo = _mm256_set1_epi32(static_cast<int32_t>(base));
    const __m256i base_hi = _mm256_set1_epi32(static_cast<int32_t>(base >> 32));
    __m256i c0 = _mm256_add_epi32(base_lo, lane);
    // unsigned c0 < base_lo (the low word wrapped) as a signed compare of sign-flipped words; the
    // all-ones mask is -1, so subtracting it adds the carry
    const __m256i carry = _mm256_cmpgt_epi32(_mm256_xor_si256(base_lo, sign),
                                             _mm256_xor_si256(c0, sign));
    __m256i c1 = _mm256_sub_epi32(base_hi, carry);
    __m256i c2 = _mm256_setzero_si256();
    __m256i c3 = _mm256_setzero_si256();
    for (int round = 0; round < philox::kRounds; ++round) {
      __m256i hi_a, lo_a, hi_b, lo_b;
      mulhilo_avx2(round_a, c0, &hi_a, &lo_a);
      mulhilo_avx2(round_b, c2, &hi_b, &lo_b);
      c0 = _mm256_xor_si256(_mm256_xor_si256(hi_b, c1), keys0[round]);
      c2 = _mm256_xor_si256(_mm256_xor_si256(hi_a, c3), keys1[round]);
      c1 = lo_b;
      c3 = lo_a;
    }
    _mm256_storeu_ps(u1 + i,
                     _mm256_max_ps(uniform_avx2(c0), _mm256_set1_ps(philox::kMinUniform)));
    _mm256_storeu_ps(theta + i, _mm256_mul_ps(_mm256_set1_ps(philox::kTwoPi), uniform_avx2(c1)));
  }
  for (; i < n; ++i) {
    const philox::Philox4 r = philox::randint4x(seed, offset + static_cast<uint64_t>(i));
    const float u = philox::uint32_to_uniform(r.x);
    u1[i] = u > philox::kMinUniform ? u : philox::kMinUniform;
    theta[i] = philox::kTwoPi * philox::uint32_to_uniform(r.y);
  }
}

}  // namespace cpu
}  // namespace dpsat_fast

#endif  // x86-64 with GCC or Clang
