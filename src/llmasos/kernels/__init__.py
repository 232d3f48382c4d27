"""Hand-written CPU kernels, compiled on first use with the machine's compiler (cached afterwards),
and `use_gemv_kernels`, which points a model's linear layers at them for batch-1 decoding.

`gemv()` returns None where the kernels cannot be had (no AVX2/FMA, no compiler, not x86, or
LLMASOS_KERNELS=0); everything then runs on stock PyTorch.
"""

from __future__ import annotations

import os
import platform
from functools import lru_cache
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def _cpu_flags() -> set[str]:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


@lru_cache(maxsize=None)
def gemv():
    """The compiled `gemv(x, w, scale, bias)` function, or None."""
    if os.environ.get("LLMASOS_KERNELS", "1") == "0" or platform.machine() not in ("x86_64", "AMD64"):
        return None
    if not {"avx2", "fma"} <= _cpu_flags():
        return None
    try:
        from torch.utils.cpp_extension import load

        # Built into torch's extension cache (TORCH_EXTENSIONS_DIR); rebuilt only when the source changes.
        module = load(name="llmasos_gemv", sources=[str(Path(__file__).with_name("gemv.cpp"))],
                      extra_cflags=["-O3", "-mavx2", "-mfma", "-fopenmp"], extra_ldflags=["-fopenmp"],
                      verbose=False)
    except Exception as e:  # no compiler or headers: run on stock PyTorch, and say so once
        import warnings

        warnings.warn(f"llmasos: CPU kernels unavailable, using stock PyTorch ({type(e).__name__}: {e})")
        return None
    return module.gemv


_EMPTY = torch.empty(0)


def single_row_gemv(x: Tensor, weight: Tensor, scale: Tensor | None, bias: Tensor | None) -> Tensor | None:
    """`x @ weight.T * scale + bias` through the kernel when `x` is one row on the CPU (decoding one
    sequence, no autograd); None otherwise, and the caller takes its usual path."""
    if x.numel() != weight.shape[1] or x.device.type != "cpu" or torch.is_grad_enabled():
        return None
    kernel = gemv()
    if kernel is None:
        return None
    y = kernel(x.contiguous(), weight, _EMPTY if scale is None else scale,
               _EMPTY if bias is None else bias.to(x.dtype))
    return y.view(*x.shape[:-1], weight.shape[0])


class GemvLinear(nn.Linear):
    """An `nn.Linear` whose single-row products (decoding one sequence) run on the GEMV kernel."""

    def forward(self, x: Tensor) -> Tensor:
        y = single_row_gemv(x, self.weight, None, self.bias)
        return F.linear(x, self.weight, self.bias) if y is None else y


def use_gemv_kernels(model: nn.Module) -> bool:
    """Switch every CPU `nn.Linear` of `model` to `GemvLinear` in place (same parameters, no copy).

    Returns False, changing nothing, where the kernels are unavailable."""
    if gemv() is None:
        return False
    for module in model.modules():
        if type(module) is nn.Linear and module.weight.device.type == "cpu" and module.weight.dtype in (
                torch.float32, torch.bfloat16):
            module.__class__ = GemvLinear
    return True
