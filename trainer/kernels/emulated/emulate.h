// The CUDA features ../ops.cu uses, emulated on the host, so its kernels' logic (indexing, block
// reductions, the order of writes, the tensor cores' fragment layouts) is checked where there is
// no GPU (check.cpp, run by tests/kernels.rs). Blocks run one at a time, each of its threads a
// std::thread; __syncthreads is a barrier, a warp shuffle an exchange through memory between two
// barriers of the warp, an mma the warp's registers gathered the same way and multiplied as the
// PTX ISA's fragment figures place them, __shared__ a static (one block at a time shares it as a
// block would). Not emulated: timing, memory ordering beyond the barriers, and every CUDA feature
// ops.cu does not use.
#pragma once
#include <atomic>
#include <barrier>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <deque>
#include <math.h>
#include <memory>
#include <thread>
#include <vector>
using std::exp;
using std::log;
using std::sqrt;
inline float __expf(float x) { return std::exp(x); }
inline float exp2_approx(float x) { return std::exp2(x); }
#define __global__
#define __device__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__ static
#define __align__(n) __attribute__((aligned(n)))
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
inline uint16_t __bfloat16_as_ushort(__nv_bfloat16 b) { return b.bits; }
inline uint16_t __half_as_ushort(__half h) {
  uint16_t u;
  std::memcpy(&u, &h, 2);
  return u;
}
inline __nv_bfloat16 __ushort_as_bfloat16(uint16_t u) { return {u}; }
inline __half __ushort_as_half(uint16_t u) {
  __half h;
  std::memcpy(&h, &u, 2);
  return h;
}
inline uint32_t load2(const uint16_t *p) { return uint32_t(p[0]) | uint32_t(p[1]) << 16; }
inline void zero16(uint16_t *to) { std::memset(to, 0, 16); }
inline void add2(float *to, float low, float high) {
  std::atomic_ref<float>(to[0]).fetch_add(low);
  std::atomic_ref<float>(to[1]).fetch_add(high);
}
inline void add4(float *to, float a, float b, float c, float d) {
  if (reinterpret_cast<uintptr_t>(to) % 16 != 0)
    std::abort(); // a float4 atomic needs a 16-byte aligned address
  add2(to, a, b);
  add2(to + 2, c, d);
}
// cp.async: each thread's copies wait in its groups until wait_async lets them land, so a kernel
// that reads a tile before waiting for it reads what was there before.
struct AsyncCopy {
  void *to;
  const void *from;
  size_t bytes;
};
inline thread_local std::vector<AsyncCopy> open_copies;
inline thread_local std::deque<std::vector<AsyncCopy>> copy_groups;
inline void copy16_async(uint16_t *to, const uint16_t *from) {
  if (reinterpret_cast<uintptr_t>(to) % 16 != 0 || reinterpret_cast<uintptr_t>(from) % 16 != 0)
    std::abort(); // cp.async of 16 bytes needs 16-byte aligned addresses
  open_copies.push_back({to, from, 16});
}
inline void copy4_async(void *to, const void *from) { open_copies.push_back({to, from, 4}); }
inline void commit_async() {
  copy_groups.push_back(std::move(open_copies));
  open_copies.clear();
}
template <int N> void wait_async() {
  while (copy_groups.size() > N) {
    for (const AsyncCopy &copy : copy_groups.front())
      std::memcpy(copy.to, copy.from, copy.bytes);
    copy_groups.pop_front();
  }
}
inline int __ffs(unsigned x) { return __builtin_ffs(int(x)); }
inline unsigned atomicOr(unsigned *to, unsigned x) {
  return std::atomic_ref<unsigned>(*to).fetch_or(x);
}
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
// The element a half of an mma operand register holds, as a float.
inline float element(__nv_bfloat16, uint16_t bits) { return __bfloat162float({bits}); }
inline float element(__half, uint16_t bits) {
  __half h;
  std::memcpy(&h, &bits, 2);
  return __half2float(h);
}
struct MmaLane {
  uint32_t a[4], b[2];
};
inline MmaLane mma_lanes[256];
// mma.sync.aligned.m16n8k16.row.col.f32.{bf16,f16}: d += A · B for the warp's 16 x 16 A and
// 16 x 8 B, each lane holding the fragment registers the PTX ISA's figures give it.
template <typename T> void mma(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  const unsigned t = threadIdx.x, warp = t / 32, lane = t % 32;
  MmaLane *lanes = &mma_lanes[warp * 32];
  lanes[lane] = {{a[0], a[1], a[2], a[3]}, {b0, b1}};
  warp_barriers[warp]->arrive_and_wait();
  const auto half = [](uint32_t r, int k) { return uint16_t(k % 2 ? r >> 16 : r & 0xffff); };
  // A[r][k]: lane 4 (r % 8) + (k % 8) / 2, register r / 8 + 2 (k / 8). B[k][n]: lane
  // 4 n + (k % 8) / 2, register k / 8. In each register, k % 2 picks the half.
  const auto A = [&](int r, int k) {
    return element(T{}, half(lanes[4 * (r % 8) + (k % 8) / 2].a[r / 8 + 2 * (k / 8)], k));
  };
  const auto B = [&](int k, int n) {
    return element(T{}, half(lanes[4 * n + (k % 8) / 2].b[k / 8], k));
  };
  float out[4];
  for (int e = 0; e < 4; e++) {
    const int r = lane / 4 + 8 * (e / 2), n = 2 * (lane % 4) + e % 2;
    double sum = 0;
    for (int k = 0; k < 16; k++)
      sum += double(A(r, k)) * B(k, n);
    out[e] = d[e] + float(sum);
  }
  warp_barriers[warp]->arrive_and_wait();
  for (int e = 0; e < 4; e++)
    d[e] = out[e];
}
inline const uint16_t *ldmatrix_rows[256];
// ldmatrix.sync.aligned.m8n8.x4[.trans].shared.b16: lane 8j + r gives the address of row r of
// 8 x 8 block j; register j of lane i gets block j's row i / 4, columns 2 (i % 4) and one more
// (low half first), or, transposed, rows 2 (i % 4) and one more of column i / 4.
template <bool Transposed> void ldmatrix_x4(uint32_t (&d)[4], const uint16_t *row) {
  const unsigned t = threadIdx.x, warp = t / 32, lane = t % 32;
  if (reinterpret_cast<uintptr_t>(row) % 16 != 0)
    std::abort(); // ldmatrix needs 16-byte aligned rows
  const uint16_t **rows = &ldmatrix_rows[warp * 32];
  rows[lane] = row;
  warp_barriers[warp]->arrive_and_wait();
  uint32_t out[4];
  for (int j = 0; j < 4; j++) {
    uint16_t low, high;
    if (Transposed) {
      low = rows[8 * j + 2 * (lane % 4)][lane / 4];
      high = rows[8 * j + 2 * (lane % 4) + 1][lane / 4];
    } else {
      low = rows[8 * j + lane / 4][2 * (lane % 4)];
      high = rows[8 * j + lane / 4][2 * (lane % 4) + 1];
    }
    out[j] = uint32_t(low) | uint32_t(high) << 16;
  }
  warp_barriers[warp]->arrive_and_wait();
  for (int j = 0; j < 4; j++)
    d[j] = out[j];
}
inline void ldmatrix(uint32_t (&d)[4], const uint16_t *row) { ldmatrix_x4<false>(d, row); }
inline void ldmatrix_trans(uint32_t (&d)[4], const uint16_t *row) { ldmatrix_x4<true>(d, row); }
// Runs `kernel` for each block of the grid, `threads` (a multiple of 32, at most 256) to a block.
template <typename F> void launch(dim3 grid, unsigned threads, F kernel) {
  for (unsigned y = 0; y < grid.y; y++)
    for (unsigned x = 0; x < grid.x; x++) {
      std::barrier<> block(threads);
      block_barrier = &block;
      std::vector<std::unique_ptr<std::barrier<>>> warps;
      for (unsigned w = 0; w < threads / 32; w++)
        warps.push_back(std::make_unique<std::barrier<>>(32));
      for (unsigned w = 0; w < threads / 32; w++)
        warp_barriers[w] = warps[w].get();
      std::vector<std::thread> running;
      for (unsigned t = 0; t < threads; t++)
        running.emplace_back([&, t] {
          threadIdx.x = t;
          blockIdx.x = x;
          blockIdx.y = y;
          kernel();
        });
      for (auto &thread : running)
        thread.join();
    }
}
// One block of 256 threads per row, as ops.cu's row kernels run.
template <typename F> void launch(unsigned rows, F kernel) {
  launch(dim3{rows, 1, 1}, 256, kernel);
}
