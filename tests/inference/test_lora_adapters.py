"""LoRA adapters served unmerged by the engine: requests for several adapters and the base share batches, and each
gets exactly the greedy tokens of its merged model."""

import json
import warnings

import pytest
import torch
from helpers import write_lora_adapter

from llmasos import LLM, SamplingParams
from llmasos.errors import LLMasOSError
from llmasos.models.lora import LINEAR_NAMES
from llmasos.models.multi_lora import AdapterSet

GREEDY = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True)
PROMPTS = ["Once upon a time", "def fibonacci(n):", "The quick brown fox jumps", "Numbers 12345"]


def peft_adapter(base, out, seed=4):
    """An adapter PEFT itself writes (its key names and config), with random B so that it matters."""
    peft = pytest.importorskip("peft", reason="peft is not installed")
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(base)
    torch.manual_seed(seed)
    config = peft.LoraConfig(r=4, lora_alpha=16, target_modules=["k_proj", "o_proj", "up_proj"], init_lora_weights=False)
    with warnings.catch_warnings():  # transformers' deprecation notices, raised inside PEFT
        warnings.simplefilter("ignore", FutureWarning)
        peft.get_peft_model(model, config).save_pretrained(out)
    saved = json.loads((out / "adapter_config.json").read_text())
    (out / "adapter_config.json").write_text(json.dumps({**saved, "base_model_name_or_path": str(base)}))
    from llmasos.tokenization import copy_tokenizer_files

    copy_tokenizer_files(base, out)
    return out


@pytest.fixture(scope="module")
def adapter_dirs(tiny, tmp_path_factory):
    root, base = tmp_path_factory.mktemp("adapters"), tiny[0]
    return {
        "qv": write_lora_adapter(base, root / "qv", ("q_proj", "v_proj"), rank=4, alpha=8, seed=1),
        "all": write_lora_adapter(base, root / "all", tuple(LINEAR_NAMES), rank=8, alpha=4, seed=2),
        "peft": peft_adapter(base, root / "peft"),
    }


@pytest.fixture(scope="module")
def merged(tiny, adapter_dirs):
    """Each adapter's greedy tokens for PROMPTS from its merged model (`LLM.load(adapter_dir)` folds it in)."""
    out = {name: [o.token_ids for o in LLM.load(path).generate(PROMPTS, GREEDY)] for name, path in adapter_dirs.items()}
    out["base"] = [o.token_ids for o in LLM.load(tiny[0]).generate(PROMPTS, GREEDY)]
    assert len({tuple(map(tuple, v)) for v in out.values()}) == len(out)  # every adapter changes what is said
    return out


def test_adapters_and_the_base_in_one_batch_equal_their_merged_models(tiny, adapter_dirs, merged):
    llm = LLM.load(tiny[0], max_batch_size=16)
    for name, path in adapter_dirs.items():
        llm.load_adapter(name, path)
    assert llm.adapters == ["all", "peft", "qv"]
    adapters = AdapterSet.of(llm.model)
    seen = []
    select = adapters.select
    adapters.select = lambda rows: (seen.append({a.name if a else None for a in rows}), select(rows))[1]
    names = ["base", "qv", "all", "peft"]
    requests = [
        (name, i, llm.engine.add(prompt, GREEDY, adapter=adapters.get(name)))
        for i, prompt in enumerate(PROMPTS)
        for name in names
    ]
    llm.engine.run([out for *_, out in requests])
    for name, i, out in requests:
        assert out.token_ids == merged[name][i], (name, i)
    assert {None, "qv", "all", "peft"} in seen  # prefilled together, and decoded together


def test_generate_and_embed_take_an_adapter_by_name(tiny, adapter_dirs, merged):
    llm = LLM.load(tiny[0])
    llm.load_adapter("qv", adapter_dirs["qv"])
    assert [o.token_ids for o in llm.generate(PROMPTS, GREEDY, adapter="qv")] == merged["qv"]
    assert [o.token_ids for o in llm.generate(PROMPTS, GREEDY)] == merged["base"]
    merged_llm = LLM.load(adapter_dirs["qv"])
    assert (llm.embed(PROMPTS, adapter="qv") - merged_llm.embed(PROMPTS)).abs().max() < 1e-5
    with pytest.raises(LLMasOSError, match=r"no LoRA adapter named 'sql' is loaded \(loaded: qv\)"):
        llm.generate(PROMPTS, GREEDY, adapter="sql")
    with pytest.raises(LLMasOSError, match="already loaded"):
        llm.load_adapter("qv", adapter_dirs["all"])


def test_an_unloaded_adapter_stays_for_the_requests_using_it(tiny, adapter_dirs, merged):
    llm = LLM.load(tiny[0])
    llm.load_adapter("all", adapter_dirs["all"])
    adapter = AdapterSet.of(llm.model).get("all")
    out = llm.engine.add(PROMPTS[0], GREEDY, adapter=adapter)
    for _ in range(3):
        llm.engine.step()
    llm.unload_adapter("all")  # a request still runs with it
    assert llm.adapters == [] and AdapterSet.of(llm.model).stacked == [adapter]
    with pytest.raises(LLMasOSError, match="has been unloaded"):
        llm.engine.add(PROMPTS[1], GREEDY, adapter=adapter)
    llm.engine.run([out])
    assert out.token_ids == merged["all"][0]
    from llmasos.inference import adapters

    assert not adapters.collect(llm.engine) and AdapterSet.of(llm.model).stacked == []


def test_the_prefix_cache_never_mixes_an_adapters_kv_with_the_bases(tiny, adapter_dirs, merged):
    llm = LLM.load(tiny[0])
    assert llm.engine.prefix_cache is not None
    llm.load_adapter("all", adapter_dirs["all"])
    for _ in range(2):  # the base's prompts cached first, then the adapter's requests, then the base's again
        assert [o.token_ids for o in llm.generate(PROMPTS, GREEDY)] == merged["base"]
        outs = llm.generate(PROMPTS, GREEDY, adapter="all")
        assert [o.token_ids for o in outs] == merged["all"] and all(o.num_cached_tokens == 0 for o in outs)
