"""``fm-train``: one console script, thin dispatch to the parts (each imported only when used).

The package holds the entry points: this dispatch (``python -m fm_train.cli`` runs it too), the
arguments shared by the commands that take a run config (:mod:`fm_train.cli.common`), and the
``plan``, ``convert`` and ``eval`` commands (:mod:`fm_train.cli.plan`, :mod:`fm_train.cli.convert`,
:mod:`fm_train.cli.eval`). It is the top layer (``docs/architecture.md``): it loads every subcommand,
the launcher's and the worker's included, by module name.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from typing import Callable, Sequence

from fm_train.families import FAMILIES

# (name, one-line help, module, add-arguments function, run function). Modules are imported to
# build their parser, so each keeps torch/deepspeed imports inside its run function.
SUBCOMMANDS: list[tuple[str, str, str, str, str]] = [
    ("launch", "run a training job on Ray (no CONFIG: the embedded local demo)", "launcher.cli",
     "add_launch_arguments", "run_launch"),
    ("submit", "submit `fm-train launch` to a Ray cluster as a Ray Job", "launcher.cli",
     "add_submit_arguments", "run_submit"),
    ("status", "show the status of a submitted job", "launcher.cli", "add_status_arguments", "run_status"),
    ("logs", "print (or follow) the logs of a submitted job", "launcher.cli", "add_logs_arguments", "run_logs"),
    ("stop", "stop a submitted job", "launcher.cli", "add_stop_arguments", "run_stop"),
    ("runs", "list runs (state, step, loss, latest checkpoint) from their run directories or run.storage;"
     " `runs show NAME`",
     "launcher.cli", "add_runs_arguments", "run_runs"),
    ("shard", "tokenize raw text into webdataset shards with an index", "data_shards.cli",
     "add_shard_arguments", "run_shard"),
    ("convert", "convert a checkpoint (any layout) into a verified Hugging Face directory", "fm_train.cli.convert",
     "add_convert_arguments", "run_convert"),
    ("plan", "validate a config and print the resolved config and rank layout", "fm_train.cli.plan",
     "add_plan_arguments", "run_plan"),
    ("eval", "held-out loss of a Hugging Face model on shards (perplexity, or masked-token accuracy)",
     "fm_train.cli.eval", "add_eval_arguments", "run_eval"),
    ("worker", "run one training rank from the rank environment (torchrun/srun/Ray)", "fm_train.worker",
     "add_worker_arguments", "run_worker_cli"),
]


def build_parser() -> argparse.ArgumentParser:
    """The full argument parser, with one sub-parser per subcommand."""
    parser = argparse.ArgumentParser(
        prog="fm-train",
        description=f"Pretrain language models ({', '.join(f.summary for f in FAMILIES.values())}): shard data,"
                    " train with DeepSpeed 3D parallelism on Ray, convert checkpoints to Hugging Face.",
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
        code = int(run(args) or 0)
    except BrokenPipeError:  # `fm-train plan ... | head`: the reader left; not an error of ours
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    if args.command == "worker":
        _leave_without_finalizers(code)
    return code


def _leave_without_finalizers(code: int) -> None:
    """End a finished training rank at once, skipping the interpreter's teardown.

    After the process group is destroyed, gloo/DeepSpeed native threads can still be alive when the
    interpreter runs static destructors, which now and then aborts a rank whose work is all done
    (SIGABRT, ``terminate called without an active exception``); the launcher would read a crash
    and restart a finished run. The worker closed its metrics sinks and checkpoint uploads before
    returning, so only the standard streams and logging handlers are left to flush.
    """
    import logging

    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
