"""The README is the manual: every block marked `bash runnable` or `python runnable` runs, in order,
in one fresh directory with its own store, as a user would type it. A command that stops working
fails here."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

README = Path(__file__).parents[1] / "README.md"
BLOCK = re.compile(r"^```(bash|python) runnable\n(.*?)^```", re.S | re.M)


def runnable_blocks() -> list[tuple[str, str]]:
    """(language, code) of each runnable block, in README order."""
    return BLOCK.findall(README.read_text())


# Verbs whose README example a test of their own runs (it would cost minutes more here).
RUN_ELSEWHERE = {"quickstart": "tests/test_quickstart.py"}


def test_the_readme_has_runnable_blocks_for_every_verb():
    from llmasos.cli import VERBS, build_parser

    build_parser()
    text = "\n".join(code for language, code in runnable_blocks() if language == "bash")
    missing = [verb for verb in VERBS if verb not in RUN_ELSEWHERE and not re.search(rf"\bllmasos {verb}\b", text)]
    assert not missing, f"verbs without a runnable README example: {missing}"


def test_every_runnable_block_runs(tmp_path):
    env = {
        **os.environ,
        "LLMASOS_HOME": str(tmp_path / "home"),
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
    }
    for number, (language, block) in enumerate(runnable_blocks(), 1):
        command = ["bash", "-euo", "pipefail", "-c", block] if language == "bash" else [sys.executable, "-c", block]
        done = subprocess.run(
            command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600, stdin=subprocess.DEVNULL
        )
        assert done.returncode == 0, (
            f"README block {number} failed:\n{block}\n--- stdout\n{done.stdout[-3000:]}\n--- stderr\n{done.stderr[-3000:]}"
        )
