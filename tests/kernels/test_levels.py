"""Instruction-set levels: which one runs (`LLMASOS_ISA` may only lower it), what each build is called, that a
finished build is loaded without compiling again, and that every level compiles on any x86 machine with a
compiler, including the levels this CPU cannot run (their tests elsewhere skip here, with the reason)."""

import os
import subprocess
import sys
import sysconfig
import warnings

import pytest
import torch
import torch.utils.cpp_extension

from llmasos import kernels
from llmasos.kernels import CFLAGS, LEVEL_NAMES, LEVELS, SOURCE, build_name, cpu_level, cpu_model, kernel_level, ops_at

AVX2_ONLY = frozenset({"avx2", "fma", "f16c", "sse4_2"})
ALL = frozenset().union(*(level.needs for level in LEVELS))


def test_the_level_is_the_cpus_own_and_llmasos_isa_only_lowers_it(monkeypatch):
    monkeypatch.setattr(kernels.platform, "machine", lambda: "x86_64")
    monkeypatch.setattr(kernels, "_cpu_flags", lambda: ALL)
    monkeypatch.delenv("LLMASOS_ISA", raising=False)
    assert kernel_level() is cpu_level() is LEVELS[-1]
    monkeypatch.setenv("LLMASOS_ISA", "avx2")
    assert kernel_level() is LEVELS[0]
    monkeypatch.setattr(kernels, "_cpu_flags", lambda: AVX2_ONLY)
    monkeypatch.setenv("LLMASOS_ISA", "avx512_bf16")
    with pytest.warns(UserWarning, match="above this CPU's level .avx2.; using avx2"):
        assert kernel_level() is LEVELS[0]  # never a level that would crash
    monkeypatch.setenv("LLMASOS_ISA", "avx9000")
    with pytest.raises(ValueError, match="'avx9000' is not a kernel level; the levels are avx2, avx512, avx512_vnni"):
        kernel_level()
    monkeypatch.setattr(kernels, "_cpu_flags", lambda: frozenset({"sse4_2", "avx"}))
    assert cpu_level() is None and kernel_level() is None  # no AVX2: stock PyTorch


def test_build_names_follow_the_level_and_the_source(tmp_path, monkeypatch):
    """Identical sources share a build across checkouts; a changed source or level never reuses (or evicts)
    another's build."""
    names = {level.name: build_name(level) for level in LEVELS}
    assert len(set(names.values())) == len(LEVELS)
    assert all(name.removeprefix(f"llmasos_{level}_").isalnum() for level, name in names.items())
    copy = tmp_path / "gemv.cpp"
    copy.write_bytes(SOURCE.read_bytes())
    same = build_name(LEVELS[0])
    monkeypatch.setattr(kernels, "SOURCE", copy)
    assert build_name(LEVELS[0]) == same  # another checkout, the same source
    copy.write_text(copy.read_text() + "\n// changed\n")
    assert build_name(LEVELS[0]) != same


def test_a_finished_build_is_loaded_without_compiling(tmp_path, monkeypatch):
    """Once a build is marked finished, later processes import it directly: no compiler, no lock, no rebuild."""
    level = kernel_level()
    if level is None or ops_at(level) is None:
        pytest.skip("no kernels on this machine (not x86 with AVX2, or no compiler)")
    built, done = kernels.build_status(level)
    assert done, built

    def no_build(**options):
        raise AssertionError("compiled again")

    monkeypatch.setattr(torch.utils.cpp_extension, "load", no_build)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        module = ops_at.__wrapped__(level)  # the function itself, not the process's cached module
    x, w = torch.randn(2, 64), torch.randn(8, 64)
    (y,) = module.gemv(x, [w], [torch.empty(0)])
    assert torch.allclose(y, x @ w.T, atol=1e-5)


@pytest.mark.parametrize("name", LEVEL_NAMES)
def test_each_level_compiles_and_runs_where_the_cpu_has_it(name, tmp_path):
    """Every level compiles here (its code is checked even on a CPU that cannot run it); where the CPU runs it,
    its kernels give the float64 product (the `ops` fixture runs every kernel test at each such level)."""
    level = LEVELS[LEVEL_NAMES.index(name)]
    own = cpu_level()
    if own is None:
        pytest.skip(f"this CPU ({cpu_model()}) runs no kernel level (not x86 with AVX2, FMA and F16C)")
    if LEVEL_NAMES.index(name) > LEVEL_NAMES.index(own.name):
        # Compile only (importing could run the level's instructions in static initializers).
        includes = [f"-I{p}" for p in torch.utils.cpp_extension.include_paths()] + [f"-I{sysconfig.get_paths()['include']}"]
        abi = f"-D_GLIBCXX_USE_CXX11_ABI={int(torch.compiled_with_cxx11_abi())}"
        cmd = ["c++", "-std=c++17", "-c", *CFLAGS, *level.cflags, abi, "-DTORCH_EXTENSION_NAME=check", *includes]
        r = subprocess.run([*cmd, str(SOURCE), "-o", str(tmp_path / "gemv.o")], capture_output=True, text=True)
        assert r.returncode == 0, r.stderr[-3000:]
        pytest.skip(
            f"{name} compiled, but this CPU ({cpu_model()}, level {own.name}) cannot run it: "
            f"it lacks {', '.join(sorted(level.needs - kernels._cpu_flags()))}"
        )
    module = ops_at(level)
    assert module is not None
    g = torch.Generator().manual_seed(0)
    for wdtype in (torch.float32, torch.bfloat16):
        w, x = torch.randn(67, 200, generator=g).to(wdtype), torch.randn(5, 200, generator=g)
        for m in (1, 5):
            (y,) = module.gemv(x[:m], [w], [torch.empty(0)])
            expected = x[:m].double() @ w.double().T
            tol = 8e-3 if wdtype == torch.bfloat16 and m > 1 and module.bf16_products else 1e-5  # x rounded
            assert ((y.double() - expected).abs().max() / expected.abs().max()) < tol


def test_info_system_names_the_cpu_its_flags_and_the_level():
    r = subprocess.run(
        [sys.executable, "-m", "llmasos", "info", "--system"],
        capture_output=True,
        text=True,
        env={**os.environ, "LLMASOS_ISA": "avx2"},
    )
    assert r.returncode == 0, r.stderr
    assert cpu_model() in r.stdout
    own = cpu_level()
    assert f"CPU level {own.name if own else 'none'}" in r.stdout
    assert ("kernel level avx2" if own else "kernel level none") in r.stdout
