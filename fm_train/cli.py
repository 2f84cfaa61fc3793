"""``fm-train``: one console script, thin dispatch to the parts (each imported only when used)."""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from typing import Callable, Sequence

# (name, one-line help, module, add-arguments function, run function). Modules are imported to
# build their parser, so each keeps torch/deepspeed imports inside its run function.
SUBCOMMANDS: list[tuple[str, str, str, str, str]] = [
    ("plan", "validate a config and print the resolved config and rank layout", "fm_train.plan.cli",
     "add_plan_arguments", "run_plan"),
]


def build_parser() -> argparse.ArgumentParser:
    """The full argument parser, with one sub-parser per subcommand."""
    parser = argparse.ArgumentParser(
        prog="fm-train",
        description="Pretrain decoder-only language models: shard data, train with DeepSpeed 3D parallelism "
                    "on Ray, convert checkpoints to Hugging Face.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, help_text, module, add_fn, run_fn in SUBCOMMANDS:
        mod = importlib.import_module(module)
        sp = sub.add_parser(name, help=help_text, description=help_text)
        getattr(mod, add_fn)(sp)
        sp.set_defaults(_run=getattr(mod, run_fn))
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``fm-train`` console script."""
    args = build_parser().parse_args(argv)
    run: Callable[[argparse.Namespace], int] = args._run
    try:
        return int(run(args) or 0)
    except BrokenPipeError:  # `fm-train plan ... | head`: the reader left; not an error of ours
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


if __name__ == "__main__":
    sys.exit(main())
