// Attention in tiles on the tensor cores (FlashAttention-2's scheme), forward and backward, so
// the `[rows, columns]` score matrices of a layer are never written to memory: the composed form
// (two matmuls around the fused masked softmax, and five with its gradient) moves them several
// times a layer. Heads of 64 dimensions, bf16 or f16 (mma.sync m16n8k16, f32 sums).
//
// Layouts (contiguous): per (sequence, key head) `head` = sequence · kv_heads + key head, the
// queries `[rows, 64]` (rows = group · length, the query heads sharing the key head stacked:
// row r is position r % length), the keys and values `[columns, 64]`, the additive mask
// `[length, columns]` of the sequence, the output `[rows, 64]` and each row's log-sum-exp of its
// scaled, masked scores (f32; +inf for a row with nothing visible, whose output is zeros).
//
// A block is 4 warps. Fragments follow the PTX ISA's figures for mma.m16n8k16 (g = lane / 4,
// t = lane % 4): A (16 x 16) register i holds row g + 8 (i % 2), columns 2t + 8 (i / 2) and
// one more; B (16 x 8) register i holds rows 2t + 8 i and one more of column g; C (16 x 8)
// element e is row g + 8 (e / 2), column 2t + e % 2. Tiles in shared memory are rows of 72
// elements: the 8 rows one fragment load reads start in 8 different banks.

#define FLASH_THREADS 128
#define TILE 64
#define HEAD_DIM 64
#define STRIDE 72

__device__ __forceinline__ uint16_t bits(__nv_bfloat16 x) { return __bfloat16_as_ushort(x); }
__device__ __forceinline__ uint16_t bits(__half x) { return __half_as_ushort(x); }
template <typename T> __device__ __forceinline__ T narrow(float x);
template <> __device__ __forceinline__ __nv_bfloat16 narrow(float x) { return __float2bfloat16(x); }
template <> __device__ __forceinline__ __half narrow(float x) { return __float2half(x); }
__device__ __forceinline__ float widen_bits(__nv_bfloat16, uint16_t x) {
  return __bfloat162float(__ushort_as_bfloat16(x));
}
__device__ __forceinline__ float widen_bits(__half, uint16_t x) {
  return __half2float(__ushort_as_half(x));
}

__device__ __forceinline__ uint32_t pair(uint16_t low, uint16_t high) {
  return uint32_t(low) | uint32_t(high) << 16;
}
// Two floats rounded to T, as one register of an A fragment (the lower column in the low half).
template <typename T> __device__ __forceinline__ uint32_t pack(float low, float high) {
  return pair(bits(narrow<T>(low)), bits(narrow<T>(high)));
}

// Two adjacent elements (4-byte aligned), rounded to T, in one store.
template <typename T> __device__ __forceinline__ void store2(T *to, float low, float high) {
  const uint32_t both = pack<T>(low, high);
#ifdef __CUDACC__
  *reinterpret_cast<uint32_t *>(to) = both;
#else
  memcpy(to, &both, 4);
#endif
}

#ifdef __CUDACC__
// Two adjacent 16-bit elements, 4-byte aligned, in one load.
__device__ __forceinline__ uint32_t load2(const uint16_t *p) {
  return *reinterpret_cast<const uint32_t *>(p);
}
__device__ __forceinline__ void copy16(uint16_t *to, const uint16_t *from) {
  *reinterpret_cast<uint4 *>(to) = *reinterpret_cast<const uint4 *>(from);
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
#endif

// Rows [first, first + TILE) of a `[count, 64]` matrix into a tile (zeros past count).
__device__ __forceinline__ void load_tile(uint16_t *tile, const uint16_t *__restrict__ matrix,
                                          uint32_t first, uint32_t count) {
  for (uint32_t i = threadIdx.x; i < TILE * HEAD_DIM / 8; i += FLASH_THREADS) {
    const uint32_t row = i / (HEAD_DIM / 8), column = i % (HEAD_DIM / 8) * 8;
    uint16_t *to = tile + row * STRIDE + column;
    if (first + row < count)
      copy16(to, matrix + (size_t)(first + row) * HEAD_DIM + column);
    else
      zero16(to);
  }
}

// The mask's tile of rows [first_row, first_row + TILE) and columns [first, first + TILE) (-inf
// outside `rows` and `columns`), as a tile of T, and whether any of it is visible in any thread
// of the block (which is also a barrier). Whole aligned rows go 16 bytes a load; otherwise a
// warp reads one row at a time, an element a lane.
template <typename T>
__device__ __forceinline__ bool load_mask(uint16_t *tile, const T *__restrict__ mask,
                                          uint32_t first_row, uint32_t rows, uint32_t first,
                                          uint32_t columns, uint32_t length) {
  const uint16_t hidden = bits(narrow<T>(-INFINITY));
  bool visible = false;
  if (first + TILE <= columns && columns % 8 == 0 && reinterpret_cast<uintptr_t>(mask) % 16 == 0) {
    for (uint32_t i = threadIdx.x; i < TILE * TILE / 8; i += FLASH_THREADS) {
      const uint32_t r = i / (TILE / 8), c = i % (TILE / 8) * 8, row = first_row + r;
      uint16_t *to = tile + r * STRIDE + c;
      if (row < rows) {
        copy16(to, reinterpret_cast<const uint16_t *>(mask + (size_t)(row % length) * columns +
                                                      first + c));
#pragma unroll
        for (int e = 0; e < 8; e++)
          visible |= widen_bits(T{}, to[e]) != -INFINITY;
      } else {
#pragma unroll
        for (int e = 0; e < 8; e++)
          to[e] = hidden;
      }
    }
    return __syncthreads_or(visible);
  }
  const uint32_t warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  for (uint32_t r = warp; r < TILE; r += FLASH_THREADS / 32) {
    const uint32_t row = first_row + r;
    const T *m = mask + (size_t)(row % length) * columns;
#pragma unroll
    for (uint32_t c = 2 * lane; c < 2 * lane + 2; c++) {
      uint16_t x = hidden;
      if (row < rows && first + c < columns) {
        x = bits(m[first + c]);
        visible |= widen_bits(T{}, x) != -INFINITY;
      }
      tile[r * STRIDE + c] = x;
    }
  }
  return __syncthreads_or(visible);
}

// The A fragments of rows [first, first + 16) of a `[count, 64]` matrix in global memory, for
// the four 16-column steps of the head dimension (zeros past count).
__device__ __forceinline__ void load_a(uint32_t (&a)[4][4], const uint16_t *__restrict__ matrix,
                                       uint32_t first, uint32_t count) {
  const uint32_t g = threadIdx.x % 32 / 4, t = threadIdx.x % 4;
#pragma unroll
  for (int kk = 0; kk < 4; kk++)
#pragma unroll
    for (int i = 0; i < 4; i++) {
      const uint32_t row = first + g + 8 * (i % 2), column = kk * 16 + 8 * (i / 2) + 2 * t;
      a[kk][i] = row < count ? load2(matrix + (size_t)row * HEAD_DIM + column) : 0;
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

// acc (16 x 64) += A (16 x 64, as the A fragments of four 16-column steps) times a 64 x 64 tile
// in shared memory, stored `[k][n]` (by b_columns) or `[n][k]` (b_rows: the product with its
// transpose).
template <typename T, bool Transposed>
__device__ __forceinline__ void product(float (&acc)[8][4], const uint32_t (&a)[4][4],
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
      mma<T>(acc[n], a[kk], b[0][0], b[0][1]);
      mma<T>(acc[n + 1], a[kk], b[1][0], b[1][1]);
    }
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

__device__ __forceinline__ float quad_max(float x) {
  x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 1));
  return fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 2));
}
__device__ __forceinline__ float quad_sum(float x) {
  x += __shfl_xor_sync(0xffffffffu, x, 1);
  return x + __shfl_xor_sync(0xffffffffu, x, 2);
}

// Grid (ceil(rows / 64), sequences · kv_heads): a block takes 64 query rows (16 a warp) and
// walks the keys 64 at a time, keeping each row's running maximum and sum (online softmax).
template <typename T>
__device__ void flash_forward(const T *__restrict__ q, const T *__restrict__ k,
                              const T *__restrict__ v, const T *__restrict__ mask,
                              T *__restrict__ out, float *__restrict__ lse, uint32_t rows,
                              uint32_t columns, uint32_t length, uint32_t kv_heads, float scale) {
  __shared__ __align__(16) uint16_t ks[TILE * STRIDE];
  __shared__ __align__(16) uint16_t vs[TILE * STRIDE];
  // The mask's tile, `[row, key]`.
  __shared__ __align__(16) uint16_t ms[TILE * STRIDE];
  const uint32_t warp = threadIdx.x / 32, g = threadIdx.x % 32 / 4, t = threadIdx.x % 4;
  const size_t head = blockIdx.y, sequence = head / kv_heads;
  const T *mask_head = mask + sequence * length * columns;
  const uint16_t *qh = reinterpret_cast<const uint16_t *>(q) + head * rows * HEAD_DIM;
  const uint16_t *kh = reinterpret_cast<const uint16_t *>(k) + head * columns * HEAD_DIM;
  const uint16_t *vh = reinterpret_cast<const uint16_t *>(v) + head * columns * HEAD_DIM;
  const uint32_t first_row = blockIdx.x * TILE + warp * 16;
  // This thread's two rows, g and g + 8 of the warp's 16 (C fragment elements 0-1 and 2-3).
  uint32_t row[2];
  bool live[2];
#pragma unroll
  for (int h = 0; h < 2; h++) {
    row[h] = first_row + g + 8 * h;
    live[h] = row[h] < rows;
  }
  uint32_t qa[4][4];
  load_a(qa, qh, first_row, rows);
  float o[8][4] = {};
  float top[2] = {-INFINITY, -INFINITY}, sum[2] = {0, 0};
  for (uint32_t first = 0; first < columns; first += TILE) {
    __syncthreads();
    // A tile the mask hides from every row adds nothing: causal attention over packed
    // conversations hides about a quarter of them at the benchmark's size.
    if (!load_mask(ms, mask_head, blockIdx.x * TILE, rows, first, columns, length))
      continue;
    load_tile(ks, kh, first, columns);
    load_tile(vs, vh, first, columns);
    __syncthreads();
    float s[8][4] = {};
    product<T, true>(s, qa, ks);
    float tile_top[2] = {-INFINITY, -INFINITY};
#pragma unroll
    for (int n = 0; n < 8; n++)
#pragma unroll
      for (int e = 0; e < 4; e++) {
        const int h = e / 2;
        const float x =
            s[n][e] * scale +
            widen_bits(T{}, ms[(warp * 16 + g + 8 * h) * STRIDE + n * 8 + 2 * t + e % 2]);
        s[n][e] = x;
        tile_top[h] = fmaxf(tile_top[h], x);
      }
    float reference[2], rescale[2];
#pragma unroll
    for (int h = 0; h < 2; h++) {
      const float next = fmaxf(top[h], quad_max(tile_top[h]));
      // Exponentials relative to 0 while nothing is visible: exp(-inf - -inf) would be NaN.
      reference[h] = next == -INFINITY ? 0.f : next;
      rescale[h] = __expf(top[h] - reference[h]);
      top[h] = next;
      sum[h] *= rescale[h];
    }
#pragma unroll
    for (int n = 0; n < 8; n++)
#pragma unroll
      for (int e = 0; e < 4; e++) {
        const float p = __expf(s[n][e] - reference[e / 2]);
        s[n][e] = p;
        sum[e / 2] += p;
        o[n][e] *= rescale[e / 2];
      }
    uint32_t pa[4][4];
    as_a<T>(s, pa);
    product<T, false>(o, pa, vs);
  }
#pragma unroll
  for (int h = 0; h < 2; h++) {
    // Each thread summed its own columns; the row's sum is the quad's.
    const float total = quad_sum(sum[h]);
    if (!live[h])
      continue;
    const float inverse = total > 0 ? 1 / total : 0;
    T *y = out + (head * rows + row[h]) * HEAD_DIM + 2 * t;
#pragma unroll
    for (int n = 0; n < 8; n++)
      store2(&y[n * 8], o[n][2 * h] * inverse, o[n][2 * h + 1] * inverse);
    if (t == 0)
      lse[head * rows + row[h]] = top[h] == -INFINITY ? INFINITY : top[h] + logf(total);
  }
}

// Grid (ceil(columns / 64), sequences · kv_heads): a block takes 64 keys (16 a warp), keeps
// their gradients in registers and walks the query rows 64 at a time, recomputing each tile's
// probabilities from the forward's log-sum-exp: P = exp(scale·QKᵀ + mask - lse), dV += Pᵀ·dO,
// dS = P·(dO·Vᵀ - dsum) with dsum = rowsum(dO·O), dK += scale·dSᵀ·Q, and dQ += scale·dS·K
// added to `dq` (f32, zeroed by the caller) by atomics, since every block adds to every row.
template <typename T>
__device__ void flash_backward(const T *__restrict__ q, const T *__restrict__ k,
                               const T *__restrict__ v, const T *__restrict__ mask,
                               const T *__restrict__ dout, const float *__restrict__ lse,
                               const float *__restrict__ dsum, float *__restrict__ dq,
                               T *__restrict__ dk, T *__restrict__ dv, uint32_t rows,
                               uint32_t columns, uint32_t length, uint32_t kv_heads, float scale) {
  __shared__ __align__(16) uint16_t qs[TILE * STRIDE];
  __shared__ __align__(16) uint16_t dos[TILE * STRIDE];
  __shared__ __align__(16) uint16_t ks[TILE * STRIDE];
  // The tile's dS as T, `[query, key]`: the A operand of dQ's product.
  __shared__ __align__(16) uint16_t dss[TILE * STRIDE];
  // The mask's tile, `[query, key]`.
  __shared__ __align__(16) uint16_t ms[TILE * STRIDE];
  __shared__ float lses[TILE], dsums[TILE];
  const uint32_t warp = threadIdx.x / 32, g = threadIdx.x % 32 / 4, t = threadIdx.x % 4;
  const size_t head = blockIdx.y, sequence = head / kv_heads;
  const uint16_t *qh = reinterpret_cast<const uint16_t *>(q) + head * rows * HEAD_DIM;
  const uint16_t *doh = reinterpret_cast<const uint16_t *>(dout) + head * rows * HEAD_DIM;
  const uint16_t *kh = reinterpret_cast<const uint16_t *>(k) + head * columns * HEAD_DIM;
  const uint16_t *vh = reinterpret_cast<const uint16_t *>(v) + head * columns * HEAD_DIM;
  const T *mask_head = mask + sequence * length * columns;
  const uint32_t first_key = blockIdx.x * TILE, warp_key = first_key + warp * 16;
  uint32_t key[2];
  bool live[2];
#pragma unroll
  for (int h = 0; h < 2; h++) {
    key[h] = warp_key + g + 8 * h;
    live[h] = key[h] < columns;
  }
  uint32_t ka[4][4], va[4][4];
  load_a(ka, kh, warp_key, columns);
  load_a(va, vh, warp_key, columns);
  load_tile(ks, kh, first_key, columns);
  float dka[8][4] = {}, dva[8][4] = {};
  for (uint32_t first = 0; first < rows; first += TILE) {
    __syncthreads();
    if (!load_mask(ms, mask_head, first, rows, first_key, columns, length))
      continue;
    load_tile(qs, qh, first, rows);
    load_tile(dos, doh, first, rows);
    for (uint32_t i = threadIdx.x; i < TILE; i += FLASH_THREADS) {
      const bool in = first + i < rows;
      lses[i] = in ? lse[head * rows + first + i] : INFINITY;
      dsums[i] = in ? dsum[head * rows + first + i] : 0.f;
    }
    __syncthreads();
    // Sᵀ = K·Qᵀ and dPᵀ = V·dOᵀ for the warp's 16 keys and the tile's 64 queries.
    float st[8][4] = {}, dpt[8][4] = {};
    product<T, true>(st, ka, qs);
    product<T, true>(dpt, va, dos);
#pragma unroll
    for (int n = 0; n < 8; n++)
#pragma unroll
      for (int e = 0; e < 4; e++) {
        const uint32_t local = n * 8 + 2 * t + e % 2;
        // Hidden (the mask's -inf, also past the rows and keys): exp(-inf) = 0.
        const float p =
            __expf(st[n][e] * scale +
                   widen_bits(T{}, ms[local * STRIDE + warp * 16 + g + 8 * (e / 2)]) - lses[local]);
        st[n][e] = p;
        dpt[n][e] = p * (dpt[n][e] - dsums[local]);
      }
    uint32_t pa[4][4], da[4][4];
    as_a<T>(st, pa);
    as_a<T>(dpt, da);
    product<T, false>(dva, pa, dos);
    product<T, false>(dka, da, qs);
#pragma unroll
    for (int n = 0; n < 8; n++)
#pragma unroll
      for (int e = 0; e < 4; e++)
        dss[(n * 8 + 2 * t + e % 2) * STRIDE + warp * 16 + g + 8 * (e / 2)] =
            bits(narrow<T>(dpt[n][e]));
    __syncthreads();
    // dQ for the warp's 16 queries of the tile, over the block's 64 keys.
    uint32_t sa[4][4];
#pragma unroll
    for (int kk = 0; kk < 4; kk++)
      a_rows(dss, warp * 16, kk, sa[kk]);
    float acc[8][4] = {};
    product<T, false>(acc, sa, ks);
#pragma unroll
    for (int h = 0; h < 2; h++) {
      const uint32_t query = first + warp * 16 + g + 8 * h;
      if (query < rows)
#pragma unroll
        for (int n = 0; n < 8; n++)
          add2(&dq[(head * rows + query) * HEAD_DIM + n * 8 + 2 * t], acc[n][2 * h] * scale,
               acc[n][2 * h + 1] * scale);
    }
  }
#pragma unroll
  for (int h = 0; h < 2; h++) {
    if (!live[h])
      continue;
    T *dkr = dk + (head * columns + key[h]) * HEAD_DIM + 2 * t;
    T *dvr = dv + (head * columns + key[h]) * HEAD_DIM + 2 * t;
#pragma unroll
    for (int n = 0; n < 8; n++) {
      store2(&dkr[n * 8], dka[n][2 * h] * scale, dka[n][2 * h + 1] * scale);
      store2(&dvr[n * 8], dva[n][2 * h], dva[n][2 * h + 1]);
    }
  }
}

#define FLASH_KERNELS(T, NAME)                                                                     \
  extern "C" __global__ void __launch_bounds__(FLASH_THREADS) flash_forward_##NAME(                \
      const T *__restrict__ q, const T *__restrict__ k, const T *__restrict__ v,                   \
      const T *__restrict__ mask, T *__restrict__ out, float *__restrict__ lse, uint32_t rows,     \
      uint32_t columns, uint32_t length, uint32_t kv_heads, float scale) {                         \
    flash_forward<T>(q, k, v, mask, out, lse, rows, columns, length, kv_heads, scale);             \
  }                                                                                                \
  extern "C" __global__ void __launch_bounds__(FLASH_THREADS) flash_backward_##NAME(               \
      const T *__restrict__ q, const T *__restrict__ k, const T *__restrict__ v,                   \
      const T *__restrict__ mask, const T *__restrict__ dout, const float *__restrict__ lse,       \
      const float *__restrict__ dsum, float *__restrict__ dq, T *__restrict__ dk,                  \
      T *__restrict__ dv, uint32_t rows, uint32_t columns, uint32_t length, uint32_t kv_heads,     \
      float scale) {                                                                               \
    flash_backward<T>(q, k, v, mask, dout, lse, dsum, dq, dk, dv, rows, columns, length, kv_heads, \
                      scale);                                                                      \
  }

FLASH_KERNELS(__nv_bfloat16, bf16)
FLASH_KERNELS(__half, f16)
