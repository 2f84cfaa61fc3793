"""Costs of data mixtures over time, each against its baseline in the same run.

1. The order: positions -> (source, index) and the per-source counts, walked a global batch at a time
   as the loader does, under a schedule (a constant phase, a long ramp, an annealing phase) against the
   static mixture of the same sources. Also the schedule's one-off construction time.
2. The per-source loss: forward + backward of the train module with the per-sample losses taken next
   to the loss (``logging.loss_per_source``) against without, alternating, on this CPU; and the extra
   cross-entropy that families without a fused loss head (bert) pay, timed alone.

Usage: OMP_NUM_THREADS=1 .venv/bin/python bench/bench_mixture.py [--batch 1024] [--ramp-steps 20000]
"""

from __future__ import annotations

import argparse
import functools
import statistics
import sys
import time
from pathlib import Path


def order_bench(batch: int, ramp_steps: int, steps: int) -> None:
    import numpy as np

    from data_shards.order import Mixer
    from data_shards.schedule import Phase, ScheduledMixer

    t0 = time.perf_counter()
    start, ramp_end = 1000 * batch, (1000 + ramp_steps) * batch
    scheduled = ScheduledMixer([Phase(0, (0.6, 0.3, 0.1), end=start),
                                Phase(start, (0.1, 0.2, 0.7), end=ramp_end, ramp_step=batch),
                                Phase(ramp_end, (0.0, 0.0, 1.0))], 3)
    built = time.perf_counter() - t0
    static = Mixer([0.6, 0.3, 0.1])

    def walk(mixer, first_step: int) -> float:
        t = time.perf_counter()
        for m in range(first_step, first_step + steps):
            mixer.split(np.arange(m * batch, (m + 1) * batch, dtype=np.int64))
            mixer.consumed((m + 1) * batch)
        return (time.perf_counter() - t) / steps

    rows = []
    for name, first in (("constant phase", 10), ("ramp", 1000 + ramp_steps // 2), ("annealing", 2000 + ramp_steps)):
        walk(scheduled, first)  # warm the pattern caches as a running loader would
        base, sched = walk(static, first), walk(scheduled, first)
        rows.append((name, base, sched))
    print(f"schedule with a {ramp_steps}-step ramp, global batch {batch}: built in {built * 1e3:.1f} ms")
    print("| where | static per step | scheduled per step | scheduled / static |")
    print("|---|---|---|---|")
    for name, base, sched in rows:
        print(f"| {name} | {base * 1e6:.0f} us | {sched * 1e6:.0f} us | {sched / base:.2f} |")


def loss_bench(reps: int) -> None:
    import torch

    from fm_train.config import build_config
    from fm_train.engine.source_metrics import per_sample_cross_entropy
    from fm_train.engine.train_module import build_train_module
    from fm_train.families import family_of

    cfg = build_config({
        "model": {"n_layers": 4, "hidden": 256, "n_heads": 4, "n_kv_heads": 2, "ffn_hidden": 688, "vocab_size": 4096,
                  "max_seq_len": 128},
        "precision": "fp32",
        "data": {"sources": [{"name": "a", "path": "x/a"}, {"name": "b", "path": "x/b"}], "seq_len": 128},
        "train": {"micro_batch": 8}, "cluster": {"workers": 1}, "parallel": {"zero_stage": 0},
    })
    module = build_train_module(cfg, family_of(cfg.model))
    on = functools.partial(per_sample_cross_entropy, vocab_size=cfg.model.vocab_size)
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, cfg.model.vocab_size, (8, 129), generator=gen)

    def step(fn) -> float:
        module.sample_loss_fn = fn
        t = time.perf_counter()
        loss = module(ids[:, :-1], ids[:, 1:])
        loss.backward()
        module.take_sample_losses()
        return time.perf_counter() - t

    for _ in range(3):
        step(None), step(on)
    off_t, on_t = [], []
    for _ in range(reps):
        off_t.append(step(None))
        on_t.append(step(on))
    off, with_ = statistics.median(off_t), statistics.median(on_t)
    with torch.no_grad():
        logits = module.model(ids[:, :-1])
    alone = []
    for _ in range(reps):  # the added work by itself, which load on a shared machine does not blur as much
        t = time.perf_counter()
        on(logits, ids[:, 1:])
        alone.append(time.perf_counter() - t)
    extra = statistics.median(alone)
    print(f"per-source loss, tiny llama (4 x 256, vocab 4096), 8 x 128 tokens, fwd+bwd, medians of {reps}:")
    how = "sums of the fused head's per-token losses" if getattr(module, "head_loss", False) else "extra cross-entropy"
    print(f"off {off * 1e3:.1f} ms, on ({how}) {with_ * 1e3:.1f} ms, on / off {with_ / off:.3f}; the extra"
          f" cross-entropy of families without a fused head, alone: {extra * 1e3:.2f} ms = {extra / off:.3f} of the"
          " step without it")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=1024, help="global batch, samples (default 1024)")
    parser.add_argument("--ramp-steps", type=int, default=20_000)
    parser.add_argument("--steps", type=int, default=200, help="steps walked per measurement")
    parser.add_argument("--reps", type=int, default=15, help="alternating fwd+bwd pairs")
    args = parser.parse_args()
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    order_bench(args.batch, args.ramp_steps, args.steps)
    loss_bench(args.reps)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
