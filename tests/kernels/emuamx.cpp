// gemv.cpp compiled for AVX2 with its AVX-512 and AMX paths on, over the emulations in emu512.h and emuamx.h (tests only).
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include "emu512.h"
#include "emuamx.h"
#include "../../src/llmasos/kernels/gemv.cpp"
