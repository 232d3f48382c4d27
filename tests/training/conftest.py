import json

import pytest
from helpers import CORPUS


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
