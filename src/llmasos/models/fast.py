"""The model's decoding on the CPU kernels (`llmasos.kernels`): faster modules swapped in for the plain ones.

`use_gemv_kernels` swaps every `nn.Linear`, `RMSNorm`, `Attention`, `MLP` and `Block` of a model for the
class below that runs it on the kernels: new modules holding the same parameters, so the state dict is
unchanged. A decoding step then runs each block in one `decode_block` call; where that does not apply,
norms, rotary, q/k/v, gate/up and attention still take fused kernels, and anything else the stock path.

A linear layer offers the kernels its operands through `kernel_operands()` (`GemvLinear` here, `Int8Linear`
and `Int4Linear` in `quantize.py`); a layer without that method (LoRA-wrapped, say) runs module by module.

`set_inference_dtypes` decides, once, the dtypes a model loaded for inference computes and caches in.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from llmasos.kernels import ANY_ROWS, Operands, inference_dtype, load_ops, max_rows, native_bf16, optional, takes_kernel
from llmasos.models.llama import MLP, Attention, Block, ForwardBatch, RMSNorm, Transformer
from llmasos.models.swap import swap_modules, with_class


def operands(linear: nn.Module) -> Operands | None:
    """What the kernels take of a linear layer, or None where they cannot take it."""
    get = getattr(linear, "kernel_operands", None)
    return None if get is None else get()


@dataclass
class _Plan:
    """What the kernels need of a group of projections (a block's seven, q/k/v, gate/up) that only changes when
    they do: gathered on the first call and reused by every later one (gathering it every decoding step cost
    ~10% of a small model's step)."""

    linears: tuple[nn.Module, ...]
    rows: int  # up to how many rows the kernels take these projections (0: they cannot, e.g. LoRA-wrapped)
    dense: bool = False  # all fp32 or bf16 weights of one dtype: what `gemv` over several and `swiglu` take
    weights: list[Tensor] = field(default_factory=list)
    scales: list[Tensor] = field(default_factory=list)
    offsets: list[Tensor] = field(default_factory=list)
    biases: list[Tensor] = field(default_factory=list)

    @classmethod
    def of(cls, linears: tuple[nn.Module, ...]) -> _Plan:
        found = [operands(m) for m in linears]
        if any(o is None for o in found):
            return cls(linears, 0)
        dense = all(o.dense for o in found) and len({o.weight.dtype for o in found}) == 1
        return cls(
            linears,
            min(o.rows for o in found),
            dense,
            [o.weight for o in found],
            [o.scales for o in found],
            [o.offsets for o in found],
            [o.bias for o in found],
        )

    def current(self, linears: tuple[nn.Module, ...]) -> bool:
        """Whether the plan still describes these projections (none swapped, no weight or bias replaced)."""
        return all(a is b for a, b in zip(self.linears, linears)) and (
            not self.rows or all(w is m.weight and b is optional(m.bias) for w, b, m in zip(self.weights, self.biases, linears))
        )


class _Planned:
    """A fast module that keeps the plan of some projections of its own."""

    _plan: _Plan | None = None

    def planned(self, linears: tuple[nn.Module, ...]) -> _Plan:
        """The plan of these projections, gathered again when they changed."""
        plan = self._plan
        if plan is None or not plan.current(linears):
            plan = self._plan = _Plan.of(linears)
        return plan


class GemvLinear(nn.Linear):
    """An `nn.Linear` whose small-batch products (decoding) run on the kernel; see `max_rows`."""

    def kernel_operands(self) -> Operands:
        return Operands(self.weight, optional(self.bias), max_rows(self.weight.dtype))

    def forward(self, x: Tensor) -> Tensor:
        if takes_kernel(x, max_rows(self.weight.dtype)):
            (y,) = load_ops().gemv(x.contiguous(), [self.weight], [optional(self.bias)])
            return y.view(*x.shape[:-1], self.out_features)
        if x.dtype != self.weight.dtype:  # fp32 activations over bf16 weights (set_inference_dtypes), many rows:
            if self.weight.dtype == torch.bfloat16 and native_bf16():  # the CPU's bf16 arithmetic (oneDNN)
                return F.linear(x.to(self.weight.dtype), self.weight, self.bias).to(x.dtype)
            return F.linear(x, self.weight.to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))
        return F.linear(x, self.weight, self.bias)


class KernelRMSNorm(RMSNorm):
    """RMSNorm in one kernel call for fp32 activations (several PyTorch ops otherwise)."""

    def forward(self, x: Tensor) -> Tensor:
        if x.dtype == torch.float32 and takes_kernel(x, ANY_ROWS):
            return load_ops().rms_norm(x.contiguous(), self.weight, self.eps)
        return super().forward(x)


class KernelAttention(_Planned, Attention):
    """q/k/v projected in one kernel call and rotated in place (fp32, a few rows), and one new token per row
    attending over its cache row in one call (decoding)."""

    def project(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        plan = self.planned((self.q_proj, self.k_proj, self.v_proj))
        if plan.dense and takes_kernel(x, plan.rows):
            q, k, v = load_ops().gemv(x.contiguous(), plan.weights, plan.biases)
            return tuple(y.view(*x.shape[:-1], -1) for y in (q, k, v))
        return super().project(x)

    def rotate(self, q: Tensor, k: Tensor, batch: ForwardBatch) -> tuple[Tensor, Tensor]:
        if (
            q.dtype == torch.float32
            and q.is_contiguous()
            and k.is_contiguous()
            and batch.cos.dtype == torch.float32
            and takes_kernel(q, ANY_ROWS)
        ):
            ops = load_ops()
            ops.rope_(q, batch.cos, batch.sin)
            ops.rope_(k, batch.cos, batch.sin)
            return q, k
        return super().rotate(q, k, batch)

    def attend(self, q: Tensor, k: Tensor, v: Tensor, batch: ForwardBatch) -> Tensor:
        if batch.cache is not None and q.shape[2] == 1 and k.dtype == torch.float32 and takes_kernel(q, ANY_ROWS):
            return load_ops().decode_attention(q, k, v, batch.input_pos[:, -1], self.sliding_window or 0)
        return super().attend(q, k, v, batch)


class KernelMLP(_Planned, MLP):
    """The gate and up projections and SiLU in one kernel call, for fp32 decoding of a few rows."""

    def forward(self, x: Tensor) -> Tensor:
        if x.dtype == torch.float32:
            plan = self.planned((self.gate_proj, self.up_proj))
            if plan.dense and takes_kernel(x, plan.rows):
                (gate, up), (gate_bias, up_bias) = plan.weights, plan.biases
                h = load_ops().swiglu(x.contiguous(), gate, up, gate_bias, up_bias)
                return self.down_proj(h.view(*x.shape[:-1], -1))
        return super().forward(x)


class KernelBlock(_Planned, Block):
    """A whole block in one kernel call when decoding (one new token per row, fp32 activations and cache;
    dense, int8 or int4 projections); otherwise the usual path, through the modules above."""

    def forward(self, x: Tensor, batch: ForwardBatch) -> Tensor:
        attn, mlp = self.self_attn, self.mlp
        if x.shape[1] == 1 and x.dtype == torch.float32 and batch.cache is not None:
            plan = self.planned((attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj, mlp.gate_proj, mlp.up_proj, mlp.down_proj))
            if batch.cache.k[attn.layer].dtype == torch.float32 and takes_kernel(x, plan.rows):
                return load_ops().decode_block(
                    x,
                    [self.input_layernorm.weight, self.post_attention_layernorm.weight],
                    plan.weights,
                    plan.scales,
                    plan.offsets,
                    plan.biases,
                    batch.cos,
                    batch.sin,
                    batch.cache.k[attn.layer],
                    batch.cache.v[attn.layer],
                    batch.row0,
                    batch.input_pos[:, -1],
                    attn.n_heads,
                    attn.sliding_window or 0,
                    self.input_layernorm.eps,
                )
        return super().forward(x, batch)


FAST_CLASSES = {nn.Linear: GemvLinear, RMSNorm: KernelRMSNorm, Attention: KernelAttention, MLP: KernelMLP, Block: KernelBlock}


def use_gemv_kernels(model: nn.Module) -> bool:
    """Swap the modules inside a CPU model for the ones above that decode on the kernels, in place: new modules
    over the same parameters (nothing copied; a norm or linear layer whose weight is not an fp32 or bf16 CPU
    tensor is kept). Returns False, changing nothing, where the kernels are unavailable."""
    if load_ops() is None:
        return False

    def faster(name: str, module: nn.Module) -> nn.Module | None:
        fast = FAST_CLASSES.get(type(module))
        weight = getattr(module, "weight", None)
        if fast is None or (
            weight is not None and (weight.device.type != "cpu" or weight.dtype not in (torch.float32, torch.bfloat16))
        ):
            return None
        return with_class(module, fast)

    swap_modules(model, faster)
    return True


def set_inference_dtypes(model: Transformer, kernels: bool) -> None:
    """Decide, once, the dtypes a model loaded for inference computes and caches in, and store them on it
    (`activation_dtype`, `cache_dtype`) for its forward pass, `new_cache` and the engine to read.

    The dtype is `inference_dtype`'s: over bf16 weights on a CPU, fp32 activations and cache wherever the
    kernels run (`kernels`: `use_gemv_kernels` swapped them in; they widen bf16 weights in their registers, as
    llama.cpp does, so norms, rotary and attention run in fp32 while the weights stream at bf16's size). Without
    the kernels the cache is fp32 where the CPU would emulate bf16, and the activations stay the weights'."""
    weight = model.model.embed_tokens.weight
    compute = inference_dtype(weight.dtype, weight.device, kernels)
    model.cache_dtype = compute
    model.activation_dtype = compute if kernels and compute != weight.dtype else None
