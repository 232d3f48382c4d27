"""Hand-written CPU kernels, compiled on first use with the machine's compiler (cached afterwards),
and `use_gemv_kernels`, which points a model's linear layers at them for decoding.

`kernels()` returns None where they cannot be had (no AVX2/FMA, no compiler, not x86, or
LLMASOS_KERNELS=0); everything then runs on stock PyTorch.
"""

from __future__ import annotations

import os
import platform
import sys
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
def kernels():
    """The compiled module (`gemv`, `int8_gemv`, `int4_gemv`), or None."""
    if os.environ.get("LLMASOS_KERNELS", "1") == "0" or platform.machine() not in ("x86_64", "AMD64"):
        return None
    if not {"avx2", "fma"} <= _cpu_flags():
        return None
    try:
        from torch.utils.cpp_extension import load

        # torch looks for `ninja` on PATH; the one pip installed beside this interpreter counts too.
        bindir = str(Path(sys.executable).parent)
        if bindir not in os.environ.get("PATH", "").split(os.pathsep):
            os.environ["PATH"] = bindir + os.pathsep + os.environ.get("PATH", "")
        # Built into torch's extension cache (TORCH_EXTENSIONS_DIR); rebuilt only when the source changes.
        module = load(name="llmasos_gemv", sources=[str(Path(__file__).with_name("gemv.cpp"))],
                      extra_cflags=["-O3", "-mavx2", "-mfma", "-fopenmp"], extra_ldflags=["-fopenmp"],
                      verbose=False)
    except Exception as e:  # no compiler or headers: run on stock PyTorch, and say so once
        import warnings

        warnings.warn(f"llmasos: CPU kernels unavailable, using stock PyTorch ({type(e).__name__}: {e})")
        return None
    return module


EMPTY = torch.empty(0)  # "no scale" / "no bias" for the kernels


def native_bf16() -> bool:
    """Whether this CPU has bf16 arithmetic (AVX512_BF16 or AMX); without it PyTorch emulates bf16 slowly."""
    return bool({"avx512_bf16", "amx_bf16"} & _cpu_flags())


@lru_cache(maxsize=None)
def max_rows(dtype: torch.dtype) -> int:
    """Up to how many input rows the kernel beats PyTorch's matmul for weights of `dtype`.

    Decoding (a few rows) is memory-bound and the kernel wins. With more rows a matmul is compute-bound:
    oneDNN wins in fp32, and in bf16 on CPUs with native bf16 dot products (AVX512_BF16, AMX). Without
    them PyTorch emulates bf16 matmuls slowly; the kernel (bf16 widened to fp32 in registers) wins up to
    about 64 rows, and beyond, widening the weight once and an fp32 matmul (measured here: 2x at 512)."""
    if dtype == torch.bfloat16 and not native_bf16():
        return 64
    return 16


def small_batch_gemv(x: Tensor, weight: Tensor, scale: Tensor | None, bias: Tensor | None) -> Tensor | None:
    """`x @ weight.T * scale + bias` through the kernel where it is the faster path (CPU, no autograd,
    few enough rows); None otherwise, and the caller takes its usual path."""
    rows = x.numel() // weight.shape[1]
    if x.device.type != "cpu" or torch.is_grad_enabled() or rows > max_rows(weight.dtype):
        return None
    module = kernels()
    if module is None:
        return None
    y = module.gemv(x.contiguous(), weight, EMPTY if scale is None else scale,
                    EMPTY if bias is None else bias.to(x.dtype))
    return y.view(*x.shape[:-1], weight.shape[0])


def quantized_kernel(x: Tensor):
    """The compiled module when `x` should take the int8/int4 kernels (CPU, no autograd, <= 16 rows)."""
    if x.device.type != "cpu" or torch.is_grad_enabled() or x.numel() // x.shape[-1] > 16:
        return None
    return kernels()


class GemvLinear(nn.Linear):
    """An `nn.Linear` whose small-batch products (decoding) run on the kernel; see `max_rows`."""

    def forward(self, x: Tensor) -> Tensor:
        y = small_batch_gemv(x, self.weight, None, self.bias)
        if y is not None:
            return y
        if x.dtype != self.weight.dtype:  # fp32 activations over bf16 weights (see use_gemv_kernels): widen them
            return F.linear(x, self.weight.to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))
        return F.linear(x, self.weight, self.bias)


def use_gemv_kernels(model: nn.Module) -> bool:
    """Switch every CPU `nn.Linear` of `model` to `GemvLinear` in place (same parameters, no copy).

    A bf16 model on a CPU without bf16 arithmetic then computes its activations in fp32, as llama.cpp
    does: the weights stay bf16 and are widened in the kernels' registers, while norms, rotary and
    attention run in fp32 instead of emulated bf16 (several times faster, and more precise).
    Returns False, changing nothing, where the kernels are unavailable."""
    if kernels() is None:
        return False
    for module in model.modules():
        if type(module) is nn.Linear and module.weight.device.type == "cpu" and module.weight.dtype in (
                torch.float32, torch.bfloat16):
            module.__class__ = GemvLinear
    if hasattr(model, "activation_dtype"):  # a Transformer
        embed = model.model.embed_tokens.weight
        if embed.dtype == torch.bfloat16 and embed.device.type == "cpu" and not native_bf16():
            model.activation_dtype = torch.float32
    return True
