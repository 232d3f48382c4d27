"""Nothing a user owns is deleted or overwritten: every verb that writes refuses, before any heavy work, an
--out it did not write (unless --force) and an --out that is or contains one of its inputs (always)."""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import pytest
from helpers import CORPUS, make_hf_model, write_bpe_tokenizer, write_jsonl

from llmasos.cli import main


class Inputs:
    """What the verbs read, made on first use under `root`, tiny so that each verb runs in seconds."""

    def __init__(self, root: Path):
        self.root = root

    @cached_property
    def corpus(self) -> Path:
        corpus = self.root / "corpus"
        corpus.mkdir(parents=True)
        for n in range(2):
            (corpus / f"{n}.txt").write_text("\n".join(f"{line} ({n}, {i})" for i, line in enumerate(CORPUS[:12])))
        return corpus

    @cached_property
    def tokenizer(self) -> Path:
        return write_bpe_tokenizer(self.root / "tokenizer")

    @cached_property
    def model(self) -> Path:
        path, _ = make_hf_model(self.root / "model", num_key_value_heads=2)
        return write_bpe_tokenizer(path)

    @cached_property
    def gguf(self) -> Path:
        from llmasos.checkpoints.export import export_gguf

        return export_gguf(self.model, self.root / "model.gguf", "f32", progress=False)

    @cached_property
    def data(self) -> Path:
        from llmasos.data.prepare import prepare

        prepare([self.corpus], self.tokenizer, self.root / "data", val_fraction=0.0, progress=False)
        return self.root / "data"

    @cached_property
    def instructions(self) -> Path:
        records = [{"instruction": f"Add {a} and {b}.", "output": f"{a + b}"} for a in range(3) for b in range(3)]
        return write_jsonl(self.root / "alpaca.jsonl", records)

    @cached_property
    def text(self) -> Path:
        (self.root / "text.txt").write_text(" ".join(CORPUS[:6]))
        return self.root / "text.txt"


TRAIN = ["--max-steps", "1", "--micro-batch-size", "1", "--global-batch-size", "1", "--warmup-steps", "1", "--precision", "fp32"]


@dataclass
class Verb:
    argv: Callable[[Inputs, Path], list]  # the command line, writing to --out OUT
    out: str  # OUT, under the test's dir
    mine: str  # the user's file there, which a refusal leaves byte for byte
    made: str  # a file the verb writes: with --force, proof that it replaced the user's
    heavy: str  # what must not run before a refusal
    clashes: Callable[[Inputs], list[Path]]  # outs that are, or contain, one of the inputs
    rerun: bool | None = True  # a second run onto its own output: works, is refused (as before), or is too slow to try
    whole: bool = True  # False: too slow to finish here; --force is followed up to the first heavy step


CASES = {
    "prepare": Verb(
        lambda i, out: ["prepare", i.corpus, "--tokenizer", i.tokenizer, "--out", out],
        "out",
        "out/notes.txt",
        "out/metadata.json",
        "llmasos.data.prepare._init_worker",
        lambda i: [i.corpus, i.root],
    ),
    "tokenizer train": Verb(
        lambda i, out: ["tokenizer", "train", i.corpus, "--vocab-size", "300", "--out", out],
        "out",
        "out/notes.txt",
        "out/tokenizer.json",
        "tokenizers.trainers.BpeTrainer",
        lambda i: [i.corpus, i.root],
    ),
    "export hf": Verb(
        lambda i, out: ["export", i.model, "--format", "hf", "--out", out],
        "out",
        "out/notes.txt",
        "out/config.json",
        "llmasos.checkpoints.export.load_model",
        lambda i: [i.model, i.root],
    ),
    "export onnx": Verb(
        lambda i, out: ["export", i.model, "--format", "onnx", "--out", out],
        "out",
        "out/notes.txt",
        "out/model.onnx",
        "llmasos.checkpoints.onnx.load_model",
        lambda i: [i.model, i.root],
        rerun=None,
    ),
    "export gguf": Verb(
        lambda i, out: ["export", i.gguf, "--format", "gguf", "--dtype", "f32", "--out", out],
        "out/m.gguf",
        "out/m.gguf",
        "out/Modelfile",
        "llmasos.checkpoints.gguf.load_tensor",
        lambda i: [i.gguf],
        rerun=False,
    ),
    "export gguf (Modelfile)": Verb(
        lambda i, out: ["export", i.model, "--format", "gguf", "--out", out],
        "out",
        "out/Modelfile",
        "out/model-f32.gguf",
        "llmasos.checkpoints.gguf.load_tensor",
        lambda i: [],
        rerun=False,
    ),
    "pretrain": Verb(
        lambda i, out: ["pretrain", "--model", "tiny-gqa", "--data", i.data, "--out", out, "--seq-len", "16", *TRAIN],
        "out",
        "out/notes.txt",
        "out/final/config.json",
        "llmasos.models.llama.Transformer",
        lambda i: [i.data, i.root],
        rerun=False,
    ),
    "finetune": Verb(
        lambda i, out: [
            "finetune",
            i.model,
            "--data",
            i.instructions,
            "--out",
            out,
            "--seq-len",
            "32",
            "--val-fraction",
            "0",
            *TRAIN,
        ],
        "out",
        "out/notes.txt",
        "out/final/config.json",
        "llmasos.checkpoints.load.load_model",
        lambda i: [i.model, i.root],
        rerun=False,
    ),
    "eval": Verb(
        lambda i, out: ["eval", i.model, "--perplexity", i.text, "--out", out],
        "results.json",
        "results.json",
        "results.json",
        "llmasos.LLM.load",
        lambda i: [i.text, i.root],
    ),
    "quickstart": Verb(
        lambda i, out: ["quickstart", "--out", out],
        "out",
        "out/notes.txt",
        "out/.llmasos",
        "llmasos.tokenization.train.train_bpe",
        lambda i: [i.corpus, i.root],
        whole=False,
    ),
}


class HeavyWork(Exception):
    """Raised by the verb's first heavy step where it must not be reached."""


def heavy_work(*args, **kwargs):
    raise HeavyWork


def snapshot(path: Path) -> dict[str, bytes]:
    """Every file under `path` (or `path` itself) with its bytes."""
    if path.is_file():
        return {"": path.read_bytes()}
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


USERS = b"the user's own words\n"


@pytest.mark.parametrize("name", CASES)
def test_a_verb_replaces_only_what_it_wrote_and_never_its_input(name, tmp_path, monkeypatch, capsys):
    verb, inputs = CASES[name], Inputs(tmp_path / "in")
    monkeypatch.setenv("LLMASOS_HOME", str(tmp_path / "home"))
    monkeypatch.setattr("llmasos.quickstart.stdlib_files", lambda max_bytes: sorted(inputs.corpus.glob("*.txt")))

    def run(out: Path, *flags: str, heavy: bool = True) -> tuple[int, str]:
        """The verb's exit code and standard error; heavy=False: its heavy work raises HeavyWork."""
        capsys.readouterr()
        with monkeypatch.context() as patch:
            if not heavy:
                patch.setattr(verb.heavy, heavy_work)
            code = main([str(a) for a in verb.argv(inputs, out)] + list(flags))
        return code, capsys.readouterr().err

    verb.argv(inputs, tmp_path)  # makes the inputs it reads
    # (c) An out that is, or contains, an input: refused even with --force, naming both; the inputs intact.
    for clash in verb.clashes(inputs):
        before = snapshot(inputs.root)
        code, err = run(clash, "--force", heavy=False)
        assert code == 1 and f"the output {clash} " in err and "even with --force" in err, err
        named = Path(re.search(r"(?:is|contains) the input (\S+):", err)[1])
        assert named == clash or clash in named.parents
        assert snapshot(inputs.root) == before

    # (a) What the user keeps at --out: refused, left byte for byte, with a message naming it and --force.
    out, mine = tmp_path / verb.out, tmp_path / verb.mine
    mine.parent.mkdir(parents=True, exist_ok=True)
    mine.write_bytes(USERS)
    before = snapshot(out)
    code, err = run(out, heavy=False)
    assert code == 1 and str(out) in err and "--force" in err and "Traceback" not in err, err
    assert snapshot(out) == before

    # (b) With --force it is replaced, atomically: no temporary name is left beside it.
    if verb.whole:
        code, err = run(out, "--force")
        assert code == 0, err
    else:
        with pytest.raises(HeavyWork):
            run(out, "--force", heavy=False)
    assert not mine.exists() or mine.read_bytes() != USERS
    assert (tmp_path / verb.made).exists()
    assert [p.name for p in out.parent.iterdir() if re.search(r"\.(tmp|old)-", p.name)] == []

    # A rerun onto its own output works where it did before (a .gguf or a finished run is refused, as before).
    if verb.whole and verb.rerun is not None:
        code, err = run(out)
        assert code == (0 if verb.rerun else 1), err
