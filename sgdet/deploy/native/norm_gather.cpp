/* Native deployment kernel, a DenseNet layer's prologue: sgdet::norm_relu_gather.

   A torchvision DenseNet layer concatenates every earlier feature map, normalises the result
   (norm1, eval mode) and applies a ReLU before its first conv reads it: three passes over a
   feature map that grows with every layer (cat, batch_norm, relu_; 26 % of a deployed
   DenseNet201 Conv-70 forward on the CPU, profiled). This op does them in one pass, reading only
   the channels the conv needs straight from the list of feature maps:

     out[n, k] = relu(features_cat[n, index[k]] * scale[k] + shift[k])

   with scale = weight / sqrt(running_var + eps) and shift = bias - running_mean * scale, the
   constants torch's own eval-mode batch norm applies. Memory-bound, so plain C++ the compiler
   vectorises for the baseline ISA; no ISA paths. */
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/core/GradMode.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <vector>

namespace sgdet_native {
namespace {

at::Tensor norm_relu_gather(at::TensorList features, const at::Tensor& index,
                            const at::Tensor& scale, const at::Tensor& shift, bool relu) {
  TORCH_CHECK(!features.empty(), "sgdet norm_relu_gather: no feature maps");
  const at::Tensor& first = features[0];
  TORCH_CHECK(first.dim() == 4, "sgdet norm_relu_gather: feature maps must be [N, C, H, W]");
  const int64_t N = first.size(0), H = first.size(2), W = first.size(3), HW = H * W;
  // Planes must be contiguous rows (the image and channel strides are free, as in a slice).
  std::vector<at::Tensor> maps;
  std::vector<int64_t> first_channel;   // global channel number of each map's channel 0
  int64_t C = 0;
  for (const at::Tensor& f : features) {
    TORCH_CHECK(f.device().is_cpu() && f.scalar_type() == at::kFloat && f.dim() == 4 &&
                    f.size(0) == N && f.size(2) == H && f.size(3) == W,
                "sgdet norm_relu_gather: feature maps must be float32 CPU tensors of one batch "
                "and size; got ", f.sizes(), " after ", first.sizes());
    TORCH_CHECK(!(f.requires_grad() && c10::GradMode::is_enabled()),
                "sgdet norm_relu_gather is inference-only: call it under torch.no_grad()");
    maps.push_back(f.stride(3) == 1 && (H == 1 || f.stride(2) == W) ? f : f.contiguous());
    first_channel.push_back(C);
    C += f.size(1);
  }
  const int64_t K = index.numel();
  TORCH_CHECK(index.scalar_type() == at::kLong && index.dim() == 1 && index.is_contiguous(),
              "sgdet norm_relu_gather: index must be a contiguous int64 vector");
  TORCH_CHECK(scale.scalar_type() == at::kFloat && shift.scalar_type() == at::kFloat &&
                  scale.is_contiguous() && shift.is_contiguous() && scale.numel() == K &&
                  shift.numel() == K,
              "sgdet norm_relu_gather: scale and shift must be contiguous float32 of the "
              "index's length ", K);
  // Resolve every output channel to (source plane base, image stride) once.
  const int64_t* idx = index.data_ptr<int64_t>();
  std::vector<const float*> src(K);
  std::vector<int64_t> src_sn(K);
  for (int64_t k = 0; k < K; ++k) {
    const int64_t c = idx[k];
    TORCH_CHECK(c >= 0 && c < C, "sgdet norm_relu_gather: channel ", c, " out of range for ",
                C, " channels");
    const int64_t m = std::upper_bound(first_channel.begin(), first_channel.end(), c) -
                      first_channel.begin() - 1;
    src[k] = maps[m].data_ptr<float>() + (c - first_channel[m]) * maps[m].stride(1);
    src_sn[k] = maps[m].stride(0);
  }
  at::Tensor out = at::empty({N, K, H, W}, first.options());
  float* dst = out.data_ptr<float>();
  const float* sc = scale.data_ptr<float>();
  const float* sh = shift.data_ptr<float>();
  // one task per (image, channel) plane; small planes are batched to ~16 K floats per task
  const int64_t grain = std::max<int64_t>(1, (16 << 10) / std::max<int64_t>(1, HW));
  at::parallel_for(0, N * K, grain, [&](int64_t b, int64_t e) {
    for (int64_t nk = b; nk < e; ++nk) {
      const int64_t n = nk / K, k = nk % K;
      const float* in = src[k] + n * src_sn[k];
      float* o = dst + nk * HW;
      const float a = sc[k], c = sh[k];
      if (relu) {
        for (int64_t p = 0; p < HW; ++p) o[p] = std::max(in[p] * a + c, 0.0f);
      } else {
        for (int64_t p = 0; p < HW; ++p) o[p] = in[p] * a + c;
      }
    }
  });
  return out;
}

}  // namespace
}  // namespace sgdet_native

TORCH_LIBRARY_FRAGMENT(sgdet, m) {
  m.def("norm_relu_gather(Tensor[] features, Tensor index, Tensor scale, Tensor shift, "
        "bool relu) -> Tensor");
}

TORCH_LIBRARY_IMPL(sgdet, CPU, m) {
  m.impl("norm_relu_gather", &sgdet_native::norm_relu_gather);
}
