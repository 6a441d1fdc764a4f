/* Native diverse-group convolution, stage 3 (AVX2 + FMA): the micro-kernel of kernel.h
   instantiated for 8-lane ymm vectors, lane masks as all-ones/zero int vectors.

   Only <immintrin.h>, <cstdint> and kernel.h are included before the target pragma (see
   kernel.h).
   ops.cpp calls this file only when __builtin_cpu_supports reports avx2 and fma. */
#include <cstdint>

#include "kernel.h"   // the interface, compiled for the baseline ISA

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>

#if defined(__clang__)   // clang ignores GCC's target pragma
#pragma clang attribute push(__attribute__((target("avx2,fma"))), apply_to = function)
#else
#pragma GCC push_options
#pragma GCC target("avx2,fma")
#endif
#define SGDET_NATIVE_ISA_FILE 1
#include "kernel.h"

namespace sgdet_native {
namespace {

struct Avx2 {
  static constexpr int N = 8;
  static constexpr bool kFullLoads = true;    // vmaskmovps is slower than a plain load
  static constexpr int kPrefetchFmas = 384;   // FMAs between a prefetch and its use
  static constexpr bool kPrefetchColdOnly = true;   // Zen 3: -5 % to +20 % per layer, median +5 %
  static constexpr int kPrefetchNextFmas = 1536;   // next block prefetched at <= this many FMAs per tap
  static constexpr int kStorePrefetchBlocks = 1;   // Zen 3: 1 block best of 1/2/4/8 (notes)
  using V = __m256;
  using M = __m256i;
  using I = __m256i;
  static inline V set1(float v) { return _mm256_set1_ps(v); }
  static inline V bcast(const float* p) { return _mm256_broadcast_ss(p); }
  static inline M mask(uint32_t bits) {
    const __m256i lane = _mm256_setr_epi32(1, 2, 4, 8, 16, 32, 64, 128);
    return _mm256_cmpeq_epi32(_mm256_and_si256(_mm256_set1_epi32((int)bits), lane), lane);
  }
  static inline V loadu(const float* p) { return _mm256_loadu_ps(p); }
  static inline V load(const float* p, M m) { return _mm256_maskload_ps(p, m); }
  static inline I offsets(const int32_t* base, int32_t add) {
    return _mm256_add_epi32(_mm256_load_si256((const __m256i*)base), _mm256_set1_epi32(add));
  }
  static inline V gather(const float* src, I off, M m) {
    return _mm256_mask_i32gather_ps(_mm256_setzero_ps(), src, off, _mm256_castsi256_ps(m), 4);
  }
  static inline V deint(V lo, V hi) {   // even lanes of lo:hi
    const __m256 t = _mm256_shuffle_ps(lo, hi, _MM_SHUFFLE(2, 0, 2, 0));   // lo0 lo2 hi0 hi2 ..
    return _mm256_castpd_ps(_mm256_permute4x64_pd(_mm256_castps_pd(t), _MM_SHUFFLE(3, 1, 2, 0)));
  }
  static inline V fma(V a, V b, V c) { return _mm256_fmadd_ps(a, b, c); }
  static inline V add(V a, V b) { return _mm256_add_ps(a, b); }
  static inline V relu(V a) { return _mm256_max_ps(a, _mm256_setzero_ps()); }
  static inline void storeu(float* p, V v) { _mm256_storeu_ps(p, v); }
  static inline void store(float* p, V v, M m) { _mm256_maskstore_ps(p, m, v); }
};

}  // namespace

/* Tile shapes (filters TF x pixel vectors PV) for 16 ymm registers: TF*PV accumulators + PV
   inputs + 1 broadcast. 4x3 (12 FMAs per 7 loads, 24 pixels) is the default and suits groups of
   4; 6x2 larger groups; 12x1 and 8x1 big groups on small maps (8-pixel blocks waste no block on
   7x7 maps; 12x1 is load-bound at 2 loads per cycle, 8x1 latency-bound). */

namespace {
void conv_isa(const ConvArgs& a, int32_t variant, int64_t begin, int64_t end) {
  switch (variant) {
    case 1: conv_variant<Avx2, 6, 2>(a, begin, end); break;
    case 2: conv_variant<Avx2, 12, 1>(a, begin, end); break;
    case 3: conv_variant<Avx2, 8, 1>(a, begin, end); break;
    default: conv_variant<Avx2, 4, 3>(a, begin, end); break;
  }
}
}  // namespace

}  // namespace sgdet_native
#if defined(__clang__)
#pragma clang attribute pop
#else
#pragma GCC pop_options
#endif

// The exported entry points are compiled for the baseline ISA (called from generic code).
namespace sgdet_native {
void conv_avx2(const ConvArgs& a, int32_t variant, int64_t begin, int64_t end) {
  conv_isa(a, variant, begin, end);
}
}  // namespace sgdet_native

#else   // not x86: ops.cpp never selects this ISA; the symbols keep the link whole
namespace sgdet_native {
void conv_avx2(const ConvArgs&, int32_t, int64_t, int64_t) {}
}  // namespace sgdet_native
#endif

namespace sgdet_native {
void variants_avx2(VariantInfo* out) {
  const VariantInfo v[kVariants] = {{4, 3, 8}, {6, 2, 8}, {12, 1, 8}, {8, 1, 8}};
  for (int i = 0; i < kVariants; ++i) out[i] = v[i];
}
}  // namespace sgdet_native
