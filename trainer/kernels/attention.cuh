// Attention in tiles on the tensor cores (FlashAttention-2's scheme), forward and backward, so
// the `[rows, columns]` score matrices of a layer are never written to memory: the composed form
// (two matmuls around the fused masked softmax, and five with its gradient) moves them several
// times a layer. Heads of 64 dimensions, bf16 or f16 (mma.sync m16n8k16, f32 sums).
//
// Layouts (contiguous): per (sequence, key head) `head` = sequence · kv_heads + key head, its rows
// = group · length (the query heads sharing the key head stacked: row r is query head r / length of
// the group, position r % length), its columns = shared + length keys and values (KeyRows), and
// each row's log-sum-exp of its scaled, visible scores, in base 2 (f32, `[head, rows]`; +inf for a
// row with nothing visible, whose output is zeros): the backward's probabilities are then
// 2^(scale · log2(e) · s - lse), one multiply-add and the special function unit's 2^x an element,
// as FlashAttention computes them (e^x is 2^(x · log2 e)), and so are the forward's. The queries,
// the output and their gradients are as the projections make and take them, `[sequences, length,
// kv_heads · group, 64]` (QueryRows). What a row sees is spans, not a mask: every row the first
// `prefix` keys (a cartridge, a context) and the keys [from, to] of its position's pair in `spans`
// `[sequences, length, 2]` (empty when from > to; a causal row's or a packed conversation's), two
// numbers a row where a mask's row is as many bytes as the keys, and it tells without a load which
// tiles a block can skip, and which it can take whole (every row seeing every key: no spans to
// compare). The forward also writes each tile of 64 rows' Reach, from which the backward knows
// which row tiles see its keys, and which see all of them.
//
// A forward block is 4 warps, a backward block 8. Fragments follow the PTX ISA's figures for
// mma.m16n8k16 (g = lane / 4, t = lane % 4): A (16 x 16) register i holds row g + 8 (i % 2),
// columns 2t + 8 (i / 2) and one more; B (16 x 8) register i holds rows 2t + 8 i and one more of
// column g; C (16 x 8) element e is row g + 8 (e / 2), column 2t + e % 2. Tiles in shared memory
// are rows of 72 elements: the 8 rows one fragment load reads start in 8 different banks. Tiles are
// loaded by cp.async, the next one while the tensor cores work on this one (two buffers).

#define FLASH_THREADS 128
#define TILE 64
// The forward's block: 4 warps, 32 rows each (two tiles of 16), which share each key and value
// fragment loaded: half the shared-memory loads a row that blocks of 64 rows make
// (FlashAttention-2's shape for heads of 64).
#define FORWARD_ROWS 128
// The backward's block: 8 warps, 16 keys each. Each tile of query rows it loads (Q, dO) and each
// dQ it adds by atomics then serves 128 keys: half the loads and atomics a key that blocks of 64
// keys make (FlashAttention-2's shape for heads of 64).
#define BACKWARD_THREADS 256
#define KEYS 128
#define HEAD_DIM 64
#define STRIDE 72
// The backward's bits of which row tiles see its keys: at most 32 · SEEN_WORDS row tiles
// (flash.rs sends larger attention to the composed form).
#define SEEN_WORDS 128
#define LOG2_E 1.4426950408889634f

__device__ __forceinline__ uint16_t bits(__nv_bfloat16 x) { return __bfloat16_as_ushort(x); }
__device__ __forceinline__ uint16_t bits(__half x) { return __half_as_ushort(x); }
template <typename T> __device__ __forceinline__ T narrow(float x);
template <> __device__ __forceinline__ __nv_bfloat16 narrow(float x) { return __float2bfloat16(x); }
template <> __device__ __forceinline__ __half narrow(float x) { return __float2half(x); }

__device__ __forceinline__ float widen_bits(__nv_bfloat16, uint32_t x) {
  return __bfloat162float(__ushort_as_bfloat16(uint16_t(x)));
}
__device__ __forceinline__ float widen_bits(__half, uint32_t x) {
  return __half2float(__ushort_as_half(uint16_t(x)));
}

#ifdef __CUDACC__
// 2^x by the special function unit alone (a result below 2^-126 is flushed to zero: a
// probability too small to matter).
__device__ __forceinline__ float exp2_approx(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}
#endif

__device__ __forceinline__ uint32_t pair(uint16_t low, uint16_t high) {
  return uint32_t(low) | uint32_t(high) << 16;
}
// Two floats rounded to T, as one register of an A fragment (the lower column in the low half).
template <typename T> __device__ __forceinline__ uint32_t pack(float low, float high) {
  return pair(bits(narrow<T>(low)), bits(narrow<T>(high)));
}

// Two adjacent 16-bit elements (4-byte aligned), as one register holds them, in one store.
__device__ __forceinline__ void store_pair(void *to, uint32_t both) {
#ifdef __CUDACC__
  *reinterpret_cast<uint32_t *>(to) = both;
#else
  memcpy(to, &both, 4);
#endif
}

// Two adjacent elements (4-byte aligned), rounded to T, in one store.
template <typename T> __device__ __forceinline__ void store2(T *to, float low, float high) {
  store_pair(to, pack<T>(low, high));
}

#ifdef __CUDACC__
// Two adjacent 16-bit elements, 4-byte aligned, in one load.
__device__ __forceinline__ uint32_t load2(const uint16_t *p) {
  return *reinterpret_cast<const uint32_t *>(p);
}
__device__ __forceinline__ void zero16(uint16_t *to) {
  *reinterpret_cast<uint4 *>(to) = make_uint4(0, 0, 0, 0);
}
// d += a · b for one 16 x 8 x 16 tile of the warp.
template <typename T>
__device__ __forceinline__ void mma(float (&d)[4], const uint32_t (&a)[4], uint32_t b0,
                                    uint32_t b1);
template <>
__device__ __forceinline__ void mma<__nv_bfloat16>(float (&d)[4], const uint32_t (&a)[4],
                                                   uint32_t b0, uint32_t b1) {
#if __CUDA_ARCH__ >= 800
  asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, "
               "{%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};"
               : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
               : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
#else
  __trap(); // No such tensor cores: flash.rs's `applies` keeps attention off these kernels.
#endif
}
template <>
__device__ __forceinline__ void mma<__half>(float (&d)[4], const uint32_t (&a)[4], uint32_t b0,
                                            uint32_t b1) {
#if __CUDA_ARCH__ >= 800
  asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, "
               "{%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};"
               : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
               : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
#else
  __trap(); // No such tensor cores: flash.rs's `applies` keeps attention off these kernels.
#endif
}

// Adds two adjacent floats (8-byte aligned): one vector atomic where the GPU has them (sm_90),
// half as many as scalar ones.
__device__ __forceinline__ void add2(float *to, float low, float high) {
#if __CUDA_ARCH__ >= 900
  atomicAdd(reinterpret_cast<float2 *>(to), make_float2(low, high));
#else
  atomicAdd(to, low);
  atomicAdd(to + 1, high);
#endif
}

// Adds four adjacent floats (16-byte aligned): one vector atomic where the GPU has them (sm_90).
__device__ __forceinline__ void add4(float *to, float a, float b, float c, float d) {
#if __CUDA_ARCH__ >= 900
  atomicAdd(reinterpret_cast<float4 *>(to), make_float4(a, b, c, d));
#else
  add2(to, a, b);
  add2(to + 2, c, d);
#endif
}

// cp.async: global to shared memory without passing through registers, in groups committed
// one after another; wait_async<N> waits until at most the N latest groups are in flight.
__device__ __forceinline__ void copy16_async(uint16_t *to, const uint16_t *from) {
#if __CUDA_ARCH__ >= 800
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;" ::"r"(
                   (uint32_t)__cvta_generic_to_shared(to)),
               "l"(from));
#else
  __trap();
#endif
}
__device__ __forceinline__ void copy4_async(void *to, const void *from) {
#if __CUDA_ARCH__ >= 800
  asm volatile("cp.async.ca.shared.global [%0], [%1], 4;" ::"r"(
                   (uint32_t)__cvta_generic_to_shared(to)),
               "l"(from));
#else
  __trap();
#endif
}
__device__ __forceinline__ void commit_async() {
#if __CUDA_ARCH__ >= 800
  asm volatile("cp.async.commit_group;");
#endif
}
template <int N> __device__ __forceinline__ void wait_async() {
#if __CUDA_ARCH__ >= 800
  asm volatile("cp.async.wait_group %0;" ::"n"(N));
#endif
}
#endif

// Where key r of a head (or value: the same for both) lies, in elements: the first `shared` in
// `[kv_heads, shared, 64]`, the same for every sequence (a cartridge's), the rest in the
// sequence's own `[sequences, length, kv_heads, 64]` (the projection's layout).
struct KeyRows {
  uint32_t shared, stride;
  size_t shared_first, own_first;
  __device__ __forceinline__ KeyRows(size_t head, uint32_t shared, uint32_t length,
                                     uint32_t kv_heads)
      : shared(shared), stride(kv_heads * HEAD_DIM),
        shared_first(head % kv_heads * shared * HEAD_DIM),
        own_first((head / kv_heads * length * kv_heads + head % kv_heads) * HEAD_DIM) {}
  // Own key r (r >= shared).
  __device__ __forceinline__ size_t own(uint32_t r) const {
    return own_first + (size_t)(r - shared) * stride;
  }
};

// Where row r of a key head's queries (or output, or a gradient of either) lies, in elements:
// `[sequences, length, kv_heads · group, 64]`, as the projections make and take them; row r is
// query head r / length of the group, position r % length.
struct QueryRows {
  size_t first;
  uint32_t length, stride;
  __device__ __forceinline__ QueryRows(size_t head, uint32_t rows, uint32_t length,
                                       uint32_t kv_heads)
      : length(length), stride(kv_heads * (rows / length) * HEAD_DIM) {
    first = head / kv_heads * length * stride + head % kv_heads * (rows / length) * HEAD_DIM;
  }
  __device__ __forceinline__ size_t operator()(uint32_t r) const {
    return first + (size_t)(r % length) * stride + (size_t)(r / length) * HEAD_DIM;
  }
};

// Row r's address, for load_tile and load_a: of a tensor laid out as QueryRows says, or of the
// shared and own parts of keys or values.
struct QueryRow {
  const QueryRows &at;
  const void *tensor;
  __device__ __forceinline__ const uint16_t *operator()(uint32_t r) const {
    return static_cast<const uint16_t *>(tensor) + at(r);
  }
};
struct KeyRow {
  const KeyRows &at;
  const void *shared_rows, *own_rows;
  __device__ __forceinline__ const uint16_t *operator()(uint32_t r) const {
    return r < at.shared
               ? static_cast<const uint16_t *>(shared_rows) + at.shared_first + (size_t)r * HEAD_DIM
               : static_cast<const uint16_t *>(own_rows) + at.own(r);
  }
};

// Rows [first, first + Rows) of `count` (row r at `row(r)`) into a tile (zeros past count), by
// cp.async, by a block of `Threads`: the copies are this thread's until it waits for them.
template <uint32_t Rows, uint32_t Threads, typename Row>
__device__ __forceinline__ void load_tile(uint16_t *tile, Row row, uint32_t first,
                                          uint32_t count) {
  for (uint32_t i = threadIdx.x; i < Rows * HEAD_DIM / 8; i += Threads) {
    const uint32_t r = i / (HEAD_DIM / 8), column = i % (HEAD_DIM / 8) * 8;
    uint16_t *to = tile + r * STRIDE + column;
    if (first + r < count)
      copy16_async(to, row(first + r) + column);
    else
      zero16(to);
  }
}

__device__ __forceinline__ uint32_t least(uint32_t a, uint32_t b) { return a < b ? a : b; }
__device__ __forceinline__ uint32_t most(uint32_t a, uint32_t b) { return a > b ? a : b; }

// Whether a row of span [from, to] sees key `key`.
__device__ __forceinline__ bool sees(uint32_t key, uint32_t prefix, uint32_t from, uint32_t to) {
  return key < prefix || (key >= from && key <= to);
}

// The A fragments of rows [first, first + 16) of `count` in global memory (row r at `row(r)`),
// for the four 16-column steps of the head dimension (zeros past count).
template <typename Row>
__device__ __forceinline__ void load_a(uint32_t (&a)[4][4], Row row, uint32_t first,
                                       uint32_t count) {
  const uint32_t g = threadIdx.x % 32 / 4, t = threadIdx.x % 4;
#pragma unroll
  for (int kk = 0; kk < 4; kk++)
#pragma unroll
    for (int i = 0; i < 4; i++) {
      const uint32_t r = first + g + 8 * (i % 2), column = kk * 16 + 8 * (i / 2) + 2 * t;
      a[kk][i] = r < count ? load2(row(r) + column) : 0;
    }
}

// Fragments from tiles in shared memory by ldmatrix (x4): four 8 x 8 blocks of 16-bit elements,
// lane 8j + r giving the address of row r of block j (16 bytes, 16-byte aligned). Register j of
// lane i gets block j's row i / 4, columns 2 (i % 4) and one more; transposed, its rows 2 (i % 4)
// and one more of column i / 4.
#ifdef __CUDACC__
__device__ __forceinline__ void ldmatrix(uint32_t (&d)[4], const uint16_t *row) {
#if __CUDA_ARCH__ >= 800
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];"
               : "=r"(d[0]), "=r"(d[1]), "=r"(d[2]), "=r"(d[3])
               : "r"((uint32_t)__cvta_generic_to_shared(row)));
#else
  __trap();
#endif
}
__device__ __forceinline__ void ldmatrix_trans(uint32_t (&d)[4], const uint16_t *row) {
#if __CUDA_ARCH__ >= 800
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];"
               : "=r"(d[0]), "=r"(d[1]), "=r"(d[2]), "=r"(d[3])
               : "r"((uint32_t)__cvta_generic_to_shared(row)));
#else
  __trap();
#endif
}
#endif

// The B fragments of the 8-column steps n0 and n0 + 8, over rows kk·16.. of a tile stored
// `[k][n]` (the two elements of a register are in adjacent rows: loaded transposed).
__device__ __forceinline__ void b_columns(const uint16_t *tile, int kk, int n0,
                                          uint32_t (&b)[2][2]) {
  const uint32_t lane = threadIdx.x % 32, j = lane / 8, r = lane % 8;
  uint32_t d[4];
  ldmatrix_trans(d, tile + (kk * 16 + r + 8 * (j % 2)) * STRIDE + n0 + 8 * (j / 2));
  b[0][0] = d[0];
  b[0][1] = d[1];
  b[1][0] = d[2];
  b[1][1] = d[3];
}

// The same of a tile stored `[n][k]` (the two elements of a register adjacent in memory).
__device__ __forceinline__ void b_rows(const uint16_t *tile, int kk, int n0, uint32_t (&b)[2][2]) {
  const uint32_t lane = threadIdx.x % 32, j = lane / 8, r = lane % 8;
  uint32_t d[4];
  ldmatrix(d, tile + (n0 + r + 8 * (j / 2)) * STRIDE + kk * 16 + 8 * (j % 2));
  b[0][0] = d[0];
  b[0][1] = d[1];
  b[1][0] = d[2];
  b[1][1] = d[3];
}

// The A fragment of rows m0.. and columns kk·16.. of a tile stored `[m][k]`.
__device__ __forceinline__ void a_rows(const uint16_t *tile, int m0, int kk, uint32_t (&a)[4]) {
  const uint32_t lane = threadIdx.x % 32, j = lane / 8, r = lane % 8;
  ldmatrix(a, tile + (m0 + r + 8 * (j % 2)) * STRIDE + kk * 16 + 8 * (j / 2));
}

// The same of a tile stored `[k][m]` (its transpose: loaded transposed).
__device__ __forceinline__ void a_columns(const uint16_t *tile, int m0, int kk, uint32_t (&a)[4]) {
  const uint32_t lane = threadIdx.x % 32, j = lane / 8, r = lane % 8;
  ldmatrix_trans(a, tile + (kk * 16 + r + 8 * (j / 2)) * STRIDE + m0 + 8 * (j % 2));
}

// acc (M x 16 x 64) += A (M x 16 x 64, as the A fragments of four 16-column steps) times a
// 64 x 64 tile in shared memory, stored `[k][n]` (by b_columns) or `[n][k]` (b_rows: the product
// with its transpose): M tiles of 16 rows, which share each B fragment loaded.
template <typename T, bool Transposed, int M>
__device__ __forceinline__ void product(float (&acc)[M][8][4], const uint32_t (&a)[M][4][4],
                                        const uint16_t *tile) {
#pragma unroll
  for (int kk = 0; kk < 4; kk++)
#pragma unroll
    for (int n = 0; n < 8; n += 2) {
      uint32_t b[2][2];
      if (Transposed)
        b_rows(tile, kk, n * 8, b);
      else
        b_columns(tile, kk, n * 8, b);
#pragma unroll
      for (int m = 0; m < M; m++) {
        mma<T>(acc[m][n], a[m][kk], b[0][0], b[0][1]);
        mma<T>(acc[m][n + 1], a[m][kk], b[1][0], b[1][1]);
      }
    }
}
// The same of one tile of 16 rows.
template <typename T, bool Transposed>
__device__ __forceinline__ void product(float (&acc)[8][4], const uint32_t (&a)[4][4],
                                        const uint16_t *tile) {
  product<T, Transposed, 1>(reinterpret_cast<float(&)[1][8][4]>(acc),
                            reinterpret_cast<const uint32_t(&)[1][4][4]>(a), tile);
}

// C fragments of a 16 x 64 tile as the A fragments of four 16-column steps, rounded to T.
template <typename T>
__device__ __forceinline__ void as_a(const float (&c)[8][4], uint32_t (&a)[4][4]) {
#pragma unroll
  for (int kk = 0; kk < 4; kk++) {
    a[kk][0] = pack<T>(c[2 * kk][0], c[2 * kk][1]);
    a[kk][1] = pack<T>(c[2 * kk][2], c[2 * kk][3]);
    a[kk][2] = pack<T>(c[2 * kk + 1][0], c[2 * kk + 1][1]);
    a[kk][3] = pack<T>(c[2 * kk + 1][2], c[2 * kk + 1][3]);
  }
}

// Element e of C fragment n of a 16 x 64 tile that as_a packed (rounded to T), as a float.
template <typename T>
__device__ __forceinline__ float a_element(const uint32_t (&a)[4][4], int n, int e) {
  const uint32_t both = a[n / 2][n % 2 * 2 + e / 2];
  return widen_bits(T{}, e % 2 ? both >> 16 : both & 0xffff);
}

__device__ __forceinline__ float quad_max(float x) {
  x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 1));
  return fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 2));
}
__device__ __forceinline__ float quad_sum(float x) {
  x += __shfl_xor_sync(0xffffffffu, x, 1);
  return x + __shfl_xor_sync(0xffffffffu, x, 2);
}

// The first tile of keys from `first` on that a tile of rows sees: the prefix's, then those
// within [lo, hi] (its rows' reach; lo > hi when no row has a span). `columns` when none.
__device__ __forceinline__ uint32_t next_keys(uint32_t first, uint32_t prefix, uint32_t lo,
                                              uint32_t hi, uint32_t columns) {
  if (first < prefix)
    return first;
  if (lo > hi || first > hi)
    return columns;
  return most(first, lo / TILE * TILE);
}

// What a set of rows sees beyond the prefix (their spans), as the forward writes it for each
// tile of 64 rows (4 u32s): the least `from` and the greatest `to` of the spans that are not
// empty (which keys any row sees: lo > hi when none), and the greatest `from` and the least `to`
// of all of them (which keys every row sees: none when any span is empty). Rows past the last
// are no rows.
struct Reach {
  uint32_t lo = UINT32_MAX, hi = 0, common_from = 0, common_to = UINT32_MAX;
  __device__ __forceinline__ void add(uint32_t from, uint32_t to) {
    if (from <= to) {
      lo = least(lo, from);
      hi = most(hi, to);
    }
    common_from = most(common_from, from);
    common_to = least(common_to, to);
  }
  __device__ __forceinline__ void merge(const Reach &other) {
    lo = least(lo, other.lo);
    hi = most(hi, other.hi);
    common_from = most(common_from, other.common_from);
    common_to = least(common_to, other.common_to);
  }
  // Over the warp's lanes (every lane takes part).
  __device__ __forceinline__ void reduce_warp() {
#pragma unroll
    for (int offset = 16; offset > 0; offset /= 2) {
      lo = least(lo, __shfl_xor_sync(0xffffffffu, lo, offset));
      hi = most(hi, __shfl_xor_sync(0xffffffffu, hi, offset));
      common_from = most(common_from, __shfl_xor_sync(0xffffffffu, common_from, offset));
      common_to = least(common_to, __shfl_xor_sync(0xffffffffu, common_to, offset));
    }
  }
  // Whether every row sees each of the keys [first, last] (by its span).
  __device__ __forceinline__ bool holds(uint32_t first, uint32_t last) const {
    return first >= common_from && last <= common_to;
  }
  __device__ __forceinline__ void store(uint32_t *to) const {
    to[0] = lo;
    to[1] = hi;
    to[2] = common_from;
    to[3] = common_to;
  }
  __device__ __forceinline__ static Reach load(const uint32_t *from) {
    Reach r;
    r.lo = from[0];
    r.hi = from[1];
    r.common_from = from[2];
    r.common_to = from[3];
    return r;
  }
};

// The block of rows that the forward's y-th block of a head takes: the latest positions first,
// those of every query head of the group side by side. Causal rows see more keys the later
// they are, so the longest blocks start first and the last wave on the GPU is of short ones,
// not a tail of long ones (the ends of sequences, launched last in row order). Where blocks do
// not align with the query heads, simply the last first.
__device__ __forceinline__ uint32_t row_block(uint32_t y, uint32_t rows, uint32_t length) {
  const uint32_t group = rows / length;
  if (length % FORWARD_ROWS != 0)
    return (rows + FORWARD_ROWS - 1) / FORWARD_ROWS - 1 - y;
  const uint32_t per_head = length / FORWARD_ROWS;
  return y % group * per_head + per_head - 1 - y / group;
}

// Grid (sequences · kv_heads, ceil(rows / 128)): a block takes 128 query rows (which ones:
// row_block), two tiles of 64, each warp 16 rows of each, and walks the keys they can see 64 at
// a time, keeping each row's running maximum and sum (online softmax). A warp's two tiles of
// rows share each fragment of the keys and values it loads.
template <typename T>
__device__ void flash_forward(const T *__restrict__ q, const T *__restrict__ k_shared,
                              const T *__restrict__ k_own, const T *__restrict__ v_shared,
                              const T *__restrict__ v_own, uint32_t shared,
                              const uint32_t *__restrict__ spans, uint32_t prefix,
                              T *__restrict__ out, float *__restrict__ lse,
                              uint32_t *__restrict__ reach, uint32_t rows, uint32_t length,
                              uint32_t kv_heads, float scale) {
  constexpr int M = FORWARD_ROWS / TILE;
  __shared__ __align__(16) uint16_t ks[2][TILE * STRIDE];
  __shared__ __align__(16) uint16_t vs[2][TILE * STRIDE];
  __shared__ uint32_t warp_reach[M][FLASH_THREADS / 32][4];
  const uint32_t warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
  const size_t head = blockIdx.x, sequence = head / kv_heads;
  const uint32_t columns = shared + length, block = row_block(blockIdx.y, rows, length);
  const uint32_t tiles = (rows + TILE - 1) / TILE;
  const QueryRows query_at(head, rows, length, kv_heads);
  const KeyRows key_at(head, shared, length, kv_heads);
  const QueryRow query_row{query_at, q};
  const KeyRow key_row{key_at, k_shared, k_own}, value_row{key_at, v_shared, v_own};
  // Scores are scaled into base 2, e^(scale·s) = 2^(scale·log2(e)·s): one multiply-add and the
  // special function unit's 2^x an element.
  const float scale2 = scale * LOG2_E;
  prefix = least(prefix, columns);
  // This thread's rows: of each tile m, g and g + 8 of the warp's 16 (C fragment elements 0-1
  // and 2-3), their spans (a key past the last is no key), and each tile's Reach: of the warp's
  // 16 rows first, then of the block's 64.
  uint32_t row[M][2], from[M][2], to[M][2];
  Reach warp_of[M];
  bool live[M][2];
#pragma unroll
  for (int m = 0; m < M; m++) {
#pragma unroll
    for (int h = 0; h < 2; h++) {
      row[m][h] = (block * M + m) * TILE + warp * 16 + g + 8 * h;
      live[m][h] = row[m][h] < rows;
      from[m][h] = 1;
      to[m][h] = 0;
      if (live[m][h]) {
        const uint32_t *span = spans + 2 * (sequence * length + row[m][h] % length);
        from[m][h] = span[0];
        to[m][h] = least(span[1], columns - 1);
        warp_of[m].add(from[m][h], to[m][h]);
      }
    }
    warp_of[m].reduce_warp();
    if (lane == 0)
      warp_of[m].store(warp_reach[m][warp]);
  }
  __syncthreads();
  // The block's reach, over both tiles: which keys it walks.
  uint32_t block_lo = UINT32_MAX, block_hi = 0;
#pragma unroll
  for (int m = 0; m < M; m++) {
    Reach tile_of;
#pragma unroll
    for (int w = 0; w < FLASH_THREADS / 32; w++)
      tile_of.merge(Reach::load(warp_reach[m][w]));
    const uint32_t tile = block * M + m;
    if (threadIdx.x == 0 && tile < tiles)
      tile_of.store(reach + 4 * (head * tiles + tile));
    block_lo = least(block_lo, tile_of.lo);
    block_hi = most(block_hi, tile_of.hi);
  }
  uint32_t qa[M][4][4];
#pragma unroll
  for (int m = 0; m < M; m++)
    load_a(qa[m], query_row, (block * M + m) * TILE + warp * 16, rows);
  float o[M][8][4] = {};
  // Each row's greatest scaled score so far (base 2), and its sum of exponentials.
  float top[M][2], sum[M][2] = {};
#pragma unroll
  for (int m = 0; m < M; m++)
    top[m][0] = top[m][1] = -INFINITY;
  uint32_t first = next_keys(0, prefix, block_lo, block_hi, columns);
  if (first < columns) {
    load_tile<TILE, FLASH_THREADS>(ks[0], key_row, first, columns);
    load_tile<TILE, FLASH_THREADS>(vs[0], value_row, first, columns);
  }
  commit_async();
  for (int b = 0; first < columns; b ^= 1) {
    const uint32_t after = next_keys(first + TILE, prefix, block_lo, block_hi, columns);
    if (after < columns) {
      load_tile<TILE, FLASH_THREADS>(ks[b ^ 1], key_row, after, columns);
      load_tile<TILE, FLASH_THREADS>(vs[b ^ 1], value_row, after, columns);
    }
    commit_async();
    wait_async<1>();
    __syncthreads();
    float s[M][8][4] = {};
    product<T, true>(s, qa, ks[b]);
    // A tile is seen whole, with no spans to compare, where its keys past the prefix (which
    // every row sees) are within every row's span.
    const bool in_prefix = first + TILE <= prefix;
    const uint32_t past_prefix = most(first, prefix);
    uint32_t pa[M][4][4];
#pragma unroll
    for (int m = 0; m < M; m++) {
      // The tile's greatest unscaled score of each row (the scale is positive).
      float tile_top[2] = {-INFINITY, -INFINITY};
      if (in_prefix || warp_of[m].holds(past_prefix, first + TILE - 1)) {
#pragma unroll
        for (int n = 0; n < 8; n++)
#pragma unroll
          for (int e = 0; e < 4; e++)
            tile_top[e / 2] = fmaxf(tile_top[e / 2], s[m][n][e]);
      } else {
#pragma unroll
        for (int n = 0; n < 8; n++)
#pragma unroll
          for (int e = 0; e < 4; e++) {
            const int h = e / 2;
            const uint32_t key = first + n * 8 + 2 * t + e % 2;
            const float x = sees(key, prefix, from[m][h], to[m][h]) ? s[m][n][e] : -INFINITY;
            s[m][n][e] = x;
            tile_top[h] = fmaxf(tile_top[h], x);
          }
      }
      float reference[2], rescale[2];
#pragma unroll
      for (int h = 0; h < 2; h++) {
        const float next = fmaxf(top[m][h], quad_max(tile_top[h]) * scale2);
        // Exponentials relative to 0 while nothing is visible: 2^(-inf - -inf) would be NaN.
        reference[h] = next == -INFINITY ? 0.f : next;
        rescale[h] = exp2_approx(top[m][h] - reference[h]);
        top[m][h] = next;
        sum[m][h] *= rescale[h];
      }
#pragma unroll
      for (int n = 0; n < 8; n++)
#pragma unroll
        for (int e = 0; e < 4; e++) {
          const float p = exp2_approx(s[m][n][e] * scale2 - reference[e / 2]);
          s[m][n][e] = p;
          sum[m][e / 2] += p;
          o[m][n][e] *= rescale[e / 2];
        }
      as_a<T>(s[m], pa[m]);
    }
    product<T, false>(o, pa, vs[b]);
    // Every warp is done with this buffer before the next tile but one is loaded into it.
    __syncthreads();
    first = after;
  }
  wait_async<0>();
#pragma unroll
  for (int m = 0; m < M; m++)
#pragma unroll
    for (int h = 0; h < 2; h++) {
      // Each thread summed its own columns; the row's sum is the quad's.
      const float total = quad_sum(sum[m][h]);
      if (!live[m][h])
        continue;
      const float inverse = total > 0 ? 1 / total : 0;
      T *y = out + query_at(row[m][h]) + 2 * t;
#pragma unroll
      for (int n = 0; n < 8; n++)
        store2(&y[n * 8], o[m][n][2 * h] * inverse, o[m][n][2 * h + 1] * inverse);
      if (t == 0)
        lse[head * rows + row[m][h]] = top[m][h] == -INFINITY ? INFINITY : top[m][h] + log2f(total);
    }
}

// The first row tile from `x` on whose bit is set in `seen`, or `tiles`.
__device__ __forceinline__ uint32_t next_rows(const uint32_t *seen, uint32_t x, uint32_t tiles) {
  while (x < tiles) {
    const uint32_t word = seen[x / 32] >> (x % 32);
    if (word)
      return x + __ffs(word) - 1;
    x = (x / 32 + 1) * 32;
  }
  return tiles;
}

// The backward's shared memory, more than the 48 KB a block may hold statically: given as
// dynamic shared memory, whose size flash.rs's BACKWARD_SHARED_BYTES says (checked against this
// by kernels/emulated/check.cpp, and by the kernel when it starts).
struct BackwardTiles {
  // Two buffers of a row tile's Q and dO, and of its rows' log-sum-exps, dsums and spans.
  __align__(16) uint16_t qs[2][TILE * STRIDE];
  __align__(16) uint16_t dos[2][TILE * STRIDE];
  // The block's keys, and the tile's dS, `[key, query]` (transposed, the A operand of dQ's
  // product: each thread stores the pairs of adjacent queries its registers hold).
  __align__(16) uint16_t ks[KEYS * STRIDE];
  __align__(16) uint16_t dss[KEYS * STRIDE];
  __align__(16) float lses[2][TILE];
  __align__(16) float dsums[2][TILE];
  __align__(16) uint32_t froms[2][TILE];
  __align__(16) uint32_t tos[2][TILE];
  uint32_t seen[SEEN_WORDS];
  // The row tile's Reach, as the forward wrote it.
  __align__(16) uint32_t reaches[2][4];
};

// Grid (sequences · kv_heads, ceil(columns / 128)), heads first so that the blocks of the
// prefix's keys, which every row sees and so take the longest, start before the rest: a block
// takes 128 keys (16 a warp), keeps their gradients in registers and walks the tiles of 64 query
// rows that see them, recomputing each tile's probabilities from the forward's log-sum-exp:
// P = 2^(scale·log2(e)·QKᵀ - lse) where seen, dV += Pᵀ·dO, dS = P·(dO·Vᵀ - dsum) with
// dsum = rowsum(dO·O), dK += scale·dSᵀ·Q, and dQ += scale·dS·K added to `dq` (f32, zeroed by
// the caller) by atomics, since every block adds to every row. The shared keys' gradients are
// summed over the sequences the same way (f32 `[kv_heads, shared, 64]`, zeroed by the caller);
// the own keys' are as the keys.
template <typename T>
__device__ void flash_backward(const T *__restrict__ q, const T *__restrict__ k_shared,
                               const T *__restrict__ k_own, const T *__restrict__ v_shared,
                               const T *__restrict__ v_own, uint32_t shared,
                               const uint32_t *__restrict__ spans, uint32_t prefix,
                               const uint32_t *__restrict__ reach, const T *__restrict__ dout,
                               const float *__restrict__ lse, const float *__restrict__ dsum,
                               float *__restrict__ dq, float *__restrict__ dk_shared,
                               T *__restrict__ dk_own, float *__restrict__ dv_shared,
                               T *__restrict__ dv_own, uint32_t rows, uint32_t length,
                               uint32_t kv_heads, float scale) {
#ifdef __CUDACC__
  extern __shared__ __align__(16) unsigned char dynamic_shared[];
  uint32_t given;
  asm("mov.u32 %0, %%dynamic_smem_size;" : "=r"(given));
  if (given < sizeof(BackwardTiles))
    __trap(); // launched with less shared memory than the tiles take
  BackwardTiles &tiles_ = *reinterpret_cast<BackwardTiles *>(dynamic_shared);
#else
  __shared__ BackwardTiles tiles_;
#endif
  auto &qs = tiles_.qs, &dos = tiles_.dos;
  auto &lses = tiles_.lses, &dsums = tiles_.dsums;
  auto &froms = tiles_.froms, &tos = tiles_.tos;
  uint16_t *const ks = tiles_.ks, *const dss = tiles_.dss;
  uint32_t *const seen = tiles_.seen;
  const uint32_t warp = threadIdx.x / 32, g = threadIdx.x % 32 / 4, t = threadIdx.x % 4;
  const size_t head = blockIdx.x, sequence = head / kv_heads;
  const uint32_t columns = shared + length;
  const QueryRows query_at(head, rows, length, kv_heads);
  const KeyRows key_at(head, shared, length, kv_heads);
  const QueryRow query_row{query_at, q}, dout_row{query_at, dout};
  const KeyRow key_row{key_at, k_shared, k_own}, value_row{key_at, v_shared, v_own};
  const uint32_t first_key = blockIdx.y * KEYS, warp_key = first_key + warp * 16;
  const float scale2 = scale * LOG2_E;
  prefix = least(prefix, columns);
  const uint32_t tiles = (rows + TILE - 1) / TILE;
  uint32_t key[2];
  bool live[2];
#pragma unroll
  for (int h = 0; h < 2; h++) {
    key[h] = warp_key + g + 8 * h;
    live[h] = key[h] < columns;
  }
  // Which row tiles see any of the block's keys: all of them where the keys start within the
  // prefix, else those whose reach meets the keys.
  for (uint32_t w = threadIdx.x; w < SEEN_WORDS; w += BACKWARD_THREADS)
    seen[w] = 0;
  __syncthreads();
  for (uint32_t x = threadIdx.x; x < tiles; x += BACKWARD_THREADS) {
    const uint32_t lo = reach[4 * (head * tiles + x)], hi = reach[4 * (head * tiles + x) + 1];
    if (first_key < prefix || (lo <= first_key + KEYS - 1 && hi >= first_key))
      atomicOr(&seen[x / 32], 1u << x % 32);
  }
  // The rows of tile x: Q and dO, and each row's log-sum-exp, dsum and span (past the rows:
  // zeros, +inf, 0 and nothing).
  const auto load_rows = [&](int b, uint32_t x) {
    load_tile<TILE, BACKWARD_THREADS>(qs[b], query_row, x * TILE, rows);
    load_tile<TILE, BACKWARD_THREADS>(dos[b], dout_row, x * TILE, rows);
    if (threadIdx.x < 4)
      copy4_async(&tiles_.reaches[b][threadIdx.x], &reach[4 * (head * tiles + x) + threadIdx.x]);
    for (uint32_t i = threadIdx.x; i < TILE; i += BACKWARD_THREADS) {
      const uint32_t row = x * TILE + i;
      if (row < rows) {
        const uint32_t *span = spans + 2 * (sequence * length + row % length);
        copy4_async(&lses[b][i], &lse[head * rows + row]);
        copy4_async(&dsums[b][i], &dsum[head * rows + row]);
        copy4_async(&froms[b][i], &span[0]);
        copy4_async(&tos[b][i], &span[1]);
      } else {
        lses[b][i] = INFINITY;
        dsums[b][i] = 0.f;
        froms[b][i] = 1;
        tos[b][i] = 0;
      }
    }
  };
  // The values' A fragments stay in registers; the keys' are read from their tile each time.
  uint32_t va[4][4];
  load_a(va, value_row, warp_key, columns);
  load_tile<KEYS, BACKWARD_THREADS>(ks, key_row, first_key, columns);
  __syncthreads();
  uint32_t x = next_rows(seen, 0, tiles);
  if (x < tiles)
    load_rows(0, x);
  commit_async();
  // Keys within the prefix are seen by every row.
  const bool in_prefix = warp_key + 16 <= prefix;
  const uint32_t past_prefix = most(warp_key, prefix);
  // dQ's share of this warp: 16 of the tile's queries and 32 of the dimensions, over the block's
  // keys.
  const uint32_t dq_row = warp % 4 * 16, dq_column = warp / 4 * 32;
  float dka[8][4] = {}, dva[8][4] = {};
  for (int b = 0; x < tiles; b ^= 1) {
    const uint32_t after = next_rows(seen, x + 1, tiles);
    if (after < tiles)
      load_rows(b ^ 1, after);
    commit_async();
    wait_async<1>();
    __syncthreads();
    // Pᵀ from Sᵀ = K·Qᵀ for the warp's 16 keys and the tile's 64 queries, rounded to T as the
    // products take it, then dPᵀ = V·dOᵀ: one 16 x 64 tile of f32 live at a time (at 5dc7086,
    // 177 registers; the two tiles together took 182, and the keys' fragments held across the
    // loop 245).
    uint32_t pa[4][4];
    {
      uint32_t ka[4][4];
#pragma unroll
      for (int kk = 0; kk < 4; kk++)
        a_rows(ks, warp * 16, kk, ka[kk]);
      float st[8][4] = {};
      product<T, true>(st, ka, qs[b]);
      // Past the rows, lse is +inf: 2^-inf = 0. Keys of the prefix, and past it keys within
      // every row's span, are seen whole: no spans to compare.
      if (in_prefix || Reach::load(tiles_.reaches[b]).holds(past_prefix, warp_key + 15)) {
#pragma unroll
        for (int n = 0; n < 8; n++)
#pragma unroll
          for (int e = 0; e < 4; e++)
            st[n][e] = exp2_approx(st[n][e] * scale2 - lses[b][n * 8 + 2 * t + e % 2]);
      } else {
#pragma unroll
        for (int n = 0; n < 8; n++)
#pragma unroll
          for (int e = 0; e < 4; e++) {
            const uint32_t local = n * 8 + 2 * t + e % 2;
            st[n][e] = sees(key[e / 2], prefix, froms[b][local], tos[b][local])
                           ? exp2_approx(st[n][e] * scale2 - lses[b][local])
                           : 0.f;
          }
      }
      as_a<T>(st, pa);
    }
    product<T, false>(dva, pa, dos[b]);
    float dpt[8][4] = {};
    product<T, true>(dpt, va, dos[b]);
#pragma unroll
    for (int n = 0; n < 8; n++)
#pragma unroll
      for (int e = 0; e < 4; e++)
        dpt[n][e] = a_element<T>(pa, n, e) * (dpt[n][e] - dsums[b][n * 8 + 2 * t + e % 2]);
    uint32_t da[4][4];
    as_a<T>(dpt, da);
    product<T, false>(dka, da, qs[b]);
    // dS has a buffer of its own, which the last tile's dQ was done reading at the loop's end:
    // da's registers, each two adjacent queries of one key, as they are (rows of 8 keys by
    // lanes' g, 4 lanes' pairs of queries a row: 32 banks).
#pragma unroll
    for (int n = 0; n < 8; n++)
#pragma unroll
      for (int h = 0; h < 2; h++)
        store_pair(&dss[(warp * 16 + g + 8 * h) * STRIDE + n * 8 + 2 * t],
                   da[n / 2][n % 2 * 2 + h]);
    __syncthreads();
    float acc[4][4] = {};
#pragma unroll
    for (int kk = 0; kk < KEYS / 16; kk++) {
      uint32_t sa[4];
      a_columns(dss, dq_row, kk, sa);
#pragma unroll
      for (int n = 0; n < 4; n += 2) {
        uint32_t bk[2][2];
        b_columns(ks, kk, dq_column + n * 8, bk);
        mma<T>(acc[n], sa, bk[0][0], bk[0][1]);
        mma<T>(acc[n + 1], sa, bk[1][0], bk[1][1]);
      }
    }
    // Lanes t and t ^ 1 hold adjacent pairs of columns of the same two rows: each gives the
    // other its pair of the row the other adds, so that each adds four adjacent columns of one
    // row (g + 8 (t % 2)) in one atomic, half as many as by pairs.
    const int mine = t % 2;
    const uint32_t query = x * TILE + dq_row + g + 8 * mine;
#pragma unroll
    for (int n = 0; n < 4; n++) {
      // Selected, not indexed by `mine`: an index known only at run time would put acc in
      // local memory.
      const float own0 = mine ? acc[n][2] : acc[n][0], own1 = mine ? acc[n][3] : acc[n][1];
      const float got0 = __shfl_xor_sync(0xffffffffu, mine ? acc[n][0] : acc[n][2], 1),
                  got1 = __shfl_xor_sync(0xffffffffu, mine ? acc[n][1] : acc[n][3], 1);
      if (query < rows) {
        float *to = &dq[query_at(query) + dq_column + n * 8 + 4 * (t / 2)];
        if (mine == 0)
          add4(to, own0 * scale, own1 * scale, got0 * scale, got1 * scale);
        else
          add4(to, got0 * scale, got1 * scale, own0 * scale, own1 * scale);
      }
    }
    // Every warp is done with this buffer before the next tile but one is loaded into it, and
    // with dS before the next tile's is written.
    __syncthreads();
    x = after;
  }
  wait_async<0>();
#pragma unroll
  for (int h = 0; h < 2; h++) {
    if (!live[h])
      continue;
    if (key[h] < shared) {
      // Every sequence's blocks add to the shared keys' gradients.
      const size_t at = (head % kv_heads * shared + key[h]) * HEAD_DIM + 2 * t;
#pragma unroll
      for (int n = 0; n < 8; n++) {
        add2(&dk_shared[at + n * 8], dka[n][2 * h] * scale, dka[n][2 * h + 1] * scale);
        add2(&dv_shared[at + n * 8], dva[n][2 * h], dva[n][2 * h + 1]);
      }
      continue;
    }
    T *dkr = dk_own + key_at.own(key[h]) + 2 * t;
    T *dvr = dv_own + key_at.own(key[h]) + 2 * t;
#pragma unroll
    for (int n = 0; n < 8; n++) {
      store2(&dkr[n * 8], dka[n][2 * h] * scale, dka[n][2 * h + 1] * scale);
      store2(&dvr[n * 8], dva[n][2 * h], dva[n][2 * h + 1]);
    }
  }
}

// rowsum(dO·O) (the backward's dsum, in f32) of the rows of `[sequences, length, kv_heads ·
// group, 64]` output and gradient, each to its place in `[sequences · kv_heads, group · length]`
// (the kernels' rows): a warp a row, two elements a lane. Grid ceil(count / 4), count =
// sequences · length · kv_heads · group.
template <typename T>
__device__ void flash_row_sums(const T *__restrict__ dout, const T *__restrict__ out,
                               float *__restrict__ sums, uint32_t count, uint32_t length,
                               uint32_t kv_heads, uint32_t group) {
  const uint32_t row = blockIdx.x * (FLASH_THREADS / 32) + threadIdx.x / 32;
  const uint32_t lane = threadIdx.x % 32;
  float x = 0.f;
  if (row < count) {
    const size_t at = (size_t)row * HEAD_DIM + 2 * lane;
    const uint32_t a = load2(reinterpret_cast<const uint16_t *>(dout) + at),
                   b = load2(reinterpret_cast<const uint16_t *>(out) + at);
    x = widen_bits(T{}, a & 0xffff) * widen_bits(T{}, b & 0xffff) +
        widen_bits(T{}, a >> 16) * widen_bits(T{}, b >> 16);
  }
#pragma unroll
  for (int offset = 16; offset > 0; offset /= 2)
    x += __shfl_xor_sync(0xffffffffu, x, offset);
  if (row < count && lane == 0) {
    const uint32_t heads = kv_heads * group, query_head = row % heads;
    const uint32_t position = row / heads % length, sequence = row / heads / length;
    sums[((size_t)sequence * kv_heads + query_head / group) * group * length +
         query_head % group * length + position] = x;
  }
}

// The forward at 2 blocks an SM (255 registers a thread at most). The backward runs one block of
// 8 warps (at 5dc7086, 2 of 4 warps: held to 168 registers for 3, spilling 20 bytes, the step
// was 2.2 ms slower on an H200).
#define FLASH_KERNELS(T, NAME)                                                                     \
  extern "C" __global__ void __launch_bounds__(FLASH_THREADS, 2) flash_forward_##NAME(             \
      const T *__restrict__ q, const T *__restrict__ k_shared, const T *__restrict__ k_own,        \
      const T *__restrict__ v_shared, const T *__restrict__ v_own, uint32_t shared,                \
      const uint32_t *__restrict__ spans, uint32_t prefix, T *__restrict__ out,                    \
      float *__restrict__ lse, uint32_t *__restrict__ reach, uint32_t rows, uint32_t length,       \
      uint32_t kv_heads, float scale) {                                                            \
    flash_forward<T>(q, k_shared, k_own, v_shared, v_own, shared, spans, prefix, out, lse, reach,  \
                     rows, length, kv_heads, scale);                                               \
  }                                                                                                \
  extern "C" __global__ void __launch_bounds__(BACKWARD_THREADS) flash_backward_##NAME(            \
      const T *__restrict__ q, const T *__restrict__ k_shared, const T *__restrict__ k_own,        \
      const T *__restrict__ v_shared, const T *__restrict__ v_own, uint32_t shared,                \
      const uint32_t *__restrict__ spans, uint32_t prefix, const uint32_t *__restrict__ reach,     \
      const T *__restrict__ dout, const float *__restrict__ lse, const float *__restrict__ dsum,    \
      float *__restrict__ dq, float *__restrict__ dk_shared, T *__restrict__ dk_own,               \
      float *__restrict__ dv_shared, T *__restrict__ dv_own, uint32_t rows, uint32_t length,       \
      uint32_t kv_heads, float scale) {                                                            \
    flash_backward<T>(q, k_shared, k_own, v_shared, v_own, shared, spans, prefix, reach, dout,     \
                      lse, dsum, dq, dk_shared, dk_own, dv_shared, dv_own, rows, length, kv_heads, \
                      scale);                                                                      \
  }                                                                                                \
  extern "C" __global__ void __launch_bounds__(FLASH_THREADS) flash_row_sums_##NAME(               \
      const T *__restrict__ dout, const T *__restrict__ out, float *__restrict__ sums,              \
      uint32_t count, uint32_t length, uint32_t kv_heads, uint32_t group) {                        \
    flash_row_sums<T>(dout, out, sums, count, length, kv_heads, group);                            \
  }

FLASH_KERNELS(__nv_bfloat16, bf16)
FLASH_KERNELS(__half, f16)
