"""Weight-only int8 and int4: what they cost in perplexity against bf16 on a fixed text."""

import copy
import math

import pytest
import torch
from helpers import CORPUS

from llmasos.models.llama import Transformer
from llmasos.models.quantize import Int4Linear, Int8Linear, linear_weight_bytes, quantize_model
from llmasos.models.zoo import zoo_config
from llmasos.tokenization import Tokenizer


@pytest.fixture(scope="module")
def trained(bpe_dir):
    """The tiny-gqa shape fitted for a few hundred steps on the test corpus, and that text's tokens."""
    tok = Tokenizer(bpe_dir)
    ids = torch.tensor(tok.encode(" ".join(sorted(set(CORPUS))) * 4))
    cfg = zoo_config("tiny-gqa")
    cfg.vocab_size = tok.vocab_size
    torch.manual_seed(0)
    model = Transformer(cfg)
    model.init_weights()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    windows = ids[: len(ids) // 64 * 64].view(-1, 64)
    for _ in range(20):  # short: a perplexity well above 1, where quantization error shows
        batch = windows[torch.randint(0, len(windows), (8,))]
        loss = torch.nn.functional.cross_entropy(model(batch[:, :-1]).flatten(0, 1), batch[:, 1:].flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval(), windows


@torch.no_grad()
def perplexity(model, windows) -> float:
    logits = model(windows[:, :-1]).float()
    return math.exp(torch.nn.functional.cross_entropy(logits.flatten(0, 1), windows[:, 1:].flatten()).item())


@torch.no_grad()
def test_perplexity_change_of_int8_and_int4_against_bf16(trained):
    model, windows = trained
    bf16 = copy.deepcopy(model).to(torch.bfloat16)
    base = perplexity(bf16, windows)
    int8 = quantize_model(copy.deepcopy(bf16), "int8")
    int4 = quantize_model(copy.deepcopy(bf16), "int4", group_size=32)
    p8, p4 = perplexity(int8, windows), perplexity(int4, windows)
    print(
        f"\nperplexity on the fixed text: bf16 {base:.3f}, int8 {p8:.3f} ({(p8 / base - 1) * 100:+.2f}%), "
        f"int4 {p4:.3f} ({(p4 / base - 1) * 100:+.2f}%)"
    )
    assert base < 100, "the fixture model did not learn the text (an untrained one scores about 400)"
    assert abs(p8 / base - 1) < 0.01  # int8 per channel: within 1%
    assert abs(p4 / base - 1) < 0.10  # int4, groups of 32: within 10%
    assert sum(isinstance(m, Int8Linear) for m in int8.modules()) == 2 * 7 + 1
    assert sum(isinstance(m, Int4Linear) for m in int4.modules()) == 2 * 7 + 1
    assert linear_weight_bytes(int4) < linear_weight_bytes(int8) < linear_weight_bytes(bf16)


@torch.no_grad()
def test_quantized_decode_step_equals_its_own_full_forward(trained):
    """The single-row kernel path and the batched path of a quantized layer agree."""
    model, windows = trained
    q = quantize_model(copy.deepcopy(model), "int8")
    x = windows[:1, :20]
    full = q(x)
    cache = q.new_cache(1, 32)
    q(x[:, :19], cache=cache)
    last = q(x[:, 19:], torch.tensor([19]), cache)
    assert (last[0, 0] - full[0, 19]).abs().max() < 1e-3


def test_unknown_method_is_named():
    from llmasos.errors import LLMasOSError

    with pytest.raises(LLMasOSError, match="unknown quantization 'int3'"):
        quantize_model(Transformer(zoo_config("tiny-mha")), "int3")
