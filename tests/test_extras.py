"""`pip install llmasos` is the lean core, and each extra brings only what its part needs. Each check runs in a
fresh interpreter where the packages of the other parts cannot be imported (as if never installed), so a
core module that imports one, or an extra that leans on another, fails here."""

import subprocess
import sys
import sysconfig
import textwrap
from pathlib import Path

import pytest

from llmasos.extras import EXTRAS

# What the optional parts and the tests bring; the core must import none of it.
OPTIONAL = {m.split(".")[0] for modules in EXTRAS.values() for m in modules} | {
    "lm_eval",
    "sacrebleu",
    "starlette",
    "pydantic",
    "transformers",
    "peft",
    "datasets",
    "openai",
    "httpx",
    "playwright",
    "schemathesis",
    "hypothesis",
    "llama_cpp",
    "onnx",
    "onnxruntime",
    "onnxscript",
}


def run(code: str, hidden: set[str], cwd: Path) -> subprocess.CompletedProcess:
    """`code` in a fresh interpreter whose site-packages lacks the `hidden` top-level packages: a view of the
    real one made of links to everything else (hiding them from the finders, as `find_spec` must see)."""
    site = Path(sysconfig.get_paths()["purelib"])
    view = cwd / "site-packages"
    view.mkdir()
    for entry in site.iterdir():
        if entry.name.partition(".")[0] not in hidden:
            (view / entry.name).symlink_to(entry)
    prelude = f"import site, sys\nsite.addsitedir({str(view)!r})\nsys.path.insert(0, {str(Path(__file__).parent)!r})\n"
    return subprocess.run(
        [sys.executable, "-S", "-c", prelude + textwrap.dedent(code)], cwd=cwd, capture_output=True, text=True, timeout=600
    )


def test_the_core_loads_and_generates_with_no_optional_package(tmp_path):
    done = run(
        """
        import torch
        from helpers import write_bpe_tokenizer
        from llmasos import LLM, SamplingParams
        from llmasos.checkpoints.hf import save_model
        from llmasos.cli import main
        from llmasos.models import zoo_config
        from llmasos.models.llama import Transformer

        torch.manual_seed(0)
        model = Transformer(zoo_config("tiny-gqa"))
        path = save_model(model, "tiny", tokenizer_dir=write_bpe_tokenizer(__import__("pathlib").Path("tok")))
        out = LLM.load(path).generate(["Once upon"], SamplingParams(max_tokens=4, temperature=0, ignore_eos=True))
        assert len(out[0].token_ids) == 4
        assert main(["generate", str(path), "-p", "Once upon", "--max-tokens", "3"]) == 0
        for verb in (["serve", str(path)], ["pretrain", "--model", "tiny-gqa", "--data", "d"], ["quickstart"]):
            assert main(verb) == 1, verb
        try:
            import llmasos.serving
        except ImportError as e:
            print("IMPORT:", e)
        """,
        OPTIONAL,
        tmp_path,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "llmasos serve needs the 'serve' extra" in done.stderr and "pip install 'llmasos[serve]'" in done.stderr
    assert "llmasos pretrain needs the 'train' extra" in done.stderr
    assert "IMPORT: llmasos.serving needs the 'serve' extra" in done.stdout


@pytest.mark.parametrize(
    "extra, modules",
    [
        ("serve", ["llmasos.serving", "llmasos.serving.app"]),
        ("train", ["llmasos.training.trainer", "llmasos.training.finetune"]),
        ("eval", ["llmasos.evaluation.runner", "llmasos.evaluation.metrics"]),
        ("export", ["llmasos.checkpoints.onnx"]),
    ],
)
def test_each_extra_needs_only_the_core_and_its_own_packages(extra, modules, tmp_path):
    own = {m.split(".")[0] for m in EXTRAS[extra]} | {
        "serve": {"starlette", "pydantic"},
        "eval": {"sacrebleu"},
        "export": {"onnx", "onnxruntime", "onnxscript"},
    }.get(extra, set())
    done = run("\n".join(f"import {m}" for m in modules) + "\nprint('ok')\n", OPTIONAL - own, tmp_path)
    assert done.returncode == 0 and "ok" in done.stdout, done.stderr[-3000:]
