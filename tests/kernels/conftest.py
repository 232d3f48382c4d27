"""The kernels at every instruction-set level this CPU runs: the `ops` fixture runs a test once per level
(`LLMASOS_ISA`), so the model's fast modules use that level too. Levels the CPU cannot run are not
parametrized here; `test_levels.py` compiles each and skips it, with the reason. On a CPU without AVX-512
the AVX-512 code paths (VNNI and BF16 included) still run, over an emulation of their intrinsics
(`emu512.h`): the "avx512_bf16-emulated" level; and the AMX path over an emulation of the tiles (`emuamx.h`):
"amx-emulated"."""

from pathlib import Path

import pytest
from torch.utils.cpp_extension import load

from llmasos import kernels
from llmasos.kernels import LEVEL_NAMES, cpu_level, load_ops

OWN = cpu_level()
RUNNABLE = LEVEL_NAMES[: LEVEL_NAMES.index(OWN.name) + 1] if OWN else ()
# The emulated builds (name: source), for an AVX2-only CPU.
EMULATIONS = {"avx512_bf16-emulated": "emu512.cpp", "amx-emulated": "emuamx.cpp"}
EMULATED = tuple(EMULATIONS) if OWN is not None and OWN.name == "avx2" else ()


@pytest.fixture(scope="session")
def emulated(tmp_path_factory):
    """Builds of gemv.cpp with its AVX-512 (VNNI and BF16 included) and AMX paths compiled over emulations of
    their intrinsics, for this AVX2 CPU: emulated(name) builds one once."""
    here, built = Path(__file__).parent, {}

    def build(name: str):
        if name not in built:
            built[name] = load(
                name=f"llmasos_{name.replace('-', '_')}",
                sources=[str(here / EMULATIONS[name])],
                extra_cflags=[*kernels.CFLAGS, *kernels.LEVELS[0].cflags, f"-I{here}"],
                extra_ldflags=["-fopenmp"],
                build_directory=str(tmp_path_factory.mktemp(name)),
                verbose=False,
            )
        return built[name]

    return build


@pytest.fixture(params=RUNNABLE + EMULATED)
def ops(request, monkeypatch):
    if request.param in EMULATED:
        module = request.getfixturevalue("emulated")(request.param)
        monkeypatch.setattr(kernels, "_ops", lambda *args: module)  # the model's fast modules use it too
        return module
    monkeypatch.setenv("LLMASOS_ISA", request.param)
    module = load_ops()
    if module is None:
        pytest.skip("the kernels cannot be built here (no compiler or Python headers)")
    return module
