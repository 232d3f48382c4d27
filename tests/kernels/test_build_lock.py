"""The kernels' first build never hangs on a lock: a lock left by a killed build is removed, and a build
still running elsewhere is waited for only so long (then stock PyTorch). No test here compiles anything."""

import fcntl
import os
import platform
import subprocess
import sys
import textwrap

import pytest
import torch.utils.cpp_extension

from llmasos.kernels import LEVELS, _cpu_flags, build_name, ops_at


@pytest.fixture
def build_dir(tmp_path, monkeypatch):
    """The kernels' build dir under a TORCH_EXTENSIONS_DIR of the test's own (torch uses that root as is),
    holding the `lock` file torch leaves behind when a build is killed."""
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    path = tmp_path / build_name(LEVELS[0])
    path.mkdir()
    (path / "lock").touch()
    return path


def test_a_lock_left_by_a_killed_build_is_removed_and_the_build_runs(build_dir, monkeypatch):
    seen = {}

    def load(**options):  # torch's load would wait on the lock file forever; here it only records
        seen.update(lock_left=(build_dir / "lock").exists(), build_directory=options["build_directory"])
        return "module"

    monkeypatch.setattr(torch.utils.cpp_extension, "load", load)
    assert ops_at.__wrapped__(LEVELS[0]) == "module"  # the function itself, not the process's cached module
    assert seen == {"lock_left": False, "build_directory": str(build_dir)}
    assert (build_dir / "llmasos.built").read_text().startswith("avx2")  # finished: later loads skip the build


@pytest.mark.skipif(
    platform.machine() not in ("x86_64", "AMD64") or not {"avx2", "fma", "f16c"} <= _cpu_flags(),
    reason="the kernels are never built on this CPU",
)
def test_a_build_running_elsewhere_is_waited_for_then_the_model_runs_on_stock_pytorch(build_dir):
    """Another live process holds the build (our flock): a fresh process waits `BUILD_WAIT_S` (1 s here), says
    what it waits for, warns, and runs the model without kernels."""
    script = textwrap.dedent("""
        import time, torch
        import llmasos.kernels as k
        from llmasos.models.config import ModelConfig
        from llmasos.models.fast import use_gemv_kernels
        from llmasos.models.llama import Transformer

        k.BUILD_WAIT_S = 1.0
        model = Transformer(ModelConfig(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=1,
                                        num_attention_heads=4, max_position_embeddings=64)).eval()
        start = time.monotonic()
        print("kernels used:", use_gemv_kernels(model), "after", round(time.monotonic() - start), "s")
        with torch.no_grad():
            print("logits:", tuple(model(torch.tensor([[1, 2, 3]])).shape))
    """)
    env = {k: v for k, v in os.environ.items() if k != "LLMASOS_KERNELS"} | {"LLMASOS_ISA": LEVELS[0].name}
    with open(build_dir / "llmasos.lock", "w") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "kernels used: False after 1 s" in r.stdout and "logits: (1, 3, 97)" in r.stdout
    assert f"waiting up to 1 s for another process compiling the CPU kernels in {build_dir}" in r.stderr
    assert "using stock PyTorch this time" in r.stderr
