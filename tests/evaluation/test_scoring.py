import math

import pytest
import torch
from helpers import CORPUS, MC_RECORDS, write_jsonl

from llmasos.evaluation.results import EvalConfig
from llmasos.evaluation.runner import run_perplexity, run_task
from llmasos.evaluation.scoring import encode_pair, loglikelihoods, perplexity_tokens, sliding_perplexity
from llmasos.evaluation.tasks import load_task


def reference_loglikelihood(ref, context: list[int], continuation: list[int]) -> tuple[float, bool]:
    """log P(continuation | context) straight from transformers' model."""
    ids = torch.tensor([context + continuation])
    with torch.no_grad():
        logprobs = ref(ids).logits[0, len(context) - 1 : -1].log_softmax(-1)
    target = torch.tensor(continuation)
    return float(logprobs.gather(-1, target[:, None]).sum()), bool((logprobs.argmax(-1) == target).all())


def hf_sliding_perplexity(ref, ids: list[int], max_length: int, stride: int) -> float:
    """transformers' documented recipe ("Perplexity of fixed-length models"), counting the labels it scores."""
    ids = torch.tensor([ids])
    nll_sum, n_tokens, prev_end = 0.0, 0, 0
    for begin in range(0, ids.size(1), stride):
        end = min(begin + max_length, ids.size(1))
        trg_len = end - prev_end
        input_ids = ids[:, begin:end]
        target_ids = input_ids.clone()
        target_ids[:, :-trg_len] = -100
        with torch.no_grad():
            loss = ref(input_ids, labels=target_ids).loss
        scored = int((target_ids[:, 1:] != -100).sum())  # labels left after transformers' internal shift
        nll_sum += float(loss) * scored
        n_tokens += scored
        prev_end = end
        if end == ids.size(1):
            break
    return math.exp(nll_sum / n_tokens)


def test_loglikelihoods_equal_transformers_in_mixed_length_batches(llm, tiny):
    pairs = [
        encode_pair(llm.tokenizer, c, k)
        for c, k in [
            ("The quick brown fox", " jumps over the lazy dog."),
            ("Once upon a time,", " in a land"),
            ("def fibonacci(n):", "\n    return n"),
            ("Numbers 12345 and", " symbols"),
        ]
    ]
    ours = loglikelihoods(llm.model, pairs, batch_size=3)
    for (context, continuation), (value, greedy) in zip(pairs, ours):
        expected, expected_greedy = reference_loglikelihood(tiny[1], context, continuation)
        assert value == pytest.approx(expected, abs=1e-3) and greedy == expected_greedy


def test_encode_pair_moves_the_contexts_trailing_space_to_the_continuation(llm):
    context, continuation = encode_pair(llm.tokenizer, "The quick ", "brown fox")
    assert context == llm.tokenizer.encode("The quick")
    assert context + continuation == llm.tokenizer.encode("The quick brown fox")


@pytest.mark.parametrize("max_length, stride", [(64, 24), (64, 64), (256, 100)])
def test_sliding_perplexity_equals_the_transformers_recipe(llm, tiny, max_length, stride):
    ids = llm.tokenizer.encode(" ".join(CORPUS[:18]))
    assert len(ids) > max_length  # several windows
    ours = sliding_perplexity(llm.model, ids, max_length=max_length, stride=stride, batch_size=2)
    assert ours.perplexity == pytest.approx(hf_sliding_perplexity(tiny[1], ids, max_length, stride), rel=1e-4)
    # overlapping windows score every token but the first; disjoint ones lose each window's first token
    assert ours.tokens == len(ids) - (1 if stride < max_length else ours.windows)


def test_perplexity_of_a_text_file_and_of_a_prepared_data_dir(llm, tiny, tmp_path):
    from llmasos.data.prepare import PackedData, prepare

    text = tmp_path / "text.txt"
    text.write_text("\n".join(CORPUS[:18]))
    row = run_perplexity(llm, EvalConfig(perplexity=str(text), stride=128), "tiny", progress=False)
    ids = llm.tokenizer.encode(text.read_text())
    assert row.task == "perplexity:text.txt" and row.samples == len(ids) - 1
    assert row.value == pytest.approx(hf_sliding_perplexity(tiny[1], ids, 512, 128), rel=1e-4)
    docs = tmp_path / "docs.jsonl"
    write_jsonl(docs, [{"text": t} for t in CORPUS[:6]])
    prepare([docs], tiny[0], tmp_path / "data", val_fraction=0.5, progress=False)
    val = PackedData(tmp_path / "data", "val")
    assert perplexity_tokens(tmp_path / "data", llm.tokenizer, 400) == val.tokens(0, len(val)).tolist()


def test_multiple_choice_accuracy_on_a_model_rigged_to_say_b(llm, tmp_path):
    """Only the tokens of " B" get a large logit, so " B" is chosen wherever it stands."""
    write_jsonl(tmp_path / "mc.jsonl", MC_RECORDS)
    (tmp_path / "mc.yaml").write_text(
        'kind: multiple_choice\ndata: mc.jsonl\nprompt: "{{ question }}\\nAnswer:"\nchoices: choices\ntarget: "{{ answer }}"\n'
    )
    task = load_task(tmp_path / "mc.yaml")
    b_tokens = encode_pair(llm.tokenizer, "Answer:", " B")[1]
    original = llm.model.lm_head
    rigged = torch.nn.Linear(original.in_features, original.out_features, bias=True)
    with torch.no_grad():
        rigged.weight.zero_()
        rigged.bias.zero_()
        rigged.bias[b_tokens] = 10.0
    llm.model.lm_head = rigged
    try:
        rows = {r.metric: r for r in run_task(llm, task, EvalConfig(tasks=["x"]), "rigged", progress=False)}
    finally:
        llm.model.lm_head = original
    assert rows["acc"].value == 0.75 and rows["acc"].samples == 4  # right on the three whose answer is " B"
    assert rows["acc_norm"].value == 0.75
