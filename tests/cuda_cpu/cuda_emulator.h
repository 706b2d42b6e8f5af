// A small CPU emulation of the CUDA features that cuda_ext/rasterizer.cu uses, so its kernels run
// (slowly) in tests on machines without a GPU: one fiber (ucontext) per CUDA thread, blocks run
// one after another, __syncthreads / __syncthreads_count are block barriers, the warp intrinsics
// (__shfl_down_sync, __any_sync) are barriers over the warp's 32 lanes, __shared__ variables are
// function statics (shared by the block's fibers; blocks never overlap). A deadlock (a barrier
// that not every thread reaches) is reported as a launch error instead of hanging.
// Include this, then rasterizer.cu; compile with -ffp-contract=off.
#pragma once

#include <ucontext.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <functional>
#include <string>
#include <vector>

#include "cuda_runtime.h"

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__ static

using std::max;
using std::min;

inline dim3 threadIdx, blockIdx, blockDim, gridDim;

namespace cuda_emu {

struct Block {
  int nthreads = 0;
  int alive = 0;
  int current = 0;
  long progress = 0;
  std::vector<ucontext_t> ctx;
  std::vector<char> finished;
  ucontext_t scheduler;
  long block_gen = 0;
  int block_arrived = 0;
  int count[2] = {0, 0};
  std::vector<long> warp_gen;
  std::vector<int> warp_arrived;
  std::vector<int> warp_alive;
  std::vector<double> shfl[2];
  std::vector<int> flags[2];
};

inline Block* g_block = nullptr;
inline std::function<void()>* g_body = nullptr;
inline std::vector<std::vector<char>> g_stacks;
inline std::string g_error;

inline int linear_id() { return g_block->current; }
inline int warp_id() { return linear_id() / 32; }
inline int lane_id() { return linear_id() % 32; }
inline int warp_size(int w) { return std::min(32, g_block->nthreads - 32 * w); }

inline void yield() {
  Block& b = *g_block;
  const int me = b.current;
  swapcontext(&b.ctx[me], &b.scheduler);
}

inline void complete_block_barrier() {
  Block& b = *g_block;
  b.block_arrived = 0;
  ++b.block_gen;
  b.count[b.block_gen & 1] = 0;
}

inline void block_barrier() {
  Block& b = *g_block;
  const long gen = b.block_gen;
  ++b.progress;
  if (++b.block_arrived == b.alive) {
    complete_block_barrier();
    return;
  }
  while (b.block_gen == gen) yield();
}

inline void warp_barrier() {
  Block& b = *g_block;
  const int w = warp_id();
  const long gen = b.warp_gen[w];
  ++b.progress;
  if (++b.warp_arrived[w] == b.warp_alive[w]) {
    b.warp_arrived[w] = 0;
    ++b.warp_gen[w];
    return;
  }
  while (b.warp_gen[w] == gen) yield();
}

inline void fiber_entry() {
  (*g_body)();
  Block& b = *g_block;
  const int me = b.current;
  const int w = me / 32;
  b.finished[me] = 1;
  --b.alive;
  --b.warp_alive[w];
  ++b.progress;
  // Threads that are waiting at a barrier need not wait for an exited thread.
  if (b.block_arrived > 0 && b.block_arrived == b.alive) complete_block_barrier();
  if (b.warp_arrived[w] > 0 && b.warp_arrived[w] == b.warp_alive[w]) {
    b.warp_arrived[w] = 0;
    ++b.warp_gen[w];
  }
}  // returns to the scheduler through uc_link

inline void set_thread_index(int i) {
  threadIdx.x = i % blockDim.x;
  threadIdx.y = (i / blockDim.x) % blockDim.y;
  threadIdx.z = i / (blockDim.x * blockDim.y);
}

template <typename Body>
void launch(dim3 grid, dim3 block, Body&& body) {
  if (!g_error.empty()) return;
  std::function<void()> fn = body;
  const int n = static_cast<int>(block.x * block.y * block.z);
  const size_t stack_size = 256 * 1024;
  if (static_cast<int>(g_stacks.size()) < n) g_stacks.resize(n);
  for (auto& s : g_stacks)
    if (s.size() < stack_size) s.resize(stack_size);
  gridDim = grid;
  blockDim = block;
  for (unsigned bz = 0; bz < grid.z; ++bz)
    for (unsigned by = 0; by < grid.y; ++by)
      for (unsigned bx = 0; bx < grid.x; ++bx) {
        Block b;
        b.nthreads = b.alive = n;
        b.ctx.resize(n);
        b.finished.assign(n, 0);
        const int warps = (n + 31) / 32;
        b.warp_gen.assign(warps, 0);
        b.warp_arrived.assign(warps, 0);
        b.warp_alive.resize(warps);
        for (int w = 0; w < warps; ++w) b.warp_alive[w] = std::min(32, n - 32 * w);
        for (int s = 0; s < 2; ++s) {
          b.shfl[s].assign(n, 0.0);
          b.flags[s].assign(n, 0);
        }
        g_block = &b;
        g_body = &fn;
        blockIdx = dim3(bx, by, bz);
        for (int i = 0; i < n; ++i) {
          getcontext(&b.ctx[i]);
          b.ctx[i].uc_stack.ss_sp = g_stacks[i].data();
          b.ctx[i].uc_stack.ss_size = g_stacks[i].size();
          b.ctx[i].uc_link = &b.scheduler;
          makecontext(&b.ctx[i], fiber_entry, 0);
        }
        while (b.alive > 0) {
          const long before = b.progress;
          for (int i = 0; i < n; ++i) {
            if (b.finished[i]) continue;
            b.current = i;
            set_thread_index(i);
            swapcontext(&b.scheduler, &b.ctx[i]);
          }
          if (b.alive > 0 && b.progress == before) {
            g_error = "deadlock: a barrier or warp intrinsic is not reached by every thread";
            break;
          }
        }
        g_block = nullptr;
        if (!g_error.empty()) return;
      }
}

}  // namespace cuda_emu

inline cudaError_t cudaGetLastError() {
  return cuda_emu::g_error.empty() ? cudaSuccess : cudaErrorUnknown;
}
inline const char* cudaGetErrorString(cudaError_t err) {
  return err == cudaSuccess ? "no error" : cuda_emu::g_error.c_str();
}

#define DREAMLAB_LAUNCH(kernel, grid, block, stream, ...) \
  ::cuda_emu::launch((grid), (block), [&] { kernel(__VA_ARGS__); })

inline void __syncthreads() { cuda_emu::block_barrier(); }

inline int __syncthreads_count(int predicate) {
  cuda_emu::Block& b = *cuda_emu::g_block;
  const int slot = b.block_gen & 1;
  b.count[slot] += predicate != 0;
  cuda_emu::block_barrier();
  return b.count[slot];
}

template <typename T>
T __shfl_down_sync(unsigned /*mask*/, T value, int delta) {
  cuda_emu::Block& b = *cuda_emu::g_block;
  const int w = cuda_emu::warp_id(), lane = cuda_emu::lane_id();
  const int slot = b.warp_gen[w] & 1;
  b.shfl[slot][32 * w + lane] = static_cast<double>(value);
  cuda_emu::warp_barrier();
  const int src = lane + delta;
  return src < cuda_emu::warp_size(w) ? static_cast<T>(b.shfl[slot][32 * w + src]) : value;
}

inline int __any_sync(unsigned /*mask*/, int predicate) {
  cuda_emu::Block& b = *cuda_emu::g_block;
  const int w = cuda_emu::warp_id(), lane = cuda_emu::lane_id();
  const int slot = b.warp_gen[w] & 1;
  b.flags[slot][32 * w + lane] = predicate != 0;
  cuda_emu::warp_barrier();
  int any = 0;
  for (int l = 0; l < cuda_emu::warp_size(w); ++l) any |= b.flags[slot][32 * w + l];
  return any;
}

// One OS thread runs every fiber and switches only at barriers: plain read-modify-writes are
// atomic here.
template <typename T>
T atomicAdd(T* address, T value) {
  const T old = *address;
  *address = old + value;
  return old;
}
inline int atomicMax(int* address, int value) {
  const int old = *address;
  *address = std::max(old, value);
  return old;
}

inline float __fmul_rn(float a, float b) { return a * b; }
inline double __dmul_rn(double a, double b) { return a * b; }
inline float __fadd_rn(float a, float b) { return a + b; }
inline double __dadd_rn(double a, double b) { return a + b; }
