"""Reader throughput from object storage against a local directory, measured in one run.

Shards of the standard library source are built locally and uploaded with ``fm-train shard --out
s3://...`` to an S3 server on loopback (moto's, as in the test suite; it serves from memory, so the
figures are the reader's and the protocol's overhead, not a real network's latency). Then
``make_train_loader`` (dp 1, the loop a training rank runs) reads the same batches from:

- the local directory (the baseline);
- ``s3://`` with ranged GETs only (no cache): one GET per contiguous run of samples in a batch;
- ``s3://`` through the shard cache, cold (empty: every shard downloaded on first touch) and warm
  (the same batches again, every shard on local disk).

Each for the global and the windowed order. Reported as M tokens/s and as a ratio to the local
reader in the same run (this machine is shared: absolute figures drift, ratios much less).

Usage: .venv/bin/python bench/bench_data_s3.py [--corpus-mb 4] [--seq-len 256] [--batches 2000]
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _rate(make_loader, batches: int) -> float:
    """Tokens/s over ``batches`` batches (the first batch, start-up, excluded)."""
    it = iter(make_loader())
    next(it)
    n, t = 0, time.perf_counter()
    for _ in range(batches):
        n += next(it)["input_ids"].numel()
    return n / (time.perf_counter() - t)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--corpus-mb", type=float, default=4.0, help="stdlib text to tokenize, MB (default 4)")
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--micro-batch", type=int, default=16)
    parser.add_argument("--batches", type=int, default=2000, help="batches timed per case (default 2000)")
    parser.add_argument("--ranged-batches", type=int, default=20,
                        help="batches timed with ranged GETs only (slow: one request per sample; default 20)")
    parser.add_argument("--shard-mb", type=float, default=2.0, help="shard size, MB (default 2)")
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT))
    sys.path.insert(0, str(ROOT / "tests"))  # the suite's loopback S3 server

    from s3_server import make_bucket, s3_server

    from data_shards import BuildOptions, ShardCache, build_shards, make_train_loader
    from data_shards.corpus import stdlib_files

    files = stdlib_files(int(args.corpus_mb * 1e6))
    with tempfile.TemporaryDirectory() as tmp, s3_server():
        tmp = Path(tmp)
        make_bucket("bench")
        common = dict(inputs=[], seq_len=args.seq_len, vocab_size=8192, workers=2,
                      shard_size=int(args.shard_mb * 1e6), progress=False, on_bad_utf8="skip")
        summary = build_shards(BuildOptions(out=tmp / "local", **common), files)
        t = time.perf_counter()
        build_shards(BuildOptions(out="s3://bench/shards", tokenizer_dir=tmp / "local" / "tokenizer",
                                  **{**common, "vocab_size": None}), files)
        upload_s = time.perf_counter() - t
        print(f"corpus: {summary.tokens / 1e6:.1f} M tokens in {summary.shards} shards ({summary.bytes / 1e6:.1f} MB);"
              f" build + upload to s3:// {upload_s:.1f} s; cpus={os.cpu_count()}, load avg {os.getloadavg()[0]:.1f}")
        print(f"reader: make_train_loader, dp 1, micro_batch {args.micro_batch}, seq_len {args.seq_len}, "
              f"{args.batches} batches per case ({args.ranged_batches} with ranged GETs), in the training process\n")
        kw = dict(seq_len=args.seq_len, micro_batch=args.micro_batch, dp_rank=0, dp_size=1, seed=0, num_workers=0)
        print(f"{'order':7s} {'source':28s} {'M tok/s':>8s} {'x local':>8s}")
        for shuffle in ("global", "window"):
            def loader(path: str, cache=None, shuffle=shuffle):
                return lambda: make_train_loader([(path, 1.0)], shuffle=shuffle, cache=cache, **kw)

            local = _rate(loader(str(tmp / "local")), args.batches)
            cache_dir = tmp / f"cache-{shuffle}"
            cache = ShardCache(cache_dir, max_bytes=int(10 * summary.bytes))
            cases = [("s3://, ranged GETs", loader("s3://bench/shards"), args.ranged_batches),
                     ("s3://, shard cache cold", loader("s3://bench/shards", cache), args.batches),
                     ("s3://, shard cache warm", loader("s3://bench/shards", cache), args.batches)]
            print(f"{shuffle:7s} {'local directory':28s} {local / 1e6:8.2f} {1.0:8.2f}")
            for name, make, batches in cases:
                rate = _rate(make, batches)
                print(f"{shuffle:7s} {name:28s} {rate / 1e6:8.2f} {rate / local:8.2f}")
            shutil.rmtree(cache_dir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
