/* Native diverse-group convolution, stage 1 of 3 (ops.cpp -> kernel.h -> kernel_<isa>.cpp):
   the torch glue. Checks the packed tensors, picks the ISA (CPU detection, or the one forced),
   splits a stride-2 conv's input into phase planes, splits the work into items and runs them
   with at::parallel_for (so torch.set_num_threads applies), and registers the ops in the
   `sgdet` namespace:

     sgdet::diverse_conv2d, sgdet::diverse_linear   the layers (fake kernels: Python side)
     sgdet::native_info, sgdet::native_set_isa      ISA detection and forcing
     sgdet::native_tune                             tuning knobs by name (tests, A/B)

   Only the few torch headers the glue needs are included (build time on small machines). */
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/core/GradMode.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstdlib>
#include <string>
#include <vector>

#include "kernel.h"

namespace sgdet_native {
namespace {

enum Isa : int64_t { kAvx512 = 0, kAvx2 = 1, kPortable = 2, kIsas = 3 };
using ConvFn = void (*)(const ConvArgs&, int32_t, int64_t, int64_t);
using VariantsFn = void (*)(VariantInfo*);
const ConvFn kConv[kIsas] = {conv_avx512, conv_avx2, conv_portable};
const VariantsFn kVariantsFn[kIsas] = {variants_avx512, variants_avx2, variants_portable};

// SGDET_NATIVE_HIDE="avx512,avx2" makes this process treat those ISAs as absent (tests of the
// refusal path; timing an older CPU's path on a newer one). Read once.
bool hidden(int64_t isa) {
  static const int64_t mask = [] {
    const char* env = std::getenv("SGDET_NATIVE_HIDE");
    const std::string s = env ? env : "";
    return (int64_t)(s.find("avx512") != std::string::npos) |
           (int64_t)(s.find("avx2") != std::string::npos) << 1;
  }();
  return mask >> isa & 1;
}

bool cpu_has(int64_t isa) {
  if (hidden(isa)) return false;
#if defined(__x86_64__) || defined(__i386__)
  if (isa == kAvx512)
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
           __builtin_cpu_supports("avx512vl");
  if (isa == kAvx2) return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
#else
  if (isa != kPortable) return false;
#endif
  return isa == kPortable;
}

int64_t best_isa() {
  for (int64_t i = 0; i < kIsas; ++i)
    if (cpu_has(i)) return i;
  return kPortable;
}

std::atomic<int64_t> g_forced{-1};   // -1: automatic
/* Tuning knobs: tests force every path with them and A/B timing toggles them; no result
   depends on them beyond float rounding order (pass_channels). One table, one op (native_tune). */
struct Knob {
  const char* name;
  std::atomic<int64_t> value;
  int64_t lo, hi;
  const char* meaning;
};
constexpr int64_t kNoLimit = int64_t{1} << 30;
Knob g_knobs[] = {
    {"pass_channels", 0, 0, kNoLimit, "channels per pass (0: automatic)"},
    {"prefetch_next", -1, -1, kNoLimit, "next-block prefetch limit in FMAs (-1: the ISA's default)"},
    {"stride2", -1, -1, 1, "stride-2 layout (-1: automatic, 0: strided rows, 1: phase planes)"},
    {"schedule", -1, -1, 1, "work split (-1: automatic, 0: static ranges, 1: guided runs)"},
    {"store_prefetch", -1, -1, 64, "blocks ahead the store prefetches (-1: the ISA's default, 0: off)"},
};
enum KnobId { kPassChannels, kPrefetchNext, kStride2, kSchedule, kStorePrefetch };
int64_t knob(KnobId id) { return g_knobs[id].value.load(std::memory_order_relaxed); }

int64_t current_isa() {
  const int64_t f = g_forced.load();
  return f >= 0 ? f : best_isa();
}

// [supported bitmask, ISA in use, forced (-1: none), pack tile, variants, then per ISA and
// variant (tf, pv, lanes)].
std::vector<int64_t> native_info() {
  std::vector<int64_t> r;
  int64_t mask = 0;
  for (int64_t i = 0; i < kIsas; ++i) mask |= (int64_t)cpu_has(i) << i;
  r = {mask, current_isa(), g_forced.load(), kPackTile, kVariants};
  for (int64_t i = 0; i < kIsas; ++i) {
    VariantInfo v[kVariants];
    kVariantsFn[i](v);
    for (const auto& e : v) r.insert(r.end(), {e.tf, e.pv, e.lanes});
  }
  return r;
}

// Sets knob `name` (values above its range are clamped to it: "no limit").
void native_tune(c10::string_view name, int64_t value) {
  std::string names;
  for (Knob& k : g_knobs) {
    if (name != k.name) {
      names += std::string(names.empty() ? "" : ", ") + k.name;
      continue;
    }
    TORCH_CHECK_VALUE(value >= k.lo, "sgdet native: ", k.name, " is the ", k.meaning,
                      "; it must be >= ", k.lo, ", got ", value);
    k.value.store(std::min(value, k.hi));
    return;
  }
  TORCH_CHECK_VALUE(false, "sgdet native: unknown knob '", std::string(name), "'; knobs: ", names);
}

/* Stride-2 convs as stride-1 convs over phase planes. Input row r of a plane is row r/2 of
   phase plane r%2 (columns alike), so output pixel (oh, ow)'s tap ky reads row oh + dy of phase
   py with ky*dh - ph = 2*dy + py. With each channel split into the phase planes its taps read
   ((H+1)/2 x (W+1)/2 each, zero-filled past the input's edge), every tap reads a contiguous run
   of a plane and the kernel's flat layout applies: no strided loads and no lane shuffles.
   Copying the planes reads the input once (only channels some group reads). */
struct PhaseSplit {
  int32_t slot_y[2] = {-1, -1}, slot_x[2] = {-1, -1};   // plane slot of each phase (-1: unused)
  int32_t ny = 0, nx = 0;
  int64_t Hp = 0, Wp = 0;
};

int32_t phase_of(int64_t r) { return (int32_t)(r & 1); }          // r may be negative
int32_t half_of(int64_t r) { return (int32_t)((r - (r & 1)) / 2); }  // exact: r - phase is even

PhaseSplit plan_phases(int64_t H, int64_t W, int64_t kh, int64_t kw, c10::IntArrayRef padding,
                       c10::IntArrayRef dilation) {
  PhaseSplit p;
  p.Hp = (H + 1) / 2;
  p.Wp = (W + 1) / 2;
  for (int64_t k = 0; k < kh; ++k) {
    const int32_t py = phase_of(k * dilation[0] - padding[0]);
    if (p.slot_y[py] < 0) p.slot_y[py] = p.ny++;
  }
  for (int64_t k = 0; k < kw; ++k) {
    const int32_t px = phase_of(k * dilation[1] - padding[1]);
    if (p.slot_x[px] < 0) p.slot_x[px] = p.nx++;
  }
  return p;
}

at::Tensor split_phases(const at::Tensor& x, const PhaseSplit& p, const std::vector<uint8_t>& read) {
  const int64_t N = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3);
  const int64_t plane = p.Hp * p.Wp, per_c = p.ny * p.nx * plane;
  at::Tensor out = at::empty({N, C * per_c}, x.options());
  const float* src = x.data_ptr<float>();
  float* dst = out.data_ptr<float>();
  const int64_t sn = x.stride(0), sc = x.stride(1);
  at::parallel_for(0, N * C, 1, [&](int64_t b, int64_t e) {
    for (int64_t nc = b; nc < e; ++nc) {
      const int64_t n = nc / C, c = nc % C;
      if (!read[c]) continue;   // no group reads it: never read from the planes either
      const float* in = src + n * sn + c * sc;
      for (int32_t py = 0; py < 2; ++py)
        for (int32_t px = 0; px < 2; ++px) {
          if (p.slot_y[py] < 0 || p.slot_x[px] < 0) continue;
          float* o = dst + nc * per_c + (p.slot_y[py] * p.nx + p.slot_x[px]) * plane;
          for (int64_t i = 0; i < p.Hp; ++i, o += p.Wp) {
            const int64_t r = 2 * i + py;
            if (r >= H) {
              std::fill(o, o + p.Wp, 0.0f);
              continue;
            }
            const float* row = in + r * W;
            int64_t j = 0;
            for (; 2 * j + px < W; ++j) o[j] = row[2 * j + px];
            for (; j < p.Wp; ++j) o[j] = 0.0f;
          }
        }
    }
  });
  return out;
}

void native_set_isa(int64_t isa) {
  TORCH_CHECK_VALUE(isa >= -1 && isa < kIsas, "sgdet native: unknown ISA index ", isa);
  TORCH_CHECK_VALUE(isa < 0 || cpu_has(isa), "sgdet native: this CPU lacks ISA index ", isa);
  g_forced.store(isa);
}

at::Tensor conv_impl(const at::Tensor& x_in, const at::Tensor& weight, const at::Tensor& bias,
                     const at::Tensor& in_index, const at::Tensor& groups,
                     const at::Tensor& out_channel, c10::IntArrayRef stride,
                     c10::IntArrayRef padding, c10::IntArrayRef dilation, int64_t out_channels,
                     bool relu, const std::optional<at::Tensor>& residual_in, int64_t variant) {
  TORCH_CHECK(!(x_in.requires_grad() && c10::GradMode::is_enabled()),
              "sgdet native kernels are inference-only (no autograd): call them under "
              "torch.no_grad() / torch.inference_mode()");
  TORCH_CHECK(x_in.device().is_cpu() && x_in.scalar_type() == at::kFloat && x_in.dim() == 4,
              "sgdet native conv: x must be a float32 CPU tensor [N, C, H, W]");
  TORCH_CHECK(weight.scalar_type() == at::kFloat && weight.dim() == 3 && weight.is_contiguous(),
              "sgdet native conv: packed weight must be contiguous float32 [kh, kw, cols]");
  TORCH_CHECK(bias.scalar_type() == at::kFloat && bias.is_contiguous() && bias.dim() == 1,
              "sgdet native conv: packed bias must be contiguous float32 [F]");
  TORCH_CHECK(in_index.scalar_type() == at::kInt && in_index.is_contiguous(),
              "sgdet native conv: in_index must be contiguous int32");
  TORCH_CHECK(out_channel.scalar_type() == at::kInt && out_channel.is_contiguous() &&
                  out_channel.numel() == bias.numel(),
              "sgdet native conv: out_channel must be contiguous int32 [F]");
  TORCH_CHECK(groups.scalar_type() == at::kLong && groups.is_contiguous() && groups.dim() == 2 &&
                  groups.size(1) == 5,
              "sgdet native conv: groups must be contiguous int64 [G, 5]");
  TORCH_CHECK(stride.size() == 2 && padding.size() == 2 && dilation.size() == 2,
              "sgdet native conv: stride, padding and dilation take two values");
  TORCH_CHECK(stride[0] >= 1 && stride[1] >= 1 && dilation[0] >= 1 && dilation[1] >= 1 &&
                  padding[0] >= 0 && padding[1] >= 0,
              "sgdet native conv: need stride >= 1, dilation >= 1, padding >= 0");
  const int64_t kh = weight.size(0), kw = weight.size(1);
  TORCH_CHECK(kh >= 1 && kw >= 1 && kh <= kMaxKernel && kw <= kMaxKernel,
              "sgdet native conv: kernel sizes 1..", kMaxKernel, " supported, got ", kh, "x", kw);

  // Planes must be contiguous rows; the image and channel strides are free.
  at::Tensor x = x_in;
  const int64_t N = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3);
  if (x.stride(3) != 1 || (H > 1 && x.stride(2) != W)) x = x.contiguous();
  const int64_t Ho = (H + 2 * padding[0] - dilation[0] * (kh - 1) - 1) / stride[0] + 1;
  const int64_t Wo = (W + 2 * padding[1] - dilation[1] * (kw - 1) - 1) / stride[1] + 1;
  TORCH_CHECK(Ho >= 1 && Wo >= 1, "sgdet native conv: the output would be empty");
  TORCH_CHECK(H * W < (int64_t(1) << 31) && Ho * Wo < (int64_t(1) << 31),
              "sgdet native conv: image planes over 2^31 pixels");

  // The tables: sizes must add up and every index must be in range (cheap, and it makes a
  // damaged or mismatched packed dict an error instead of a wild read).
  const int64_t G = groups.size(0), F = bias.numel();
  const int64_t* gt = groups.data_ptr<int64_t>();
  int64_t fsum = 0, isum = 0, wsum = 0;
  for (int64_t g = 0; g < G; ++g) {
    const int64_t* r = gt + 5 * g;
    TORCH_CHECK(r[0] == fsum && r[2] == isum && r[4] == wsum && r[1] >= 0 && r[3] >= 0,
                "sgdet native conv: inconsistent group table at group ", g);
    fsum += r[1];
    isum += r[3];
    wsum += r[1] * r[3];
  }
  TORCH_CHECK(fsum == F && isum == in_index.numel() && wsum == weight.size(2),
              "sgdet native conv: group table does not match the packed tensors");
  const int32_t* ip = in_index.data_ptr<int32_t>();
  std::vector<uint8_t> read(C, 0);
  for (int64_t i = 0; i < isum; ++i) {
    TORCH_CHECK(ip[i] >= 0 && ip[i] < C, "sgdet native conv: input channel ", ip[i],
                " out of range for ", C, " channels");
    read[ip[i]] = 1;
  }
  const int64_t Cout = out_channels >= 0 ? out_channels : F;
  const int32_t* op = out_channel.data_ptr<int32_t>();
  std::vector<uint8_t> written(Cout, 0);
  for (int64_t f = 0; f < F; ++f) {
    TORCH_CHECK(op[f] >= 0 && op[f] < Cout, "sgdet native conv: output channel ", op[f],
                " out of range for ", Cout, " channels");
    written[op[f]] = 1;
  }

  at::Tensor out = at::empty({N, Cout, Ho, Wo}, x.options());
  at::Tensor residual;
  if (residual_in.has_value()) {
    TORCH_CHECK(residual_in->sizes() == out.sizes() && residual_in->scalar_type() == at::kFloat &&
                    residual_in->device().is_cpu(),
                "sgdet native conv: residual must be float32 shaped like the output ",
                out.sizes());
    residual = residual_in->contiguous();
  }
  if (N == 0) return out;

  const int64_t isa = current_isa();
  TORCH_CHECK_VALUE(variant >= 0 && variant < kVariants, "sgdet native conv: variant must be in 0..",
                    kVariants - 1, ", got ", variant);
  VariantInfo vi[kVariants];
  kVariantsFn[isa](vi);
  const int64_t pv = vi[variant].pv, lanes = vi[variant].lanes, bp = pv * lanes;

  // Stride-2 convs whose output rows are as wide as the phase planes run on phase planes
  // (PhaseSplit; timed against strided rows: see native_speed_notes.md).
  const int64_t s2 = knob(kStride2);
  const bool phases = s2 != 0 && stride[0] == 2 && stride[1] == 2 && Wo == (W + 1) / 2;
  PhaseSplit ps;
  at::Tensor xs;
  if (phases) {
    ps = plan_phases(H, W, kh, kw, padding, dilation);
    xs = split_phases(x, ps, read);
  }
  const int64_t plane = ps.Hp * ps.Wp;

  ConvArgs a{};
  a.x = phases ? xs.data_ptr<float>() : x.data_ptr<float>();
  a.x_sn = phases ? C * ps.ny * ps.nx * plane : x.stride(0);
  a.x_sc = phases ? ps.ny * ps.nx * plane : x.stride(1);
  a.H = (int32_t)(phases ? ps.Hp : H);
  a.W = (int32_t)(phases ? ps.Wp : W);
  a.w = weight.data_ptr<float>();
  a.w_row = weight.size(2);
  a.bias = bias.data_ptr<float>();
  a.in_index = ip;
  a.groups = gt;
  a.G = (int32_t)G;
  a.out_channel = op;
  a.out = out.data_ptr<float>();
  a.o_sn = Cout * Ho * Wo;
  a.o_sc = Ho * Wo;
  a.Ho = (int32_t)Ho;
  a.Wo = (int32_t)Wo;
  a.residual = residual.defined() ? residual.data_ptr<float>() : nullptr;
  a.kh = (int32_t)kh;
  a.kw = (int32_t)kw;
  a.sh = phases ? 1 : (int32_t)stride[0];
  a.sw = phases ? 1 : (int32_t)stride[1];
  a.ph = phases ? 0 : (int32_t)padding[0];
  a.pw = phases ? 0 : (int32_t)padding[1];
  for (int64_t k = 0; k < kh; ++k) {
    const int64_t r = k * dilation[0] - padding[0];
    a.tap_dy[k] = phases ? half_of(r) : (int32_t)(k * dilation[0]);
    a.plane_y[k] = phases ? ps.slot_y[phase_of(r)] * ps.nx * plane : 0;
  }
  for (int64_t k = 0; k < kw; ++k) {
    const int64_t r = k * dilation[1] - padding[1];
    a.tap_dx[k] = phases ? half_of(r) : (int32_t)(k * dilation[1]);
    a.plane_x[k] = phases ? ps.slot_x[phase_of(r)] * plane : 0;
  }
  a.relu = relu;
  a.N = (int32_t)N;
  a.ahead = -1;
  a.next_fmas = (int32_t)knob(kPrefetchNext);
  a.store_ahead = (int32_t)knob(kStorePrefetch);

  /* Vector layout (kernel.h): flat runs when stride 1 keeps the row width; rows for stride
     width 2 unless most lanes of a row's last vector would idle (Wo = 7 on 16 lanes); gathers
     otherwise (other strides; stride 1 with valid padding, rare in CNNs). */
  const int64_t seg = (Wo + lanes - 1) / lanes;
  if (a.sh == 1 && a.sw == 1 && Wo == a.W) a.layout = kLayoutFlat;
  else if (a.sw == 2 && 2 * Wo >= seg * lanes) a.layout = kLayoutRows;
  else a.layout = kLayoutGather;
  a.seg_per_row = (int32_t)seg;
  a.vec_per_image = a.layout == kLayoutRows ? Ho * seg : (Ho * Wo + lanes - 1) / lanes;
  a.nblocks = a.layout == kLayoutGather ? N * ((Ho * Wo + bp - 1) / bp)
                                        : (N * a.vec_per_image + pv - 1) / pv;

  /* Work items: chunks of blocks x slices of groups. A chunk is sized so its input strip (all
     channels, stride rows included) stays near 128 KiB of L2 while every group of a slice reads
     it. Layers whose weights outgrow L2 (small maps, wide layers) run group-major: one group
     per item, items ordered so a thread walks blocks and images with one group's weights hot.
     Otherwise groups are only sliced as finely as needed to give every thread a few items. */
  const int64_t threads = at::get_num_threads();
  const int64_t planes = phases ? ps.ny * ps.nx : 1;   // planes a block reads per channel
  const int64_t strip = std::max<int64_t>(1, C * bp * (phases ? planes : stride[0]) * 4);
  const int64_t chunk = std::max<int64_t>(1, std::min<int64_t>(a.nblocks, (128 << 10) / strip));
  a.chunk_blocks = (int32_t)chunk;
  a.n_chunks = (int32_t)((a.nblocks + chunk - 1) / chunk);
  const bool big_weights = weight.numel() * 4 > (512 << 10);
  a.group_major = big_weights && G > 1;
  int64_t slices = a.group_major ? G : 1;
  while (!a.group_major && slices < G && a.n_chunks * slices < 4 * threads) slices *= 2;
  a.n_slices = (int32_t)std::min<int64_t>(std::max<int64_t>(G, 1), slices);
  const int64_t items = G == 0 ? 0 : (int64_t)a.n_chunks * a.n_slices;

  /* Channels per pass (kernel.h, run_tile): for k x k convs, as many as keep one block's input
     strip near kPassBytes, so the strip stays in L1 (32 KiB or more on every x86 core since
     2006) beside the weights while every tap and filter tile reads it. 1x1 convs read each row
     once per tile and measured no gain from passes (AVX2, Zen 3: -6 % to +8 % per layer, within
     noise), so they run one pass; 3x3 convs on 7-14 px maps gained 5-15 %. */
  constexpr int64_t kPassBytes = 16 << 10;
  const auto extent = [](const int32_t* d, int64_t k) {   // rows (columns) the taps span
    return *std::max_element(d, d + k) - *std::min_element(d, d + k);
  };
  const int64_t ext_y = extent(a.tap_dy, kh), ext_x = extent(a.tap_dx, kw);
  const int64_t span = 4 * planes * (bp * a.sh * a.sw + ext_y * a.W + ext_x) + 64;
  const int64_t forced_kc = knob(kPassChannels);
  a.kc = (int32_t)(forced_kc > 0 ? std::min<int64_t>(forced_kc, 1 << 30)
                   : kh * kw == 1 ? 1 << 30
                                  : std::max<int64_t>(16, kPassBytes / span));

  const ConvFn fn = kConv[isa];
  const int32_t v = (int32_t)variant;
  /* Group-major layers run a guided split: each thread takes the next run of items, a
     2*threads-th of what is left, so runs start long (a thread walks blocks with one group's
     weights hot) and shrink to single items at the end, which evens out the threads. Equal
     static ranges gave one thread the big groups (k-means groups differ up to 100x in size; in
     ResNet50 Conv-60 one thread got 57-85 % of a group-major layer's work). Other layers split
     by pixel chunks, equal work per range, and keep static ranges: guided everywhere cost
     Conv-80 5 % in-network (AVX2, Zen 3). Measured on the deployed Conv-60 layers (real
     inputs, interleaved): group-major 3x3 1.15-1.44x, 1x1 1.02-1.54x; whole network 1.04x.
     Each output value is computed by one item, so the split changes no result. */
  const int64_t schedule = knob(kSchedule);
  if (schedule == 0 || (schedule < 0 && !a.group_major)) {
    at::parallel_for(0, items, 1, [&](int64_t b, int64_t e) { fn(a, v, b, e); });
  } else {
    std::atomic<int64_t> next{0};
    const int64_t workers = std::min<int64_t>(threads, items);
    at::parallel_for(0, workers, 1, [&](int64_t, int64_t) {
      int64_t b = next.load(std::memory_order_relaxed);
      while (b < items) {
        const int64_t take = std::max<int64_t>(1, (items - b) / (2 * workers));
        if (next.compare_exchange_weak(b, b + take, std::memory_order_relaxed)) {
          fn(a, v, b, b + take);
          b = next.load(std::memory_order_relaxed);
        }
      }
    });
  }

  // Channels no filter writes: zero, or the residual (through the relu) when there is one.
  for (int64_t c = 0; c < Cout; ++c) {
    if (written[c]) continue;
    for (int64_t n = 0; n < N; ++n) {
      float* d = a.out + n * a.o_sn + c * a.o_sc;
      const float* r = a.residual ? a.residual + n * a.o_sn + c * a.o_sc : nullptr;
      for (int64_t p = 0; p < Ho * Wo; ++p) {
        const float v2 = r ? r[p] : 0.0f;
        d[p] = relu && v2 < 0.0f ? 0.0f : v2;
      }
    }
  }
  return out;
}

at::Tensor diverse_conv2d(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias,
                          const at::Tensor& in_index, const at::Tensor& groups,
                          const at::Tensor& out_channel, c10::IntArrayRef stride,
                          c10::IntArrayRef padding, c10::IntArrayRef dilation,
                          int64_t out_channels, bool relu,
                          const std::optional<at::Tensor>& residual, int64_t variant) {
  return conv_impl(x, weight, bias, in_index, groups, out_channel, stride, padding, dilation,
                   out_channels, relu, residual, variant);
}

// A linear layer is a 1x1 conv over one image whose pixels are the batch: x.t() is [in][N].
at::Tensor diverse_linear(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias,
                          const at::Tensor& in_index, const at::Tensor& groups,
                          const at::Tensor& out_channel, int64_t out_features, bool relu,
                          int64_t variant) {
  TORCH_CHECK(x.dim() == 2, "sgdet native linear: x must be [N, in_features]");
  TORCH_CHECK(weight.dim() == 3 && weight.size(0) == 1 && weight.size(1) == 1,
              "sgdet native linear: the packed weights are not 1x1");
  const int64_t N = x.size(0), C = x.size(1);
  const at::Tensor xt = x.t().contiguous().view({1, C, 1, N});
  const int64_t one[2] = {1, 1}, zero[2] = {0, 0};
  at::Tensor y = conv_impl(xt, weight, bias, in_index, groups, out_channel, one, zero, one,
                           out_features, relu, std::nullopt, variant);
  return y.view({y.size(1), N}).t().contiguous();
}

}  // namespace
}  // namespace sgdet_native

using sgdet_native::diverse_conv2d;
using sgdet_native::diverse_linear;
using sgdet_native::native_info;
using sgdet_native::native_set_isa;
using sgdet_native::native_tune;

TORCH_LIBRARY(sgdet, m) {
  m.set_python_module("sgdet.deploy.native");
  m.def("diverse_conv2d(Tensor x, Tensor weight, Tensor bias, Tensor in_index, Tensor groups, "
        "Tensor out_channel, int[2] stride, int[2] padding, int[2] dilation, int out_channels, "
        "bool relu, Tensor? residual, int variant) -> Tensor");
  m.def("diverse_linear(Tensor x, Tensor weight, Tensor bias, Tensor in_index, Tensor groups, "
        "Tensor out_channel, int out_features, bool relu, int variant) -> Tensor");
  m.def("native_info() -> int[]", &native_info);
  m.def("native_set_isa(int isa) -> ()", &native_set_isa);
  m.def("native_tune(str name, int value) -> ()", &native_tune);
}

TORCH_LIBRARY_IMPL(sgdet, CPU, m) {
  m.impl("diverse_conv2d", &diverse_conv2d);
  m.impl("diverse_linear", &diverse_linear);
}
