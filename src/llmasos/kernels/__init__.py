"""Hand-written CPU kernels, compiled on first use with the machine's compiler (cached afterwards),
and `use_gemv_kernels`, which points a model's linear layers, norms, attention projections and MLPs at
them for decoding.

`kernels()` returns None where they cannot be had (no AVX2/FMA/F16C, no compiler, not x86,
LLMASOS_KERNELS=0, or another process still compiling them after `BUILD_WAIT_S`); everything then runs
on stock PyTorch.
"""

from __future__ import annotations

import os
import platform
import sys
import time
import warnings
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import IO

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from llmasos.models.llama import MLP, Attention, Block, RMSNorm, Step


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
        print(f"llmasos: waiting up to {timeout:.0f} s for another process compiling the CPU kernels in {build_dir}",
              file=sys.stderr, flush=True)
        deadline = time.monotonic() + timeout
        while not acquired():
            if time.monotonic() >= deadline:
                f.close()
                return None
            time.sleep(0.2)
    (build_dir / "lock").unlink(missing_ok=True)
    return f


@lru_cache(maxsize=None)
def kernels():
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
            warnings.warn(f"llmasos: another process has been compiling the CPU kernels in {build_dir} for "
                          f"{BUILD_WAIT_S:.0f} s; using stock PyTorch this time")
            return None
        with lock:
            return load(name="llmasos_gemv", sources=[str(Path(__file__).with_name("gemv.cpp"))],
                        extra_cflags=["-O3", "-mavx2", "-mfma", "-mf16c", "-ffp-contract=off", "-fopenmp"],
                        extra_ldflags=["-fopenmp"], build_directory=str(build_dir), verbose=False)
    except Exception as e:  # no compiler or headers: run on stock PyTorch, and say so once
        warnings.warn(f"llmasos: CPU kernels unavailable, using stock PyTorch ({type(e).__name__}: {e})")
        return None


EMPTY = torch.empty(0)  # "no scale" / "no bias" for the kernels


def native_bf16() -> bool:
    """Whether this CPU has bf16 arithmetic (AVX512_BF16 or AMX); without it PyTorch emulates bf16 slowly."""
    return bool({"avx512_bf16", "amx_bf16"} & _cpu_flags())


@lru_cache(maxsize=None)
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


def _fast(x: Tensor, rows_limit: int) -> bool:
    """Whether `x` takes a kernel: on the CPU, no autograd, at most `rows_limit` rows."""
    return x.device.type == "cpu" and not torch.is_grad_enabled() and x.numel() // x.shape[-1] <= rows_limit


def quantized_kernel(x: Tensor):
    """The compiled module when `x` should take the int8/int4 kernels (CPU, no autograd, <= 16 rows)."""
    return kernels() if _fast(x, QUANTIZED_ROWS) else None


def _bias(linear: nn.Module) -> Tensor:
    """The bias as the kernels take it (fp32, bf16 or fp16; they read it in place as fp32), or EMPTY."""
    return EMPTY if linear.bias is None else linear.bias


class GemvLinear(nn.Linear):
    """An `nn.Linear` whose small-batch products (decoding) run on the kernel; see `max_rows`."""

    def forward(self, x: Tensor) -> Tensor:
        if _fast(x, max_rows(self.weight.dtype)):
            (y,) = kernels().gemv(x.contiguous(), [self.weight], [_bias(self)])
            return y.view(*x.shape[:-1], self.out_features)
        if x.dtype != self.weight.dtype:  # fp32 activations over bf16 weights (see use_gemv_kernels): widen them
            return F.linear(x, self.weight.to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))
        return F.linear(x, self.weight, self.bias)


def _plain(*linears: nn.Module) -> bool:
    """Whether these are all `GemvLinear`s of one weight dtype (not LoRA-wrapped or quantized)."""
    return all(type(m) is GemvLinear for m in linears) and len({m.weight.dtype for m in linears}) == 1


class KernelRMSNorm(RMSNorm):
    """RMSNorm in one kernel call for fp32 activations (several PyTorch ops otherwise)."""

    def forward(self, x: Tensor) -> Tensor:
        if x.dtype == torch.float32 and _fast(x, ANY_ROWS):
            return kernels().rms_norm(x.contiguous(), self.weight, self.eps)
        return super().forward(x)


class KernelAttention(Attention):
    """q/k/v projected in one kernel call and rotated in place (fp32, a few rows), and one new token per row
    attending over its cache row in one call (decoding)."""

    def project(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        linears = (self.q_proj, self.k_proj, self.v_proj)
        if _plain(*linears) and _fast(x, max_rows(self.q_proj.weight.dtype)):
            q, k, v = kernels().gemv(x.contiguous(), [m.weight for m in linears], [_bias(m) for m in linears])
            return tuple(y.view(*x.shape[:-1], -1) for y in (q, k, v))
        return super().project(x)

    def rotate(self, q: Tensor, k: Tensor, step: Step) -> tuple[Tensor, Tensor]:
        if (q.dtype == torch.float32 and q.is_contiguous() and k.is_contiguous() and step.cos.dtype == torch.float32
                and _fast(q, ANY_ROWS)):
            module = kernels()
            module.rope_(q, step.cos, step.sin)
            module.rope_(k, step.cos, step.sin)
            return q, k
        return super().rotate(q, k, step)

    def attend(self, q: Tensor, k: Tensor, v: Tensor, step: Step) -> Tensor:
        if step.cache is not None and q.shape[2] == 1 and k.dtype == torch.float32 and _fast(q, ANY_ROWS):
            return kernels().decode_attention(q, k, v, step.input_pos[:, -1], self.sliding_window or 0)
        return super().attend(q, k, v, step)


class KernelMLP(MLP):
    """The gate and up projections and SiLU in one kernel call, for fp32 decoding of a few rows."""

    def forward(self, x: Tensor) -> Tensor:
        gate, up = self.gate_proj, self.up_proj
        if x.dtype == torch.float32 and _plain(gate, up) and _fast(x, max_rows(gate.weight.dtype)):
            h = kernels().swiglu(x.contiguous(), gate.weight, up.weight, _bias(gate), _bias(up))
            return self.down_proj(h.view(*x.shape[:-1], -1))
        return super().forward(x)


@lru_cache(maxsize=None)
def _quantized_classes() -> tuple[type, ...]:
    from llmasos.models.quantize import Int4Linear, Int8Linear  # imports this module: not at the top

    return Int8Linear, Int4Linear


@dataclass
class _DecodePlan:
    """What `decode_block` needs of a block's projections that only changes when they do: built on the first
    decoding step and reused by every later one (gathering it every step cost ~10% of a small model's step)."""

    linears: tuple[nn.Module, ...]
    rows: int  # up to how many rows the kernel takes these projections (0: it cannot, e.g. LoRA-wrapped)
    weights: list[Tensor] = field(default_factory=list)
    scales: list[Tensor] = field(default_factory=list)
    offsets: list[Tensor] = field(default_factory=list)
    biases: list[Tensor] = field(default_factory=list)

    @classmethod
    def of(cls, linears: tuple[nn.Module, ...]) -> "_DecodePlan":
        rows = ANY_ROWS
        for m in linears:
            if type(m) is GemvLinear:
                rows = min(rows, max_rows(m.weight.dtype))
            elif type(m) in _quantized_classes() and m.in_features % 16 == 0:
                rows = min(rows, QUANTIZED_ROWS)
            else:
                return cls(linears, 0)
        return cls(linears, rows, [m.weight for m in linears], [getattr(m, "scales", EMPTY) for m in linears],
                   [getattr(m, "offsets", EMPTY) for m in linears], [_bias(m) for m in linears])

    def current(self, linears: tuple[nn.Module, ...]) -> bool:
        """Whether the plan still describes these projections (none swapped, no weight or bias replaced)."""
        return all(a is b for a, b in zip(self.linears, linears)) and (not self.rows or all(
            w is m.weight and b is _bias(m) for w, b, m in zip(self.weights, self.biases, linears)))


class KernelBlock(Block):
    """A whole block in one kernel call when decoding (one new token per row, fp32 activations and cache;
    dense, int8 or int4 projections); otherwise the usual path, through the modules above."""

    _plan: _DecodePlan | None = None

    def forward(self, x: Tensor, step: Step) -> Tensor:
        attn, mlp = self.self_attn, self.mlp
        if x.shape[1] == 1 and x.dtype == torch.float32 and step.cache is not None:
            linears = (attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj, mlp.gate_proj, mlp.up_proj, mlp.down_proj)
            if self._plan is None or not self._plan.current(linears):
                self._plan = _DecodePlan.of(linears)
            plan = self._plan
            if step.cache.k[attn.layer].dtype == torch.float32 and _fast(x, plan.rows):
                return kernels().decode_block(
                    x, [self.input_layernorm.weight, self.post_attention_layernorm.weight], plan.weights,
                    plan.scales, plan.offsets, plan.biases, step.cos, step.sin, step.cache.k[attn.layer],
                    step.cache.v[attn.layer], step.row0, step.input_pos[:, -1], attn.n_heads,
                    attn.sliding_window or 0, self.input_layernorm.eps)
        return super().forward(x, step)


KERNEL_CLASSES = {nn.Linear: GemvLinear, RMSNorm: KernelRMSNorm, Attention: KernelAttention, MLP: KernelMLP,
                  Block: KernelBlock}


def use_gemv_kernels(model: nn.Module) -> bool:
    """Point a CPU model's decoding at the kernels, in place (same parameters, no copy): every `nn.Linear`
    becomes a `GemvLinear`, a decoding step runs each block in one `decode_block` call, and norms, attention
    and MLPs take fused paths where it does not apply.

    A bf16 model on a CPU without bf16 arithmetic then computes its activations in fp32, as llama.cpp
    does: the weights stay bf16 and are widened in the kernels' registers, while norms, rotary and
    attention run in fp32 instead of emulated bf16 (several times faster, and more precise).
    Returns False, changing nothing, where the kernels are unavailable."""
    if kernels() is None:
        return False
    for module in model.modules():
        fast = KERNEL_CLASSES.get(type(module))
        if fast is None:
            continue
        weight = getattr(module, "weight", None)
        if weight is not None and (weight.device.type != "cpu" or weight.dtype not in (torch.float32, torch.bfloat16)):
            continue
        module.__class__ = fast
    if hasattr(model, "activation_dtype"):  # a Transformer
        embed = model.model.embed_tokens.weight
        if embed.dtype == torch.bfloat16 and embed.device.type == "cpu" and not native_bf16():
            model.activation_dtype = torch.float32
    return True
