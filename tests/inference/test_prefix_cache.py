"""Automatic prefix caching: the same outputs as without it, the prompt tokens it saves, and its budget."""

import pytest
import torch
from helpers import make_hf_model, write_bpe_tokenizer

from llmasos import LLM, SamplingParams
from llmasos.inference.prefix_cache import BLOCK_SIZE, PrefixCache

GREEDY = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True)


@pytest.fixture(scope="module")
def long_dir(tmp_path_factory):
    """A tiny random GQA Llama with 2,048 tokens of context (for a 1,000-token system prompt)."""
    path, _ = make_hf_model(
        tmp_path_factory.mktemp("prefix") / "tiny", num_key_value_heads=2, max_position_embeddings=2048, seed=3
    )
    return write_bpe_tokenizer(path)


@pytest.fixture(scope="module")
def cached(long_dir):
    return LLM.load(long_dir, max_batch_size=8)


@pytest.fixture(scope="module")
def plain(cached):
    """The same model without the prefix cache."""
    return LLM(cached.model, cached.tokenizer, max_batch_size=8, enable_prefix_caching=False)


def words(n: int, seed: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(10, 390, (n,), generator=g).tolist()


def test_a_multi_turn_chat_re_sending_its_history_gives_the_same_answers_from_the_cache(cached, plain):
    cached.engine.reset_prefix_cache()
    messages = [{"role": "system", "content": "You answer in riddles, briefly."}]
    previous = 0
    for turn, question in enumerate(["Who are you?", "Where is the fox?", "Why is it lazy?", "Tell me more.", "Bye!"]):
        messages.append({"role": "user", "content": question})
        with_cache, without = cached.chat(messages, GREEDY), plain.chat(messages, GREEDY)
        assert with_cache.token_ids == without.token_ids
        assert without.num_cached_tokens == 0
        if turn:  # the earlier turns' prompt and answer, but for the last tokens that tokenize across the seam
            assert with_cache.num_cached_tokens >= previous - 2 * BLOCK_SIZE
        assert with_cache.num_cached_tokens % BLOCK_SIZE == 0 and with_cache.num_cached_tokens < len(with_cache.prompt_token_ids)
        previous = len(with_cache.prompt_token_ids)
        messages.append({"role": "assistant", "content": with_cache.text})
    assert previous > 100


def test_two_requests_sharing_a_1000_token_system_prompt(cached, plain):
    cached.engine.reset_prefix_cache()
    system = words(1000, seed=1)
    first, second = system + words(20, seed=2), system + words(30, seed=3)
    params = SamplingParams(max_tokens=32, temperature=0, ignore_eos=True)
    expected = [o.token_ids for o in plain.generate([first, second], params)]
    a = cached.generate([first], params)[0]
    b = cached.generate([second], params)[0]
    assert [a.token_ids, b.token_ids] == expected
    assert a.num_cached_tokens == 0 and b.num_cached_tokens == 1000 // BLOCK_SIZE * BLOCK_SIZE
    # A request that arrives while the first still runs finds its prompt already cached.
    cached.engine.reset_prefix_cache()
    engine = cached.engine
    a = engine.add(first, params)
    engine.step()
    b = engine.add(second, params)
    engine.run([a, b])
    assert [a.token_ids, b.token_ids] == expected and b.num_cached_tokens == 992


def test_seeded_samples_are_the_same_with_and_without_the_cache(cached, plain):
    prompt = words(300, seed=4)
    params = SamplingParams(max_tokens=40, temperature=0.9, top_p=0.95, seed=11, n=3)
    want = [c.token_ids for c in plain.generate([prompt], params)[0].outputs]
    cached.generate([prompt[:200]], GREEDY)  # caches the first 192 tokens
    out = cached.generate([prompt], params)[0]
    assert out.num_cached_tokens >= 192 and [c.token_ids for c in out.outputs] == want


def test_an_answer_is_cached_for_the_next_turn(cached):
    cached.engine.reset_prefix_cache()
    prompt = words(40, seed=5)
    first = cached.generate([prompt], SamplingParams(max_tokens=60, temperature=0, ignore_eos=True))[0]
    follow = prompt + first.token_ids + words(5, seed=6)
    again = cached.generate([follow], GREEDY)[0]
    # Every token whose KV was computed (all but the last one sampled), in whole blocks.
    assert again.num_cached_tokens == (len(prompt) + len(first.token_ids) - 1) // BLOCK_SIZE * BLOCK_SIZE


def test_prompt_logprobs_with_a_cached_prefix_are_computed_in_full(cached, plain):
    """A request that asks for prompt logprobs needs the logits of every prompt position, which the cache does
    not hold: it bypasses the cache (its own KV is still kept for others)."""
    prompt = words(120, seed=7)
    cached.generate([prompt], GREEDY)
    want = plain.engine.prompt_logprobs(prompt, top=2)
    scored = cached.generate([prompt], SamplingParams(max_tokens=3, temperature=0, prompt_logprobs=2, ignore_eos=True))[0]
    assert scored.num_cached_tokens == 0
    assert [e.token_id for e in scored.prompt_logprobs] == prompt[1:]
    assert [e.logprob for e in scored.prompt_logprobs] == pytest.approx([e.logprob for e in want], abs=1e-4)
    assert [[t for t, _ in e.top] for e in scored.prompt_logprobs] == [[t for t, _ in e.top] for e in want]
    assert cached.engine.prompt_logprobs(prompt, top=2) == want  # scoring alone: no cache either


def test_eviction_under_a_small_budget_stays_within_it_and_keeps_the_newest(cached, plain):
    slot = plain.engine.slot_bytes
    budget = (256 + 10 * BLOCK_SIZE) * slot  # one row of 256 slots, and room for 10 blocks beside it
    llm = LLM(cached.model, cached.tokenizer, max_batch_size=1, cache_budget=budget)
    engine, params = llm.engine, SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
    prompts = [words(70, seed=100 + i) for i in range(8)]  # 4 whole blocks each, 32 in all
    expected = [o.token_ids for o in plain.generate(prompts, params)]
    outs = []
    for p in prompts:
        out = engine.add(p, params)
        while not out.finished:
            engine.step()
            assert engine.kv_bytes <= budget
        outs.append(out)
    assert [o.token_ids for o in outs] == expected
    assert len(engine.prefix_cache.blocks) == 10
    assert llm.generate([prompts[-1]], params)[0].num_cached_tokens == 64  # the newest is kept
    assert llm.generate([prompts[0]], params)[0].num_cached_tokens == 0  # the oldest went first


def test_cached_prefixes_never_keep_a_request_out(cached):
    """The prefix cache takes what the rows leave; a request that needs the whole budget evicts it all."""
    budget = 1024 * cached.engine.slot_bytes
    llm = LLM(cached.model, cached.tokenizer, max_batch_size=1, cache_budget=budget)
    engine = llm.engine
    llm.generate([words(600, seed=8)], SamplingParams(max_tokens=4, temperature=0, ignore_eos=True))
    # Its row took 768 slots, leaving 256 (16 blocks) to the prefix cache; idle, the row was given back.
    assert engine.cache is None and engine.prefix_cache.num_tokens == 256
    out = engine.add(words(900, seed=9), SamplingParams(max_tokens=124, temperature=0, ignore_eos=True))
    engine.step()
    assert engine.num_running == 1 and engine.kv_bytes <= budget and engine.prefix_cache.num_tokens == 0
    engine.run([out])
    assert len(out.token_ids) == 124


def test_disabled_and_reset(plain, cached):
    assert plain.engine.prefix_cache is None
    prompt = words(50, seed=10)
    cached.generate([prompt], GREEDY)
    cached.engine.reset_prefix_cache()
    assert cached.engine.prefix_cache.num_tokens == 0
    assert cached.generate([prompt], GREEDY)[0].num_cached_tokens == 0


def test_the_pool_evicts_least_recently_used_leaves_first():
    pool = PrefixCache(block_bytes=1, block_size=2)
    k, v = [torch.arange(2 * 12, dtype=torch.float).view(1, 2, 12, 1)], [torch.zeros(1, 2, 12, 1)]
    trunk, left, right = [1, 2, 3, 4], [5, 6, 7, 8], [9, 10, 11, 12]
    pool.store(trunk + left, 8, k, v, 0, room=100)
    pool.store(trunk + right, 8, k, v, 0, room=100)
    assert len(pool.blocks) == 6  # the trunk's two blocks once, two of each branch
    assert len(pool.match(trunk + left, 8)) == 4  # the left branch is now the newest
    pool.shrink_to(4)  # the right branch's blocks go, deepest first
    assert len(pool.match(trunk + right, 8)) == 2 and len(pool.match(trunk + left, 8)) == 4
    pool.store(trunk + [0, 0], 6, k, v, 0, room=4)  # room made by evicting the left branch's tip, never the trunk
    assert len(pool.match(trunk + [0, 0], 6)) == 3 and len(pool.match(trunk + left, 8)) == 3
    rows = [torch.zeros(1, 2, 12, 1)]
    assert pool.load(pool.match(trunk + [0, 0], 6), rows, [torch.zeros(1, 2, 12, 1)], 0) == 6
    assert torch.equal(rows[0][0, :, :6], k[0][0, :, :6])
    pool.evict(100)
    assert not pool.blocks and not pool.lru
