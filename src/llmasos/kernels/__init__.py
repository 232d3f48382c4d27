"""Hand-written CPU kernels (`gemv.cpp`), compiled on first use with the machine's compiler (cached
afterwards), and what decides when to call them: the CPU's features, the dtype to compute in, and up to
how many input rows each kernel beats PyTorch.

`load_ops()` returns the compiled module, or None where it cannot be had (no AVX2/FMA/F16C, no compiler,
not x86, LLMASOS_KERNELS=0, or another process still compiling it after `BUILD_WAIT_S`); everything then
runs on stock PyTorch. This package knows no model: the modules that run a model's layers on these ops
are `llmasos.models.fast` (dense layers, norms, attention, whole blocks) and `llmasos.models.quantize`.
"""

from __future__ import annotations

import os
import platform
import sys
import time
import warnings
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import IO

import torch
from torch import Tensor


def _cpu_flags() -> set[str]:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


BUILD_WAIT_S = 300.0  # how long to wait for another process compiling the kernels (a build takes ~1 minute)


def _build_lock(build_dir: Path, timeout: float) -> IO | None:
    """Our lock on the kernels' build dir, held by the open file returned (None: still busy after `timeout`).

    It is an flock, which the OS drops when its holder dies, unlike torch's own `lock` file, which a process
    killed mid-build leaves behind and torch then waits on forever. Every build takes ours first, so a torch
    lock found while holding ours was left by a dead process, and is removed."""
    import fcntl

    def acquired() -> bool:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            return False

    build_dir.mkdir(parents=True, exist_ok=True)
    f = open(build_dir / "llmasos.lock", "w")
    if not acquired():
        print(
            f"llmasos: waiting up to {timeout:.0f} s for another process compiling the CPU kernels in {build_dir}",
            file=sys.stderr,
            flush=True,
        )
        deadline = time.monotonic() + timeout
        while not acquired():
            if time.monotonic() >= deadline:
                f.close()
                return None
            time.sleep(0.2)
    (build_dir / "lock").unlink(missing_ok=True)
    return f


@cache
def load_ops():
    """The compiled module (`gemv`, `swiglu`, `rms_norm`, `rope_`, `decode_attention`, `decode_block`,
    `int8_gemv`, `int4_gemv`), or None."""
    if os.environ.get("LLMASOS_KERNELS", "1") == "0" or platform.machine() not in ("x86_64", "AMD64"):
        return None
    if not {"avx2", "fma", "f16c"} <= _cpu_flags():
        return None
    try:
        from torch.utils.cpp_extension import _get_build_directory, load

        # torch looks for `ninja` on PATH; the one pip installed beside this interpreter counts too.
        bindir = str(Path(sys.executable).parent)
        if bindir not in os.environ.get("PATH", "").split(os.pathsep):
            os.environ["PATH"] = bindir + os.pathsep + os.environ.get("PATH", "")
        # Built into torch's extension cache (TORCH_EXTENSIONS_DIR); rebuilt only when the source changes.
        build_dir = Path(_get_build_directory("llmasos_gemv", verbose=False))
        lock = _build_lock(build_dir, BUILD_WAIT_S)
        if lock is None:
            warnings.warn(
                f"llmasos: another process has been compiling the CPU kernels in {build_dir} for "
                f"{BUILD_WAIT_S:.0f} s; using stock PyTorch this time",
                stacklevel=2,
            )
            return None
        with lock:
            return load(
                name="llmasos_gemv",
                sources=[str(Path(__file__).with_name("gemv.cpp"))],
                extra_cflags=["-O3", "-mavx2", "-mfma", "-mf16c", "-ffp-contract=off", "-fopenmp"],
                extra_ldflags=["-fopenmp"],
                build_directory=str(build_dir),
                verbose=False,
            )
    except Exception as e:  # no compiler or headers: run on stock PyTorch, and say so once
        warnings.warn(f"llmasos: CPU kernels unavailable, using stock PyTorch ({type(e).__name__}: {e})", stacklevel=2)
        return None


EMPTY = torch.empty(0)  # "no scale" / "no bias" for the kernels


def optional(t: Tensor | None) -> Tensor:
    """`t`, or EMPTY for None: how the kernels take a missing bias, scale or offset."""
    return EMPTY if t is None else t


def native_bf16() -> bool:
    """Whether this CPU has bf16 arithmetic (AVX512_BF16 or AMX); without it PyTorch emulates bf16 slowly."""
    return bool({"avx512_bf16", "amx_bf16"} & _cpu_flags())


def compute_dtype(dtype: torch.dtype, device: torch.device | str) -> torch.dtype:
    """The dtype to compute in over weights of `dtype` on `device`: fp32 for bf16 on a CPU without bf16
    arithmetic (emulated bf16 is several times slower than fp32, and less precise), otherwise `dtype`."""
    if dtype == torch.bfloat16 and torch.device(device).type == "cpu" and not native_bf16():
        return torch.float32
    return dtype


@cache
def max_rows(dtype: torch.dtype) -> int:
    """Up to how many input rows the kernel beats PyTorch's matmul for weights of `dtype`.

    Decoding (a few rows) is memory-bound and the kernel wins. With more rows a matmul is compute-bound:
    oneDNN wins in fp32, and in bf16 on CPUs with native bf16 dot products (AVX512_BF16, AMX). Without
    them PyTorch emulates bf16 matmuls slowly; the kernel (bf16 widened to fp32 in registers) wins below
    about 128 rows (1.2x at 64), and beyond, widening the weight once and an fp32 matmul (1.2x at 512)."""
    if dtype == torch.bfloat16 and not native_bf16():
        return 64
    return 16


QUANTIZED_ROWS = 16  # the int8/int4 kernels' limit; beyond it (a prefill) the quantized layers dequantize
ANY_ROWS = 1 << 30  # the elementwise kernels (norm, rotary, attention) take any number of rows


def takes_kernel(x: Tensor, rows_limit: int) -> bool:
    """Whether `x` takes a kernel: on the CPU, no autograd, at most `rows_limit` rows."""
    return x.device.type == "cpu" and not torch.is_grad_enabled() and x.numel() // x.shape[-1] <= rows_limit


def quantized_ops(x: Tensor):
    """The compiled module when `x` should take the int8/int4 kernels (CPU, no autograd, <= 16 rows), else None."""
    return load_ops() if takes_kernel(x, QUANTIZED_ROWS) else None


@dataclass(slots=True)
class Operands:
    """A linear layer as the kernels take it (`gemv`, `swiglu`, `int8_gemv`, `int4_gemv`, `decode_block`): its
    weight (fp32 or bf16; int8; or int4, two a byte), its bias (fp32, bf16 or fp16, read in place as fp32),
    scales and offsets (int8: scales; int4: both), each EMPTY when the layer has none, and up to how many
    input rows the kernels take it."""

    weight: Tensor
    bias: Tensor
    rows: int
    scales: Tensor = EMPTY
    offsets: Tensor = EMPTY

    @property
    def dense(self) -> bool:
        """fp32 or bf16 weights (what `gemv` and `swiglu` take), not quantized ones."""
        return not self.scales.numel()
