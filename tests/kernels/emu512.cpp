// gemv.cpp compiled for AVX2 with its AVX-512 paths on, over the emulation in emu512.h (tests only).
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include "emu512.h"
#include "../../src/llmasos/kernels/gemv.cpp"
