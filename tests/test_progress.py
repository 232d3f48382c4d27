"""Progress bars: tqdm on a terminal; off one (CI logs, `| tee`), a plain line every 5% and none redrawn."""

import io
import subprocess
import sys

from tqdm import tqdm

from llmasos.progress import LineBar, progress_bar


def test_off_a_terminal_a_1000_step_bar_prints_a_plain_line_every_5_percent(capsys):
    bar = progress_bar(total=1000, desc="steps", unit="step")
    for i in range(1000):
        bar.set_postfix(loss=f"{1 / (i + 1):.3f}")  # a redraw on a terminal, not a line in a log
        bar.update(1)
        bar.refresh()
    bar.close()
    err = capsys.readouterr().err
    lines = err.splitlines()
    assert "\r" not in err and err.endswith("\n") and 20 <= len(lines) <= 25
    assert lines[0].startswith("steps:   0% 0/1000") and lines[1].startswith("steps:   5% 50/1000")
    assert lines[-1].startswith("steps: 100% 1000/1000") and "loss=0.001" in lines[-1]


def test_an_iterated_bar_that_would_vanish_leaves_its_last_line_in_the_log():
    log = io.StringIO()
    assert sum(progress_bar(range(37), desc="tensors", leave=False, file=log)) == sum(range(37))
    lines = log.getvalue().splitlines()
    assert len(lines) <= 21 and lines[-1].startswith("tensors: 100% 37/37") and "\r" not in log.getvalue()


def test_a_bar_without_a_total_prints_its_first_and_last_count():
    log = io.StringIO()
    bar = progress_bar(desc="tokenizing", unit="doc", file=log)
    for _ in range(10_000):
        bar.update(64)
    bar.close()
    assert log.getvalue().splitlines() == [log.getvalue().splitlines()[0], log.getvalue().splitlines()[-1]]
    assert log.getvalue().splitlines()[-1].startswith("tokenizing: 640000doc")


def test_on_a_terminal_the_bar_is_plain_tqdm():
    class Terminal(io.StringIO):
        def isatty(self):
            return True

    bar = progress_bar(total=10, file=Terminal())
    assert type(bar) is tqdm and not isinstance(bar, LineBar)
    bar.close()


def test_a_piped_training_bar_has_no_carriage_returns():
    """The real stderr of a child process, piped as under `| tee`."""
    code = (
        "from llmasos.progress import progress_bar\n"
        "bar = progress_bar(total=1000, desc='pretrain', unit='step')\n"
        "for _ in range(1000):\n    bar.update(1)\nbar.close()\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert "\r" not in r.stderr and len(r.stderr.splitlines()) <= 25
