import json

import pytest
from helpers import CORPUS, make_hf_model, write_bpe_tokenizer


@pytest.fixture(scope="package")
def data(tmp_path_factory, bpe_dir):
    """A prepared data dir: 300 short documents, 10% of them for validation."""
    from llmasos.data.prepare import prepare

    root = tmp_path_factory.mktemp("corpus")
    with open(root / "c.jsonl", "w") as f:
        for i in range(300):
            f.write(json.dumps({"text": f"{CORPUS[i % 6]} number {i}"}) + "\n")
    prepare([root / "c.jsonl"], bpe_dir, root / "data", val_fraction=0.1, progress=False)
    return root / "data"


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A tiny random GQA Llama with a byte-level BPE tokenizer, to fine-tune (one for each test module): its dir,
    and the transformers model written there."""
    path, ref = make_hf_model(tmp_path_factory.mktemp("base") / "base", num_key_value_heads=2)
    write_bpe_tokenizer(path)
    return path, ref
