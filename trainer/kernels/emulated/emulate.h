// The CUDA features ../ops.cu uses, emulated on the host, so its kernels' logic (indexing, block
// reductions, the order of writes) is checked where there is no GPU (check.cpp, run by
// tests/kernels.rs). Blocks run one at a time, each of its 256 threads a std::thread;
// __syncthreads is a barrier, a warp shuffle an exchange through memory between two barriers of
// the warp, __shared__ a static (one block at a time shares it as a block would). Not emulated:
// timing, memory ordering beyond the barriers, and every CUDA feature ops.cu does not use.
#pragma once
#include <barrier>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <math.h>
#include <memory>
#include <thread>
#include <vector>
using std::exp;
using std::log;
using std::sqrt;
#define __global__
#define __device__
#define __forceinline__ inline
#define __launch_bounds__(x)
#define __shared__ static
struct dim3 {
  unsigned x = 0, y = 0, z = 0;
};
inline thread_local dim3 threadIdx, blockIdx;
struct __nv_bfloat16 {
  uint16_t bits;
};
struct __half {
  _Float16 v;
};
inline float __bfloat162float(__nv_bfloat16 b) {
  uint32_t u = uint32_t(b.bits) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
inline __nv_bfloat16 __float2bfloat16(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  if (std::isnan(f))
    return {0x7fc0};
  uint32_t r = ((u >> 16) & 1) + 0x7fff;
  return {uint16_t((u + r) >> 16)};
}
inline float __half2float(__half h) { return float(h.v); }
inline __half __float2half(float f) { return {_Float16(f)}; }
inline std::barrier<> *block_barrier;
inline std::barrier<> *warp_barriers[8];
inline double exchange[256];
inline void __syncthreads() { block_barrier->arrive_and_wait(); }
template <typename V> V __shfl_xor_sync(unsigned, V v, int offset) {
  unsigned t = threadIdx.x, warp = t / 32, lane = t % 32;
  exchange[t] = double(v);
  warp_barriers[warp]->arrive_and_wait();
  V other = V(exchange[warp * 32 + (lane ^ offset)]);
  warp_barriers[warp]->arrive_and_wait();
  return other;
}
template <typename F> void launch(unsigned grid, F kernel) {
  for (unsigned b = 0; b < grid; b++) {
    std::barrier<> block(256);
    block_barrier = &block;
    std::vector<std::unique_ptr<std::barrier<>>> warps;
    for (int w = 0; w < 8; w++)
      warps.push_back(std::make_unique<std::barrier<>>(32));
    for (int w = 0; w < 8; w++)
      warp_barriers[w] = warps[w].get();
    std::vector<std::thread> threads;
    for (unsigned t = 0; t < 256; t++)
      threads.emplace_back([&, t] {
        threadIdx.x = t;
        blockIdx.x = b;
        kernel();
      });
    for (auto &th : threads)
      th.join();
  }
}
