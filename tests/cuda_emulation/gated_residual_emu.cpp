// C ABI around csrc/kernels/gated_residual.cu built under the host emulation
// (fk_cuda_emu.h), for ctypes (tests/cuda_emulation/harness.py); same arguments as
// _C.gated_residual, strides as a pointer to 11 int64, stream 0.
#include "emu_abi.h"
#include "gated_residual_emu.cu.inc"

extern "C" int emu_gated_residual(uint64_t x, uint64_t gate, uint64_t y, uint64_t out, int64_t B, int64_t N,
                                  int64_t H, const int64_t* s, int64_t code, char* err, int n_err) {
  FK_EMU_TRY(fk::gated_residual(x, gate, y, out, B, N, H, std::vector<int64_t>(s, s + 11), code, 0))
}
