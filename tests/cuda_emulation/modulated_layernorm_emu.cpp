// C ABI around csrc/kernels/modulated_layernorm.cu built under the host emulation
// (fk_cuda_emu.h), for ctypes (tests/cuda_emulation/harness.py); same arguments as
// _C.modulated_layernorm, strides as a pointer to 10 int64, stream 0.
#include "emu_abi.h"
#include "modulated_layernorm_emu.cu.inc"

extern "C" int emu_modulated_layernorm(uint64_t x, uint64_t shift, uint64_t scale, uint64_t out, int64_t B,
                                       int64_t N, int64_t H, double eps, const int64_t* s, int64_t code, char* err,
                                       int n_err) {
  FK_EMU_TRY(fk::modulated_layernorm(x, shift, scale, out, B, N, H, eps, std::vector<int64_t>(s, s + 10), code, 0))
}
