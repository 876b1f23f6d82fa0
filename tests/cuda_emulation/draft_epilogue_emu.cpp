// C ABI around csrc/kernels/draft_epilogue.cu built under the host emulation
// (fk_cuda_emu.h), for ctypes (tests/cuda_emulation/harness.py).  The arguments of
// _C.draft_epilogue in arrays: p the 14 pointers, s the 34 strides, codes the 3
// dtype codes, sizes (G, R, N, H, C, S, patch_size, weight_rows, table_stride),
// f (eps, cfg_scale), flags (guidance_channels, learned_variance, predict_xstart,
// clip_denoised); stream 0.
#include "emu_abi.h"
#include "draft_epilogue_emu.cu.inc"

extern "C" int emu_draft_epilogue(const uint64_t* p, const int64_t* s, const int64_t* codes, const int64_t* sizes,
                                  const double* f, const int64_t* flags, char* err, int n_err) {
  FK_EMU_TRY(fk::draft_epilogue(p[0], p[1], p[2], p[3], p[4], p[5], p[6], p[7], p[8], p[9], p[10], p[11], p[12],
                                p[13], std::vector<int64_t>(s, s + 34), std::vector<int64_t>(codes, codes + 3),
                                sizes[0], sizes[1], sizes[2], sizes[3], sizes[4], sizes[5], sizes[6], sizes[7],
                                sizes[8], f[0], f[1], flags[0], flags[1] != 0, flags[2] != 0, flags[3] != 0, 0))
}
