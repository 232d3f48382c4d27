"""The hand-written GEMV kernels against PyTorch's matmul."""

import copy
import threading
import time

import pytest
import torch

import llmasos.kernels
from llmasos.models.config import ROPE_TYPES, ModelConfig
from llmasos.models.fast import GemvLinear, KernelBlock, use_gemv_kernels
from llmasos.models.llama import Block, Transformer
from llmasos.models.quantize import Int8Linear, quantize_model
from llmasos.models.swap import swap_modules, with_class

pytestmark = pytest.mark.usefixtures("ops")  # each test at every level this CPU runs (conftest.py)


# (97, 784): three passes of the AMX tiles (32 rows) and a row after them, 16 columns past their last 32
@pytest.mark.parametrize("n, k", [(64, 64), (2051, 771), (3, 16), (5, 40), (97, 784)])
@pytest.mark.parametrize("m", [1, 2, 3, 5, 7, 16])  # blocks of four inputs and every tail
@pytest.mark.parametrize("wdtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("xdtype", [torch.float32, torch.bfloat16])
def test_gemv_equals_matmul(n, k, m, wdtype, xdtype, ops):
    g = torch.Generator().manual_seed(n * k)
    w = torch.randn(n, k, generator=g).to(wdtype)
    x, bias = torch.randn(m, k, generator=g).to(xdtype), torch.randn(n, generator=g).to(xdtype)
    expected = x.double() @ w.double().T + bias.double()
    (y,) = ops.gemv(x, [w], [bias])
    assert y.dtype == xdtype and y.shape == (m, n)
    # fp32: summation order only; bf16: the output's rounding, or x's (several rows over bf16 weights at avx512_bf16)
    rounds_x = wdtype == torch.bfloat16 and m > 1 and ops.bf16_products
    tol = 8e-3 if xdtype == torch.bfloat16 or rounds_x else 1e-5
    assert ((y.double() - expected).abs() / expected.abs().max()).max() < tol


@pytest.mark.parametrize("m", [1, 5, 16])
@pytest.mark.parametrize("wdtype", [torch.float32, torch.bfloat16])
def test_gemv_of_several_weights_equals_their_matmuls(m, wdtype, ops):
    """Several weights in one call (a layer's q/k/v), large enough that threads share the rows in chunks that
    cross from one weight to the next, with biases of each float dtype read in place, and none."""
    g = torch.Generator().manual_seed(m)
    rows, k = (100, 37, 300), 768
    ws = [torch.randn(n, k, generator=g).to(wdtype) for n in rows]
    biases = [torch.randn(rows[0], generator=g), torch.randn(rows[1], generator=g).bfloat16(), torch.empty(0)]
    x = torch.randn(m, k, generator=g)
    for y, w, b in zip(ops.gemv(x, ws, biases), ws, biases):
        expected = x.double() @ w.double().T + (b.double() if b.numel() else 0)
        assert y.shape == (m, w.shape[0])
        tol = 8e-3 if wdtype == torch.bfloat16 and m > 1 and ops.bf16_products else 1e-5  # x rounded to bf16
        assert ((y.double() - expected).abs() / expected.abs().max()).max() < tol
    with pytest.raises(RuntimeError, match="one value per output"):
        ops.gemv(x, ws, [biases[1], biases[0], biases[2]])
    with pytest.raises(RuntimeError, match="one value per output"):
        ops.int8_gemv(x, torch.zeros(4, k, dtype=torch.int8), torch.ones(4), torch.ones(5))


@pytest.mark.parametrize("n, k", [(64, 64), (2051, 784), (5, 48)])
@pytest.mark.parametrize("m", [1, 2, 5, 16])
@pytest.mark.parametrize("xdtype", [torch.float32, torch.bfloat16])
def test_int8_gemv_equals_matmul(n, k, m, xdtype, ops):
    g = torch.Generator().manual_seed(n * k)
    w = torch.randint(-128, 128, (n, k), generator=g, dtype=torch.int8)
    scale = torch.rand(n, generator=g)
    x, bias = torch.randn(m, k, generator=g).to(xdtype), torch.randn(n, generator=g).to(xdtype)
    expected = x.double() @ w.double().T * scale.double() + bias.double()
    y = ops.int8_gemv(x, w, scale, bias)
    assert y.dtype == xdtype and y.shape == (m, n)
    tol = 8e-3 if xdtype == torch.bfloat16 else 1e-3  # fp32: the inputs are quantized to 14 bits
    assert ((y.double() - expected).abs() / expected.abs().max()).max() < tol


@torch.no_grad()
def test_gemv_linear_is_a_drop_in_for_decoding_and_training():
    lin = torch.nn.Linear(96, 40)
    ref = torch.nn.Linear(96, 40)
    ref.load_state_dict(lin.state_dict())
    model = torch.nn.Sequential(lin)
    assert use_gemv_kernels(model) and type(model[0]) is GemvLinear and model[0].weight is lin.weight
    lin = model[0]
    x = torch.randn(1, 1, 96)
    assert (lin(x) - ref(x)).abs().max() < 1e-5
    batch = torch.randn(3, 5, 96)
    assert (lin(batch) - ref(batch)).abs().max() < 1e-5
    many = torch.randn(4, 50, 96)
    assert torch.equal(lin(many), ref(many))  # beyond the kernel's rows (fp32): the stock path, bit for bit
    with torch.enable_grad():
        lin(x).sum().backward()  # with autograd the kernel steps aside
    assert lin.weight.grad is not None


@pytest.mark.parametrize("m", [1, 3, 16])
@pytest.mark.parametrize("k", [256, 800])  # 800: 25 groups, so a tail after the blocks of eight
@pytest.mark.parametrize("xdtype", [torch.float32, torch.bfloat16])
def test_int4_gemv_equals_its_dequantized_matmul(m, k, xdtype, ops):
    """The kernel quantizes its inputs to int8 per group of 32 (scale max |x| / 127) and takes the offsets'
    part from the exact sums of x: the same arithmetic in float64 must agree to rounding."""
    from llmasos.models.quantize import int4_dequantize, int4_quantize

    g = torch.Generator().manual_seed(m * k)
    w = torch.randn(300, k, generator=g)
    packed, scales, offsets = int4_quantize(w)
    assert (int4_dequantize(packed, scales, offsets) - w).abs().max() <= scales.max() / 2 + 1e-6
    x, bias = torch.randn(m, k, generator=g).to(xdtype), torch.randn(300, generator=g).to(xdtype)
    groups = x.double().view(m, -1, 32)
    step = groups.abs().amax(-1, keepdim=True) / 127
    rounded = (torch.round(groups / step) * step).view(m, k)
    q = int4_dequantize(packed, scales, torch.zeros_like(offsets)).double()
    expected = rounded @ q.T + groups.sum(-1) @ offsets.double().T + bias.double()
    y = ops.int4_gemv(x, packed, scales, offsets, bias)
    assert y.dtype == xdtype and y.shape == (m, 300)
    tol = 8e-3 if xdtype == torch.bfloat16 else 1e-5  # bf16: the output's rounding
    assert ((y.double() - expected).abs() / expected.abs().max()).max() < tol
    exact = x.double() @ int4_dequantize(packed, scales, offsets).double().T + bias.double()
    assert ((y.double() - exact).abs() / exact.abs().max()).max() < 3e-2  # what 8-bit inputs cost


def test_a_bf16_model_on_the_kernels_runs_with_autograd_too(tmp_path):
    """Where the CPU lacks bf16 arithmetic the activations are fp32 over bf16 weights; the stock path
    (autograd on) must take that mix as well, and agree with the kernels."""
    from helpers import make_hf_model

    from llmasos.checkpoints.load import load_model

    path, _ = make_hf_model(tmp_path / "m")
    model = load_model(path, dtype=torch.bfloat16)
    use_gemv_kernels(model)
    model.activation_dtype = torch.float32  # as on a CPU without bf16 arithmetic, whatever this one has
    ids = torch.tensor([[5, 17, 42, 99]])
    with torch.no_grad():
        fast = model(ids)
    slow = model(ids)  # autograd on: the kernels step aside
    assert fast.dtype == slow.dtype == torch.float32
    assert (fast - slow.detach()).abs().max() < 0.05 * fast.abs().max()


# Every architectural feature `ModelConfig` has, each in a tiny model: the fused decode paths must give the plain
# PyTorch model's logits for all of them (a feature the fused block lacks fails here). Rope scalings come from
# the config's own list, so a new type gets a case by itself.
ROPE_EXTRAS = {"llama3": {"low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 32}}
FEATURES = {
    "mha": {},
    "gqa": {"num_key_value_heads": 2},
    "mqa": {"num_key_value_heads": 1},
    "head-dim": {"head_dim": 32},  # not hidden_size / heads (4 x 32 = 128 wide attention over 64)
    "qwen2-qkv-bias": {"qkv_bias": True, "num_key_value_heads": 2},
    "mistral-sliding-window": {"sliding_window": 5, "num_key_value_heads": 2},
    "tied-embeddings": {"tie_word_embeddings": True},
    "llama-biases": {"attention_bias": True, "mlp_bias": True},
    "norm-eps-and-theta": {"rms_norm_eps": 1e-2, "rope_theta": 500000.0},
    **{
        f"rope-{kind}": {"rope_scaling": {"rope_type": kind, "factor": 4.0, **ROPE_EXTRAS.get(kind, {})}}
        for kind in ROPE_TYPES
        if kind != "default"
    },
    "all-at-once": {
        "num_key_value_heads": 2,
        "sliding_window": 5,
        "attention_bias": True,
        "mlp_bias": True,
        "tie_word_embeddings": True,
        "rope_scaling": {"rope_type": "linear", "factor": 2.0},
    },
}
# Config fields that are sizes, token ids or names: a value, not a variant of the computation.
NOT_FEATURES = {
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "max_position_embeddings",
    "hidden_act",
    "bos_token_id",
    "eos_token_id",
    "pad_token_id",
    "architecture",
    "dtype",
}


def test_every_feature_of_the_config_has_a_fast_path_case():
    """A flag added to `ModelConfig` (and to llama.py) needs a case in FEATURES, or a place in NOT_FEATURES."""
    covered = {key for flags in FEATURES.values() for key in flags}
    assert set(ModelConfig.field_names()) - NOT_FEATURES == covered


def tiny_pair(flags: dict, dtype: torch.dtype, quantize: str | None):
    """A random plain model, and the same weights on the fast modules (in `dtype`, fp32 activations and cache)."""
    config = ModelConfig(
        vocab_size=97,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=64,
        **flags,
    )
    torch.manual_seed(0)
    ref = Transformer(config)
    ref.init_weights(std=0.1)
    for p in ref.parameters():  # non-zero biases and norms, so a wrong one shows
        p.add_(torch.randn_like(p) * 0.05)
    ref = ref.to(dtype).float()  # the values a bf16 model holds, in fp32
    fast = copy.deepcopy(ref).to(dtype)
    if quantize:
        # The quantized kernels round their inputs (int4: to 8 bits a group of 32), so a few-ulp difference in
        # a norm can move a rounding step: compare against the module-by-module path on the same kernels.
        quantize_model(ref, quantize)
        quantize_model(fast, quantize)
        use_gemv_kernels(ref)
        ref.activation_dtype = torch.float32
        swap_modules(ref, lambda name, m: with_class(m, Block) if type(m) is KernelBlock else None)
    assert use_gemv_kernels(fast)
    fast.activation_dtype = torch.float32
    return ref, fast


@pytest.mark.parametrize("flags", FEATURES.values(), ids=FEATURES.keys())
@pytest.mark.parametrize(
    "dtype, quantize",
    [(torch.float32, None), (torch.bfloat16, None), (torch.float32, "int8"), (torch.float32, "int4")],
    ids=["fp32", "bf16", "int8", "int4"],
)
@torch.inference_mode()
def test_decode_fast_paths_give_the_model_s_logits(monkeypatch, flags, dtype, quantize, ops):
    """The fused decode paths (whole blocks in one call, attention over cache rows at different
    positions, rows after the first) against the plain PyTorch model on the same weights."""
    ref, fast = tiny_pair(flags, dtype, quantize)
    calls = []
    block = ops.decode_block
    monkeypatch.setattr(ops, "decode_block", lambda *a: calls.append(1) or block(*a))

    prompts = [[5, 9, 2, 7, 1, 3, 8], [4, 4], [11, 12, 13, 14, 15, 16, 17, 18, 19, 20]]
    caches = {m: m.new_cache(4, 32, torch.float32) for m in (ref, fast)}
    # int4's 8-bit inputs turn ulp-level differences (SiLU in C++ against PyTorch's) into rounding steps of
    # 1/127 of a group's largest input from the second step on: room for that, not for a wiring error.
    tol = {None: 1e-4, "int8": 1e-5, "int4": 3e-2}[quantize]
    if dtype == torch.bfloat16 and ops.bf16_products:  # several rows over bf16 weights: x rounded to bf16 in
        tol = 3e-2  # each product (~1% of the largest logit over two layers, as a native bf16 model computes)
    for row, p in enumerate(prompts):  # prefills, through the module-by-module fast paths
        want, got = (m(torch.tensor([p]), cache=caches[m], cache_row=row + 1) for m in (ref, fast))
        assert (got - want).abs().max() < max(tol, 1e-4) * want.abs().max()
    pos = [len(p) for p in prompts]
    for step in range(6):
        tokens = torch.tensor([[(7 * step + r) % 97] for r in range(3)])
        positions = torch.tensor([[p + step] for p in pos])  # rows at different positions: a scatter
        want = ref(tokens, positions, caches[ref], cache_row=1)
        got = fast(tokens, positions, caches[fast], cache_row=1)
        assert (got - want).abs().max() < tol * want.abs().max(), step
    assert len(calls) == 6 * fast.config.num_hidden_layers  # every step took the fused block
    same = torch.tensor([pos[2] + 6])  # one row, one position for all: the slice-write path
    want = ref(torch.tensor([[3]]), same, caches[ref], cache_row=3)
    got = fast(torch.tensor([[3]]), same, caches[fast], cache_row=3)
    assert (got - want).abs().max() < tol * want.abs().max()
    assert len(calls) == 7 * fast.config.num_hidden_layers


@torch.inference_mode()
def test_the_decode_plan_follows_replaced_weights_and_modules():
    """The whole-block kernel reuses what it gathered of a block's projections from step to step; a weight
    replaced, or a projection swapped for a quantized one, must be seen at the next step."""
    config = ModelConfig(
        vocab_size=97,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=1,
        num_attention_heads=4,
        max_position_embeddings=64,
    )
    torch.manual_seed(0)
    ref = Transformer(config)
    ref.init_weights(std=0.1)
    fast = Transformer(config)
    fast.load_state_dict(ref.state_dict())
    assert use_gemv_kernels(fast)
    caches = {m: m.new_cache(1, 16, torch.float32) for m in (ref, fast)}

    def step(pos):
        out = [m(torch.tensor([[pos + 3]]), torch.tensor([pos]), caches[m]) for m in (ref, fast)]
        assert (out[1] - out[0]).abs().max() < 1e-4 * out[0].abs().max(), pos

    step(0)
    new = torch.randn(64, 96) * 0.1
    for m in (ref, fast):
        m.model.layers[0].mlp.down_proj.weight = torch.nn.Parameter(new.clone())
    step(1)
    ref_layer, fast_layer = ref.model.layers[0].self_attn, fast.model.layers[0].self_attn
    ref_layer.o_proj = Int8Linear(ref_layer.o_proj)
    fast_layer.o_proj = Int8Linear(fast_layer.o_proj)
    step(2)
    assert fast.model.layers[0]._plan.weights[3] is fast_layer.o_proj.weight


def test_kernels_let_other_python_threads_run(ops):
    """A server's event loop must keep streaming while a step computes: the kernels release the GIL."""
    x, w, empty = torch.randn(64, 4096), torch.randn(16384, 4096).bfloat16(), torch.empty(0)  # ~0.1 s a call
    start = time.perf_counter()
    ops.gemv(x, [w], [empty])
    took = time.perf_counter() - start
    done = threading.Event()

    def compute():
        for _ in range(3):
            ops.gemv(x, [w], [empty])
        done.set()

    worker = threading.Thread(target=compute)
    worker.start()
    gaps, last = [], time.perf_counter()
    while not done.is_set():  # Python work on this thread: it stalls for a whole call if the GIL is held
        now = time.perf_counter()
        gaps.append(now - last)
        last = now
    worker.join()
    assert max(gaps) < took / 2, (max(gaps), took)


@pytest.mark.parametrize("native", [False, True], ids=["emulated-bf16", "bf16-arithmetic"])
def test_one_decode_policy_for_bf16_whether_or_not_the_cpu_has_bf16_arithmetic(tmp_path, monkeypatch, ops, native):
    """A bf16 model decodes on the fused blocks with fp32 activations and cache on every CPU (no separate
    module-by-module path where the CPU has bf16 arithmetic); a prefill's large products use that arithmetic
    (bf16 in, oneDNN) where it exists, and widen the weights to fp32 where it does not."""
    import torch.nn.functional as F
    from helpers import make_hf_model, write_bpe_tokenizer

    from llmasos import LLM, SamplingParams
    from llmasos.models import fast as fast_module

    monkeypatch.setattr(llmasos.kernels, "native_bf16", lambda: native)
    monkeypatch.setattr(fast_module, "native_bf16", lambda: native)
    path, _ = make_hf_model(tmp_path / "m", max_position_embeddings=128)
    write_bpe_tokenizer(path)
    llm = LLM.load(path, dtype="bfloat16")
    model = llm.engine.model
    assert (model.activation_dtype, model.cache_dtype) == (torch.float32, torch.float32)
    blocks, linear_inputs = [], []  # fused decode blocks run; inputs of the prefill's products
    block = ops.decode_block
    monkeypatch.setattr(ops, "decode_block", lambda *a: blocks.append(1) or block(*a))
    linear = F.linear
    monkeypatch.setattr(fast_module.F, "linear", lambda x, *a: linear_inputs.append(x.dtype) or linear(x, *a))
    prompt = list(range(3, 3 + 80))  # 80 rows: beyond the kernels' rows, so the prefill takes F.linear
    llm.generate([prompt], SamplingParams(max_tokens=5, temperature=0.0))[0]
    assert len(blocks) == 4 * model.config.num_hidden_layers  # every decode step after the prefill, fused
    assert set(linear_inputs) == {torch.bfloat16 if native else torch.float32}
    if native:  # a prefill's logits as the widened path gives them, to bf16's rounding of the inputs
        ids = torch.tensor([prompt])
        with torch.no_grad():
            bf16 = model(ids)
            monkeypatch.setattr(fast_module, "native_bf16", lambda: False)
            widened = model(ids)
        assert (bf16 - widened).abs().max() < 2e-2 * widened.abs().max()
