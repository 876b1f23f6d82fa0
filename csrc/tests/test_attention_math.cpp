// Host test of csrc/include/free_kernels/attention_math.h (g++ only, no CUDA):
//
// 1. a warp emulator of ldmatrix.x4 (plain and .trans) and mma.m16n8k16, written
//    from the PTX ISA fragment tables independently of the header, runs the
//    kernel's tile schedule (the same address helpers and loop nest as
//    verify_attention.cu) and must reproduce S = Q K^T and O = P V exactly;
// 2. the shared-memory pitch makes every ldmatrix phase bank-conflict free;
// 3. the online-softmax helpers merged block by block equal a direct softmax,
//    including masked (-inf) keys;
// 4. padding / chunk validity of the head dim.
//
// Build and run: g++ -std=c++17 -O1 -Icsrc/include -Icsrc/tests csrc/tests/test_attention_math.cpp -o t && ./t\n// (ctest runs it through CMakeLists.txt's csrc/tests/test_*.cpp glob).
#include <cmath>
#include <cstdio>
#include <array>
#include <cstdlib>
#include <vector>

#include "fk_test.h"
#include "free_kernels/attention_math.h"

using namespace fk::attn;
using fk::ceil_div;

// FK_CHECK with a printf-style message
#define CHECK(cond, ...)                                          \
  do {                                                            \
    if (!(cond)) {                                                \
      char fk_msg_[256];                                          \
      std::snprintf(fk_msg_, sizeof fk_msg_, __VA_ARGS__);        \
      ::fk_test::fail(__FILE__, __LINE__, fk_msg_);               \
    }                                                             \
  } while (0)

// ------------------------------------------------------------- warp emulator
// Values are floats holding small integers, so every product and sum is exact.
struct Smem {
  int pitch;
  std::vector<float> v;
  Smem(int rows, int pitch_) : pitch(pitch_), v(static_cast<size_t>(rows) * pitch_, 0.f) {}
  float& at(int r, int c) { return v[static_cast<size_t>(r) * pitch + c]; }
};

// A register = two 16-bit values; reg[lane][j][half]
struct Regs4 { float x[32][4][2]; };

// ldmatrix.m8n8.x4: lane 8j + r supplies the address of row r of matrix j (its
// 8 consecutive elements).  Without .trans, lane l receives row l/4, columns
// 2(l%4) and 2(l%4)+1 of matrix j in register j; with .trans it receives
// rows 2(l%4) and 2(l%4)+1 of column l/4 (the matrix transposed).
static Regs4 emulate_ldmatrix_x4(Smem& s, const int row_of_lane[32], const int col_of_lane[32], bool trans) {
  Regs4 out{};
  for (int j = 0; j < 4; ++j) {
    float m[8][8];
    for (int r = 0; r < 8; ++r)
      for (int c = 0; c < 8; ++c) m[r][c] = s.at(row_of_lane[8 * j + r], col_of_lane[8 * j + r] + c);
    for (int l = 0; l < 32; ++l)
      for (int h = 0; h < 2; ++h)
        out.x[l][j][h] = trans ? m[2 * (l % 4) + h][l / 4] : m[l / 4][2 * (l % 4) + h];
  }
  return out;
}

// mma.m16n8k16 (PTX ISA "Matrix fragments for mma.m16n8k16 with floating point type"):
//   A element a_i (i = 0..7, register i/2): row = groupID + 8 if i in {2,3,6,7},
//     col = 2*threadID_in_group + (i & 1) + 8 if i >= 4
//   B element b_i (i = 0..3): row(k) = 2*threadID_in_group + (i & 1) + 8 if i >= 2, col(n) = groupID
//   C element c_i (i = 0..3): row = groupID + 8 if i >= 2, col = 2*threadID_in_group + (i & 1)
static void emulate_mma(float c[32][4], const float a[32][8], const float b[32][4]) {
  float A[16][16], B[16][8];
  for (int l = 0; l < 32; ++l) {
    const int gid = l >> 2, tig = l % 4;
    for (int i = 0; i < 8; ++i) {
      const int row = gid + ((i == 2 || i == 3 || i == 6 || i == 7) ? 8 : 0);
      const int col = 2 * tig + (i & 1) + (i >= 4 ? 8 : 0);
      A[row][col] = a[l][i];
    }
    for (int i = 0; i < 4; ++i) B[2 * tig + (i & 1) + (i >= 2 ? 8 : 0)][gid] = b[l][i];
  }
  for (int l = 0; l < 32; ++l) {
    const int gid = l >> 2, tig = l % 4;
    for (int i = 0; i < 4; ++i) {
      const int row = gid + (i >= 2 ? 8 : 0), col = 2 * tig + (i & 1);
      float acc = 0.f;
      for (int k = 0; k < 16; ++k) acc += A[row][k] * B[k][col];
      c[l][i] += acc;
    }
  }
}

// ---------------------------------------- the kernel's schedule, one warp
// Q: 16 x pad, K and V: 64 x pad (keys x d), pitch from smem_pitch(pad).
static void run_tile_schedule(int pad, int head_dim) {
  const int kBlockN = 64, pitch = smem_pitch(pad);
  Smem sQ(16, pitch), sK(kBlockN, pitch), sV(kBlockN, pitch);
  // small integers; zero fill past head_dim as the loader does; NaN in the
  // row pitch padding (never read)
  auto fill = [&](Smem& s, int rows, int seed) {
    for (int r = 0; r < rows; ++r)
      for (int c = 0; c < pitch; ++c)
        s.at(r, c) = c >= pad ? NAN : c < head_dim ? static_cast<float>(((r * 7 + c * 3 + seed) % 5) - 2) : 0.f;
  };
  fill(sQ, 16, 1);
  fill(sK, kBlockN, 2);
  fill(sV, kBlockN, 3);

  int row_of[32], col_of[32];
  // Q fragments
  const int ksteps = pad / 16;
  std::vector<Regs4> qf(ksteps);
  for (int kk = 0; kk < ksteps; ++kk) {
    for (int l = 0; l < 32; ++l) { row_of[l] = ldsm_a_row(l); col_of[l] = kk * 16 + ldsm_a_col(l); }
    qf[kk] = emulate_ldmatrix_x4(sQ, row_of, col_of, false);
  }
  // S = Q K^T
  float s[8][32][4] = {};
  for (int kk = 0; kk < ksteps; ++kk) {
    for (int np = 0; np < 4; ++np) {
      for (int l = 0; l < 32; ++l) { row_of[l] = np * 16 + ldsm_k_row(l); col_of[l] = kk * 16 + ldsm_k_col(l); }
      Regs4 kb = emulate_ldmatrix_x4(sK, row_of, col_of, false);
      float a[32][8], b0[32][4], b1[32][4];
      for (int l = 0; l < 32; ++l) {
        for (int r = 0; r < 4; ++r) { a[l][2 * r] = qf[kk].x[l][r][0]; a[l][2 * r + 1] = qf[kk].x[l][r][1]; }
        b0[l][0] = kb.x[l][0][0]; b0[l][1] = kb.x[l][0][1]; b0[l][2] = kb.x[l][1][0]; b0[l][3] = kb.x[l][1][1];
        b1[l][0] = kb.x[l][2][0]; b1[l][1] = kb.x[l][2][1]; b1[l][2] = kb.x[l][3][0]; b1[l][3] = kb.x[l][3][1];
      }
      emulate_mma(s[2 * np], a, b0);
      emulate_mma(s[2 * np + 1], a, b1);
    }
  }
  // check S against the naive product, through the accumulator mapping
  for (int t = 0; t < 8; ++t)
    for (int l = 0; l < 32; ++l)
      for (int i = 0; i < 4; ++i) {
        const int row = mma_c_row(l, i), key = t * 8 + mma_c_col(l, i);
        float ref = 0.f;
        for (int d = 0; d < head_dim; ++d) ref += sQ.at(row, d) * sK.at(key, d);
        CHECK(s[t][l][i] == ref, "pad %d S[%d][%d] = %g, want %g", pad, row, key, s[t][l][i], ref);
      }
  // use S itself as P (small integers: exact) and run O = P V
  const int otiles = pad / 8;
  std::vector<std::array<std::array<float, 4>, 32>> o(otiles);
  for (auto& t : o) for (auto& ln : t) ln = {0.f, 0.f, 0.f, 0.f};
  for (int kc = 0; kc < kBlockN / 16; ++kc) {
    float pa[32][8];
    for (int l = 0; l < 32; ++l)
      for (int rr = 0; rr < 4; ++rr) {
        const float* st = s[2 * kc + p_from_s_tile(rr)][l];
        pa[l][2 * rr] = st[p_from_s_elem(rr)];
        pa[l][2 * rr + 1] = st[p_from_s_elem(rr) + 1];
      }
    for (int dp = 0; dp < ksteps; ++dp) {
      for (int l = 0; l < 32; ++l) { row_of[l] = kc * 16 + ldsm_v_row(l); col_of[l] = dp * 16 + ldsm_v_col(l); }
      Regs4 vb = emulate_ldmatrix_x4(sV, row_of, col_of, true);
      float b0[32][4], b1[32][4], c0[32][4], c1[32][4];
      for (int l = 0; l < 32; ++l) {
        b0[l][0] = vb.x[l][0][0]; b0[l][1] = vb.x[l][0][1]; b0[l][2] = vb.x[l][1][0]; b0[l][3] = vb.x[l][1][1];
        b1[l][0] = vb.x[l][2][0]; b1[l][1] = vb.x[l][2][1]; b1[l][2] = vb.x[l][3][0]; b1[l][3] = vb.x[l][3][1];
        for (int i = 0; i < 4; ++i) { c0[l][i] = o[2 * dp][l][i]; c1[l][i] = o[2 * dp + 1][l][i]; }
      }
      emulate_mma(c0, pa, b0);
      emulate_mma(c1, pa, b1);
      for (int l = 0; l < 32; ++l)
        for (int i = 0; i < 4; ++i) { o[2 * dp][l][i] = c0[l][i]; o[2 * dp + 1][l][i] = c1[l][i]; }
    }
  }
  // naive P V with P[row][key] = S
  for (int t = 0; t < otiles; ++t)
    for (int l = 0; l < 32; ++l)
      for (int i = 0; i < 4; ++i) {
        const int row = mma_c_row(l, i), d = t * 8 + mma_c_col(l, i);
        float ref = 0.f;
        for (int key = 0; key < kBlockN; ++key) {
          float sq = 0.f;
          for (int dd = 0; dd < head_dim; ++dd) sq += sQ.at(row, dd) * sK.at(key, dd);
          ref += sq * sV.at(key, d);
        }
        CHECK(o[t][l][i] == ref, "pad %d O[%d][%d] = %g, want %g", pad, row, d, o[t][l][i], ref);
        if (d >= head_dim) CHECK(ref == 0.f, "padded output column %d not zero", d);
      }
}

// ---------------------------------------------- bank conflicts of ldmatrix
// Each 8x8 matrix is one phase: its 8 row addresses (16 bytes = 4 banks each)
// must cover 32 distinct banks.
static void check_banks(int pad) {
  const int pitch = smem_pitch(pad);
  int (*fns[3][2])(int) = {{ldsm_a_row, ldsm_a_col}, {ldsm_k_row, ldsm_k_col}, {ldsm_v_row, ldsm_v_col}};
  for (auto& f : fns) {
    for (int colbase = 0; colbase < pad; colbase += 16) {
      for (int j = 0; j < 4; ++j) {
        bool used[32] = {};
        for (int r = 0; r < 8; ++r) {
          const int lane = 8 * j + r;
          const long word = (static_cast<long>(f[0](lane)) * pitch + colbase + f[1](lane)) / 2;
          CHECK(((f[0](lane) * pitch + colbase + f[1](lane)) * 2) % 16 == 0, "ldmatrix row address not 16B aligned");
          for (int w = 0; w < 4; ++w) {
            const int bank = static_cast<int>((word + w) % 32);
            CHECK(!used[bank], "pad %d: bank conflict in ldmatrix phase %d", pad, j);
            used[bank] = true;
          }
        }
      }
    }
  }
}

// -------------------------------------------------------- online softmax
static void check_online_softmax() {
  std::srand(7);
  for (int trial = 0; trial < 50; ++trial) {
    const int n = 1 + std::rand() % 200, block = 1 + std::rand() % 64;
    const float scale = (trial % 2) ? 30.f : 0.01f;
    std::vector<float> s(n), v(n);
    for (int i = 0; i < n; ++i) {
      s[i] = scale * (static_cast<float>(std::rand()) / RAND_MAX - 0.5f);
      v[i] = static_cast<float>(std::rand()) / RAND_MAX;
    }
    // direct
    float mx = -INFINITY;
    for (float x : s) mx = std::fmax(mx, x);
    double num = 0, den = 0;
    for (int i = 0; i < n; ++i) { double p = std::exp2(static_cast<double>(s[i]) - mx); num += p * v[i]; den += p; }
    // blockwise with a padded (masked) tail as the kernel sees it
    float m = -INFINITY, l = 0.f, o = 0.f;
    const int nb = ceil_div(n, block);
    for (int j = 0; j < nb; ++j) {
      float bmax = -INFINITY;
      for (int i = j * block; i < (j + 1) * block; ++i) bmax = std::fmax(bmax, i < n ? s[i] : -INFINITY);
      const float m_new = std::fmax(m, bmax);
      const float alpha = softmax_rescale(m, m_new);
      float sum = 0.f, acc = 0.f;
      for (int i = j * block; i < (j + 1) * block; ++i) {
        const float p = softmax_weight(i < n ? s[i] : -INFINITY, m_new);
        sum += p;
        acc += p * (i < n ? v[i] : 0.f);
      }
      l = l * alpha + sum;
      o = o * alpha + acc;
      m = m_new;
    }
    const double want = num / den, got = o / l;
    CHECK(std::fabs(got - want) <= 1e-5 * std::fabs(want) + 1e-6, "online softmax %g vs %g (n=%d block=%d)", got, want,
          n, block);
  }
  CHECK(softmax_rescale(-INFINITY, 3.f) == 0.f, "rescale from -inf");
  CHECK(softmax_rescale(-INFINITY, -INFINITY) == 1.f, "rescale with all masked");
  CHECK(softmax_weight(-INFINITY, -INFINITY) == 0.f, "weight with all masked");
  CHECK(softmax_weight(-INFINITY, 1.f) == 0.f, "masked weight");
}

static void check_padding() {
  CHECK(padded_head_dim(72) == 80, "72 -> 80");
  CHECK(padded_head_dim(64) == 64 && padded_head_dim(128) == 128 && padded_head_dim(1) == 64, "pads");
  CHECK(padded_head_dim(129) == -1 && padded_head_dim(0) == -1, "unsupported head dims");
  for (int hd = 1; hd <= 128; ++hd) CHECK(padded_head_dim(hd) % 16 == 0 && padded_head_dim(hd) >= hd, "pad %d", hd);
  // 72 = 9 valid 16-byte chunks of 10
  int valid = 0;
  for (int ch = 0; ch < 10; ++ch) valid += chunk_valid(0, ch, 1, 72);
  CHECK(valid == 9, "chunks of 72: %d", valid);
  CHECK(!chunk_valid(5, 0, 5, 72), "row past N");
}

FK_TEST(ldmatrix_phases_are_bank_conflict_free) {
  for (int pad : {64, 80, 128}) check_banks(pad);
}
FK_TEST(tile_schedule_reproduces_qk_and_pv_hd64) { run_tile_schedule(64, 64); }
FK_TEST(tile_schedule_reproduces_qk_and_pv_hd72_padded_to_80) { run_tile_schedule(80, 72); }
FK_TEST(tile_schedule_reproduces_qk_and_pv_hd128) { run_tile_schedule(128, 128); }
FK_TEST(tile_schedule_reproduces_qk_and_pv_hd100_padded_to_128) { run_tile_schedule(128, 100); }
FK_TEST(online_softmax_matches_direct_softmax) { check_online_softmax(); }
FK_TEST(head_dim_padding_and_chunks) { check_padding(); }

int main() { return fk_test::run_all(); }
