// The trainer's fused ops (model/fused.rs has the same arithmetic for the CPU, and the checks of
// both against the composed forms). Each is one pass over matrices the composed forms crossed
// several times: attention's masked softmax and its gradient (the broadcast mask add, softmax,
// casts and broadcast subtract took 33 ms a layer at the benchmark's size on an H200, against
// about 1 ms of memory traffic), the distillation loss over the vocabulary with its gradient,
// RMSNorm, a residual connection's add in place, RMSNorm's gradient (ten composed ops on f32
// copies) with the residual gradient added, the MLP's gate and the rotary embedding of
// the stacked projections' output, each with its gradient, and the gradient of selecting rows.
// One block per row (the norms: a warp); sums in f32 (f64 for f64). Attention in tiles, which
// replaces the softmax's two where it applies, is in attention.cuh (included at the end: one
// module).
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <math.h>
#include <stdint.h>

#define THREADS 256

template <typename T> struct Wide {
  typedef float type;
};
template <> struct Wide<double> {
  typedef double type;
};

__device__ __forceinline__ float widen(__nv_bfloat16 x) { return __bfloat162float(x); }
__device__ __forceinline__ float widen(__half x) { return __half2float(x); }
__device__ __forceinline__ float widen(float x) { return x; }
__device__ __forceinline__ double widen(double x) { return x; }

__device__ __forceinline__ void store(__nv_bfloat16 *to, float x) { *to = __float2bfloat16(x); }
__device__ __forceinline__ void store(__half *to, float x) { *to = __float2half(x); }
__device__ __forceinline__ void store(float *to, float x) { *to = x; }
__device__ __forceinline__ void store(double *to, double x) { *to = x; }

// The running maximum of a row's visible scores and the sum of their exponentials relative to
// it. An empty part (nothing visible) has max -inf and sum 0.
template <typename A> struct MaxSum {
  A max;
  A sum;
};

template <typename A> __device__ __forceinline__ MaxSum<A> merge(MaxSum<A> a, MaxSum<A> b) {
  // exp(-inf - -inf) would be NaN: an empty side leaves the other as it is.
  if (a.max == -INFINITY)
    return b;
  if (b.max == -INFINITY)
    return a;
  const A max = a.max > b.max ? a.max : b.max;
  return MaxSum<A>{max, a.sum * exp(a.max - max) + b.sum * exp(b.max - max)};
}

// Every thread of the block gets the merge of all threads' parts. blockDim.x is THREADS.
template <typename A> __device__ MaxSum<A> merge_block(MaxSum<A> part) {
  __shared__ A maxes[THREADS / 32];
  __shared__ A sums[THREADS / 32];
  for (int offset = 16; offset > 0; offset /= 2) {
    const MaxSum<A> other = {__shfl_xor_sync(0xffffffffu, part.max, offset),
                             __shfl_xor_sync(0xffffffffu, part.sum, offset)};
    part = merge(part, other);
  }
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  if (lane == 0) {
    maxes[warp] = part.max;
    sums[warp] = part.sum;
  }
  __syncthreads();
  if (warp == 0) {
    part = lane < THREADS / 32 ? MaxSum<A>{maxes[lane], sums[lane]} : MaxSum<A>{-INFINITY, 0};
    for (int offset = 16; offset > 0; offset /= 2) {
      const MaxSum<A> other = {__shfl_xor_sync(0xffffffffu, part.max, offset),
                               __shfl_xor_sync(0xffffffffu, part.sum, offset)};
      part = merge(part, other);
    }
    if (lane == 0) {
      maxes[0] = part.max;
      sums[0] = part.sum;
    }
  }
  __syncthreads();
  return MaxSum<A>{maxes[0], sums[0]};
}

// A row's maximum and sum of exponentials relative to it, of value(j) for j < columns, in every
// thread of the block.
template <typename A, typename Value>
__device__ MaxSum<A> row_max_sum(uint32_t columns, Value value) {
  MaxSum<A> part = {-INFINITY, 0};
#pragma unroll 4
  for (uint32_t j = threadIdx.x; j < columns; j += THREADS) {
    const A v = value(j);
    if (v > part.max) {
      part.sum = part.sum * exp(part.max - v) + 1;
      part.max = v;
    } else if (v != -INFINITY) {
      part.sum += exp(v - part.max);
    }
  }
  return merge_block(part);
}

// out = softmax(scores + mask) over each row of `columns`. Scores are `[B, heads, length,
// columns]`, the mask `[B, length, columns]`. Block i takes head i % heads of mask row i / heads
// (sequence, position): the heads that add one mask row run side by side, so it is read from
// memory once and from the cache by the others. A row with nothing visible is all zeros.
template <typename T>
__device__ void masked_softmax(const T *__restrict__ scores, const T *__restrict__ mask,
                               T *__restrict__ out, uint32_t columns, uint32_t length,
                               uint32_t heads) {
  typedef typename Wide<T>::type A;
  const size_t mask_row = blockIdx.x / heads, head = blockIdx.x % heads;
  const size_t sequence = mask_row / length, position = mask_row % length;
  const size_t row = (sequence * heads + head) * length + position;
  const T *__restrict__ x = scores + row * columns;
  const T *__restrict__ m = mask + mask_row * columns;
  T *__restrict__ y = out + row * columns;
  const MaxSum<A> whole =
      row_max_sum<A>(columns, [&](uint32_t j) { return (A)widen(x[j]) + (A)widen(m[j]); });
  const A scale = whole.max == -INFINITY ? (A)0 : (A)1 / whole.sum;
#pragma unroll 4
  for (uint32_t j = threadIdx.x; j < columns; j += THREADS) {
    const A v = (A)widen(x[j]) + (A)widen(m[j]);
    store(&y[j], v == -INFINITY ? (A)0 : exp(v - whole.max) * scale);
  }
}

// The softmax's input gradient, out = p * (dp - sums[row]), where sums[row] is the row's sum of
// p * dp (the caller has it from narrower tensors: dO . O).
template <typename T>
__device__ void softmax_gradient(const T *__restrict__ p, const T *__restrict__ dp,
                                 const typename Wide<T>::type *__restrict__ sums,
                                 T *__restrict__ out, uint32_t columns) {
  typedef typename Wide<T>::type A;
  const size_t row = blockIdx.x;
  const A sum = sums[row];
#pragma unroll 4
  for (uint32_t j = threadIdx.x; j < columns; j += THREADS) {
    const size_t i = row * columns + j;
    store(&out[i], (A)widen(p[i]) * ((A)widen(dp[i]) - sum));
  }
}

// 16 bytes of elements, one load or store: the ops over the vocabulary's rows spent their time
// issuing a load of 2 bytes an element.
template <typename T> struct __align__(16) Pack {
  static constexpr uint32_t N = 16 / sizeof(T);
  T v[N];
};

// Whether rows of `columns` at these pointers are read and written a Pack at a time: each
// aligned, and whole Packs a row.
template <typename T, typename... More>
__device__ __forceinline__ bool packed(uint32_t columns, const T *x, const More *...more) {
  const auto aligned = [](const void *p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; };
  return columns % Pack<T>::N == 0 && aligned(x) && (aligned(more) && ...);
}
template <typename T> __device__ __forceinline__ Pack<T> load_pack(const T *p) {
  return *reinterpret_cast<const Pack<T> *>(p);
}
template <typename T> __device__ __forceinline__ void store_pack(T *p, const Pack<T> &pack) {
  *reinterpret_cast<Pack<T> *>(p) = pack;
}

// The log-sum-exp of a row, in every thread of the block.
template <typename T>
__device__ typename Wide<T>::type row_log_sum(const T *__restrict__ x, uint32_t columns) {
  typedef typename Wide<T>::type A;
  MaxSum<A> part = {-INFINITY, 0};
  // n elements from v into the thread's part: at most one rescale for all of them.
  const auto add = [&](const T *v, uint32_t n) {
    A top = part.max;
    for (uint32_t i = 0; i < n; i++)
      top = fmax(top, (A)widen(v[i]));
    // exp(-inf - -inf) would be NaN: nothing seen yet (or nothing but -inf) adds nothing.
    if (top == -INFINITY)
      return;
    if (top > part.max) {
      part.sum *= exp(part.max - top);
      part.max = top;
    }
    for (uint32_t i = 0; i < n; i++)
      part.sum += exp((A)widen(v[i]) - top);
  };
  if (packed(columns, x)) {
    constexpr uint32_t N = Pack<T>::N;
#pragma unroll 2
    for (uint32_t j = threadIdx.x * N; j < columns; j += THREADS * N) {
      const Pack<T> pack = load_pack(x + j);
      add(pack.v, N);
    }
  } else {
    for (uint32_t j = threadIdx.x; j < columns; j += THREADS)
      add(x + j, 1);
  }
  const MaxSum<A> whole = merge_block(part);
  return whole.max + log(whole.sum);
}

// The cross-entropy of each row of logits `[rows, columns]` against a teacher's top k
// (`ids`, `probabilities` `[rows, k]`): -sum_s p_s * log softmax(x)[id_s], into out[row], and
// the row's log-sum-exp, which the gradient takes, into out[rows + row]. An id outside the row
// counts for nothing (the caller checks ids; this only keeps reads in bounds).
template <typename T>
__device__ void top_k_cross_entropy(const T *__restrict__ logits, const uint32_t *__restrict__ ids,
                                    const typename Wide<T>::type *__restrict__ probabilities,
                                    typename Wide<T>::type *__restrict__ out, uint32_t columns,
                                    uint32_t k, uint32_t rows) {
  typedef typename Wide<T>::type A;
  const size_t row = blockIdx.x;
  const T *__restrict__ x = logits + row * columns;
  const A log_sum = row_log_sum(x, columns);
  if (threadIdx.x == 0) {
    A loss = 0;
    for (uint32_t s = 0; s < k; s++) {
      const uint32_t id = ids[row * k + s];
      if (id < columns)
        loss -= probabilities[row * k + s] * ((A)widen(x[id]) - log_sum);
    }
    out[row] = loss;
    out[rows + row] = log_sum;
  }
}

// Its gradient for the logits, times each row's incoming gradient `grad`:
// grad * (mass * softmax(x) - p at the teacher's ids), mass being the row's sum of p, softmax
// from the log-sum-exps the loss gave (`log_sums` `[rows]`): one read of the logits.
template <typename T>
__device__ void
top_k_cross_entropy_gradient(const T *__restrict__ logits, const uint32_t *__restrict__ ids,
                             const typename Wide<T>::type *__restrict__ probabilities,
                             const typename Wide<T>::type *__restrict__ log_sums,
                             const typename Wide<T>::type *__restrict__ grad, T *__restrict__ out,
                             uint32_t columns, uint32_t k) {
  typedef typename Wide<T>::type A;
  const size_t row = blockIdx.x;
  const T *__restrict__ x = logits + row * columns;
  T *__restrict__ y = out + row * columns;
  const uint32_t *__restrict__ id = ids + row * k;
  const A *p = probabilities + row * k;
  const A log_sum = log_sums[row];
  A mass = 0;
  for (uint32_t s = 0; s < k; s++)
    mass += p[s];
  const A g = grad[row], scale = g * mass;
  if (packed(columns, x, y)) {
    constexpr uint32_t N = Pack<T>::N;
#pragma unroll 2
    for (uint32_t j = threadIdx.x * N; j < columns; j += THREADS * N) {
      const Pack<T> in = load_pack(x + j);
      Pack<T> result;
#pragma unroll
      for (uint32_t i = 0; i < N; i++)
        store(&result.v[i], scale * exp((A)widen(in.v[i]) - log_sum));
      store_pack(y + j, result);
    }
  } else {
    for (uint32_t j = threadIdx.x; j < columns; j += THREADS)
      store(&y[j], scale * exp((A)widen(x[j]) - log_sum));
  }
  // The teacher's columns again, by one thread, each with all the probability its id has
  // (padding slots may repeat an id): rounded once, not a correction of a rounded value.
  __syncthreads();
  if (threadIdx.x == 0) {
    for (uint32_t s = 0; s < k; s++) {
      if (id[s] >= columns)
        continue;
      A target = 0;
      for (uint32_t t = 0; t < k; t++) {
        if (id[t] == id[s])
          target += p[t];
      }
      store(&y[id[s]], g * (mass * exp((A)widen(x[id[s]]) - log_sum) - target));
    }
  }
}

// The norms' kernels take a warp a row, THREADS / 32 rows a block: rows of a few hundred
// columns (SmolLM2's 576) would leave most of a block's threads idle, and its barriers wait.
// Grid ceil(rows / (THREADS / 32)); the row of this thread's warp, and its lane.
__device__ __forceinline__ size_t warp_row() {
  return (size_t)blockIdx.x * (THREADS / 32) + threadIdx.x / 32;
}

// A sum over the warp, in every lane.
template <typename A> __device__ __forceinline__ A warp_sum(A x) {
  for (int offset = 16; offset > 0; offset /= 2)
    x += __shfl_xor_sync(0xffffffffu, x, offset);
  return x;
}

// RMSNorm, w * x * (mean(x^2) + eps)^-1/2, per row of `columns`.
template <typename T>
__device__ void rms_norm(const T *__restrict__ x, const T *__restrict__ weight,
                         T *__restrict__ out, uint32_t columns, uint32_t rows, float eps) {
  typedef typename Wide<T>::type A;
  const size_t row = warp_row();
  const uint32_t lane = threadIdx.x % 32;
  // A whole warp leaves together: no barrier waits for it.
  if (row >= rows)
    return;
  const T *__restrict__ xr = x + row * columns;
  T *__restrict__ y = out + row * columns;
  A squares = 0;
#pragma unroll 4
  for (uint32_t j = lane; j < columns; j += 32) {
    const A v = widen(xr[j]);
    squares += v * v;
  }
  const A r = (A)1 / sqrt(warp_sum(squares) / (A)columns + (A)eps);
#pragma unroll 4
  for (uint32_t j = lane; j < columns; j += 32)
    store(&y[j], (A)widen(xr[j]) * r * (A)widen(weight[j]));
}

// sum += x per row of `columns`, in place: a residual connection's add, into the buffer of the
// branch's output (which nothing else holds), so that no third buffer is written.
template <typename T>
__device__ void add_in_place(const T *__restrict__ x, T *__restrict__ sum, uint32_t columns,
                             uint32_t rows) {
  typedef typename Wide<T>::type A;
  const size_t row = warp_row();
  const uint32_t lane = threadIdx.x % 32;
  if (row >= rows)
    return;
  T *__restrict__ s = sum + row * columns;
  const T *__restrict__ a = x + row * columns;
  if (packed(columns, s, a)) {
    constexpr uint32_t N = Pack<T>::N;
    for (uint32_t j = lane * N; j < columns; j += 32 * N) {
      Pack<T> total = load_pack(s + j);
      const Pack<T> more = load_pack(a + j);
#pragma unroll
      for (uint32_t i = 0; i < N; i++)
        store(&total.v[i], (A)widen(total.v[i]) + (A)widen(more.v[i]));
      store_pack(s + j, total);
    }
  } else {
    for (uint32_t j = lane; j < columns; j += 32)
      store(&s[j], (A)widen(s[j]) + (A)widen(a[j]));
  }
}

// RMSNorm's input gradient for y = w * x * r, r = (mean(x^2) + eps)^-1/2, per row of `columns`:
// dx = r * g * w - x * r^3 * mean(g * w * x), plus, where `residual` is not null, the gradient
// that reaches x around the norm (a residual connection's), in the same pass: the add would
// read and write as much again.
template <typename T>
__device__ void rms_norm_gradient(const T *__restrict__ x, const T *__restrict__ grad,
                                  const T *__restrict__ weight, const T *__restrict__ residual,
                                  T *__restrict__ out, uint32_t columns, uint32_t rows,
                                  float eps) {
  typedef typename Wide<T>::type A;
  const size_t row = warp_row();
  const uint32_t lane = threadIdx.x % 32;
  if (row >= rows)
    return;
  const T *__restrict__ xr = x + row * columns;
  const T *__restrict__ g = grad + row * columns;
  T *__restrict__ y = out + row * columns;
  const T *__restrict__ around = residual ? residual + row * columns : nullptr;
  A squares = 0, dot = 0;
#pragma unroll 4
  for (uint32_t j = lane; j < columns; j += 32) {
    const A v = (A)widen(xr[j]);
    squares += v * v;
    dot += (A)widen(g[j]) * (A)widen(weight[j]) * v;
  }
  squares = warp_sum(squares);
  dot = warp_sum(dot);
  const A r = (A)1 / sqrt(squares / (A)columns + (A)eps);
  const A c = dot / (A)columns * r * r * r;
#pragma unroll 4
  for (uint32_t j = lane; j < columns; j += 32) {
    const A rest = around ? (A)widen(around[j]) : (A)0;
    store(&y[j], r * (A)widen(g[j]) * (A)widen(weight[j]) - (A)widen(xr[j]) * c + rest);
  }
}

// The gradient of selecting rows of x `[rows, columns]`, each at most once: row r of out is row
// source[r] of the selected rows' gradient, or zeros where source[r] is UINT32_MAX (not
// selected). Every element is written: no zeroing pass, no atomics.
template <typename T>
__device__ void place_rows(const T *__restrict__ selected, const uint32_t *__restrict__ source,
                           T *__restrict__ out, uint32_t columns) {
  typedef typename Wide<T>::type A;
  const size_t row = blockIdx.x;
  const uint32_t from = source[row];
  T *__restrict__ y = out + row * columns;
#pragma unroll 4
  for (uint32_t j = threadIdx.x; j < columns; j += THREADS) {
    if (from == UINT32_MAX) {
      store(&y[j], (A)0);
    } else {
      y[j] = selected[(size_t)from * columns + j];
    }
  }
}

// out = silu(gate)·up over rows of `columns`, a row's gate and up side by side in `gate_up`
// `[rows, 2 · columns]` (one projection makes both).
template <typename T>
__device__ void swiglu(const T *__restrict__ gate_up, T *__restrict__ out, uint32_t columns) {
  typedef typename Wide<T>::type A;
  const size_t row = blockIdx.x;
  const T *__restrict__ gate = gate_up + row * 2 * columns;
  const T *__restrict__ up = gate + columns;
  T *__restrict__ y = out + row * columns;
  const auto silu_times = [](A g, A u) { return g / ((A)1 + exp(-g)) * u; };
  if (packed(columns, gate, y)) {
    constexpr uint32_t N = Pack<T>::N;
    for (uint32_t j = threadIdx.x * N; j < columns; j += THREADS * N) {
      const Pack<T> g = load_pack(gate + j), u = load_pack(up + j);
      Pack<T> result;
#pragma unroll
      for (uint32_t i = 0; i < N; i++)
        store(&result.v[i], silu_times(widen(g.v[i]), widen(u.v[i])));
      store_pack(y + j, result);
    }
  } else {
    for (uint32_t j = threadIdx.x; j < columns; j += THREADS)
      store(&y[j], silu_times(widen(gate[j]), widen(up[j])));
  }
}

// The gradients of silu(gate)·up given the output's, laid out as gate_up: each row's d gate,
// then its d up.
template <typename T>
__device__ void swiglu_gradient(const T *__restrict__ gate_up, const T *__restrict__ grad,
                                T *__restrict__ out, uint32_t columns) {
  typedef typename Wide<T>::type A;
  const size_t row = blockIdx.x;
  const T *__restrict__ gate = gate_up + row * 2 * columns;
  const T *__restrict__ up = gate + columns;
  const T *__restrict__ d = grad + row * columns;
  T *__restrict__ d_gate = out + row * 2 * columns;
  T *__restrict__ d_up = d_gate + columns;
  // Column j's two gradients, into d_gate_j and d_up_j.
  const auto gradients = [](A g, A u, A d, T *d_gate_j, T *d_up_j) {
    const A sigmoid = (A)1 / ((A)1 + exp(-g));
    store(d_gate_j, d * u * sigmoid * ((A)1 + g * ((A)1 - sigmoid)));
    store(d_up_j, d * g * sigmoid);
  };
  if (packed(columns, gate, d, d_gate)) {
    constexpr uint32_t N = Pack<T>::N;
    for (uint32_t j = threadIdx.x * N; j < columns; j += THREADS * N) {
      const Pack<T> g = load_pack(gate + j), u = load_pack(up + j), dy = load_pack(d + j);
      Pack<T> dg, du;
#pragma unroll
      for (uint32_t i = 0; i < N; i++)
        gradients(widen(g.v[i]), widen(u.v[i]), widen(dy.v[i]), &dg.v[i], &du.v[i]);
      store_pack(d_gate + j, dg);
      store_pack(d_up + j, du);
    }
  } else {
    for (uint32_t j = threadIdx.x; j < columns; j += THREADS)
      gradients(widen(gate[j]), widen(up[j]), widen(d[j]), &d_gate[j], &d_up[j]);
  }
}

// The rotary embedding of a position's queries and keys, and a copy of its values, between the
// two layouts of a row (block `row` = sequence · length + position): `stacked`, one projection's
// output `[rows, (heads + 2 kv_heads) · dim]`, and `split`, the queries `[rows, heads, dim]`,
// the keys and the values `[rows, kv_heads, dim]` apart (as attention takes them). Forward
// (stacked to split, sign 1) rotates each head's pairs (x[i], x[i + half]) by the position's
// angles, cos and sin `[rows, half]`; backward (split to stacked, sign -1) by their opposite,
// which is the rotation's transpose. One pass where rotating the queries and the keys apart,
// then adding their gradients back through three projections, crossed them four times.
template <typename T>
__device__ void rope_qkv(const T *__restrict__ q, const T *__restrict__ k,
                         const T *__restrict__ v, T *__restrict__ q_out, T *__restrict__ k_out,
                         T *__restrict__ v_out, bool forward, const T *__restrict__ cos,
                         const T *__restrict__ sin, uint32_t heads, uint32_t kv_heads,
                         uint32_t half) {
  typedef typename Wide<T>::type A;
  const size_t row = blockIdx.x;
  const uint32_t dim = 2 * half, stacked = (heads + 2 * kv_heads) * dim;
  // Elements a row of each part, in, then out.
  const uint32_t query_in = forward ? stacked : heads * dim;
  const uint32_t key_in = forward ? stacked : kv_heads * dim;
  const uint32_t query_out = forward ? heads * dim : stacked;
  const uint32_t key_out = forward ? kv_heads * dim : stacked;
  const A sign = forward ? (A)1 : (A)-1;
  for (uint32_t x = threadIdx.x; x < (heads + kv_heads) * half; x += THREADS) {
    const uint32_t h = x / half, i = x % half;
    const bool query = h < heads;
    const T *__restrict__ from = query ? q + row * query_in + h * dim
                                       : k + row * key_in + (h - heads) * dim;
    T *__restrict__ to = query ? q_out + row * query_out + h * dim
                               : k_out + row * key_out + (h - heads) * dim;
    const A c = widen(cos[row * half + i]), s = sign * (A)widen(sin[row * half + i]);
    const A a = widen(from[i]), b = widen(from[i + half]);
    store(&to[i], a * c - b * s);
    store(&to[i + half], a * s + b * c);
  }
  for (uint32_t j = threadIdx.x; j < kv_heads * dim; j += THREADS)
    v_out[row * key_out + j] = v[row * key_in + j];
}

// One Adam step: param, its gradient and its moments `[2, rows, columns]` (first, second) give
// `[3, rows, columns]`, the new param then the new moments.
template <typename T>
__device__ void adam_step(const T *__restrict__ param, const T *__restrict__ grad,
                          const T *__restrict__ moments, T *__restrict__ out, uint32_t columns,
                          uint32_t rows, float lr, float beta1, float keep1, float beta2,
                          float keep2, float epsilon, float correction1, float correction2) {
  typedef typename Wide<T>::type A;
  const size_t base = (size_t)blockIdx.x * columns, n = (size_t)rows * columns;
  for (uint32_t j = threadIdx.x; j < columns; j += THREADS) {
    const size_t i = base + j;
    const A g = widen(grad[i]);
    const A first = widen(moments[i]) * (A)beta1 + g * (A)keep1;
    const A second = widen(moments[n + i]) * (A)beta2 + g * g * (A)keep2;
    const A step = (first / (A)correction1) / (sqrt(second / (A)correction2) + (A)epsilon);
    store(&out[i], widen(param[i]) - step * (A)lr);
    store(&out[n + i], first);
    store(&out[2 * n + i], second);
  }
}

#define KERNELS(T, NAME)                                                                           \
  extern "C" __global__ void __launch_bounds__(THREADS) masked_softmax_##NAME(                     \
      const T *__restrict__ scores, const T *__restrict__ mask, T *__restrict__ out,               \
      uint32_t columns, uint32_t length, uint32_t heads) {                                         \
    masked_softmax<T>(scores, mask, out, columns, length, heads);                                  \
  }                                                                                                \
  extern "C" __global__ void __launch_bounds__(THREADS) softmax_gradient_##NAME(                   \
      const T *__restrict__ p, const T *__restrict__ dp, const Wide<T>::type *__restrict__ sums,   \
      T *__restrict__ out, uint32_t columns) {                                                     \
    softmax_gradient<T>(p, dp, sums, out, columns);                                                \
  }                                                                                                \
  extern "C" __global__ void __launch_bounds__(THREADS)                                            \
      top_k_cross_entropy_##NAME(const T *__restrict__ logits, const uint32_t *__restrict__ ids,   \
                                 const Wide<T>::type *__restrict__ probabilities,                  \
                                 Wide<T>::type *__restrict__ out, uint32_t columns, uint32_t k,    \
                                 uint32_t rows) {                                                  \
    top_k_cross_entropy<T>(logits, ids, probabilities, out, columns, k, rows);                     \
  }                                                                                                \
  extern "C" __global__ void __launch_bounds__(THREADS) top_k_cross_entropy_gradient_##NAME(       \
      const T *__restrict__ logits, const uint32_t *__restrict__ ids,                              \
      const Wide<T>::type *__restrict__ probabilities, const Wide<T>::type *__restrict__ log_sums, \
      const Wide<T>::type *__restrict__ grad, T *__restrict__ out, uint32_t columns, uint32_t k) { \
    top_k_cross_entropy_gradient<T>(logits, ids, probabilities, log_sums, grad, out, columns, k);  \
  }                                                                                                \
  extern "C" __global__ void __launch_bounds__(THREADS)                                            \
      rms_norm_##NAME(const T *__restrict__ x, const T *__restrict__ weight, T *__restrict__ out,  \
                      uint32_t columns, uint32_t rows, float eps) {                                \
    rms_norm<T>(x, weight, out, columns, rows, eps);                                               \
  }                                                                                                \
  extern "C" __global__ void __launch_bounds__(THREADS) add_in_place_##NAME(                       \
      const T *__restrict__ x, T *__restrict__ sum, uint32_t columns, uint32_t rows) {             \
    add_in_place<T>(x, sum, columns, rows);                                                        \
  }                                                                                                \
  extern "C" __global__ void __launch_bounds__(THREADS) rms_norm_gradient_##NAME(                  \
      const T *__restrict__ x, const T *__restrict__ grad, const T *__restrict__ weight,           \
      T *__restrict__ out, uint32_t columns, uint32_t rows, float eps) {                           \
    rms_norm_gradient<T>(x, grad, weight, nullptr, out, columns, rows, eps);                       \
  }                                                                                                \
  extern "C" __global__ void __launch_bounds__(THREADS) rms_norm_gradient_add_##NAME(              \
      const T *__restrict__ x, const T *__restrict__ grad, const T *__restrict__ weight,           \
      const T *__restrict__ residual, T *__restrict__ out, uint32_t columns, uint32_t rows,        \
      float eps) {                                                                                 \
    rms_norm_gradient<T>(x, grad, weight, residual, out, columns, rows, eps);                      \
  }                                                                                                \
  extern "C" __global__ void __launch_bounds__(THREADS)                                            \
      place_rows_##NAME(const T *__restrict__ selected, const uint32_t *__restrict__ source,       \
                        T *__restrict__ out, uint32_t columns) {                                   \
    place_rows<T>(selected, source, out, columns);                                                 \
  }                                                                                                \
  extern "C" __global__ void __launch_bounds__(THREADS)                                            \
      swiglu_##NAME(const T *__restrict__ gate_up, T *__restrict__ out, uint32_t columns) {        \
    swiglu<T>(gate_up, out, columns);                                                              \
  }                                                                                                \
  extern "C" __global__ void __launch_bounds__(THREADS) swiglu_gradient_##NAME(                    \
      const T *__restrict__ gate_up, const T *__restrict__ grad, T *__restrict__ out,              \
      uint32_t columns) {                                                                          \
    swiglu_gradient<T>(gate_up, grad, out, columns);                                               \
  }                                                                                                \
  extern "C" __global__ void __launch_bounds__(THREADS) rope_qkv_##NAME(                           \
      const T *__restrict__ qkv, const T *__restrict__ cos, const T *__restrict__ sin,             \
      T *__restrict__ out, uint32_t heads, uint32_t kv_heads, uint32_t half, uint32_t rows) {      \
    const size_t dim = 2 * half, queries = (size_t)rows * heads * dim;                             \
    rope_qkv<T>(qkv, qkv + heads * dim, qkv + (heads + kv_heads) * dim, out, out + queries,        \
                out + queries + (size_t)rows * kv_heads * dim, true, cos, sin, heads, kv_heads,    \
                half);                                                                             \
  }                                                                                                \
  extern "C" __global__ void __launch_bounds__(THREADS) rope_qkv_gradient_##NAME(                  \
      const T *__restrict__ dq, const T *__restrict__ dk, const T *__restrict__ dv,                \
      const T *__restrict__ cos, const T *__restrict__ sin, T *__restrict__ out, uint32_t heads,   \
      uint32_t kv_heads, uint32_t half) {                                                          \
    const size_t dim = 2 * half;                                                                   \
    rope_qkv<T>(dq, dk, dv, out, out + heads * dim, out + (heads + kv_heads) * dim, false, cos,    \
                sin, heads, kv_heads, half);                                                       \
  }                                                                                                \
  extern "C" __global__ void __launch_bounds__(THREADS) adam_step_##NAME(                          \
      const T *__restrict__ param, const T *__restrict__ grad, const T *__restrict__ moments,      \
      T *__restrict__ out, uint32_t columns, uint32_t rows, float lr, float beta1, float keep1,    \
      float beta2, float keep2, float epsilon, float correction1, float correction2) {             \
    adam_step<T>(param, grad, moments, out, columns, rows, lr, beta1, keep1, beta2, keep2,         \
                 epsilon, correction1, correction2);                                               \
  }

KERNELS(__nv_bfloat16, bf16)
KERNELS(__half, f16)
KERNELS(float, f32)
KERNELS(double, f64)

#include "attention.cuh"
