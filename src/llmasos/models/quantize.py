"""Weight-only quantization: a module swap of `nn.Linear`, not a fork of the model.

int8: one scale per output channel (symmetric), run by `aten._weight_int8pack_mm`.
int4: groups of `group_size` inputs with a scale and a zero point each (asymmetric), packed for
`aten._weight_int4pack_mm_for_cpu`. Activations stay in the model's dtype; only weights shrink,
which is what decode speed on a CPU depends on (it streams every weight once per token).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from llmasos.errors import LLMasOSError

METHODS = ("int8", "int4")


def int8_quantize(w: Tensor) -> tuple[Tensor, Tensor]:
    """[N, K] float -> int8 [N, K] and per-row scales [N] (float32)."""
    w = w.float()
    scales = w.abs().amax(dim=1).clamp(min=1e-8) / 127
    q = torch.round(w / scales[:, None]).clamp(-128, 127).to(torch.int8)
    return q, scales


def int4_quantize(w: Tensor, group_size: int) -> tuple[Tensor, Tensor]:
    """[N, K] float -> values 0..15 as int32 [N, K], and [K / group, N, 2] (scale, zero) with
    w ~= (q - 8) * scale + zero inside each group."""
    n, k = w.shape
    groups = w.float().reshape(n, k // group_size, group_size)
    lo, hi = groups.amin(-1, keepdim=True), groups.amax(-1, keepdim=True)
    scales = (hi - lo).clamp(min=1e-6) / 15
    zeros = lo + scales * 8
    q = torch.round((groups - lo) / scales).clamp(0, 15).to(torch.int32).reshape(n, k)
    qparams = torch.cat([scales, zeros], dim=-1).transpose(0, 1).contiguous()  # [K/g, N, 2]
    return q, qparams


class Int8Linear(nn.Module):
    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        q, scales = int8_quantize(linear.weight.detach())
        self.register_buffer("weight", q)
        self.register_buffer("scales", scales)  # fp32
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().clone(), requires_grad=False)

    def forward(self, x: Tensor) -> Tensor:
        from llmasos.kernels import small_batch_gemv

        y = small_batch_gemv(x, self.weight, self.scales, self.bias)
        if y is not None:
            return y
        x2 = x.reshape(-1, self.in_features)
        y = torch.ops.aten._weight_int8pack_mm(x2, self.weight, self.scales.to(x.dtype))
        y = y.reshape(*x.shape[:-1], self.out_features)
        return y if self.bias is None else y + self.bias

    def dequantize(self) -> Tensor:
        return self.weight.float() * self.scales.float()[:, None]


class Int4Linear(nn.Module):
    def __init__(self, linear: nn.Linear, group_size: int = 32):
        super().__init__()
        self.in_features, self.out_features, self.group_size = linear.in_features, linear.out_features, group_size
        q, qparams = int4_quantize(linear.weight.detach(), group_size)
        self.register_buffer("weight", torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1))
        self.register_buffer("qparams", qparams.to(linear.weight.dtype))
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().clone(), requires_grad=False)

    def forward(self, x: Tensor) -> Tensor:
        x2 = x.reshape(-1, self.in_features)
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(x2, self.weight, self.group_size, self.qparams.to(x.dtype))
        y = y.reshape(*x.shape[:-1], self.out_features)
        return y if self.bias is None else y + self.bias


def quantize_model(model: nn.Module, method: str, group_size: int = 32, skip: tuple[str, ...] = ()) -> nn.Module:
    """Swap every Linear (the LM head included; a tied head gets its own quantized copy and the
    embedding stays exact) for its quantized version, in place. Layers whose input size is not a
    multiple of the int4 group size keep their full precision."""
    if method not in METHODS:
        raise LLMasOSError(f"unknown quantization {method!r}; use one of {', '.join(METHODS)}")
    if next(model.parameters()).device.type != "cpu":
        raise LLMasOSError(f"{method} weight-only quantization runs on the CPU kernels only")
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            full = f"{name}.{child_name}" if name else child_name
            if not isinstance(child, nn.Linear) or full in skip:
                continue
            if method == "int4" and child.in_features % group_size:
                continue
            new = Int8Linear(child) if method == "int8" else Int4Linear(child, group_size)
            setattr(module, child_name, new)
    model.quantization = method
    return model


def linear_weight_bytes(model: nn.Module) -> int:
    """Bytes of every matmul weight read per decoded token (quantized or not), the LM head included."""
    total = 0
    for m in model.modules():
        if isinstance(m, nn.Linear):
            total += m.weight.numel() * m.weight.element_size()
        elif isinstance(m, Int8Linear):
            total += m.weight.numel() + m.scales.numel() * 4
        elif isinstance(m, Int4Linear):
            total += m.weight.numel() * m.weight.element_size() + m.qparams.numel() * m.qparams.element_size()
    return total
