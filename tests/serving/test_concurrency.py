"""Many clients at once through the continuous-batching engine."""

import asyncio

PROMPTS = [[(7 * i + j) % 390 + 5 for j in range(3 + i % 11)] for i in range(64)]


def test_64_concurrent_streams_complete_and_equal_single_runs(client, server):
    import openai
    from helpers import API_KEY

    kw = dict(model="tiny", max_tokens=8, temperature=0, extra_body={"ignore_eos": True})
    alone = [client.completions.create(prompt=p, **kw).choices[0].text for p in PROMPTS]

    async def one(aclient, prompt):
        chunks = [c async for c in await aclient.completions.create(prompt=prompt, stream=True, **kw)]
        reasons = [c.choices[0].finish_reason for c in chunks if c.choices[0].finish_reason]
        return "".join(c.choices[0].text for c in chunks), reasons

    async def all_at_once():
        async with openai.AsyncOpenAI(base_url=f"{server}/v1", api_key=API_KEY, max_retries=0, timeout=120) as aclient:
            return await asyncio.gather(*(one(aclient, p) for p in PROMPTS))

    results = asyncio.run(all_at_once())
    assert [reasons for _, reasons in results] == [["length"]] * 64
    assert [text for text, _ in results] == alone
