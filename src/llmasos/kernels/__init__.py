"""Hand-written CPU kernels (`gemv.cpp`), and what decides when to call them: the CPU's instruction-set
level, the dtype to compute in, and up to how many input rows each kernel beats PyTorch.

The kernels are compiled for one level (`LEVELS`: AVX2+FMA, AVX-512, AVX-512 VNNI, AVX512_BF16, AMX) on first use with the
machine's compiler, into torch's extension cache under a name hashed from the source and flags
(`build_name`), and loaded from there afterwards. The level is the CPU's own (`cpu_level`) or a lower one
forced with `LLMASOS_ISA`. `load_ops()` returns the compiled module, or None where it cannot be had (no
AVX2/FMA/F16C, no compiler, not x86, LLMASOS_KERNELS=0, or another process still compiling it after
`BUILD_WAIT_S`); everything then runs on stock PyTorch. This package knows no model: the modules that run a
model's layers on these ops are `llmasos.models.fast` (dense layers, norms, attention, whole blocks)
and `llmasos.models.quantize`.
"""

from __future__ import annotations

import hashlib
import importlib.util
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


@cache
def _cpuinfo(field: str) -> str:
    """The first `field` line of /proc/cpuinfo ("flags", "model name"), or "" where there is none."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(field):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return ""


@cache
def _cpu_flags() -> frozenset[str]:
    return frozenset(_cpuinfo("flags").split())


def cpu_model() -> str:
    """The CPU's name as the OS reports it (for bench headers and `llmasos info --system`)."""
    return _cpuinfo("model name") or platform.processor() or platform.machine()


@dataclass(frozen=True)
class Level:
    """An instruction-set level the kernels are built for: the CPU flags it needs and the compiler flags that
    let `gemv.cpp` use them (its `#if defined(__AVX512F__)` etc. choose the code)."""

    name: str
    needs: frozenset[str]
    cflags: tuple[str, ...]


_AVX2 = Level("avx2", frozenset({"avx2", "fma", "f16c"}), ("-mavx2", "-mfma", "-mf16c"))
_AVX512 = Level(
    "avx512",
    _AVX2.needs | {"avx512f", "avx512bw", "avx512vl", "avx512dq"},
    (*_AVX2.cflags, "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq"),
)
_VNNI = Level("avx512_vnni", _AVX512.needs | {"avx512_vnni"}, (*_AVX512.cflags, "-mavx512vnni"))
_BF16 = Level("avx512_bf16", _VNNI.needs | {"avx512_bf16"}, (*_VNNI.cflags, "-mavx512bf16"))
_AMX = Level("amx", _BF16.needs | {"amx_tile", "amx_bf16"}, (*_BF16.cflags, "-mamx-tile", "-mamx-bf16"))
LEVELS: tuple[Level, ...] = (_AVX2, _AVX512, _VNNI, _BF16, _AMX)  # lowest first; each includes the ones before it
LEVEL_NAMES = tuple(level.name for level in LEVELS)


def cpu_level() -> Level | None:
    """The highest level this CPU runs (None: not x86 or no AVX2/FMA/F16C, so no kernels)."""
    if platform.machine() not in ("x86_64", "AMD64"):
        return None
    runs = [level for level in LEVELS if level.needs <= _cpu_flags()]
    return runs[-1] if runs else None


def kernel_level() -> Level | None:
    """The level the kernels run at: the CPU's own, or the lower one `LLMASOS_ISA` names (tests run every level
    below the machine's this way). A level above the CPU's is refused with a warning (it would crash); a name
    that is not a level is an error naming the ones that are."""
    own = cpu_level()
    wanted = os.environ.get("LLMASOS_ISA", "").strip().lower()
    if not wanted or own is None:
        return own
    if wanted not in LEVEL_NAMES:
        raise ValueError(f"LLMASOS_ISA={wanted!r} is not a kernel level; the levels are {', '.join(LEVEL_NAMES)}")
    if LEVEL_NAMES.index(wanted) > LEVEL_NAMES.index(own.name):
        warnings.warn(f"llmasos: LLMASOS_ISA={wanted} is above this CPU's level ({own.name}); using {own.name}", stacklevel=2)
        return own
    return LEVELS[LEVEL_NAMES.index(wanted)]


SOURCE = Path(__file__).with_name("gemv.cpp")
CFLAGS = ("-O3", "-ffp-contract=off", "-fopenmp")


def build_name(level: Level) -> str:
    """The build's name in torch's extension cache: the level and a hash of everything the binary depends on
    (source, flags, torch, Python), so identical sources share one build across checkouts and venvs, and
    different ones never evict each other (one name for all made two checkouts rebuild in turn)."""
    digest = hashlib.sha256()
    for part in (SOURCE.read_bytes(), " ".join(CFLAGS + level.cflags).encode(), torch.__version__.encode(), sys.version.encode()):
        digest.update(part)
    return f"llmasos_{level.name}_{digest.hexdigest()[:12]}"


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


def load_ops():
    """The compiled module (`gemv`, `swiglu`, `rms_norm`, `rope_`, `decode_attention`, `decode_block`,
    `int8_gemv`, `int4_gemv`) at `kernel_level()`, or None. Cheap: called by every fast module's forward."""
    return _ops(os.environ.get("LLMASOS_KERNELS", "1"), os.environ.get("LLMASOS_ISA", ""))


@cache
def _ops(enabled: str, isa: str):
    if enabled == "0":
        return None
    level = kernel_level()
    return None if level is None else ops_at(level)


@cache
def ops_at(level: Level):
    """The kernels built for `level` (compiled on first use, then loaded from torch's extension cache), or None
    with a warning where they cannot be built (no compiler or headers)."""
    try:
        from torch.utils.cpp_extension import _get_build_directory, load

        # torch looks for `ninja` on PATH; the one pip installed beside this interpreter counts too.
        bindir = str(Path(sys.executable).parent)
        if bindir not in os.environ.get("PATH", "").split(os.pathsep):
            os.environ["PATH"] = bindir + os.pathsep + os.environ.get("PATH", "")
        name = build_name(level)
        build_dir = Path(_get_build_directory(name, verbose=False))
        if (build_dir / BUILT).exists():  # a finished build of these very sources: no compiler, no lock
            return _import(name, build_dir / f"{name}.so")
        lock = _build_lock(build_dir, BUILD_WAIT_S)
        if lock is None:
            warnings.warn(
                f"llmasos: another process has been compiling the CPU kernels in {build_dir} for "
                f"{BUILD_WAIT_S:.0f} s; using stock PyTorch this time",
                stacklevel=2,
            )
            return None
        with lock:
            module = load(
                name=name,
                sources=[str(SOURCE)],
                extra_cflags=[*CFLAGS, *level.cflags],
                extra_ldflags=["-fopenmp"],
                build_directory=str(build_dir),
                verbose=False,
            )
            (build_dir / BUILT).write_text(f"{level.name} {' '.join(level.cflags)}\n")
            return module
    except Exception as e:  # no compiler or headers: run on stock PyTorch, and say so once
        warnings.warn(f"llmasos: CPU kernels unavailable, using stock PyTorch ({type(e).__name__}: {e})", stacklevel=2)
        return None


BUILT = "llmasos.built"  # written into a build dir once its module has been built and loaded


def _import(name: str, path: Path):
    """A finished build's module, imported as torch's loader would (without re-running its build check)."""
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def build_status(level: Level) -> tuple[str, bool]:
    """Where `level`'s build lives and whether it is finished (for `llmasos info --system`)."""
    from torch.utils.cpp_extension import _get_build_directory

    build_dir = Path(_get_build_directory(build_name(level), verbose=False))
    return str(build_dir), (build_dir / BUILT).exists()


def system_report() -> list[tuple[str, str]]:
    """What this machine gives the kernels, as (name, value) rows: the CPU, its instruction sets, bf16
    arithmetic, the kernel level and its build (`llmasos info --system` and the bench's header)."""
    own, level = cpu_level(), kernel_level()
    wanted = ("avx2", "fma", "f16c", "avx_vnni", "avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512_vnni")
    wanted += ("avx512_bf16", "avx512_fp16", "amx_tile", "amx_bf16", "amx_int8")
    kernels = f"CPU level {own.name if own else 'none'}, kernel level {level.name if level else 'none'}"
    if os.environ.get("LLMASOS_ISA"):
        kernels += f" (LLMASOS_ISA={os.environ['LLMASOS_ISA']})"
    if os.environ.get("LLMASOS_KERNELS") == "0":
        kernels += " (off: LLMASOS_KERNELS=0)"
    rows = [
        ("CPU", cpu_model()),
        ("instruction sets", " ".join(f for f in wanted if f in _cpu_flags()) or "none of the ones used"),
        ("bf16 arithmetic", "yes (prefill and training use it)" if native_bf16() else "no (bf16 is widened to fp32)"),
        ("kernels", kernels),
    ]
    if level is not None:
        where, built = build_status(level)
        rows.append(("kernel build", f"{where} ({'built' if built else 'not built yet: compiled on first use'})"))
    cuda = f"available ({torch.cuda.get_device_name()})" if torch.cuda.is_available() else "not available"
    return rows + [("threads", str(torch.get_num_threads())), ("torch", f"{torch.__version__}, CUDA {cuda}")]


EMPTY = torch.empty(0)  # "no scale" / "no bias" for the kernels


def optional(t: Tensor | None) -> Tensor:
    """`t`, or EMPTY for None: how the kernels take a missing bias, scale or offset."""
    return EMPTY if t is None else t


def native_bf16() -> bool:
    """Whether this CPU has bf16 arithmetic (AVX512_BF16 or AMX); without it PyTorch emulates bf16 slowly."""
    return bool({"avx512_bf16", "amx_bf16"} & _cpu_flags())


def compute_dtype(dtype: torch.dtype, device: torch.device | str) -> torch.dtype:
    """The dtype to train in over weights of `dtype` on `device`: fp32 for bf16 on a CPU without bf16
    arithmetic (emulated bf16 is several times slower than fp32, and less precise), otherwise `dtype`."""
    if dtype == torch.bfloat16 and torch.device(device).type == "cpu" and not native_bf16():
        return torch.float32
    return dtype


def inference_dtype(dtype: torch.dtype, device: torch.device | str, kernels: bool) -> torch.dtype:
    """The dtype a model with weights of `dtype` on `device` keeps its activations and KV cache in for inference
    (`kernels`: the CPU kernels run it).

    One decode policy on every CPU: over bf16 weights the kernels widen each weight in registers and compute
    in fp32, as llama.cpp does, whether or not the CPU has bf16 arithmetic (decoding is bound by reading the
    weights, which stay bf16-sized); large products (prefill) still use the CPU's bf16 arithmetic where it has
    it (`GemvLinear`). Without the kernels: bf16 where the CPU computes in it, fp32 where it would emulate it."""
    if dtype == torch.bfloat16 and torch.device(device).type == "cpu" and (kernels or not native_bf16()):
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
