"""Data benchmarks, measured in one run on this machine.

1. Shard building (``data_shards.build_shards``, end to end: datasets reading, worker processes,
   packing, tar writing, sha256) against tokenizers' own ``encode_batch`` on the same documents with
   the same number of threads. Goal: build >= 0.8 x encode_batch.
2. Reader tokens/s per process (``make_train_loader``, dp 1, the loop a training rank runs), with
   the global order (random access into the tars) and the windowed order, in the same run.
   Goal: >= 5 M tokens/s with the global order.

Usage: .venv/bin/python bench/bench_data.py [--workers 2] [--corpus-mb 6] [--seq-len 256]
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import tempfile
import time
from pathlib import Path


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workers", type=int, default=2, help="tokenizer processes / threads (default 2)")
    parser.add_argument("--corpus-mb", type=float, default=6.0, help="stdlib text to tokenize, MB (default 6)")
    parser.add_argument("--vocab-size", type=int, default=8192)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--micro-batch", type=int, default=16)
    parser.add_argument("--reader-seconds", type=float, default=5.0)
    args = parser.parse_args()
    # tokenizers sizes its thread pool once, from this variable: the baseline gets the same core count.
    os.environ["RAYON_NUM_THREADS"] = str(args.workers)
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

    from data_shards import BuildOptions, build_shards, make_train_loader
    from data_shards.corpus import stdlib_files
    from data_shards.tokenizer import save_tokenizer_dir, train_bpe

    files = stdlib_files(int(args.corpus_mb * 1e6))
    docs = [open(f.path, encoding="utf-8", errors="replace").read() for f in files]
    mb = sum(len(d.encode()) for d in docs) / 1e6
    print(f"corpus: {len(files)} stdlib files, {mb:.1f} MB; workers={args.workers}; cpus={os.cpu_count()}; "
          f"load avg {os.getloadavg()[0]:.1f}")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        t = time.perf_counter()
        tok = train_bpe(docs[: max(1, len(docs) // 4)], args.vocab_size)
        print(f"tokenizer: byte-level BPE, vocab {tok.vocab_size}, trained in {time.perf_counter() - t:.1f} s")
        save_tokenizer_dir(tok, tmp / "tok")

        encoder = tok.tokenizer
        t, cpu = time.perf_counter(), time.process_time()
        encoded = encoder.encode_batch(docs, add_special_tokens=False)
        base_s, base_cpu = time.perf_counter() - t, time.process_time() - cpu
        tokens = sum(len(e.ids) for e in encoded) + len(encoded)
        t = time.perf_counter()
        encoder.encode_batch_fast(docs, add_special_tokens=False)
        fast_s = time.perf_counter() - t

        opts = BuildOptions(inputs=[], out=tmp / "shards", seq_len=args.seq_len, tokenizer_dir=tmp / "tok",
                            workers=args.workers, shard_size=16_000_000, progress=False)
        t, cpu, child = time.perf_counter(), time.process_time(), _children_cpu()
        summary = build_shards(opts, files)
        build_s = time.perf_counter() - t
        build_cpu = time.process_time() - cpu + _children_cpu() - child  # main + its (reaped) workers
        assert summary.tokens == tokens, (summary.tokens, tokens)

        print("\n== shard build vs tokenizers.encode_batch (same documents, same core count) ==")
        print(f"encode_batch       : {tokens / base_s / 1e6:6.2f} M tok/s  ({base_s:.2f} s, {tokens} tokens)")
        print(f"encode_batch_fast  : {tokens / fast_s / 1e6:6.2f} M tok/s  ({fast_s:.2f} s)")
        print(f"build, whole call  : {tokens / build_s / 1e6:6.2f} M tok/s  ({build_s:.2f} s: reading through "
              "datasets, spawning workers, tokenizing, packing, writing, sha256)")
        print(f"build, tokenize+write pass: {summary.tokens_per_s / 1e6:6.2f} M tok/s  ({summary.tokenize_seconds:.2f} s)")
        print(f"ratio build/encode_batch: whole call {base_s / build_s:.2f}, tokenize+write pass "
              f"{base_s / summary.tokenize_seconds:.2f}  (goal >= 0.8)")
        # Wall time on a shared machine depends on the neighbours; CPU-seconds per token do not.
        print(f"CPU-seconds: encode_batch {base_cpu:.2f}, build {build_cpu:.2f} -> CPU efficiency "
              f"{base_cpu / build_cpu:.2f}")

        print(f"\n== reader (make_train_loader, dp 1, micro_batch {args.micro_batch}, seq_len {args.seq_len}) ==")
        # The global order reads samples at random places in the shards; the windowed one in runs.
        for shuffle, workers in (("global", 0), ("window", 0), ("global", 2), ("window", 2)):
            loader = make_train_loader([(str(tmp / "shards"), 1.0)], seq_len=args.seq_len,
                                       micro_batch=args.micro_batch, dp_rank=0, dp_size=1, seed=0,
                                       num_workers=workers, shuffle=shuffle)
            it = iter(loader)
            next(it)  # start-up (worker processes) is not throughput
            n, t, cpu = 0, time.perf_counter(), time.process_time()
            while time.perf_counter() - t < args.reader_seconds:
                n += next(it)["input_ids"].numel()
            rate, cpu = n / (time.perf_counter() - t), time.process_time() - cpu
            what = "in the training process" if workers == 0 else f"{workers} loader workers"
            # On a shared machine wall time counts other people's work; CPU time is this process's own.
            per_cpu = f", {n / cpu / 1e6:6.2f} M tok per CPU-second of this process" if workers == 0 else ""
            print(f"reader, {shuffle:6s} order, {what:24s}: {rate / 1e6:6.2f} M tok/s wall{per_cpu}  (goal >= 5)")
            del it
    return 0


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


if __name__ == "__main__":
    sys.exit(main())
