"""Tokens/s of one fm-train process against a bare PyTorch loop and a Hugging Face Llama loop.

    OMP_NUM_THREADS=1 .venv/bin/python bench/bench_engine.py [--threads 1] [--rounds 6] [--steps-per-round 5]

Three contenders train the same Llama shape on the same fixed batch with the same AdamW settings
and gradient clipping, in one process with the same thread count:

* ``fm-train``: the DeepSpeed engine (world 1, gloo, ZeRO-0 fp32 by default) driven by
  ``fm_train.engine.train`` with metrics on (a record every round: all-reduce, jsonl, TensorBoard)
  - the whole worker loop minus the data reader;
* ``torch``: ``build_train_module`` + ``torch.optim.AdamW`` + ``LambdaLR`` + ``clip_grad_norm_``;
* ``hf-loop``: ``transformers.LlamaForCausalLM`` (sdpa attention) in the loop ``transformers.Trainer``
  runs per step (``model(**batch).loss``, backward, ``clip_grad_norm_``, AdamW,
  ``get_cosine_schedule_with_warmup``). The Trainer itself needs ``accelerate``, which this
  environment does not have; its step adds data collation and callbacks on top of this loop, so
  the loop's speed is an upper bound on the Trainer's.

The machine is shared, so the contenders run interleaved: each round runs a few steps of each in
turn, and a contender's figure is its median step time over all rounds after the first (warm-up).
tokens/s = micro_batch x seq_len / median step time. Goals: fm-train / torch >= 0.95 and
fm-train / hf >= 1.0.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SHAPE = {"n_layers": 4, "hidden": 256, "n_heads": 8, "n_kv_heads": 4, "ffn_hidden": 688, "vocab_size": 4096,
         "max_seq_len": 256, "tie_embeddings": True}
SEQ, MICRO, LR, WARMUP = 128, 8, 1e-3, 5


def make_config(steps: int, zero: int, run_dir: str, log_every: int):
    from fm_train.config import build_config

    return build_config({
        "run": {"dir": run_dir, "seed": 1}, "model": SHAPE, "precision": "fp32",
        "parallel": {"zero_stage": zero}, "cluster": {"workers": 1}, "data": {"seq_len": SEQ},
        "train": {"steps": steps, "micro_batch": MICRO, "grad_accum": 1, "eval_every": 0, "log_every": log_every},
        "optim": {"lr": LR, "min_lr": LR / 10, "warmup_steps": WARMUP, "weight_decay": 0.1, "grad_clip": 1.0},
    })


def fixed_batch():
    import torch

    tokens = torch.randint(0, SHAPE["vocab_size"], (MICRO, SEQ + 1), generator=torch.Generator().manual_seed(0))
    return tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()


Contender = Callable[[int], list[float]]  # run n steps, return their step times


def fm_train_contender(total_steps: int, zero: int, run_dir: str, per_round: int) -> Contender:
    """fm-train's loop; each call trains ``n`` more steps of one engine through ``train``."""
    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT="29583")
    from fm_train.dist.env import RankEnv, ensure_extension_cache
    from fm_train.engine import MetricsSink, TrainState, build_engine, train
    from fm_train.engine.distributed import init_distributed
    from fm_train.engine.loop import throughput_spec
    from fm_train.parallel.build import build_train_module

    ensure_extension_cache()
    init_distributed(RankEnv.from_environ())
    cfg = make_config(total_steps, zero, run_dir, log_every=per_round)
    engine, scheduler = build_engine(cfg, build_train_module(cfg))
    ids, labels = fixed_batch()
    batches = iter(lambda: {"input_ids": ids, "labels": labels, "state": {}, "receipt": ""}, None)
    state = TrainState(lr_scheduler=scheduler)
    sink = MetricsSink(run_dir, enabled=True, stream=open(os.devnull, "w"))
    spec = throughput_spec(cfg, engine.device)  # once: it probes the CPU's matmul peak

    def run(n: int) -> list[float]:
        stamps = [time.perf_counter()]
        upto = cfg.model_copy(update={"train": cfg.train.model_copy(update={"steps": state.step + n})})
        train(engine, batches, state, upto, sink=sink, spec=spec, hooks=[lambda _e, _s: stamps.append(time.perf_counter())])
        return [b - a for a, b in zip(stamps, stamps[1:])]

    return run


def torch_contender(total_steps: int) -> Contender:
    import torch

    from fm_train.engine import build_lr_scheduler, weight_decay_groups
    from fm_train.parallel.build import build_train_module

    cfg = make_config(total_steps, 0, "unused", log_every=1)
    module, o = build_train_module(cfg), cfg.optim
    opt = torch.optim.AdamW(weight_decay_groups(module, o.weight_decay), lr=o.lr, betas=o.betas, eps=o.eps)
    sched = build_lr_scheduler(opt, o, total_steps)
    ids, labels = fixed_batch()

    def run(n: int) -> list[float]:
        times = []
        for _ in range(n):
            start = time.perf_counter()
            loss = module(ids, labels)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(module.parameters(), o.grad_clip)
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            loss.item()  # a training loop logs its loss; same host sync as the others
            times.append(time.perf_counter() - start)
        return times

    return run


def hf_contender(total_steps: int) -> Contender:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, get_cosine_schedule_with_warmup

    s = SHAPE
    model = LlamaForCausalLM(LlamaConfig(
        vocab_size=s["vocab_size"], hidden_size=s["hidden"], intermediate_size=s["ffn_hidden"],
        num_hidden_layers=s["n_layers"], num_attention_heads=s["n_heads"], num_key_value_heads=s["n_kv_heads"],
        max_position_embeddings=s["max_seq_len"], tie_word_embeddings=s["tie_embeddings"], attn_implementation="sdpa"))
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=LR, betas=(0.9, 0.95), weight_decay=0.1)
    sched = get_cosine_schedule_with_warmup(opt, WARMUP, total_steps)
    ids, _ = fixed_batch()

    def run(n: int) -> list[float]:
        times = []
        for _ in range(n):
            start = time.perf_counter()
            loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            loss.item()
            times.append(time.perf_counter() - start)
        return times

    return run


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--steps-per-round", type=int, default=5)
    parser.add_argument("--zero", type=int, default=0, choices=[0, 1, 2, 3])
    args = parser.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    total = args.rounds * args.steps_per_round
    with tempfile.TemporaryDirectory() as run_dir:
        contenders = {"fm-train": fm_train_contender(total, args.zero, run_dir, args.steps_per_round),
                      "torch": torch_contender(total), "hf-loop": hf_contender(total)}
        times: dict[str, list[float]] = {name: [] for name in contenders}
        for r in range(args.rounds):
            for name, run in contenders.items():
                step_times = run(args.steps_per_round)
                if r > 0:  # round 0 is warm-up: allocator, kernel choice, first-call costs
                    times[name] += step_times
    tps = {name: MICRO * SEQ / statistics.median(t) for name, t in times.items()}
    for name, t in times.items():
        print(json.dumps({"name": name, "median_step_s": round(statistics.median(t), 4),
                          "tokens_per_s": round(tps[name], 1), "steps_measured": len(t)}))
    print(f"fm-train / torch   = {tps['fm-train'] / tps['torch']:.3f} (goal >= 0.95)")
    print(f"fm-train / hf-loop = {tps['fm-train'] / tps['hf-loop']:.3f} (goal >= 1.0)")
    print(f"shape {SHAPE}, micro_batch {MICRO}, seq_len {SEQ}, fp32, threads {args.threads}, ZeRO-{args.zero}, "
          f"torch {torch.__version__}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
