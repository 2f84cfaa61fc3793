"""``fm-train eval HF_DIR --data SHARDS``: the command around :func:`fm_train.convert.hf_eval.evaluate_hf`.

``HF_DIR`` may also be ``RUN/hf_steps`` (or the run directory holding it), the exports ``convert.every``
writes during training: each export is evaluated in step order, one JSON line each, and with ``--watch``
each new one as it appears, until Ctrl-C or ``--idle-exit-s``. An export is held against
``convert.keep`` while it is read (:func:`fm_train.convert.exports_dir.reading`)."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from fm_train.cli.common import fail
from fm_train.convert.hf_eval import evaluate_hf


def add_eval_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``fm-train eval``."""
    parser.add_argument("hf_dir", metavar="HF_DIR", type=Path,
                        help="a Hugging Face model dir (fm-train convert's output), or RUN/hf_steps (or RUN) with the"
                             " exports of convert.every: each is evaluated, one JSON line per step")
    parser.add_argument("--data", required=True, help="a shard directory built by fm-train shard (or an object-store URI)")
    parser.add_argument("--val-fraction", type=float, default=0.01,
                        help="share of each shard held out, as data.val_fraction in training (0.01)")
    parser.add_argument("--batches", type=int, default=50, help="at most this many batches (50)")
    parser.add_argument("--micro-batch", type=int, default=8, help="sequences per batch (8)")
    parser.add_argument("--seed", type=int, default=1234, help="the run seed (an encoder's masking depends on it; 1234)")
    parser.add_argument("--watch", action="store_true",
                        help="with RUN/hf_steps: keep watching and evaluate each new export as training writes it"
                             " (Ctrl-C to stop)")
    parser.add_argument("--poll-s", type=float, default=10.0, help="--watch: seconds between looks (10)")
    parser.add_argument("--idle-exit-s", type=float, default=None,
                        help="--watch: stop after this many seconds without a new export (default: only Ctrl-C)")


def run_eval(args: argparse.Namespace) -> int:
    """Entry of ``fm-train eval``: the JSON result on stdout (a line per export for RUN/hf_steps), a progress
    bar on stderr."""
    if args.hf_dir.name == "latest" and args.hf_dir.is_file():  # RUN/hf_steps/latest: the newest export
        from fm_train.convert.exports_dir import read_latest

        newest = read_latest(args.hf_dir.parent)
        if newest is None:
            return fail("eval", f"{args.hf_dir} names no published export")
        args.hf_dir = newest
    exports = _exports_folder(args.hf_dir, args.watch)
    if exports is not None:
        return _eval_exports(exports, args)
    if args.watch:
        return fail("eval", f"--watch needs a folder of exports (RUN/hf_steps, written by convert.every); {args.hf_dir}"
                            " is not one")
    if not (args.hf_dir / "config.json").is_file():
        return fail("eval", f"{args.hf_dir} has no config.json: not a Hugging Face model dir (fm-train convert's output)"
                            " nor a folder of convert.every exports (RUN/hf_steps)")
    code, result = _eval_one(args.hf_dir, args)
    if result is not None:
        print(json.dumps(result), flush=True)
    return code


def _exports_folder(path: Path, watch: bool) -> Path | None:
    """``path`` or ``path/hf_steps`` when it is a folder of ``convert.every`` exports (even empty so far);
    with ``watch``, also a run directory whose training has not written the first one yet."""
    from fm_train.convert.exports_dir import HF_STEPS

    for candidate in (path, path / HF_STEPS):
        if candidate.name == HF_STEPS and candidate.is_dir():
            return candidate
    if watch and (path / "config.resolved.yaml").is_file():
        return path / HF_STEPS
    return None


def _eval_exports(root: Path, args: argparse.Namespace) -> int:
    """Evaluate each export under ``root`` in step order (and, with ``--watch``, each new one)."""
    from fm_train.convert.exports_dir import list_exports, reading

    done: set[str] = set()
    last_new = time.monotonic()
    try:
        while True:
            for step, export in list_exports(root):
                if export.name in done:
                    continue
                done.add(export.name)
                last_new = time.monotonic()
                try:
                    with reading(export):  # convert.keep leaves it alone meanwhile
                        code, result = _eval_one(export, args)
                except FileNotFoundError:
                    print(f"fm-train eval: {export} was deleted by convert.keep before it could be read; skipped",
                          file=sys.stderr, flush=True)
                    continue
                if result is None:
                    return code
                print(json.dumps({"step": step, "hf_dir": str(export), **result}), flush=True)
            if not args.watch:
                if not done:
                    return fail("eval", f"{root} holds no exports yet (convert.every writes them during training);"
                                        " pass --watch to wait for them")
                return 0
            if args.idle_exit_s is not None and time.monotonic() - last_new > args.idle_exit_s:
                print(f"fm-train eval: no new export in {args.idle_exit_s:g} s; stopping", file=sys.stderr, flush=True)
                return 0
            time.sleep(args.poll_s)
    except KeyboardInterrupt:
        print(f"fm-train eval: stopped after {len(done)} export(s)", file=sys.stderr, flush=True)
        return 0


def _eval_one(hf_dir: Path, args: argparse.Namespace) -> tuple[int, dict | None]:
    """(exit code, the JSON result or None after an error) for one model dir."""
    from tqdm import tqdm

    import data_shards

    try:
        with tqdm(total=args.batches, desc="fm-train eval", unit="batch", file=sys.stderr) as bar:
            def advance(done: int, total: int) -> None:
                bar.total = total  # the held-out split may hold fewer batches than --batches
                bar.update(1)

            result = evaluate_hf(hf_dir, args.data, val_fraction=args.val_fraction, batches=args.batches,
                                 micro_batch=args.micro_batch, seed=args.seed, progress=advance)
    except (ValueError, data_shards.DataError) as exc:
        return fail("eval", str(exc)), None
    return 0, result
