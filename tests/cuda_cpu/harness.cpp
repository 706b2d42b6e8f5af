// C entry points around cuda_ext/rasterizer.cu built for the CPU emulation (cuda_emulator.h),
// loaded with ctypes by tests/test_cuda_ext.py. Pointers are CPU tensors' data.
#include "cuda_emulator.h"

#include "rasterizer.cu"

namespace {

dreamlab::Cutoffs cut(double alpha_min, double alpha_max, double t_min, double q_max) {
  return dreamlab::Cutoffs{alpha_min, alpha_max, t_min, q_max};
}

template <typename T>
int forward(const int32_t* ranges, const int32_t* ids, const void* means2d, const void* conic,
            const void* opacity, const void* feats, int nf, int cams, int h, int w, double a0,
            double a1, double t0, double q0, void* out, void* t_final, int32_t* n_contrib) {
  return dreamlab::launch_composite_forward<T>(
      ranges, ids, static_cast<const T*>(means2d), static_cast<const T*>(conic),
      static_cast<const T*>(opacity), static_cast<const T*>(feats), nf, cams, h, w,
      cut(a0, a1, t0, q0), static_cast<T*>(out), static_cast<T*>(t_final), n_contrib, nullptr);
}

template <typename T>
int backward(const int32_t* ranges, const int32_t* ids, const void* means2d, const void* conic,
             const void* opacity, const void* feats, int nf, int cams, int h, int w, double a0,
             double a1, double t0, double q0, const void* t_final, const int32_t* n_contrib,
             const void* grad_out, const void* grad_t, void* g_means2d, void* g_conic,
             void* g_opacity, void* g_feats) {
  return dreamlab::launch_composite_backward<T>(
      ranges, ids, static_cast<const T*>(means2d), static_cast<const T*>(conic),
      static_cast<const T*>(opacity), static_cast<const T*>(feats), nf, cams, h, w,
      cut(a0, a1, t0, q0), static_cast<const T*>(t_final), n_contrib,
      static_cast<const T*>(grad_out), static_cast<const T*>(grad_t), static_cast<T*>(g_means2d),
      static_cast<T*>(g_conic), static_cast<T*>(g_opacity), static_cast<T*>(g_feats), nullptr);
}

}  // namespace

extern "C" {

const char* emu_last_error() { return cuda_emu::g_error.c_str(); }

int emu_emit_intersections(const int32_t* rects, const int64_t* ends, const int32_t* rank,
                           int64_t num_gauss, int64_t per_camera, int tiles_x, int tiles_y,
                           int64_t* keys) {
  return dreamlab::launch_emit_intersections(rects, ends, rank, num_gauss, per_camera, tiles_x,
                                             tiles_y, keys, nullptr);
}

int emu_tile_ranges(const int64_t* keys, int64_t num_isect, int32_t* ranges) {
  return dreamlab::launch_tile_ranges(keys, num_isect, ranges, nullptr);
}

int emu_forward(int is_double, const int32_t* ranges, const int32_t* ids, const void* means2d,
                const void* conic, const void* opacity, const void* feats, int nf, int cams,
                int h, int w, double a0, double a1, double t0, double q0, void* out,
                void* t_final, int32_t* n_contrib) {
  return is_double ? forward<double>(ranges, ids, means2d, conic, opacity, feats, nf, cams, h, w,
                                     a0, a1, t0, q0, out, t_final, n_contrib)
                   : forward<float>(ranges, ids, means2d, conic, opacity, feats, nf, cams, h, w,
                                    a0, a1, t0, q0, out, t_final, n_contrib);
}

int emu_backward(int is_double, const int32_t* ranges, const int32_t* ids, const void* means2d,
                 const void* conic, const void* opacity, const void* feats, int nf, int cams,
                 int h, int w, double a0, double a1, double t0, double q0, const void* t_final,
                 const int32_t* n_contrib, const void* grad_out, const void* grad_t,
                 void* g_means2d, void* g_conic, void* g_opacity, void* g_feats) {
  return is_double
             ? backward<double>(ranges, ids, means2d, conic, opacity, feats, nf, cams, h, w, a0,
                                a1, t0, q0, t_final, n_contrib, grad_out, grad_t, g_means2d,
                                g_conic, g_opacity, g_feats)
             : backward<float>(ranges, ids, means2d, conic, opacity, feats, nf, cams, h, w, a0, a1,
                               t0, q0, t_final, n_contrib, grad_out, grad_t, g_means2d, g_conic,
                               g_opacity, g_feats);
}

}  // extern "C"
