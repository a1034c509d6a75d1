// Composition on the GPU: one launch per part copies each of its rows into its place in every
// row of the composed buffer (a strided copy). The driver's own 2D copy (cuMemcpy2DAsync) runs
// at about 0.4 of a plain device-to-device copy on an H200; this kernel's loads and stores are
// plain and coalesced, as a device-to-device copy's.
//
// The loader embeds the PTX that `loader/kernels/build` makes of this file (it builds without a
// CUDA toolkit; the driver compiles the PTX for its GPU when the loader opens it).

#include <cstddef>

// Rows of `row_bytes` from `src` (rows `src_pitch` bytes apart) to `dst` (`dst_pitch` apart), in
// `Word`s: every size, pitch and address must be a multiple of `sizeof(Word)`.
template <typename Word>
__device__ void copy_rows(const char* __restrict__ src, size_t src_pitch, char* __restrict__ dst,
                          size_t dst_pitch, size_t row_bytes, unsigned int rows) {
  const size_t words = row_bytes / sizeof(Word);
  const size_t stride = (size_t)gridDim.x * blockDim.x;
  for (unsigned int row = blockIdx.y; row < rows; row += gridDim.y) {
    const Word* from = reinterpret_cast<const Word*>(src + row * src_pitch);
    Word* to = reinterpret_cast<Word*>(dst + row * dst_pitch);
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < words; i += stride) {
      to[i] = from[i];
    }
  }
}

// 16-byte words where the shapes allow (a head's tokens are 128 bytes or more of bf16 in every
// model the trainer knows), bytes otherwise.
extern "C" __global__ void copy_rows_16(const char* src, size_t src_pitch, char* dst,
                                        size_t dst_pitch, size_t row_bytes, unsigned int rows) {
  copy_rows<uint4>(src, src_pitch, dst, dst_pitch, row_bytes, rows);
}

extern "C" __global__ void copy_rows_1(const char* src, size_t src_pitch, char* dst,
                                       size_t dst_pitch, size_t row_bytes, unsigned int rows) {
  copy_rows<unsigned char>(src, src_pitch, dst, dst_pitch, row_bytes, rows);
}
