/* Native diverse-group convolution, stage 3 (AVX-512): the micro-kernel of kernel.h
   instantiated for 16-lane zmm vectors with k-register lane masks.

   Only <immintrin.h>, <cstdint> and kernel.h are included before the target pragma: no inline
   library function is compiled for AVX-512 here (see kernel.h). ops.cpp calls this file only when
   __builtin_cpu_supports reports avx512f, avx512bw and avx512vl. */
#include <cstdint>

#include "kernel.h"   // the interface, compiled for the baseline ISA

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>

#if defined(__clang__)   // clang ignores GCC's target pragma
#pragma clang attribute push(__attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma"))), apply_to = function)
#else
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma")
#endif
// GCC 12 flags _mm512_undefined_ps inside the max intrinsic (a known false positive)
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#define SGDET_NATIVE_ISA_FILE 1
#include "kernel.h"

namespace sgdet_native {
namespace {

struct Avx512 {
  static constexpr int N = 16;
  static constexpr bool kFullLoads = false;   // a k-masked load costs what a plain one does
  static constexpr int kPrefetchFmas = 384;   // FMAs between a prefetch and its use
  static constexpr bool kPrefetchColdOnly = false;  // unmeasured on AVX-512: unchanged
  static constexpr int kPrefetchNextFmas = 0;   // unmeasured on AVX-512: off
  static constexpr int kStorePrefetchBlocks = 0;   // unmeasured on AVX-512: off
  using V = __m512;
  using M = __mmask16;
  using I = __m512i;
  static inline V set1(float v) { return _mm512_set1_ps(v); }
  static inline V bcast(const float* p) { return _mm512_set1_ps(*p); }
  static inline M mask(uint32_t bits) { return (M)bits; }
  static inline V loadu(const float* p) { return _mm512_loadu_ps(p); }
  static inline V load(const float* p, M m) { return _mm512_maskz_loadu_ps(m, p); }
  static inline I offsets(const int32_t* base, int32_t add) {
    return _mm512_add_epi32(_mm512_load_si512((const void*)base), _mm512_set1_epi32(add));
  }
  static inline V gather(const float* src, I off, M m) {
    return _mm512_mask_i32gather_ps(_mm512_setzero_ps(), m, off, src, 4);
  }
  static inline V deint(V lo, V hi) {   // even lanes of lo:hi
    return _mm512_permutex2var_ps(
        lo, _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30), hi);
  }
  static inline V fma(V a, V b, V c) { return _mm512_fmadd_ps(a, b, c); }
  static inline V add(V a, V b) { return _mm512_add_ps(a, b); }
  static inline V relu(V a) { return _mm512_max_ps(a, _mm512_setzero_ps()); }
  static inline void storeu(float* p, V v) { _mm512_storeu_ps(p, v); }
  static inline void store(float* p, V v, M m) { _mm512_mask_storeu_ps(p, m, v); }
};

}  // namespace

/* Tile shapes (filters TF x pixel vectors PV): TF*PV accumulators + PV inputs + 1 broadcast
   must fit the 32 zmm registers. 6x4 reuses each loaded input 6 times and each broadcast 4
   times (24 FMAs per 10 loads) over 64 pixels; 8x3 and 12x2 favour big groups on small maps;
   4x6 favours groups of 4 filters on large maps. */

namespace {
void conv_isa(const ConvArgs& a, int32_t variant, int64_t begin, int64_t end) {
  switch (variant) {
    case 1: conv_variant<Avx512, 8, 3>(a, begin, end); break;
    case 2: conv_variant<Avx512, 12, 2>(a, begin, end); break;
    case 3: conv_variant<Avx512, 4, 6>(a, begin, end); break;
    default: conv_variant<Avx512, 6, 4>(a, begin, end); break;
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
void conv_avx512(const ConvArgs& a, int32_t variant, int64_t begin, int64_t end) {
  conv_isa(a, variant, begin, end);
}
}  // namespace sgdet_native

#else   // not x86: ops.cpp never selects this ISA; the symbols keep the link whole
namespace sgdet_native {
void conv_avx512(const ConvArgs&, int32_t, int64_t, int64_t) {}
}  // namespace sgdet_native
#endif

namespace sgdet_native {
void variants_avx512(VariantInfo* out) {
  const VariantInfo v[kVariants] = {{6, 4, 16}, {8, 3, 16}, {12, 2, 16}, {4, 6, 16}};
  for (int i = 0; i < kVariants; ++i) out[i] = v[i];
}
}  // namespace sgdet_native
