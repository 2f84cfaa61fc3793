"""Reader tokens/s with each shard's sha256 checked on first read (``data.verify_sha256``, the default)
against without, in the same run.

One process reads whole epochs of a local shard directory (``make_train_loader``, dp 1, in the training
process) in the global order. Each "on" rep starts with nothing verified (the process memo cleared, a
fresh marker directory), so its first epoch hashes every shard: that epoch is the cost; the second
epoch reads from the memo, the steady state. Reps alternate off/on so load drifts hit both alike.
Goal: on / off >= 0.95.

Usage: .venv/bin/python bench/bench_data_verify.py [--corpus-mb 4] [--reps 3] [--seq-len 256]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--corpus-mb", type=float, default=4.0, help="stdlib text to shard, MB (default 4)")
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--micro-batch", type=int, default=16)
    parser.add_argument("--shard-size", default="4MB", help="bytes per shard (default 4MB: several shards)")
    parser.add_argument("--reps", type=int, default=3)
    args = parser.parse_args()
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

    from data_shards import BuildOptions, build_shards
    from data_shards.cli import parse_size
    from data_shards.corpus import stdlib_files
    from data_shards.index import read_index

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        build_shards(BuildOptions(inputs=[], out=root / "shards", seq_len=args.seq_len, vocab_size=8192, workers=0,
                                  shard_size=parse_size(args.shard_size), progress=False),
                     stdlib_files(int(args.corpus_mb * 1e6)))
        index = read_index(root / "shards")
        mb = sum(e.bytes for e in index.shards) / 1e6
        print(f"{len(index.shards)} shards, {mb:.1f} MB, {index.num_samples} samples of {args.seq_len + 1} tokens; "
              f"cpus={os.cpu_count()}; load avg {os.getloadavg()[0]:.1f}")
        rates: dict[str, list[tuple[Rate, Rate]]] = {"off": [], "on": []}
        for rep in range(args.reps):
            for verify in ((False, True) if rep % 2 == 0 else (True, False)):
                first, second = _two_epochs(root / "shards", root / f"markers-{rep}-{verify}", args, verify)
                rates["on" if verify else "off"].append((first, second))
                print(f"rep {rep} verify {'on ' if verify else 'off'}: epoch 1 {first[0] / 1e6:6.2f} M tok/s wall "
                      f"({first[1] / 1e6:6.2f} per CPU-s), epoch 2 {second[0] / 1e6:6.2f} ({second[1] / 1e6:6.2f})")
        # On a shared machine wall time counts the neighbours' work; CPU time is this process's own.
        for epoch, what in ((0, "epoch 1 (every shard hashed)"), (1, "epoch 2 (from the memo)")):
            for k, unit in ((0, "tok/s wall"), (1, "tok per CPU-s")):
                off = statistics.median(r[epoch][k] for r in rates["off"])
                on = statistics.median(r[epoch][k] for r in rates["on"])
                print(f"{what:30s}: off {off / 1e6:6.2f}, on {on / 1e6:6.2f} M {unit:13s} (medians of {args.reps}); "
                      f"on / off {on / off:.3f}  (goal >= 0.95)")
        t = time.perf_counter()
        import hashlib

        for e in index.shards:
            hashlib.sha256((root / "shards" / e.name).read_bytes())
        print(f"sha256 of every shard alone: {mb / (time.perf_counter() - t):.0f} MB/s")
    return 0


Rate = tuple[float, float]  # tokens per wall second, tokens per CPU-second of this process


def _two_epochs(shards: Path, markers: Path, args: argparse.Namespace, verify: bool) -> tuple[Rate, Rate]:
    """(wall, CPU) tokens/s of two consecutive epochs, starting with no shard verified in this process or node."""
    from data_shards import ShardCache, make_train_loader
    from data_shards import verify as verify_module
    from data_shards.index import read_index

    verify_module._verified.clear()  # a fresh process: nothing verified yet
    steps = read_index(shards).num_samples // args.micro_batch
    # A local source never reads through the cache; its directory only holds this rep's markers.
    it = iter(make_train_loader([(str(shards), 1.0)], seq_len=args.seq_len, micro_batch=args.micro_batch,
                                dp_rank=0, dp_size=1, seed=0, verify_sha256=verify,
                                cache=ShardCache(markers, 1 << 30)))
    rates = []
    for _ in range(2):
        n, t, cpu = 0, time.perf_counter(), time.process_time()
        for _ in range(steps):
            n += next(it)["input_ids"].numel()
        rates.append((n / (time.perf_counter() - t), n / (time.process_time() - cpu)))
    return rates[0], rates[1]


if __name__ == "__main__":
    sys.exit(main())
