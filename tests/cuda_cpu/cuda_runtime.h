// Stand-in for CUDA's cuda_runtime.h when cuda_ext/rasterizer.cu is built for the CPU emulation
// (cuda_emulator.h); only what rasterizer.h and rasterizer.cu use.
#pragma once

enum cudaError_t { cudaSuccess = 0, cudaErrorUnknown = 999 };
typedef struct CUstream_st* cudaStream_t;

struct dim3 {
  unsigned x, y, z;
  constexpr dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};

cudaError_t cudaGetLastError();
const char* cudaGetErrorString(cudaError_t err);
