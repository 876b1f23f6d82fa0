// The emulated csrc/kernels/runtime.cu: the emulated device is always usable.
namespace fk {
void check_cuda_available() {}
}  // namespace fk
