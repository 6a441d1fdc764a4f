/* Native diverse-group convolution, stage 2 of 3 (ops.cpp -> kernel.h -> kernel_<isa>.cpp):
   the plain-data interface every ISA file exports and the templated micro-kernel they
   instantiate.

   No torch or std-library header is included here, on purpose: each ISA file compiles this
   template under its own `#pragma GCC target`, and any inline library function compiled that
   way could be the copy the linker keeps for the whole module (an AVX-512 body run on a CPU
   without it). The includer provides <cstdint> (and the ISA's intrinsics). Everything below the
   interface lives in an anonymous namespace, so each ISA file gets private copies. An ISA file
   includes this twice: the interface before its target pragma (so the exported declarations
   carry no target), the templates after it, with SGDET_NATIVE_ISA_FILE defined. */
#ifndef SGDET_NATIVE_KERNEL_H
#define SGDET_NATIVE_KERNEL_H

namespace sgdet_native {

// Filters per packed weight tile. Every variant's filter tile (TF) divides it, so one packing
// serves every ISA and variant: 3, 4, 6, 8, 12 and 24 filters all fit.
constexpr int32_t kPackTile = 24;
constexpr int32_t kMaxKernel = 16;   // kh, kw <= 16
constexpr int32_t kVariants = 4;     // variants per ISA (same count on every ISA)

// Everything the kernel reads, as plain pointers and sizes (built and checked by ops.cpp).
struct ConvArgs {
  const float* x;              // plane (n, c) at x + n*x_sn + c*x_sc, rows W floats apart
  int64_t x_sn, x_sc;
  int32_t H, W;
  const float* w;              // packed weights [kh*kw][w_row] (layout: see group tables)
  int64_t w_row;
  const float* bias;           // [F], BN already folded in
  const int32_t* in_index;     // per-group input channel lists, concatenated
  const int64_t* groups;       // [G][5]: filter start, filters, index start, inputs, weight column
  int32_t G;
  const int32_t* out_channel;  // [F]: output channel of each filter
  float* out;                  // NCHW-contiguous output
  int64_t o_sn, o_sc;
  int32_t Ho, Wo;
  const float* residual;       // null, or laid out like out
  int32_t kh, kw, sh, sw, ph, pw;  // dilation lives in the tap offsets below
  int32_t relu;
  int32_t N;
  int32_t ahead;                 // prefetch distance in channels (-1: the kernel's default)
  int32_t next_fmas;             // short lists prefetch the next block instead (-1: ISA default)
  int32_t store_ahead;           // blocks ahead the store prefetches (-1: the ISA's default)
  int32_t layout, seg_per_row;   // how vectors map to output pixels (kLayout*, chosen by ops.cpp)
  int64_t vec_per_image;         // flat / rows: vectors per image (blocks run across images)
  int64_t nblocks;               // blocks of PV vectors, all images
  // work items: (chunk of blocks, slice of groups); see ops.cpp
  int32_t chunk_blocks, n_chunks, n_slices, group_major;
  int32_t kc;                    // channels per pass (kc >= a group's count: one pass); >= 1
  // Per kernel row (column): the input row (column) it reads, from the lane's origin, and the
  // offset of the plane it reads in a channel (0; or a stride-2 conv's phase plane, ops.cpp).
  int32_t tap_dy[kMaxKernel], tap_dx[kMaxKernel];
  int64_t plane_y[kMaxKernel], plane_x[kMaxKernel];
};

/* Vector layouts. Flat: an image's vector v holds output pixels v*lanes ... in flat oh*Wo + ow
   order (rows wrap inside a vector); with stride 1 and Wo == W each vector reads one contiguous
   input run per tap (a masked load). Rows (stride width 2): vector v holds up to `lanes` pixels
   of one output row (seg_per_row vectors per row) and reads two vectors, keeping the even lanes.
   In both, blocks of PV vectors run on across images (no idle block at each image's end: 7x7
   maps are 7 vectors of 8 lanes, 3 blocks of 3 per image, but 19 per 8 images). Gather: flat
   lanes, each gathered (any other geometry); its blocks stay inside one image. Stride-2 convs
   whose output rows are half the input's width run flat on phase planes (ops.cpp, PhaseSplit):
   ConvArgs' per-row and per-column tap offsets then point into the plane each tap reads. */
constexpr int32_t kLayoutFlat = 0;
constexpr int32_t kLayoutRows = 1;
constexpr int32_t kLayoutGather = 2;

struct VariantInfo { int32_t tf, pv, lanes; };

// One pair per ISA file: the variant table, and the work items [begin, end) of one call.
void variants_avx512(VariantInfo* out);
void conv_avx512(const ConvArgs& a, int32_t variant, int64_t begin, int64_t end);
void variants_avx2(VariantInfo* out);
void conv_avx2(const ConvArgs& a, int32_t variant, int64_t begin, int64_t end);
void variants_portable(VariantInfo* out);
void conv_portable(const ConvArgs& a, int32_t variant, int64_t begin, int64_t end);

}  // namespace sgdet_native
#endif  // SGDET_NATIVE_KERNEL_H

#if defined(SGDET_NATIVE_ISA_FILE) && !defined(SGDET_NATIVE_KERNEL_TEMPLATES)
#define SGDET_NATIVE_KERNEL_TEMPLATES
namespace sgdet_native {
namespace {

/* An ISA is a traits struct A: A::N lanes of type A::V, lane masks A::M built from bit masks,
   A::I int32 offset vectors, and static load / gather / deinterleave / fma / store functions. */

constexpr int kMaxTaps = kMaxKernel * kMaxKernel;

// How a block's lanes are read per tap: one run (vector j at a constant j*lanes, so the loads
// use address displacements), per vector two runs keeping even lanes, or gathered.
enum Load { kFlat = 0, kDeint = 1, kGather = 2, kVec = 3 };   // kVec: flat, spanning images

/* Per pixel block (PV vectors): which lanes each kernel tap may read and where, computed once
   per block and shared by every group and filter tile (masks are per tap, not per channel).
   Taps reading no valid lane (borders of small maps) are dropped, so no channel loop sees them. */
template <class A, int PV>
struct Block {
  int64_t n;                        // image of the first vector; offsets below are from it
  bool uniform;                     // flat: all vectors in image n, one run (vector j at j*lanes)
  int64_t pout[PV];                 // output offset of each vector's lane 0
  int32_t cnt[PV];                  // output pixels in each vector (lanes 0..cnt-1)
  int64_t org[PV];                  // flat / deinterleaved: input offset of lane 0 at tap 0
  int32_t live;                     // taps with any valid lane
  int32_t tap[kMaxTaps];            // their index ky*kw + kx
  int64_t toff[kMaxTaps];           // their input offset dy*W + dx
  uint32_t bits[kMaxTaps][PV];      // lanes each live tap may read
  uint32_t bits2[kMaxTaps][PV][2];  // deinterleaved: the even lanes of the two loaded vectors
  uint32_t full[kMaxTaps];          // every lane of every vector valid (unmasked loads)
  alignas(64) int32_t base[PV][A::N];   // gathered: input offset of each lane at tap 0
};

template <class A, int PV, int LOAD>
void setup_block(const ConvArgs& a, int64_t blk, Block<A, PV>& b) {
  constexpr int N = A::N, L = PV * N;
  constexpr uint32_t all = N == 32 ? 0xffffffffu : (1u << N) - 1u;
  const int64_t hwo = (int64_t)a.Ho * a.Wo;
  const bool rows = a.layout == kLayoutRows;
  // the block's first vector: image n, vector v0 of it (gather blocks stay in one image)
  const int64_t per = LOAD == kGather ? a.nblocks / a.N * PV : a.vec_per_image;
  b.n = blk * PV / per;
  b.uniform = true;
  int32_t iy[L], ix[L];   // input row / column of each lane at tap (0, 0)
  for (int j = 0; j < PV; ++j) {
    const int64_t gv = blk * PV + j, n = gv / per, v = gv - n * per;
    int64_t p;
    int32_t oh, ow, cnt;
    if (rows) {
      oh = (int32_t)(v / a.seg_per_row);
      ow = (int32_t)(v % a.seg_per_row) * N;
      p = (int64_t)oh * a.Wo + ow;
      cnt = oh < a.Ho ? (a.Wo - ow < N ? a.Wo - ow : N) : 0;
    } else {
      p = v * N;
      oh = (int32_t)(p / a.Wo);
      ow = (int32_t)(p - (int64_t)oh * a.Wo);
      cnt = hwo - p <= 0 ? 0 : (hwo - p < N ? (int32_t)(hwo - p) : N);
    }
    if (n >= a.N) cnt = 0;
    if (n != b.n && cnt > 0) b.uniform = false;
    b.pout[j] = (n - b.n) * a.o_sn + p;
    b.cnt[j] = cnt;
    b.org[j] = (n - b.n) * a.x_sn + (int64_t)(oh * a.sh - a.ph) * a.W + (int64_t)ow * a.sw - a.pw;
    for (int i = 0; i < N; ++i) {
      const int l = j * N + i;
      iy[l] = i < cnt ? oh * a.sh - a.ph : -0x40000000;   // empty lanes fail every row test
      ix[l] = ow * a.sw - a.pw;
      if (LOAD == kGather) b.base[j][i] = i < cnt ? iy[l] * a.W + ix[l] : 0;
      if (++ow == a.Wo && !rows) { ow = 0; ++oh; }       // flat vectors wrap rows
    }
  }
  // Row and column validity separately (kh + kw passes), combined per tap.
  uint32_t rowm[kMaxKernel][PV], colm[kMaxKernel][PV];
  for (int k = 0; k < a.kh; ++k)
    for (int j = 0; j < PV; ++j) {
      uint32_t m = 0;
      for (int i = 0; i < N; ++i)
        m |= (uint32_t)((uint32_t)(iy[j * N + i] + a.tap_dy[k]) < (uint32_t)a.H) << i;
      rowm[k][j] = m;
    }
  for (int k = 0; k < a.kw; ++k)
    for (int j = 0; j < PV; ++j) {
      uint32_t m = 0;
      for (int i = 0; i < N; ++i)
        m |= (uint32_t)((uint32_t)(ix[j * N + i] + a.tap_dx[k]) < (uint32_t)a.W) << i;
      colm[k][j] = m;
    }
  b.live = 0;
  for (int ky = 0; ky < a.kh; ++ky)
    for (int kx = 0; kx < a.kw; ++kx) {
      uint32_t any = 0, every = all;
      for (int j = 0; j < PV; ++j) {
        const uint32_t m = rowm[ky][j] & colm[kx][j];
        b.bits[b.live][j] = m;
        any |= m;
        every &= m;
        if (LOAD == kDeint) {
          uint32_t spread = 0;   // lane i is element 2i of the two loaded vectors
          for (int i = 0; i < N; ++i) spread |= (m >> i & 1u) << (2 * i);
          b.bits2[b.live][j][0] = spread & all;
          b.bits2[b.live][j][1] = (uint32_t)((uint64_t)spread >> N);
        }
      }
      if (!any) continue;
      b.tap[b.live] = ky * a.kw + kx;
      b.toff[b.live] = a.plane_y[ky] + a.plane_x[kx] + (int64_t)a.tap_dy[ky] * a.W + a.tap_dx[kx];
      b.full[b.live] = every == all;
      ++b.live;
    }
}

// One filter tile's work: TF filters of one group over a block. The group's weights are
// [tap][channel][tw] (tw = the packed tile's width; TF of them read per channel).
struct Job {
  const float* xn;        // image n's input
  const int32_t* idx;     // the group's input channels
  int32_t kg;             // how many
  const float* w;         // tap 0, channel 0, first filter of this tile
  int32_t tw;             // packed tile width (weight stride per channel)
  const float* bias;      // this tile's biases
  const int32_t* oc;      // this tile's output channels
  float* out_n;           // image n's output
  const float* res_n;     // image n's residual (or null)
  bool cold;              // the group's first filter tile on this block: its rows may be uncached
};

// One input channel (element offset `chan` of its plane from each vector's base): load its PV
// vectors for this tap and FMA them with TF broadcast weights from wc. always_inline: if GCC
// leaves this (or the channel loop) out of line, the accumulators go to the stack and the kernel
// runs at a third of its speed.
template <class A, int TF, int PV, int LOAD, bool FULL>
__attribute__((always_inline)) inline void step(
    int64_t chan, const float* const (&base)[PV], const float* wc, const typename A::M (&m)[PV],
    const typename A::M (&m2)[PV], const typename A::I (&off)[PV], typename A::V (&r)[TF][PV]) {
  using V = typename A::V;
  V in[PV];
  for (int j = 0; j < PV; ++j) {
    if (LOAD == kGather) in[j] = A::gather(base[0] + chan, off[j], m[j]);
    else if (LOAD == kDeint) in[j] = A::deint(A::load(base[j] + chan, m[j]), A::load(base[j] + chan + A::N, m2[j]));
    else if (LOAD == kVec) in[j] = A::load(base[j] + chan, m[j]);
    else if (FULL) in[j] = A::loadu(base[0] + chan + j * A::N);   // flat: displacements
    else in[j] = A::load(base[0] + chan + j * A::N, m[j]);
  }
  for (int f = 0; f < TF; ++f) {
    const V wf = A::bcast(wc + f);
    for (int j = 0; j < PV; ++j) r[f][j] = A::fma(wf, in[j], r[f][j]);
  }
}

// Channel loop for one tap, through the group's index list. FULL drops the masks (interior
// blocks; matters for AVX2). The loop walks the index list and the weights with pointers, and
// each vector's base address is fixed before it, so a step is one index load, one multiply and
// the loads with constant displacements (GCC otherwise kept per-filter weight offsets on the
// stack and recomputed every address: ~45 instructions per 12 FMAs on AVX2).
template <class A, int TF, int PV, int LOAD, bool FULL>
__attribute__((always_inline)) inline void channels(const ConvArgs& a, const Block<A, PV>& b,
                                                    const Job& t, int s,
                                                    typename A::V (&acc)[TF][PV]) {
  typename A::M m[PV], m2[PV];
  typename A::I off[PV];
  const float* base[PV];
  for (int j = 0; j < PV; ++j) {
    // A fully masked vector still reads from its address: point it into the plane (a masked
    // load from an unmapped page costs a microcode assist on every channel).
    base[j] = t.xn + (LOAD == kFlat ? b.org[0] + b.toff[s] + j * A::N
                      : LOAD == kGather ? 0 : (b.bits[s][j] ? b.org[j] + b.toff[s] : 0));
    if (LOAD == kDeint) {
      m[j] = A::mask(b.bits2[s][j][0]);
      m2[j] = A::mask(b.bits2[s][j][1]);
    } else {
      m[j] = A::mask(b.bits[s][j]);
      m2[j] = m[j];
    }
    if (LOAD == kGather) off[j] = A::offsets(b.base[j], (int32_t)b.toff[s]);
  }
  const float* wc = t.w + (int64_t)b.tap[s] * a.w_row;
  const int64_t sc = a.x_sc, tw = t.tw;
  const int32_t* ip = t.idx;
  const int32_t* const end = ip + t.kg;
  // a local copy: updated through the caller's array, GCC stores every accumulator each channel
  typename A::V r[TF][PV];
  for (int f = 0; f < TF; ++f)
    for (int j = 0; j < PV; ++j) r[f][j] = acc[f][j];
  // The index list defeats the hardware prefetcher: prefetch the vectors of the channel read
  // ~A::kPrefetchFmas FMA instructions later (gathers skip it). Two loops keep the test out.
  // A::kPrefetchColdOnly: only the group's first filter tile prefetches; the later tiles re-read
  // rows it brought in, and the prefetch's index load and address math cost issue slots.
  const int ahead = a.ahead >= 0 ? a.ahead : A::kPrefetchFmas / (TF * PV);
  // A list no longer than the distance prefetches nothing above, and its rows are first read
  // cold. So in 1x1 convs a short list (at most next_fmas FMAs) has its first tile prefetch the
  // same rows for the NEXT block into L2 instead, a block of work ahead (AVX2, Zen 3: 1x1 convs
  // at 28-56 px +6 to +30 %; 3x3 convs lost 3-7 %, so they keep the near prefetch only).
  const int64_t next_fmas = a.next_fmas >= 0 ? a.next_fmas : A::kPrefetchNextFmas;
  if ((LOAD == kFlat || LOAD == kVec) && t.cold && a.kh * a.kw == 1 &&
      (int64_t)t.kg * TF * PV <= next_fmas) {
    for (; ip < end; ++ip, wc += tw) {
      const int64_t chan = (int64_t)*ip * sc;
      for (int j = 0; j < PV; ++j) __builtin_prefetch(base[j] + chan + PV * A::N, 0, 1);
      step<A, TF, PV, LOAD, FULL>(chan, base, wc, m, m2, off, r);
    }
  }
  if (LOAD != kGather && ahead > 0 && (t.cold || !A::kPrefetchColdOnly))
    for (; end - ip > ahead; ++ip, wc += tw) {
      const int64_t pre = (int64_t)ip[ahead] * sc;
      for (int j = 0; j < PV; ++j) {
        __builtin_prefetch(base[j] + pre);
        if (LOAD == kDeint) __builtin_prefetch(base[j] + pre + A::N);
      }
      step<A, TF, PV, LOAD, FULL>((int64_t)*ip * sc, base, wc, m, m2, off, r);
    }
  for (; ip < end; ++ip, wc += tw)
    step<A, TF, PV, LOAD, FULL>((int64_t)*ip * sc, base, wc, m, m2, off, r);
  for (int f = 0; f < TF; ++f)
    for (int j = 0; j < PV; ++j) acc[f][j] = r[f][j];
}

// Store: (acc = conv + folded bias) + residual -> relu -> output channel oc[f], short vectors
// masked. Each filter's output (and residual) pixels of the block `ahead` blocks on are
// prefetched here: a block writes every output channel, one plane per channel, far more streams
// than the hardware prefetcher follows, so without it each store and residual load of a large
// map waits on memory (AVX2, Zen 3, ResNet50 Conv-60 batch 8: 1x1 expansion convs 1.06-2.0x,
// the whole network 1.10-1.15x; see native_speed_notes.md).
template <class A, int TF, int PV>
inline void store(const ConvArgs& a, const Block<A, PV>& b, const Job& t,
                  typename A::V (&acc)[TF][PV]) {
  using V = typename A::V;
  constexpr int L = PV * A::N;   // pixels per block; the next block's start L further on
  const int64_t ahead = (int64_t)(a.store_ahead >= 0 ? a.store_ahead : A::kStorePrefetchBlocks) * L;
  for (int f = 0; f < TF; ++f) {
    const int64_t o = (int64_t)t.oc[f] * a.o_sc;
    if (ahead > 0) {   // one prefetch per cache line of the block's L pixels, and its last
      const float* nd = t.out_n + o + b.pout[0] + ahead;
      const float* nr = t.res_n ? t.res_n + o + b.pout[0] + ahead : nullptr;
      for (int k = 0; k < L; k += 16) {
        __builtin_prefetch(nd + k, 1);
        if (nr) __builtin_prefetch(nr + k);
      }
      __builtin_prefetch(nd + L - 1, 1);
      if (nr) __builtin_prefetch(nr + L - 1);
    }
    for (int j = 0; j < PV; ++j) {
      const int32_t cnt = b.cnt[j];
      if (cnt <= 0) continue;
      float* dst = t.out_n + o + b.pout[j];
      const float* res = t.res_n ? t.res_n + o + b.pout[j] : nullptr;
      V v = acc[f][j];
      if (cnt == A::N) {
        if (res) v = A::add(v, A::loadu(res));
        if (a.relu) v = A::relu(v);
        A::storeu(dst, v);
      } else {
        const typename A::M m = A::mask((1u << cnt) - 1u);
        if (res) v = A::add(v, A::load(res, m));
        if (a.relu) v = A::relu(v);
        A::store(dst, v, m);
      }
    }
  }
}

/* One filter tile over one pass of the group's channels. Passes (ConvArgs::kc channels each)
   keep the block's input strip for those channels in L1 while every filter tile of the packed
   tile reads it, instead of each tile streaming the group's whole strip from L2. Between passes
   a tile's sums wait in `part` (TF x PV vectors); the first pass starts from the bias, the last
   stores. */
template <class A, int TF, int PV, int LOAD>
void run_tile(const ConvArgs& a, const Block<A, PV>& b, const Job& t, float* part, bool first,
              bool last) {
  typename A::V acc[TF][PV];
  for (int f = 0; f < TF; ++f) {
    const typename A::V bv = A::set1(t.bias[f]);
    for (int j = 0; j < PV; ++j) acc[f][j] = first ? bv : A::loadu(part + (f * PV + j) * A::N);
  }
  for (int s = 0; s < b.live; ++s) {
    if (LOAD == kFlat && !b.uniform)
      channels<A, TF, PV, kVec, false>(a, b, t, s, acc);
    else if (LOAD == kFlat && A::kFullLoads && b.full[s])
      channels<A, TF, PV, LOAD, true>(a, b, t, s, acc);
    else
      channels<A, TF, PV, LOAD, false>(a, b, t, s, acc);
  }
  if (last) {
    store<A, TF, PV>(a, b, t, acc);
  } else {
    for (int f = 0; f < TF; ++f)
      for (int j = 0; j < PV; ++j) A::storeu(part + (f * PV + j) * A::N, acc[f][j]);
  }
}

// Tiles of R < TF filters (a group's or packed tile's rest) run an exact R-filter kernel.
template <class A, int R, int PV, int LOAD>
struct Rest {
  static void run(int r, const ConvArgs& a, const Block<A, PV>& b, const Job& t, float* part,
                  bool first, bool last) {
    if (r == R) run_tile<A, R, PV, LOAD>(a, b, t, part, first, last);
    else Rest<A, R - 1, PV, LOAD>::run(r, a, b, t, part, first, last);
  }
};
template <class A, int PV, int LOAD>
struct Rest<A, 0, PV, LOAD> {
  static void run(int, const ConvArgs&, const Block<A, PV>&, const Job&, float*, bool, bool) {}
};

/* Work items [begin, end). An item is (chunk of pixel blocks, slice of groups); inside, each
   block is set up once, then every group of the slice and every filter tile of the group runs
   over it, so the block's input strip is reused from L1/L2 across tiles and groups (overlapping
   channel lists make groups share input). group_major orders items slice-first so a thread
   keeps one slice's weights cached across blocks and images (layers with large weights). */
template <class A, int TF, int PV, int LOAD>
void conv_items(const ConvArgs& a, int64_t begin, int64_t end) {
  Block<A, PV> b;
  alignas(64) float part[kPackTile * PV * A::N];   // a packed tile's sums between passes
  for (int64_t item = begin; item < end; ++item) {
    const int64_t chunk = a.group_major ? item % a.n_chunks : item / a.n_slices;
    const int64_t slice = a.group_major ? item / a.n_chunks : item % a.n_slices;
    const int64_t g0 = slice * a.G / a.n_slices, g1 = (slice + 1) * a.G / a.n_slices;
    const int64_t blk0 = chunk * a.chunk_blocks;
    const int64_t blk1 = blk0 + a.chunk_blocks < a.nblocks ? blk0 + a.chunk_blocks : a.nblocks;
    Job t;
    for (int64_t blk = blk0; blk < blk1; ++blk) {
      setup_block<A, PV, LOAD>(a, blk, b);
      t.xn = a.x + b.n * a.x_sn;
      t.out_n = a.out + b.n * a.o_sn;
      t.res_n = a.residual ? a.residual + b.n * a.o_sn : nullptr;
      for (int64_t g = g0; g < g1; ++g) {
        const int64_t* gs = a.groups + 5 * g;
        const int64_t fs = gs[0], nf = gs[1], is = gs[2], kg = gs[3], wc = gs[4];
        const int32_t passes = kg <= a.kc ? 1 : (int32_t)((kg + a.kc - 1) / a.kc);
        for (int64_t p = 0; p < nf; p += kPackTile) {
          t.tw = (int32_t)(nf - p < kPackTile ? nf - p : kPackTile);
          const float* wp = a.w + wc + p * kg;   // earlier tiles are full width
          // balanced filter tiles: 8 filters run as 4 + 4, not 6 + 2
          const int32_t tiles = (t.tw + TF - 1) / TF;
          for (int32_t pass = 0; pass < passes; ++pass) {
            const int64_t c0 = kg * pass / passes, c1 = kg * (pass + 1) / passes;
            t.idx = a.in_index + is + c0;
            t.kg = (int32_t)(c1 - c0);
            for (int32_t q = 0, f0 = 0; q < tiles; ++q) {
              const int32_t r = t.tw / tiles + (q < t.tw % tiles);
              t.w = wp + f0 + c0 * t.tw;
              // a pass's first tile reads rows no tile has touched yet; with one pass, packed
              // tiles after the first re-read rows the first brought in
              t.cold = q == 0 && (p == 0 || passes > 1);
              t.bias = a.bias + fs + p + f0;
              t.oc = a.out_channel + fs + p + f0;
              float* pt = part + (int64_t)f0 * PV * A::N;
              if (r == TF) run_tile<A, TF, PV, LOAD>(a, b, t, pt, pass == 0, pass == passes - 1);
              else Rest<A, TF - 1, PV, LOAD>::run(r, a, b, t, pt, pass == 0, pass == passes - 1);
              f0 += r;
            }
          }
        }
      }
    }
  }
}

template <class A, int TF, int PV>
void conv_variant(const ConvArgs& a, int64_t begin, int64_t end) {
  if (a.layout == kLayoutGather) conv_items<A, TF, PV, kGather>(a, begin, end);
  else if (a.layout == kLayoutRows) conv_items<A, TF, PV, kDeint>(a, begin, end);
  else conv_items<A, TF, PV, kFlat>(a, begin, end);
}

}  // namespace
}  // namespace sgdet_native
#endif  // SGDET_NATIVE_ISA_FILE
