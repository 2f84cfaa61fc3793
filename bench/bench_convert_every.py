"""Does ``convert.every`` slow the training step? The same local run with and without it, measured in one go.

The run: ``fm-train worker`` on ``--ranks`` processes of this machine (gloo, ZeRO-2, fp32, the ``tiny``
preset with the vocabulary of a default corpus built once), ``--steps`` steps, a checkpoint every
``--every`` steps. Three runs per round, their order rotating from round to round:

- **off**, twice (``off-a``, ``off-b``): ``convert.every: 0``; the two give the noise, the spread between
  two runs of the same setting;
- **on**: ``convert.every: --every`` (``convert.keep: 2``), so that an export (a separate process at
  niceness 19 converting the committed step, verifying its logits against the probe, renaming it into
  ``RUN/hf_steps``) runs during most of the steps.

A run's step time is the median of its ``step_time_s`` in ``metrics.jsonl`` (the first ``--skip`` steps
left out: start-up). Printed: each run's median, each setting's median over the rounds, the ratio
on / off (off: both off runs of each round), the noise (median and largest |off-a / off-b - 1|), how
many exports the on runs wrote, and the verdict: whether |on / off - 1| is within the largest noise.

``--paired`` measures the same question inside one process, where a busy machine's drift cancels out:
a one-rank engine (the same model) saves a checkpoint each round, then times, in rotating order, steps
with no export in flight (twice: ``idle-a``, ``idle-b``, their spread is the noise) and the steps that
run while the real export process (:class:`fm_train.convert.background.BackgroundExports`) converts and
verifies that checkpoint (``export``); medians per round, then the median ratio export / idle.

Usage: .venv/bin/python bench/bench_convert_every.py [--rounds 3] [--steps 400] [--every 20] [--ranks 2]
       .venv/bin/python bench/bench_convert_every.py --paired [--rounds 15] [--idle-steps 20]
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_once(config: dict, run_dir: Path, ranks: int, skip: int) -> tuple[float, int, float]:
    """Train ``config`` into ``run_dir`` on ``ranks`` local processes; (median step time, exports written,
    wall seconds)."""
    config = {**config, "run": {**config["run"], "dir": str(run_dir)}}
    path = run_dir.with_suffix(".yaml")
    path.write_text(yaml.safe_dump(config))
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "WORLD_SIZE": str(ranks),
           "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
    start = time.perf_counter()
    procs = [subprocess.Popen([sys.executable, "-m", "fm_train.cli", "worker", str(path)],
                              env={**env, "RANK": str(r), "LOCAL_RANK": str(r)},
                              stdout=open(run_dir.with_suffix(f".rank{r}.log"), "w"), stderr=subprocess.STDOUT)
             for r in range(ranks)]
    codes = [p.wait() for p in procs]
    wall = time.perf_counter() - start
    if any(codes):
        raise RuntimeError(f"a rank failed (exit codes {codes}); see {run_dir.with_suffix('.rank0.log')}")
    times = [r["step_time_s"] for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())
             if "step_time_s" in r and r["step"] > skip]
    log = run_dir.with_suffix(".rank0.log").read_text()
    return statistics.median(times), log.count("verified and written"), wall


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3, help="rounds of (off-a, on, off-b), order rotating (3)")
    parser.add_argument("--steps", type=int, default=400, help="training steps per run (400)")
    parser.add_argument("--every", type=int, default=20, help="checkpoint.every and convert.every (20)")
    parser.add_argument("--ranks", type=int, default=2, help="worker processes (2)")
    parser.add_argument("--skip", type=int, default=10, help="first steps left out of the medians (10)")
    parser.add_argument("--paired", action="store_true", help="one process: steps during an export vs none")
    parser.add_argument("--idle-steps", type=int, default=20, help="--paired: steps per idle block (20)")
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT))
    from data_shards import build_default_corpus

    tmp = Path(tempfile.mkdtemp(prefix="fm-train-bench-convert-every-"))
    vocab = 1024
    corpus = build_default_corpus(tmp / "corpus", vocab_size=vocab, seq_len=128, max_bytes=2_000_000)
    if args.paired:
        return paired(args, tmp, corpus, vocab)
    base = {"run": {"name": "bench", "seed": 1}, "model": {"preset": "tiny", "vocab_size": vocab},
            "precision": "fp32", "parallel": {"zero_stage": 2}, "cluster": {"workers": args.ranks},
            "data": {"sources": [{"path": str(corpus)}], "seq_len": 128, "num_workers": 0},
            "train": {"steps": args.steps, "micro_batch": 4, "eval_every": 0, "log_every": 1},
            "checkpoint": {"every": args.every, "keep": 2, "resume": "none"},
            "logging": {"tensorboard": False}}
    settings = {"off-a": {"convert": {"at_end": False, "every": 0}},
                "on": {"convert": {"at_end": False, "every": args.every, "keep": 2, "dtype": "fp32"}},
                "off-b": {"convert": {"at_end": False, "every": 0}}}
    names = list(settings)
    medians: dict[str, list[float]] = {name: [] for name in names}
    exports = []
    for rnd in range(args.rounds):
        order = names[rnd % 3:] + names[:rnd % 3]
        for name in order:
            median, written, wall = run_once({**base, **settings[name]}, tmp / f"r{rnd}-{name}", args.ranks, args.skip)
            medians[name].append(median)
            if name == "on":
                exports.append(written)
            print(f"round {rnd} {name:<6} median step {median * 1e3:7.2f} ms  ({wall:.0f} s wall"
                  + (f", {written} exports written)" if name == "on" else ")"), flush=True)
    off = [statistics.mean(pair) for pair in zip(medians["off-a"], medians["off-b"])]
    ratio = statistics.median(on / o for on, o in zip(medians["on"], off))
    noise = [abs(a / b - 1) for a, b in zip(medians["off-a"], medians["off-b"])]
    print(f"\nmedian step: off {statistics.median(off) * 1e3:.2f} ms, on {statistics.median(medians['on']) * 1e3:.2f} ms")
    print(f"on / off = {ratio:.3f} (median over {args.rounds} rounds); noise |off-a / off-b - 1|: median "
          f"{statistics.median(noise):.3f}, largest {max(noise):.3f}; exports written per on run: {exports}")
    verdict = "within" if abs(ratio - 1) <= max(noise) else "OUTSIDE"
    print(f"verdict: the slowdown {ratio - 1:+.3f} is {verdict} the noise ({max(noise):.3f})")
    print(f"(runs kept in {tmp})")
    return 0


def paired(args: argparse.Namespace, tmp: Path, corpus: Path, vocab: int) -> int:
    """Steps while the export process converts a checkpoint vs steps with none in flight, in one process."""
    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    import torch

    from data_shards.tokenizer import tokenizer_file_hash
    from fm_train.checkpoint import build_manifest, save_checkpoint
    from fm_train.config import build_config
    from fm_train.convert.background import BackgroundExports
    from fm_train.deepspeed_adapter.comm import init_distributed
    from fm_train.dist import Topology
    from fm_train.dist.env import RankEnv, ensure_extension_cache
    from fm_train.engine import build_engine
    from fm_train.engine.train_module import build_train_module
    from fm_train.families import family_of
    from fm_train.families.spec import manifest_layers

    ensure_extension_cache()
    init_distributed(RankEnv.from_environ())
    run = tmp / "paired"
    cfg = build_config({"run": {"dir": str(run), "seed": 1}, "model": {"preset": "tiny", "vocab_size": vocab},
                        "precision": "fp32", "parallel": {"zero_stage": 2}, "cluster": {"workers": 1},
                        "data": {"sources": [{"path": str(corpus)}], "seq_len": 128},
                        "train": {"steps": 10**6, "micro_batch": 4, "eval_every": 0}, "checkpoint": {"keep": 2}})
    family = family_of(cfg.model)
    engine, _ = build_engine(cfg, build_train_module(cfg, family))
    tokens = torch.randint(0, vocab, (4, 129), generator=torch.Generator().manual_seed(0))
    manifest = build_manifest(cfg, Topology(world=1, tp=1, pp=1), data_state={}, tokens_seen=0,
                              tokenizer_hash=tokenizer_file_hash(corpus / "tokenizer" / "tokenizer.json"),
                              layers=manifest_layers(family, cfg))
    exports = BackgroundExports(run, dtype="fp32", keep=2, storage=None, retries=0, end_wait_s=600, say=lambda _l: None)
    step = [0]

    def one_step() -> float:
        start = time.perf_counter()
        engine.backward(engine(tokens[:, :-1], tokens[:, 1:]))
        engine.step()
        step[0] += 1
        return time.perf_counter() - start

    def idle() -> list[float]:
        return [one_step() for _ in range(args.idle_steps)]

    def during(step_dir: Path) -> list[float]:
        exports.submit(step[0], step_dir)
        times = [one_step()]
        while exports._pending is not None or exports._running is not None:
            times.append(one_step())
        return times

    for _ in range(5):
        one_step()
    during(save_checkpoint(engine, run, step[0], manifest=manifest, keep=2, is_rank0=True))  # starts the process
    medians: dict[str, list[float]] = {"idle-a": [], "export": [], "idle-b": []}
    counts = []
    for rnd in range(args.rounds):
        step_dir = save_checkpoint(engine, run, step[0], manifest=manifest, keep=2, is_rank0=True)
        names = list(medians)
        for name in names[rnd % 3:] + names[:rnd % 3]:
            times = during(step_dir) if name == "export" else idle()
            medians[name].append(statistics.median(times))
            if name == "export":
                counts.append(len(times))
        print(f"round {rnd:2d}: " + ", ".join(f"{n} {medians[n][-1] * 1e3:6.2f} ms" for n in names)
              + f" ({counts[-1]} steps during the export)", flush=True)
    lines = exports.close()
    idle_both = [statistics.mean(p) for p in zip(medians["idle-a"], medians["idle-b"])]
    ratio = statistics.median(e / i for e, i in zip(medians["export"], idle_both))
    noise = [abs(a / b - 1) for a, b in zip(medians["idle-a"], medians["idle-b"])]
    print(f"\nmedian step: idle {statistics.median(idle_both) * 1e3:.2f} ms, during an export "
          f"{statistics.median(medians['export']) * 1e3:.2f} ms; export / idle = {ratio:.3f} (median of {args.rounds}"
          f" rounds); noise |idle-a / idle-b - 1|: median {statistics.median(noise):.3f}, largest {max(noise):.3f}")
    print(f"exports: {len(exports.written)} written, {len(exports.failed)} failed; {lines[-1] if lines else ''}")
    verdict = "within" if abs(ratio - 1) <= max(noise) else "OUTSIDE"
    print(f"verdict: {ratio - 1:+.3f} is {verdict} the noise ({max(noise):.3f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
