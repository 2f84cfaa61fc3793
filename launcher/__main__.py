"""``python -m launcher launch|submit|status|logs|stop``: the launcher's commands without the fm-train CLI."""

from __future__ import annotations

import argparse
import sys

from launcher.cli import COMMANDS


def main(argv: list[str] | None = None) -> int:
    """Parse and dispatch one launcher command."""
    parser = argparse.ArgumentParser(prog="python -m launcher", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (help_text, add, run) in COMMANDS.items():
        sp = sub.add_parser(name, help=help_text, description=help_text)
        add(sp)
        sp.set_defaults(_run=run, entry_module="launcher")  # a submitted job runs `python -m launcher launch`
    args = parser.parse_args(argv)
    return int(args._run(args))


if __name__ == "__main__":
    sys.exit(main())
