// Stand-in for the CUDA header of the same name (host emulation, see fk_cuda_emu.h).
#pragma once
#include "fk_cuda_emu.h"
