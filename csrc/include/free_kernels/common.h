// Umbrella header for the torch-free math shared by CUDA kernels and host code.
//
//   FK_HOST_DEVICE / FK_INLINE / FK_UNROLL, fk::ceil_div      (config.h)
//   Philox4x32-10 counter-based RNG, uniforms, Box-Muller     (philox.h)
//   log_ndtr, log1mexp, log_add_exp, gelu_tanh,
//   CompensatedSum, Welford                                   (numerics.h)
//
// Compiles under nvcc and plain g++; csrc/tests/ checks it on the CPU.
#pragma once

#include "free_kernels/config.h"
#include "free_kernels/numerics.h"
#include "free_kernels/philox.h"
