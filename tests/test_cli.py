"""The `fm-train` console script: every subcommand is wired, documented, and cheap to start."""

from __future__ import annotations

import subprocess
import sys

import pytest

from fm_train.cli import SUBCOMMANDS, build_parser

pytestmark = pytest.mark.unit


def test_parser_builds_without_torch_or_deepspeed():
    code = "import sys, fm_train.cli as c; c.build_parser(); print(sorted(m for m in ('torch', 'deepspeed', 'ray') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


@pytest.mark.parametrize("name", [s[0] for s in SUBCOMMANDS])
def test_every_option_has_help(name):
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command").choices[name]
    assert sub.description
    for action in sub._actions:
        if action.dest != "help":
            assert action.help, f"fm-train {name}: option {action.option_strings or action.dest} has no help text"


@pytest.mark.e2e
def test_help_of_each_subcommand_exits_zero():
    for name, *_ in SUBCOMMANDS:
        proc = subprocess.run([sys.executable, "-m", "fm_train.cli", name, "--help"], capture_output=True, text=True)
        assert proc.returncode == 0 and "usage: fm-train" in proc.stdout, name
