// PyTorch bindings of dreamlab's CUDA rasterizer (rasterizer.cu): argument checks, output
// allocation, dtype dispatch and the current CUDA stream. Built by dreamlab.cuda_ext's loader.
#include <torch/extension.h>

#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <vector>

#include "rasterizer.h"

namespace {

void check_tensor(const torch::Tensor& t, const char* name, c10::ScalarType dtype, int64_t dim) {
  TORCH_CHECK(t.is_cuda(), "dreamlab rasterizer: ", name, " must be a CUDA tensor");
  TORCH_CHECK(t.is_contiguous(), "dreamlab rasterizer: ", name, " must be contiguous");
  TORCH_CHECK(t.scalar_type() == dtype, "dreamlab rasterizer: ", name, " must be ", dtype,
              ", got ", t.scalar_type());
  TORCH_CHECK(t.dim() == dim, "dreamlab rasterizer: ", name, " must have ", dim,
              " dimensions, got ", t.dim());
}

void check_launch(cudaError_t err, const char* what) {
  TORCH_CHECK(err == cudaSuccess, "dreamlab rasterizer: ", what, " failed: ",
              cudaGetErrorString(err));
}

dreamlab::Cutoffs make_cutoffs(double alpha_min, double alpha_max, double t_min, double q_max) {
  return dreamlab::Cutoffs{alpha_min, alpha_max, t_min, q_max};
}

void check_gaussians(const torch::Tensor& means2d, const torch::Tensor& conic,
                     const torch::Tensor& opacity, const torch::Tensor& feats) {
  const auto dtype = means2d.scalar_type();
  TORCH_CHECK(dtype == torch::kFloat32 || dtype == torch::kFloat64,
              "dreamlab rasterizer: float32 or float64 only, got ", dtype);
  check_tensor(means2d, "means2d", dtype, 2);
  check_tensor(conic, "conic", dtype, 2);
  check_tensor(opacity, "opacity", dtype, 1);
  check_tensor(feats, "feats", dtype, 2);
  const int64_t g = means2d.size(0);
  TORCH_CHECK(means2d.size(1) == 2 && conic.size(0) == g && conic.size(1) == 3 &&
                  opacity.size(0) == g && feats.size(0) == g,
              "dreamlab rasterizer: means2d [G, 2], conic [G, 3], opacity [G], feats [G, F]");
  TORCH_CHECK(g < (int64_t(1) << 31), "dreamlab rasterizer: at most 2^31 - 1 flat Gaussians");
}

torch::Tensor emit_intersections(const torch::Tensor& rects, const torch::Tensor& ends,
                                 const torch::Tensor& depth_rank, int64_t gauss_per_camera,
                                 int64_t tiles_x, int64_t tiles_y, int64_t num_isect) {
  check_tensor(rects, "rects", torch::kInt32, 2);
  check_tensor(ends, "ends", torch::kInt64, 1);
  check_tensor(depth_rank, "depth_rank", torch::kInt32, 1);
  const int64_t g = rects.size(0);
  TORCH_CHECK(rects.size(1) == 4 && ends.size(0) == g && depth_rank.size(0) == g,
              "dreamlab rasterizer: rects [G, 4], ends [G], depth_rank [G]");
  TORCH_CHECK(gauss_per_camera > 0 || g == 0, "gauss_per_camera must be positive");
  const c10::cuda::CUDAGuard guard(rects.device());
  auto keys = torch::empty({num_isect}, rects.options().dtype(torch::kInt64));
  check_launch(dreamlab::launch_emit_intersections(
                   rects.data_ptr<int32_t>(), ends.data_ptr<int64_t>(),
                   depth_rank.data_ptr<int32_t>(), g, gauss_per_camera,
                   static_cast<int>(tiles_x), static_cast<int>(tiles_y),
                   keys.data_ptr<int64_t>(), c10::cuda::getCurrentCUDAStream()),
               "emit_intersections");
  return keys;
}

torch::Tensor tile_ranges(const torch::Tensor& sorted_keys, int64_t num_tiles) {
  check_tensor(sorted_keys, "sorted_keys", torch::kInt64, 1);
  TORCH_CHECK(sorted_keys.size(0) < (int64_t(1) << 31),
              "dreamlab rasterizer: at most 2^31 - 1 (Gaussian, tile) intersections");
  const c10::cuda::CUDAGuard guard(sorted_keys.device());
  auto ranges = torch::zeros({num_tiles, 2}, sorted_keys.options().dtype(torch::kInt32));
  check_launch(dreamlab::launch_tile_ranges(sorted_keys.data_ptr<int64_t>(), sorted_keys.size(0),
                                            ranges.data_ptr<int32_t>(),
                                            c10::cuda::getCurrentCUDAStream()),
               "tile_ranges");
  return ranges;
}

std::vector<torch::Tensor> composite_forward(const torch::Tensor& ranges, const torch::Tensor& ids,
                                             const torch::Tensor& means2d,
                                             const torch::Tensor& conic,
                                             const torch::Tensor& opacity,
                                             const torch::Tensor& feats, int64_t num_cameras,
                                             int64_t height, int64_t width, double alpha_min,
                                             double alpha_max, double t_min, double q_max) {
  check_gaussians(means2d, conic, opacity, feats);
  check_tensor(ranges, "ranges", torch::kInt32, 2);
  check_tensor(ids, "ids", torch::kInt32, 1);
  const c10::cuda::CUDAGuard guard(means2d.device());
  const int64_t pixels = num_cameras * height * width;
  const int64_t nf = feats.size(1);
  auto out = torch::empty({pixels, nf}, means2d.options());
  auto t_final = torch::empty({pixels}, means2d.options());
  auto n_contrib = torch::empty({pixels}, means2d.options().dtype(torch::kInt32));
  const auto cut = make_cutoffs(alpha_min, alpha_max, t_min, q_max);
  const auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(means2d.scalar_type(), "dreamlab_composite_forward", [&] {
    check_launch(dreamlab::launch_composite_forward<scalar_t>(
                     ranges.data_ptr<int32_t>(), ids.data_ptr<int32_t>(),
                     means2d.data_ptr<scalar_t>(), conic.data_ptr<scalar_t>(),
                     opacity.data_ptr<scalar_t>(), feats.data_ptr<scalar_t>(),
                     static_cast<int>(nf), static_cast<int>(num_cameras),
                     static_cast<int>(height), static_cast<int>(width), cut,
                     out.data_ptr<scalar_t>(), t_final.data_ptr<scalar_t>(),
                     n_contrib.data_ptr<int32_t>(), stream),
                 "composite_forward");
  });
  return {out, t_final, n_contrib};
}

std::vector<torch::Tensor> composite_backward(
    const torch::Tensor& ranges, const torch::Tensor& ids, const torch::Tensor& means2d,
    const torch::Tensor& conic, const torch::Tensor& opacity, const torch::Tensor& feats,
    int64_t num_cameras, int64_t height, int64_t width, double alpha_min, double alpha_max,
    double t_min, double q_max, const torch::Tensor& t_final, const torch::Tensor& n_contrib,
    const torch::Tensor& grad_out, const torch::Tensor& grad_t_final) {
  check_gaussians(means2d, conic, opacity, feats);
  check_tensor(ranges, "ranges", torch::kInt32, 2);
  check_tensor(ids, "ids", torch::kInt32, 1);
  const auto dtype = means2d.scalar_type();
  check_tensor(t_final, "t_final", dtype, 1);
  check_tensor(n_contrib, "n_contrib", torch::kInt32, 1);
  check_tensor(grad_out, "grad_out", dtype, 2);
  check_tensor(grad_t_final, "grad_t_final", dtype, 1);
  const c10::cuda::CUDAGuard guard(means2d.device());
  const int64_t nf = feats.size(1);
  auto grad_means2d = torch::zeros_like(means2d);
  auto grad_conic = torch::zeros_like(conic);
  auto grad_opacity = torch::zeros_like(opacity);
  auto grad_feats = torch::zeros_like(feats);
  const auto cut = make_cutoffs(alpha_min, alpha_max, t_min, q_max);
  const auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(dtype, "dreamlab_composite_backward", [&] {
    check_launch(dreamlab::launch_composite_backward<scalar_t>(
                     ranges.data_ptr<int32_t>(), ids.data_ptr<int32_t>(),
                     means2d.data_ptr<scalar_t>(), conic.data_ptr<scalar_t>(),
                     opacity.data_ptr<scalar_t>(), feats.data_ptr<scalar_t>(),
                     static_cast<int>(nf), static_cast<int>(num_cameras),
                     static_cast<int>(height), static_cast<int>(width), cut,
                     t_final.data_ptr<scalar_t>(), n_contrib.data_ptr<int32_t>(),
                     grad_out.data_ptr<scalar_t>(), grad_t_final.data_ptr<scalar_t>(),
                     grad_means2d.data_ptr<scalar_t>(), grad_conic.data_ptr<scalar_t>(),
                     grad_opacity.data_ptr<scalar_t>(), grad_feats.data_ptr<scalar_t>(), stream),
                 "composite_backward");
  });
  return {grad_means2d, grad_conic, grad_opacity, grad_feats};
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "dreamlab's tile-based CUDA Gaussian rasterizer (see dreamlab.cuda_ext)";
  m.def("emit_intersections", &emit_intersections,
        "one (tile << 32 | depth rank) key per (Gaussian, tile) intersection");
  m.def("tile_ranges", &tile_ranges, "[start, end) of every tile in the sorted keys");
  m.def("composite_forward", &composite_forward,
        "front-to-back compositing: (out [P, F], t_final [P], n_contrib [P])");
  m.def("composite_backward", &composite_backward,
        "gradients (means2d, conic, opacity, feats) of composite_forward");
}
