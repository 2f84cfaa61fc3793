"""``fm-train eval HF_DIR --data SHARDS``: the command around :func:`fm_train.convert.hf_eval.evaluate_hf`."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from fm_train.cli.common import fail
from fm_train.convert.hf_eval import evaluate_hf


def add_eval_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``fm-train eval``."""
    parser.add_argument("hf_dir", metavar="HF_DIR", type=Path, help="a Hugging Face model dir (fm-train convert's output)")
    parser.add_argument("--data", required=True, help="a shard directory built by fm-train shard (or an object-store URI)")
    parser.add_argument("--val-fraction", type=float, default=0.01,
                        help="share of each shard held out, as data.val_fraction in training (0.01)")
    parser.add_argument("--batches", type=int, default=50, help="at most this many batches (50)")
    parser.add_argument("--micro-batch", type=int, default=8, help="sequences per batch (8)")
    parser.add_argument("--seed", type=int, default=1234, help="the run seed (an encoder's masking depends on it; 1234)")


def run_eval(args: argparse.Namespace) -> int:
    """Entry of ``fm-train eval``: the JSON result on stdout, a progress bar on stderr."""
    from tqdm import tqdm

    import data_shards

    if not (args.hf_dir / "config.json").is_file():
        return fail("eval", f"{args.hf_dir} has no config.json: not a Hugging Face model dir (fm-train convert's output)")
    try:
        with tqdm(total=args.batches, desc="fm-train eval", unit="batch", file=sys.stderr) as bar:
            def advance(done: int, total: int) -> None:
                bar.total = total  # the held-out split may hold fewer batches than --batches
                bar.update(1)

            result = evaluate_hf(args.hf_dir, args.data, val_fraction=args.val_fraction, batches=args.batches,
                                 micro_batch=args.micro_batch, seed=args.seed, progress=advance)
    except (ValueError, data_shards.DataError) as exc:
        return fail("eval", str(exc))
    print(json.dumps(result), flush=True)
    return 0
