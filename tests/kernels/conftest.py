"""The kernels at every instruction-set level this CPU runs: the `ops` fixture runs a test once per level
(`LLMASOS_ISA`), so the model's fast modules use that level too. Levels the CPU cannot run are not
parametrized here; `test_levels.py` skips one test per such level, with the reason."""

import pytest

from llmasos.kernels import LEVEL_NAMES, cpu_level, load_ops

OWN = cpu_level()
RUNNABLE = LEVEL_NAMES[: LEVEL_NAMES.index(OWN.name) + 1] if OWN else ()


@pytest.fixture(params=RUNNABLE)
def ops(request, monkeypatch):
    monkeypatch.setenv("LLMASOS_ISA", request.param)
    module = load_ops()
    if module is None:
        pytest.skip("the kernels cannot be built here (no compiler or Python headers)")
    return module
