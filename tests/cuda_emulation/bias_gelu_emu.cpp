// C ABI around csrc/kernels/bias_gelu.cu built under the host emulation
// (fk_cuda_emu.h), for ctypes (tests/cuda_emulation/harness.py); same arguments as
// _C.bias_gelu, strides as a pointer to 7 int64, stream 0.
#include "emu_abi.h"
#include "bias_gelu_emu.cu.inc"

extern "C" int emu_bias_gelu(uint64_t x, uint64_t bias, uint64_t out, int64_t B, int64_t N, int64_t K,
                             const int64_t* s, int64_t code, char* err, int n_err) {
  FK_EMU_TRY(fk::bias_gelu(x, bias, out, B, N, K, std::vector<int64_t>(s, s + 7), code, 0))
}
