"""Weight-only quantization: a module swap of `nn.Linear`, not a fork of the model.

int8: one scale per output channel (symmetric). int4: groups of 32 inputs with a scale and an offset
each (asymmetric), two values a byte. Decoding runs on `llmasos.kernels` (`int8_gemv`, `int4_gemv`, and
`decode_block` through `kernel_operands`); elsewhere int8 uses `aten._weight_int8pack_mm` and int4
dequantizes. Activations stay in the model's dtype; only weights shrink, which is what decode speed on a
CPU depends on (it streams every weight once per token).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from llmasos.errors import LLMasOSError
from llmasos.kernels import EMPTY, QUANTIZED_ROWS, Operands, optional, quantized_ops
from llmasos.models.swap import swap_modules

METHODS = ("int8", "int4")


def int8_quantize(w: Tensor) -> tuple[Tensor, Tensor]:
    """[N, K] float -> int8 [N, K] and per-row scales [N] (float32)."""
    w = w.float()
    scales = w.abs().amax(dim=1).clamp(min=1e-8) / 127
    q = torch.round(w / scales[:, None]).clamp(-128, 127).to(torch.int8)
    return q, scales


def int4_quantize(w: Tensor, group_size: int = 32) -> tuple[Tensor, Tensor, Tensor]:
    """[N, K] float -> packed uint8 [N, K/2], scales and offsets [N, K/group] (fp16, as llama.cpp's q4_1:
    20 bytes per 32 weights rather than 24 with fp32), with w ~= q * scale + offset inside each group,
    q in 0..15. Within a group of 32, byte j holds q[j] in its low nibble and q[j + 16] in its high one
    (the layout `int4_gemv` reads)."""
    n, k = w.shape
    groups = w.float().reshape(n, k // group_size, group_size)
    lo, hi = groups.amin(-1, keepdim=True), groups.amax(-1, keepdim=True)
    offsets = lo.half()
    # Rounded up to fp16 (and at least its smallest normal), so that offset + 15 * scale still reaches hi.
    scales = ((hi - offsets.float()).clamp(min=15 * 2**-14) / 15 * (1 + 2**-10)).half()
    q = torch.round((groups - offsets.float()) / scales.float()).clamp(0, 15).to(torch.uint8)
    half = group_size // 2
    packed = (q[..., :half] | (q[..., half:] << 4)).reshape(n, k // 2)
    return packed.contiguous(), scales[..., 0].contiguous(), offsets[..., 0].contiguous()


def int4_dequantize(packed: Tensor, scales: Tensor, offsets: Tensor, group_size: int = 32) -> Tensor:
    n = packed.shape[0]
    g = packed.view(n, -1, group_size // 2)
    q = torch.cat([g & 0x0F, g >> 4], dim=-1).float()
    return (q * scales.float()[..., None] + offsets.float()[..., None]).reshape(n, -1)


class Int8Linear(nn.Module):
    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        q, scales = int8_quantize(linear.weight.detach())
        self.register_buffer("weight", q)
        self.register_buffer("scales", scales)  # fp32
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().clone(), requires_grad=False)

    def kernel_operands(self) -> Operands | None:
        """What the kernels take of this layer (`llmasos.kernels.Operands`); None: its input size is not a multiple
        of 16, which they need."""
        if self.in_features % 16:
            return None
        return Operands(self.weight, optional(self.bias), QUANTIZED_ROWS, scales=self.scales)

    def forward(self, x: Tensor) -> Tensor:
        ops = quantized_ops(x) if self.in_features % 16 == 0 else None
        x2 = x.reshape(-1, self.in_features).contiguous()
        if ops is not None:
            y = ops.int8_gemv(x2, self.weight, self.scales, EMPTY if self.bias is None else self.bias.to(x.dtype))
        else:
            y = torch.ops.aten._weight_int8pack_mm(x2, self.weight, self.scales.to(x.dtype))
            y = y if self.bias is None else y + self.bias.to(x.dtype)
        return y.reshape(*x.shape[:-1], self.out_features)

    def dequantize(self) -> Tensor:
        return self.weight.float() * self.scales[:, None]


class Int4Linear(nn.Module):
    def __init__(self, linear: nn.Linear, group_size: int = 32):
        super().__init__()
        if group_size != 32:
            raise LLMasOSError(f"int4 group size {group_size} is not supported (32 is)")
        self.in_features, self.out_features, self.group_size = linear.in_features, linear.out_features, group_size
        packed, scales, offsets = int4_quantize(linear.weight.detach(), group_size)
        self.register_buffer("weight", packed)
        self.register_buffer("scales", scales)
        self.register_buffer("offsets", offsets)
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().clone(), requires_grad=False)

    def kernel_operands(self) -> Operands:
        """What the kernels take of this layer (`llmasos.kernels.Operands`)."""
        return Operands(self.weight, optional(self.bias), QUANTIZED_ROWS, scales=self.scales, offsets=self.offsets)

    def forward(self, x: Tensor) -> Tensor:
        ops = quantized_ops(x)
        x2 = x.reshape(-1, self.in_features).contiguous()
        if ops is not None:
            y = ops.int4_gemv(x2, self.weight, self.scales, self.offsets, EMPTY if self.bias is None else self.bias.to(x.dtype))
        else:  # many rows (a prefill) or no kernels: dequantize, then an ordinary matmul
            w = self.dequantize().to(x.dtype)
            y = torch.nn.functional.linear(x2, w, self.bias)
        return y.reshape(*x.shape[:-1], self.out_features)

    def dequantize(self) -> Tensor:
        return int4_dequantize(self.weight, self.scales, self.offsets, self.group_size)


def quantize_model(model: nn.Module, method: str, group_size: int = 32, skip: tuple[str, ...] = ()) -> nn.Module:
    """Swap every Linear (the LM head included; a tied head gets its own quantized copy and the
    embedding stays exact) for its quantized version, in place. Layers whose input size is not a
    multiple of the int4 group size keep their full precision."""
    if method not in METHODS:
        raise LLMasOSError(f"unknown quantization {method!r}; use one of {', '.join(METHODS)}")
    if next(model.parameters()).device.type != "cpu":
        raise LLMasOSError(f"{method} weight-only quantization runs on the CPU kernels only")

    def quantized(name: str, child: nn.Module) -> nn.Module | None:
        if not isinstance(child, nn.Linear) or name in skip or (method == "int4" and child.in_features % group_size):
            return None
        return Int8Linear(child) if method == "int8" else Int4Linear(child, group_size)

    swap_modules(model, quantized)
    model.quantization = method
    return model


def linear_weight_bytes(model: nn.Module) -> int:
    """Bytes of every matmul weight read per decoded token (quantized or not), the LM head included."""
    total = 0
    for m in model.modules():
        if isinstance(m, nn.Linear):
            total += m.weight.numel() * m.weight.element_size()
        elif isinstance(m, Int8Linear):
            total += m.weight.numel() + m.scales.numel() * m.scales.element_size()
        elif isinstance(m, Int4Linear):
            total += m.weight.numel() + m.scales.numel() * m.scales.element_size() + m.offsets.numel() * m.offsets.element_size()
    return total
