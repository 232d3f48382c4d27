import subprocess
import sys

from llmasos.cli import VERBS, build_parser


def test_help_lists_every_verb_without_importing_torch():
    code = ("import sys; from llmasos.cli import main\n"
            "try:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
            "assert 'torch' not in sys.modules, 'torch imported by --help'")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    build_parser()
    for verb in VERBS:
        assert verb in r.stdout


def test_every_verb_has_help_with_examples():
    build_parser()
    for verb in VERBS:
        r = subprocess.run([sys.executable, "-m", "llmasos", verb, "--help"], capture_output=True, text=True)
        assert r.returncode == 0 and "examples:" in r.stdout and f"llmasos {verb}" in r.stdout
