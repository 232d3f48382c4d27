"""The hand-written GEMV kernels against PyTorch's matmul."""

import pytest
import torch

from llmasos.kernels import GemvLinear, gemv, use_gemv_kernels

kernel = gemv()
pytestmark = pytest.mark.skipif(kernel is None, reason="GEMV kernels unavailable here (no AVX2/FMA or no compiler)")


@pytest.mark.parametrize("n, k", [(64, 64), (2051, 771), (3, 16), (5, 40)])
@pytest.mark.parametrize("m", [1, 2, 5, 16])
@pytest.mark.parametrize("wdtype", [torch.float32, torch.bfloat16, torch.int8])
@pytest.mark.parametrize("xdtype", [torch.float32, torch.bfloat16])
def test_gemv_equals_matmul(n, k, m, wdtype, xdtype):
    g = torch.Generator().manual_seed(n * k)
    if wdtype == torch.int8:
        w = torch.randint(-128, 128, (n, k), generator=g, dtype=torch.int8)
        scale = torch.rand(n, generator=g)
    else:
        w, scale = torch.randn(n, k, generator=g).to(wdtype), None
    x, bias = torch.randn(m, k, generator=g).to(xdtype), torch.randn(n, generator=g).to(xdtype)
    expected = x.double() @ w.double().T * (scale.double() if scale is not None else 1) + bias.double()
    y = kernel(x, w, torch.empty(0) if scale is None else scale, bias)
    assert y.dtype == xdtype and y.shape == (m, n)
    tol = 1e-5 if xdtype == torch.float32 else 8e-3  # bf16: the output's own rounding
    assert ((y.double() - expected).abs() / expected.abs().max()).max() < tol


@torch.no_grad()
def test_gemv_linear_is_a_drop_in_for_decoding_and_training():
    lin = torch.nn.Linear(96, 40)
    ref = torch.nn.Linear(96, 40)
    ref.load_state_dict(lin.state_dict())
    model = torch.nn.Sequential(lin)
    assert use_gemv_kernels(model) and type(lin) is GemvLinear
    x = torch.randn(1, 1, 96)
    assert (lin(x) - ref(x)).abs().max() < 1e-5
    batch = torch.randn(3, 5, 96)
    assert (lin(batch) - ref(batch)).abs().max() < 1e-5
    many = torch.randn(4, 50, 96)
    assert torch.equal(lin(many), ref(many))  # beyond the kernel's rows (fp32): the stock path, bit for bit
    with torch.enable_grad():
        lin(x).sum().backward()  # with autograd the kernel steps aside
    assert lin.weight.grad is not None
