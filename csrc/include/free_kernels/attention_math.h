// Pure index and softmax math of the verify_attention CUDA kernel, shared by the
// kernel (device) and by host unit tests (g++, no CUDA needed).
//
// Conventions (PTX ISA, warp-level mma.sync.m16n8k16 with .row.col operands and
// ldmatrix.m8n8.x4): lane = threadIdx.x % 32, g = lane / 4 ("group"),
// t = lane % 4 ("thread in group").  Each function below says which element of
// which tile a lane holds or which shared-memory row/column it points ldmatrix at.
#pragma once

#include <cmath>
#include <cstdint>

#include "free_kernels/config.h"

#define FK_HD FK_HOST_DEVICE FK_INLINE

namespace fk {
namespace attn {

// ---------------------------------------------------------------- tiling
// Head widths the kernel is instantiated for: a multiple of 16 (the mma K step).
// Columns in [head_dim, padded) are zero-filled in shared memory, so they add
// nothing to q.k and give output columns that are never stored.  DiT-XL's 72
// pads to 80 = 5 x k16 (11% waste), not to 128 (78% waste).
FK_HD int padded_head_dim(int head_dim) {
  return head_dim < 1 ? -1 : head_dim <= 64 ? 64 : head_dim <= 80 ? 80 : head_dim <= 128 ? 128 : -1;
}

// Shared-memory row pitch in 16-bit elements: 8 extra elements (16 bytes) make
// the eight 16-byte rows read by one ldmatrix 8x8 matrix fall in distinct banks
// whenever (padded * 2 bytes / 16) is even (64, 80, 128 all are): the row
// starts step through the 32 banks by 4-bank strides.
FK_HD int smem_pitch(int padded) { return padded + 8; }

// Bank (4-byte word mod 32) of the first word of row r of a tile with pitch p.
FK_HD int smem_row_bank(int r, int pitch_elems) { return (r * pitch_elems / 2) % 32; }

// A 16-byte chunk (8 elements) of a row is fully valid or fully padding when
// head_dim % 8 == 0 (the vectorised path); otherwise the kernel loads per element.
FK_HD bool chunk_valid(int row, int chunk, int rows_valid, int head_dim) {
  return row < rows_valid && chunk * 8 < head_dim;
}

// ------------------------------------------------- mma.m16n8k16 fragments
// Accumulator C/D (16 x 8, fp32): 4 values per lane.
FK_HD int mma_c_row(int lane, int i) { return (lane >> 2) + ((i >> 1) & 1) * 8; }
FK_HD int mma_c_col(int lane, int i) { return ((lane & 3) << 1) + (i & 1); }

// Operand A (16 x 16, row major): 8 halves per lane in 4 registers; element e
// is register e / 2, low (e even) or high (e odd) half.
FK_HD int mma_a_row(int lane, int e) { return (lane >> 2) + ((e >> 1) & 1) * 8; }
FK_HD int mma_a_col(int lane, int e) { return ((lane & 3) << 1) + (e & 1) + ((e >> 2) & 1) * 8; }

// Operand B (16 x 8, k x n, "col"): 4 halves per lane in 2 registers.
FK_HD int mma_b_k(int lane, int e) { return ((lane & 3) << 1) + (e & 1) + ((e >> 1) & 1) * 8; }
FK_HD int mma_b_n(int lane, int /*e*/) { return lane >> 2; }

// ----------------------------------------------- ldmatrix.x4 row addresses
// Lane l points at row (l % 8) of 8x8 matrix (l / 8); register j of every lane
// receives matrix j.  The three tile loads of the kernel:
//
// Q as operand A, one 16x16 block (rows m, cols d): matrices
//   0: rows 0-7 cols 0-7, 1: rows 8-15 cols 0-7, 2: rows 0-7 cols 8-15, 3: rows 8-15 cols 8-15
// which are exactly registers a0..a3 of the A fragment.
FK_HD int ldsm_a_row(int lane) { return (lane & 7) + ((lane >> 3) & 1) * 8; }
FK_HD int ldsm_a_col(int lane) { return (lane >> 4) * 8; }

// K as operand B of S = Q K^T (B[k=d][n=key] = K[key][d]), no transpose, 16 keys x
// 16 d: matrices 0: keys 0-7 d 0-7, 1: keys 0-7 d 8-15, 2: keys 8-15 d 0-7,
// 3: keys 8-15 d 8-15 -> registers (b0, b1) of key tile 0, then of key tile 1.
FK_HD int ldsm_k_row(int lane) { return (lane & 7) + (lane >> 4) * 8; }
FK_HD int ldsm_k_col(int lane) { return ((lane >> 3) & 1) * 8; }

// V as operand B of O = P V (B[k=key][n=d] = V[key][d]), WITH .trans, 16 keys x 16 d:
// matrices 0: keys 0-7 d 0-7, 1: keys 8-15 d 0-7, 2: keys 0-7 d 8-15, 3: keys 8-15 d 8-15
// -> registers (b0, b1) of d tile 0, then of d tile 1.
FK_HD int ldsm_v_row(int lane) { return (lane & 7) + ((lane >> 3) & 1) * 8; }
FK_HD int ldsm_v_col(int lane) { return (lane >> 4) * 8; }

// The S accumulator of key tiles 2c and 2c+1 is, element for element, the A
// operand of the 16-key chunk c of P V: A register r takes accumulator values
// (2*(r&1), 2*(r&1)+1) of key tile 2c + (r >> 1).
FK_HD int p_from_s_tile(int r) { return r >> 1; }
FK_HD int p_from_s_elem(int r) { return (r & 1) * 2; }

// ------------------------------------------------------- online softmax
// Scores are kept in log2 units (s * scale * log2 e) so exp becomes exp2.
FK_HD float fast_exp2(float x) {
#if FK_DEVICE_PASS
  return exp2f(x);
#else
  return std::exp2(x);
#endif
}

// Rescale factor applied to the running sum and output when the running row
// max moves from m_old to m_new (m_new >= m_old).  m_old = -inf (first block)
// gives 0; m_new = -inf (a row that saw only masked keys so far) gives 1.
FK_HD float softmax_rescale(float m_old, float m_new) {
  if (m_new == -INFINITY) return 1.f;
  return fast_exp2(m_old - m_new);
}

// exp2(s - m) with a row max that may still be -inf (all keys masked): 0.
FK_HD float softmax_weight(float s, float m) {
  return m == -INFINITY ? 0.f : fast_exp2(s - m);
}

}  // namespace attn
}  // namespace fk

#undef FK_HD
