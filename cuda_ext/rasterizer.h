// Launchers of dreamlab's CUDA Gaussian rasterizer (rasterizer.cu), shared with bindings.cpp.
// Plain C++ with raw pointers and no torch headers, so that rasterizer.cu compiles with nvcc alone.
#pragma once

#include <cstdint>

#include <cuda_runtime.h>

namespace dreamlab {

// Edge length of a screen tile in pixels; one thread block of TILE x TILE threads per tile.
constexpr int kTile = 16;

// The per-pair cut-offs of the forward model, passed from Python (rasterize.py's constants) so
// that the PyTorch twin and these kernels cannot drift apart.
struct Cutoffs {
  double alpha_min;  // pairs with opacity * exp(-q / 2) below this are skipped (1/255)
  double alpha_max;  // alpha is clamped to this (0.99)
  double t_min;      // a pixel stops before the pair that would bring T below this (1e-4)
  double q_max;      // pairs with Mahalanobis^2 q above this are skipped (9: 3 sigma)
};

// Writes one 64-bit key per (Gaussian, tile) intersection: (global tile id << 32) | depth_rank.
// rects [G, 4] int32 (tile x0, y0, x1, y1, inclusive; x1 < x0 for culled Gaussians), ends [G]
// inclusive prefix sums of the rect sizes, depth_rank [G] the Gaussian's front-to-back rank.
cudaError_t launch_emit_intersections(const int32_t* rects, const int64_t* ends,
                                      const int32_t* depth_rank, int64_t num_gauss,
                                      int64_t gauss_per_camera, int tiles_x, int tiles_y,
                                      int64_t* keys, cudaStream_t stream);

// ranges [num_tiles, 2] (zero-filled by the caller) gets [start, end) of each tile's entries in
// the sorted key array.
cudaError_t launch_tile_ranges(const int64_t* sorted_keys, int64_t num_isect, int32_t* ranges,
                               cudaStream_t stream);

// Front-to-back compositing of F features per pixel. Inputs per flat Gaussian (G = cameras * N):
// means2d [G, 2], conic [G, 3], opacity [G], feats [G, F]. Outputs per flat pixel
// (P = cameras * height * width): out [P, F], t_final [P], n_contrib [P] (tile-list entries up
// to and including the pixel's last composited pair, for the backward pass).
template <typename T>
cudaError_t launch_composite_forward(const int32_t* ranges, const int32_t* ids, const T* means2d,
                                     const T* conic, const T* opacity, const T* feats,
                                     int num_feats, int num_cameras, int height, int width,
                                     Cutoffs cutoffs, T* out, T* t_final, int32_t* n_contrib,
                                     cudaStream_t stream);

// Backward of launch_composite_forward: accumulates (+=) into grad_means2d [G, 2], grad_conic
// [G, 3], grad_opacity [G] and grad_feats [G, F], which the caller zero-fills.
template <typename T>
cudaError_t launch_composite_backward(const int32_t* ranges, const int32_t* ids, const T* means2d,
                                      const T* conic, const T* opacity, const T* feats,
                                      int num_feats, int num_cameras, int height, int width,
                                      Cutoffs cutoffs, const T* t_final, const int32_t* n_contrib,
                                      const T* grad_out, const T* grad_t_final, T* grad_means2d,
                                      T* grad_conic, T* grad_opacity, T* grad_feats,
                                      cudaStream_t stream);

}  // namespace dreamlab
