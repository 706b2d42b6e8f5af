// dreamlab's tile-based CUDA Gaussian rasterizer: intersection keys, tile ranges, and the
// forward / backward compositing kernels behind the "cuda" backend of
// renderers/gaussians/rasterize.py (projection and tile boxes stay in PyTorch there).
//
// Why hand-written rather than gsplat's or 3DGS's kernels: this backend must compute exactly the
// forward model of dreamlab's PyTorch twin, which those kernels do not (they use a square or
// 3.33-sigma box instead of the per-pixel 3-sigma ellipse, clamp alpha at 0.999 in gsplat, fix
// the channel count at compile time and run in float32 only), and it must run float64 too, so
// the twin and the kernels can be compared to rounding error. The project also keeps its own
// code; these kernels follow the published algorithm (Kerbl et al. 2023), not anyone's source.
//
// No torch headers: plain CUDA C++ on raw pointers, so nvcc compiles this file alone in seconds
// (tests/test_cuda_ext.py does so on machines without a GPU to keep it from rotting).
//
// Agreement with the twin, decision by decision: a (Gaussian, pixel) pair is composited iff
// q <= q_max and opacity * exp(-q / 2) >= alpha_min, with q evaluated in the twin's operation
// order and explicit round-to-nearest operations (no FMA contraction), so both backends take the
// same decisions on the same device; pairs are visited front to back in the twin's order
// (depth, then flat Gaussian index: keys carry a depth rank); a pixel stops before the pair that
// would bring T below t_min.
#include "rasterizer.h"

// Kernel launch. tests/cuda_cpu/ defines this before including this file to run the kernels on
// the CPU (one fiber per CUDA thread), so the kernel logic is tested without a GPU.
#ifndef DREAMLAB_LAUNCH
#define DREAMLAB_LAUNCH(kernel, grid, block, stream, ...) \
  kernel<<<(grid), (block), 0, (stream)>>>(__VA_ARGS__)
#endif

namespace dreamlab {
namespace {

constexpr int kBlock = kTile * kTile;
constexpr unsigned kFullMask = 0xffffffffu;
// Features are composited in chunks of at most this many channels (more cost one more pass).
constexpr int kMaxChunk = 32;

__device__ __forceinline__ float mul_rn(float a, float b) { return __fmul_rn(a, b); }
__device__ __forceinline__ double mul_rn(double a, double b) { return __dmul_rn(a, b); }
__device__ __forceinline__ float add_rn(float a, float b) { return __fadd_rn(a, b); }
__device__ __forceinline__ double add_rn(double a, double b) { return __dadd_rn(a, b); }
__device__ __forceinline__ float exp_t(float x) { return expf(x); }
__device__ __forceinline__ double exp_t(double x) { return exp(x); }

// Mahalanobis^2 of the pixel offset (dx, dy): (A dx) dx + ((2 B) dx) dy + (C dy) dy, in the
// PyTorch twin's order, every operation rounded on its own.
template <typename T>
__device__ __forceinline__ T mahalanobis(T ca, T cb, T cc, T dx, T dy) {
  const T t1 = mul_rn(mul_rn(ca, dx), dx);
  const T t2 = mul_rn(mul_rn(mul_rn(T(2), cb), dx), dy);
  const T t3 = mul_rn(mul_rn(cc, dy), dy);
  return add_rn(add_rn(t1, t2), t3);
}

template <typename T>
__device__ __forceinline__ T warp_sum(T v) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_down_sync(kFullMask, v, offset);
  return v;
}

__global__ void emit_intersections_kernel(const int32_t* __restrict__ rects,
                                          const int64_t* __restrict__ ends,
                                          const int32_t* __restrict__ depth_rank,
                                          int64_t num_gauss, int64_t gauss_per_camera,
                                          int tiles_x, int tiles_y, int64_t* __restrict__ keys) {
  const int64_t g = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (g >= num_gauss) return;
  const int tx0 = rects[4 * g + 0], ty0 = rects[4 * g + 1];
  const int tx1 = rects[4 * g + 2], ty1 = rects[4 * g + 3];
  int64_t slot = g == 0 ? 0 : ends[g - 1];
  const int64_t cam = g / gauss_per_camera;
  const int64_t low = static_cast<int64_t>(static_cast<uint32_t>(depth_rank[g]));
  for (int ty = ty0; ty <= ty1; ++ty) {
    for (int tx = tx0; tx <= tx1; ++tx) {
      const int64_t tile = (cam * tiles_y + ty) * tiles_x + tx;
      keys[slot++] = (tile << 32) | low;
    }
  }
}

__global__ void tile_ranges_kernel(const int64_t* __restrict__ keys, int64_t num_isect,
                                   int32_t* __restrict__ ranges) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= num_isect) return;
  const int64_t tile = keys[i] >> 32;
  if (i == 0 || (keys[i - 1] >> 32) != tile) ranges[2 * tile] = static_cast<int32_t>(i);
  if (i == num_isect - 1 || (keys[i + 1] >> 32) != tile)
    ranges[2 * tile + 1] = static_cast<int32_t>(i + 1);
}

// One block per (tile, camera), one thread per pixel. The tile's Gaussians are visited front to
// back in batches of kBlock staged in shared memory; the block stops once every pixel is done.
template <typename T, int MAXF>
__global__ void __launch_bounds__(kBlock)
    composite_forward_kernel(const int32_t* __restrict__ ranges, const int32_t* __restrict__ ids,
                             const T* __restrict__ means2d, const T* __restrict__ conic,
                             const T* __restrict__ opacity, const T* __restrict__ feats,
                             int feat_stride, int nf, int height, int width, Cutoffs cutoffs,
                             T* __restrict__ out, T* __restrict__ t_final,
                             int32_t* __restrict__ n_contrib) {
  __shared__ int32_t s_id[kBlock];
  __shared__ T s_mx[kBlock], s_my[kBlock], s_ca[kBlock], s_cb[kBlock], s_cc[kBlock],
      s_op[kBlock];
  const T alpha_min = T(cutoffs.alpha_min), alpha_max = T(cutoffs.alpha_max);
  const T t_min = T(cutoffs.t_min), q_max = T(cutoffs.q_max);

  const int tid = threadIdx.y * kTile + threadIdx.x;
  const int col = blockIdx.x * kTile + threadIdx.x;
  const int row = blockIdx.y * kTile + threadIdx.y;
  const int64_t tile =
      (static_cast<int64_t>(blockIdx.z) * gridDim.y + blockIdx.y) * gridDim.x + blockIdx.x;
  const bool inside = col < width && row < height;
  const int64_t pix = (static_cast<int64_t>(blockIdx.z) * height + row) * width + col;
  const T px = T(col) + T(0.5), py = T(row) + T(0.5);
  const int start = ranges[2 * tile], end = ranges[2 * tile + 1];

  T acc[MAXF];
#pragma unroll
  for (int k = 0; k < MAXF; ++k) acc[k] = T(0);
  T trans = T(1);
  int last = 0;
  bool done = !inside;

  for (int base = start; base < end; base += kBlock) {
    // Also the barrier that keeps the previous batch in shared memory until all have read it.
    if (__syncthreads_count(done) == kBlock) break;
    const int i = base + tid;
    if (i < end) {
      const int32_t g = ids[i];
      s_id[tid] = g;
      s_mx[tid] = means2d[2 * static_cast<int64_t>(g)];
      s_my[tid] = means2d[2 * static_cast<int64_t>(g) + 1];
      s_ca[tid] = conic[3 * static_cast<int64_t>(g)];
      s_cb[tid] = conic[3 * static_cast<int64_t>(g) + 1];
      s_cc[tid] = conic[3 * static_cast<int64_t>(g) + 2];
      s_op[tid] = opacity[g];
    }
    __syncthreads();
    const int n = min(kBlock, end - base);
    for (int j = 0; j < n && !done; ++j) {
      const T dx = px - s_mx[j];
      const T dy = py - s_my[j];
      const T q = mahalanobis(s_ca[j], s_cb[j], s_cc[j], dx, dy);
      if (!(q <= q_max)) continue;  // also skips NaN
      const T alpha_raw = mul_rn(s_op[j], exp_t(mul_rn(T(-0.5), q)));
      if (!(alpha_raw >= alpha_min)) continue;
      const T alpha = min(alpha_raw, alpha_max);
      const T next = trans * (T(1) - alpha);
      if (next < t_min) {
        done = true;
        break;
      }
      const T w = alpha * trans;
      const T* f = feats + static_cast<int64_t>(s_id[j]) * feat_stride;
#pragma unroll
      for (int k = 0; k < MAXF; ++k)
        if (k < nf) acc[k] += w * f[k];
      trans = next;
      last = base + j - start + 1;
    }
  }
  if (inside) {
    T* o = out + pix * feat_stride;
#pragma unroll
    for (int k = 0; k < MAXF; ++k)
      if (k < nf) o[k] = acc[k];
    if (t_final != nullptr) t_final[pix] = trans;
    if (n_contrib != nullptr) n_contrib[pix] = last;
  }
}

// Backward, back to front from each pixel's last composited pair. With w_k = alpha_k T_k and
// s_k = <dL/dout, f_k>: dL/dalpha_k = T_k s_k - (sum_{j>k} w_j s_j + T_final dL/dT_final) /
// (1 - alpha_k), zero where alpha was clamped; T_k is recovered as T_{k+1} / (1 - alpha_k).
// Per-Gaussian sums are reduced over each warp before one atomicAdd per warp.
template <typename T, int MAXF>
__global__ void __launch_bounds__(kBlock) composite_backward_kernel(
    const int32_t* __restrict__ ranges, const int32_t* __restrict__ ids,
    const T* __restrict__ means2d, const T* __restrict__ conic, const T* __restrict__ opacity,
    const T* __restrict__ feats, int feat_stride, int nf, int height, int width, Cutoffs cutoffs,
    const T* __restrict__ t_final, const int32_t* __restrict__ n_contrib,
    const T* __restrict__ grad_out, const T* __restrict__ grad_t_final,
    T* __restrict__ grad_means2d, T* __restrict__ grad_conic, T* __restrict__ grad_opacity,
    T* __restrict__ grad_feats) {
  __shared__ int32_t s_id[kBlock];
  __shared__ T s_mx[kBlock], s_my[kBlock], s_ca[kBlock], s_cb[kBlock], s_cc[kBlock],
      s_op[kBlock];
  __shared__ int s_count;
  const T alpha_min = T(cutoffs.alpha_min), alpha_max = T(cutoffs.alpha_max);
  const T q_max = T(cutoffs.q_max);

  const int tid = threadIdx.y * kTile + threadIdx.x;
  const int lane = tid & 31;
  const int col = blockIdx.x * kTile + threadIdx.x;
  const int row = blockIdx.y * kTile + threadIdx.y;
  const int64_t tile =
      (static_cast<int64_t>(blockIdx.z) * gridDim.y + blockIdx.y) * gridDim.x + blockIdx.x;
  const bool inside = col < width && row < height;
  const int64_t pix = (static_cast<int64_t>(blockIdx.z) * height + row) * width + col;
  const T px = T(col) + T(0.5), py = T(row) + T(0.5);
  const int start = ranges[2 * tile];

  T gpix[MAXF];
#pragma unroll
  for (int k = 0; k < MAXF; ++k) gpix[k] = (inside && k < nf) ? grad_out[pix * feat_stride + k] : T(0);
  T trans = inside ? t_final[pix] : T(1);
  // Everything composited behind the current pair, background term included.
  T after = (inside && grad_t_final != nullptr) ? trans * grad_t_final[pix] : T(0);
  const int my_last = inside ? n_contrib[pix] : 0;

  if (tid == 0) s_count = 0;
  __syncthreads();
  if (my_last > 0) atomicMax(&s_count, my_last);
  __syncthreads();
  const int count = s_count;

  for (int hi = start + count; hi > start; hi -= kBlock) {
    __syncthreads();  // the previous batch has been read by everyone
    const int i = hi - 1 - tid;
    if (i >= start) {
      const int32_t g = ids[i];
      s_id[tid] = g;
      s_mx[tid] = means2d[2 * static_cast<int64_t>(g)];
      s_my[tid] = means2d[2 * static_cast<int64_t>(g) + 1];
      s_ca[tid] = conic[3 * static_cast<int64_t>(g)];
      s_cb[tid] = conic[3 * static_cast<int64_t>(g) + 1];
      s_cc[tid] = conic[3 * static_cast<int64_t>(g) + 2];
      s_op[tid] = opacity[g];
    }
    __syncthreads();
    const int n = min(kBlock, hi - start);
    for (int j = 0; j < n; ++j) {  // uniform over the block: every lane reaches the shuffles
      const int rel = hi - 1 - j - start;
      bool valid = rel < my_last;
      T g_mx = T(0), g_my = T(0), g_ca = T(0), g_cb = T(0), g_cc = T(0), g_op = T(0), w = T(0);
      if (valid) {
        const T dx = px - s_mx[j];
        const T dy = py - s_my[j];
        const T ca = s_ca[j], cb = s_cb[j], cc = s_cc[j];
        const T q = mahalanobis(ca, cb, cc, dx, dy);
        valid = q <= q_max;
        if (valid) {
          const T gauss = exp_t(mul_rn(T(-0.5), q));
          const T alpha_raw = mul_rn(s_op[j], gauss);
          valid = alpha_raw >= alpha_min;
          if (valid) {
            const T alpha = min(alpha_raw, alpha_max);
            const T one_minus = T(1) - alpha;
            trans = trans / one_minus;  // T before this pair
            w = alpha * trans;
            const T* f = feats + static_cast<int64_t>(s_id[j]) * feat_stride;
            T s = T(0);
#pragma unroll
            for (int k = 0; k < MAXF; ++k)
              if (k < nf) s += gpix[k] * f[k];
            const T d_alpha = alpha_raw <= alpha_max ? trans * s - after / one_minus : T(0);
            after += w * s;
            g_op = d_alpha * gauss;
            const T d_power = d_alpha * alpha_raw;
            const T e = d_power * dx, h = d_power * dy;
            g_mx = ca * e + cb * h;
            g_my = cb * e + cc * h;
            g_ca = T(-0.5) * e * dx;
            g_cb = -e * dy;
            g_cc = T(-0.5) * h * dy;
          }
        }
      }
      if (__any_sync(kFullMask, valid)) {
        const int64_t g = s_id[j];
        g_mx = warp_sum(g_mx);
        g_my = warp_sum(g_my);
        g_ca = warp_sum(g_ca);
        g_cb = warp_sum(g_cb);
        g_cc = warp_sum(g_cc);
        g_op = warp_sum(g_op);
        if (lane == 0) {
          atomicAdd(grad_means2d + 2 * g, g_mx);
          atomicAdd(grad_means2d + 2 * g + 1, g_my);
          atomicAdd(grad_conic + 3 * g, g_ca);
          atomicAdd(grad_conic + 3 * g + 1, g_cb);
          atomicAdd(grad_conic + 3 * g + 2, g_cc);
          atomicAdd(grad_opacity + g, g_op);
        }
#pragma unroll
        for (int k = 0; k < MAXF; ++k) {
          if (k < nf) {
            const T v = warp_sum(w * gpix[k]);  // w is 0 where the pair is not composited
            if (lane == 0) atomicAdd(grad_feats + g * feat_stride + k, v);
          }
        }
      }
    }
  }
}

template <typename T, int MAXF>
void forward_chunk(dim3 grid, dim3 block, cudaStream_t stream, const int32_t* ranges,
                   const int32_t* ids, const T* means2d, const T* conic, const T* opacity,
                   const T* feats, int feat_stride, int nf, int height, int width, Cutoffs cut,
                   T* out, T* t_final, int32_t* n_contrib) {
  auto kernel = composite_forward_kernel<T, MAXF>;
  DREAMLAB_LAUNCH(kernel, grid, block, stream, ranges, ids, means2d, conic, opacity, feats,
                  feat_stride, nf, height, width, cut, out, t_final, n_contrib);
}

template <typename T, int MAXF>
void backward_chunk(dim3 grid, dim3 block, cudaStream_t stream, const int32_t* ranges,
                    const int32_t* ids, const T* means2d, const T* conic, const T* opacity,
                    const T* feats, int feat_stride, int nf, int height, int width, Cutoffs cut,
                    const T* t_final, const int32_t* n_contrib, const T* grad_out,
                    const T* grad_t_final, T* grad_means2d, T* grad_conic, T* grad_opacity,
                    T* grad_feats) {
  auto kernel = composite_backward_kernel<T, MAXF>;
  DREAMLAB_LAUNCH(kernel, grid, block, stream, ranges, ids, means2d, conic, opacity, feats,
                  feat_stride, nf, height, width, cut, t_final, n_contrib, grad_out, grad_t_final,
                  grad_means2d, grad_conic, grad_opacity, grad_feats);
}

}  // namespace

cudaError_t launch_emit_intersections(const int32_t* rects, const int64_t* ends,
                                      const int32_t* depth_rank, int64_t num_gauss,
                                      int64_t gauss_per_camera, int tiles_x, int tiles_y,
                                      int64_t* keys, cudaStream_t stream) {
  if (num_gauss > 0) {
    const int threads = 256;
    const int64_t blocks = (num_gauss + threads - 1) / threads;
    auto kernel = emit_intersections_kernel;
    DREAMLAB_LAUNCH(kernel, dim3(static_cast<unsigned>(blocks)), dim3(threads), stream, rects,
                    ends, depth_rank, num_gauss, gauss_per_camera, tiles_x, tiles_y, keys);
  }
  return cudaGetLastError();
}

cudaError_t launch_tile_ranges(const int64_t* sorted_keys, int64_t num_isect, int32_t* ranges,
                               cudaStream_t stream) {
  if (num_isect > 0) {
    const int threads = 256;
    const int64_t blocks = (num_isect + threads - 1) / threads;
    auto kernel = tile_ranges_kernel;
    DREAMLAB_LAUNCH(kernel, dim3(static_cast<unsigned>(blocks)), dim3(threads), stream,
                    sorted_keys, num_isect, ranges);
  }
  return cudaGetLastError();
}

// Features go through in chunks of up to kMaxChunk channels, each compiled for the smallest
// register budget that holds it. Chunks after the first only add their channels: the forward
// writes T / n_contrib once, and the backward, being linear in dL/dout, adds the background term
// once.
template <typename T>
cudaError_t launch_composite_forward(const int32_t* ranges, const int32_t* ids, const T* means2d,
                                     const T* conic, const T* opacity, const T* feats,
                                     int num_feats, int num_cameras, int height, int width,
                                     Cutoffs cutoffs, T* out, T* t_final, int32_t* n_contrib,
                                     cudaStream_t stream) {
  if (num_cameras <= 0 || height <= 0 || width <= 0) return cudaSuccess;
  const dim3 block(kTile, kTile);
  const dim3 grid((width + kTile - 1) / kTile, (height + kTile - 1) / kTile, num_cameras);
  for (int c0 = 0; c0 == 0 || c0 < num_feats; c0 += kMaxChunk) {
    const int nf = min(kMaxChunk, num_feats - c0);
    T* t_out = c0 == 0 ? t_final : nullptr;
    int32_t* n_out = c0 == 0 ? n_contrib : nullptr;
    const T* f = feats + c0;
    T* o = out + c0;
    if (nf <= 4) {
      forward_chunk<T, 4>(grid, block, stream, ranges, ids, means2d, conic, opacity, f, num_feats,
                          nf, height, width, cutoffs, o, t_out, n_out);
    } else if (nf <= 8) {
      forward_chunk<T, 8>(grid, block, stream, ranges, ids, means2d, conic, opacity, f, num_feats,
                          nf, height, width, cutoffs, o, t_out, n_out);
    } else if (nf <= 16) {
      forward_chunk<T, 16>(grid, block, stream, ranges, ids, means2d, conic, opacity, f,
                           num_feats, nf, height, width, cutoffs, o, t_out, n_out);
    } else {
      forward_chunk<T, kMaxChunk>(grid, block, stream, ranges, ids, means2d, conic, opacity, f,
                                  num_feats, nf, height, width, cutoffs, o, t_out, n_out);
    }
    const cudaError_t err = cudaGetLastError();
    if (err != cudaSuccess) return err;
  }
  return cudaSuccess;
}

template <typename T>
cudaError_t launch_composite_backward(const int32_t* ranges, const int32_t* ids, const T* means2d,
                                      const T* conic, const T* opacity, const T* feats,
                                      int num_feats, int num_cameras, int height, int width,
                                      Cutoffs cutoffs, const T* t_final, const int32_t* n_contrib,
                                      const T* grad_out, const T* grad_t_final, T* grad_means2d,
                                      T* grad_conic, T* grad_opacity, T* grad_feats,
                                      cudaStream_t stream) {
  if (num_cameras <= 0 || height <= 0 || width <= 0) return cudaSuccess;
  const dim3 block(kTile, kTile);
  const dim3 grid((width + kTile - 1) / kTile, (height + kTile - 1) / kTile, num_cameras);
  for (int c0 = 0; c0 == 0 || c0 < num_feats; c0 += kMaxChunk) {
    const int nf = min(kMaxChunk, num_feats - c0);
    const T* gt = c0 == 0 ? grad_t_final : nullptr;
    const T* f = feats + c0;
    const T* go = grad_out + c0;
    T* gf = grad_feats + c0;
    if (nf <= 4) {
      backward_chunk<T, 4>(grid, block, stream, ranges, ids, means2d, conic, opacity, f,
                           num_feats, nf, height, width, cutoffs, t_final, n_contrib, go, gt,
                           grad_means2d, grad_conic, grad_opacity, gf);
    } else if (nf <= 8) {
      backward_chunk<T, 8>(grid, block, stream, ranges, ids, means2d, conic, opacity, f,
                           num_feats, nf, height, width, cutoffs, t_final, n_contrib, go, gt,
                           grad_means2d, grad_conic, grad_opacity, gf);
    } else if (nf <= 16) {
      backward_chunk<T, 16>(grid, block, stream, ranges, ids, means2d, conic, opacity, f,
                            num_feats, nf, height, width, cutoffs, t_final, n_contrib, go, gt,
                            grad_means2d, grad_conic, grad_opacity, gf);
    } else {
      backward_chunk<T, kMaxChunk>(grid, block, stream, ranges, ids, means2d, conic, opacity, f,
                                   num_feats, nf, height, width, cutoffs, t_final, n_contrib, go,
                                   gt, grad_means2d, grad_conic, grad_opacity, gf);
    }
    const cudaError_t err = cudaGetLastError();
    if (err != cudaSuccess) return err;
  }
  return cudaSuccess;
}

#define DREAMLAB_INSTANTIATE(T)                                                                 \
  template cudaError_t launch_composite_forward<T>(                                             \
      const int32_t*, const int32_t*, const T*, const T*, const T*, const T*, int, int, int,     \
      int, Cutoffs, T*, T*, int32_t*, cudaStream_t);                                            \
  template cudaError_t launch_composite_backward<T>(                                            \
      const int32_t*, const int32_t*, const T*, const T*, const T*, const T*, int, int, int,     \
      int, Cutoffs, const T*, const int32_t*, const T*, const T*, T*, T*, T*, T*, cudaStream_t);

DREAMLAB_INSTANTIATE(float)
DREAMLAB_INSTANTIATE(double)
#undef DREAMLAB_INSTANTIATE

}  // namespace dreamlab
