/* Native diverse-group convolution, stage 3 (portable): the micro-kernel of kernel.h over an
   8-float GCC/Clang vector-extension type the compiler lowers to the baseline ISA (two SSE
   registers on x86-64, two NEON registers on arm64). Correct everywhere; the fallback when no
   AVX2 is present. No target pragma: this file must run on any CPU the module is loaded on. */
#include <cstdint>

// 32-byte vector types without AVX: GCC notes the (unused: all inline) ABI difference
#pragma GCC diagnostic ignored "-Wpsabi"
#define SGDET_NATIVE_ISA_FILE 1
#include "kernel.h"

namespace sgdet_native {
namespace {

struct Portable {
  static constexpr int N = 8;
  static constexpr bool kFullLoads = true;    // skip the per-lane mask test on interior blocks
  static constexpr int kPrefetchFmas = 256;   // FMAs between a prefetch and its use
  static constexpr bool kPrefetchColdOnly = false;  // unmeasured: unchanged
  static constexpr int kPrefetchNextFmas = 0;   // unmeasured: off
  static constexpr int kStorePrefetchBlocks = 0;   // unmeasured: off
  // GCC / Clang vector extensions: lowered to SSE pairs on x86-64, NEON on arm64
  typedef float V __attribute__((vector_size(32)));
  typedef int32_t I __attribute__((vector_size(32)));
  using M = uint32_t;
  static inline V set1(float x) { return V{x, x, x, x, x, x, x, x}; }
  static inline V bcast(const float* p) { return set1(*p); }
  static inline M mask(uint32_t bits) { return bits; }
  static inline V loadu(const float* p) {
    V r;
    __builtin_memcpy(&r, p, sizeof r);
    return r;
  }
  static inline V load(const float* p, M m) {   // only masked-in lanes are read
    V r = set1(0.0f);
    for (int i = 0; i < N; ++i)
      if (m >> i & 1u) r[i] = p[i];
    return r;
  }
  static inline I offsets(const int32_t* base, int32_t add) {
    I r;
    __builtin_memcpy(&r, base, sizeof r);
    return r + add;
  }
  static inline V gather(const float* src, I off, M m) {
    V r = set1(0.0f);
    for (int i = 0; i < N; ++i)
      if (m >> i & 1u) r[i] = src[off[i]];
    return r;
  }
  static inline V deint(V lo, V hi) {   // even lanes of lo:hi
    return V{lo[0], lo[2], lo[4], lo[6], hi[0], hi[2], hi[4], hi[6]};
  }
  static inline V fma(V a, V b, V c) { return a * b + c; }
  static inline V add(V a, V b) { return a + b; }
  static inline V relu(V a) {
    const V zero = set1(0.0f);
    return a > zero ? a : zero;
  }
  static inline void storeu(float* p, V v) { __builtin_memcpy(p, &v, sizeof v); }
  static inline void store(float* p, V v, M m) {
    for (int i = 0; i < N; ++i)
      if (m >> i & 1u) p[i] = v[i];
  }
};

}  // namespace

// Tile shapes (filters TF x 8-float vectors PV). Sized for arm64's 32 NEON registers (a vector
// is two); x86-64 without AVX2 (16 SSE registers) prefers the smaller 3x1 and 2x2.
void variants_portable(VariantInfo* out) {
  const VariantInfo v[kVariants] = {{4, 2, 8}, {8, 1, 8}, {3, 1, 8}, {2, 2, 8}};
  for (int i = 0; i < kVariants; ++i) out[i] = v[i];
}

void conv_portable(const ConvArgs& a, int32_t variant, int64_t begin, int64_t end) {
  switch (variant) {
    case 1: conv_variant<Portable, 8, 1>(a, begin, end); break;
    case 2: conv_variant<Portable, 3, 1>(a, begin, end); break;
    case 3: conv_variant<Portable, 2, 2>(a, begin, end); break;
    default: conv_variant<Portable, 4, 2>(a, begin, end); break;
  }
}

}  // namespace sgdet_native
