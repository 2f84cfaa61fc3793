"""Tokens/s of one fm-train process against bare PyTorch, a Hugging Face loop and ``transformers.Trainer``.

    OMP_NUM_THREADS=1 .venv/bin/python bench/bench_engine.py [--family llama|bert|qwen3_moe] [--threads 1] [--rounds 6]
                                                             [--steps-per-round 5]

Four contenders train the same model (``--family llama``: a Llama decoder on next-token prediction;
``bert``: an encoder with BERT's masked tokens, ``BertForMaskedLM`` on the Hugging Face side, dropout
off there as fm-train has none; ``qwen3_moe``: 8 routed experts, top-2, ``Qwen3MoeForCausalLM`` with its
load-balancing loss on the Hugging Face side) of the same shape on the same fixed batch with the same AdamW settings,
cosine schedule and gradient clipping, in one process with the same thread count:

* ``fm-train``: the DeepSpeed engine (world 1, gloo, ZeRO-0 fp32 by default) driven by
  ``fm_train.engine.train`` with metrics on (a record every round: all-reduce, jsonl, TensorBoard)
  - the whole worker loop minus the data reader;
* ``torch``: ``build_train_module`` + ``torch.optim.AdamW`` + ``LambdaLR`` + ``clip_grad_norm_``;
* ``hf-loop``: ``transformers.LlamaForCausalLM``, ``BertForMaskedLM`` or ``Qwen3MoeForCausalLM`` (sdpa attention) in the loop ``transformers.Trainer``
  runs per step (``model(**batch).loss``, backward, ``clip_grad_norm_``, AdamW, cosine schedule);
* ``hf-trainer``: ``transformers.Trainer`` itself (needs ``accelerate``) training that model from a
  dataset of the same rows (default collator, ``adamw_torch``, ``max_grad_norm=1``, cosine schedule,
  no logging, checkpointing or evaluation). Its step time runs from one ``on_step_end`` to the next,
  so it includes the Trainer's data loading and collation, as fm-train's includes its loop.

The machine is shared, so the contenders run interleaved: the Trainer drives the rounds (a callback
runs a round of the others every ``--steps-per-round`` Trainer steps, outside the Trainer's timing),
and a contender's figure is its median step time over all rounds after the first (warm-up).
tokens/s = micro_batch x seq_len / median step time. Goals: fm-train / torch >= 0.95 and
fm-train / hf-trainer >= 1.0.
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

SHAPES = {
    "llama": {"n_layers": 4, "hidden": 256, "n_heads": 8, "n_kv_heads": 4, "ffn_hidden": 688, "vocab_size": 4096,
              "max_seq_len": 256, "tie_embeddings": True},
    "bert": {"family": "bert", "n_layers": 4, "hidden": 256, "n_heads": 4, "n_kv_heads": 4, "ffn_hidden": 1024,
             "vocab_size": 4096, "max_seq_len": 256, "tie_embeddings": True, "norm_eps": 1e-12},
    # 8 experts of a quarter of llama's width, top-2: the same active FLOPs per token as the llama shape's MLP.
    # The z-loss is off because transformers' Qwen3-MoE has none; both add the load-balancing loss.
    "qwen3_moe": {"family": "qwen3_moe", "n_layers": 4, "hidden": 256, "n_heads": 8, "n_kv_heads": 4, "head_dim": 32,
                  "ffn_hidden": 688, "vocab_size": 4096, "max_seq_len": 256, "tie_embeddings": True, "norm_eps": 1e-6,
                  "moe": {"experts": 8, "top_k": 2, "expert_ffn_hidden": 344, "dense_layers": 0,
                          "norm_topk_prob": True, "aux_loss_coef": 0.001, "z_loss_coef": 0.0}},
}
SHAPE = SHAPES["llama"]  # main() picks the family's
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
    """``(input_ids, labels)`` as fm-train's loader makes them: shifted tokens, or BERT's masked windows."""
    import numpy as np
    import torch

    vocab = SHAPE["vocab_size"]
    tokens = torch.randint(1, vocab - 3, (MICRO, SEQ + 1), generator=torch.Generator().manual_seed(0))
    if SHAPE.get("family") != "bert":
        return tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()
    from data_shards.masking import MaskedLM

    masking = MaskedLM(cls_id=vocab - 3, sep_id=vocab - 2, mask_id=vocab - 1, vocab_size=vocab, seed=1, eos_id=0)
    ids, labels = masking.apply(tokens.numpy(), np.arange(MICRO))
    return torch.from_numpy(ids), torch.from_numpy(labels)


def hf_labels(ids, labels):
    """The labels ``transformers`` takes: the inputs for a causal LM (it shifts them), the masked ones for BERT."""
    return labels if SHAPE.get("family") == "bert" else ids


Contender = Callable[[int], list[float]]  # run n steps, return their step times


def fm_train_contender(total_steps: int, zero: int, run_dir: str, per_round: int) -> Contender:
    """fm-train's loop; each call trains ``n`` more steps of one engine through ``train``."""
    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT="29583")
    from fm_train.dist.env import RankEnv, ensure_extension_cache
    from fm_train.engine import MetricsSink, TrainState, build_engine, train
    from fm_train.deepspeed_adapter.comm import init_distributed
    from fm_train.engine.loop import throughput_spec
    from fm_train.engine.train_module import build_train_module
    from fm_train.families import family_of

    ensure_extension_cache()
    init_distributed(RankEnv.from_environ())
    cfg = make_config(total_steps, zero, run_dir, log_every=per_round)
    family = family_of(cfg.model)
    engine, scheduler = build_engine(cfg, build_train_module(cfg, family), blocks=family.modules().block_types)
    ids, labels = fixed_batch()
    batches = iter(lambda: {"input_ids": ids, "labels": labels, "state": {}, "receipt": ""}, None)
    state = TrainState(lr_scheduler=scheduler)
    sink = MetricsSink(run_dir, enabled=True, stream=open(os.devnull, "w"))
    spec = throughput_spec(cfg, family, engine.device)  # once: it probes the CPU's matmul peak

    def run(n: int) -> list[float]:
        stamps = [time.perf_counter()]
        upto = cfg.model_copy(update={"train": cfg.train.model_copy(update={"steps": state.step + n})})
        train(engine, batches, state, upto, sink=sink, spec=spec, hooks=[lambda _e, _s: stamps.append(time.perf_counter())])
        return [b - a for a, b in zip(stamps, stamps[1:])]

    return run


def torch_contender(total_steps: int) -> Contender:
    import torch

    from fm_train.engine import build_lr_scheduler, weight_decay_groups
    from fm_train.engine.train_module import build_train_module
    from fm_train.families import family_of

    cfg = make_config(total_steps, 0, "unused", log_every=1)
    module, o = build_train_module(cfg, family_of(cfg.model)), cfg.optim
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
    from transformers import get_cosine_schedule_with_warmup

    model = hf_model()
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=LR, betas=(0.9, 0.95), weight_decay=0.1)
    sched = get_cosine_schedule_with_warmup(opt, WARMUP, total_steps)
    ids, labels = fixed_batch()
    labels = hf_labels(ids, labels)

    def run(n: int) -> list[float]:
        times = []
        for _ in range(n):
            start = time.perf_counter()
            loss = model(input_ids=ids, labels=labels).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            loss.item()
            times.append(time.perf_counter() - start)
        return times

    return run


def hf_model():
    from transformers import BertConfig, BertForMaskedLM, LlamaConfig, LlamaForCausalLM

    s = SHAPE
    if s.get("family") == "qwen3_moe":  # the family's own export config: the same model, exactly
        from fm_train.families import family_of

        model_fields = make_config(WARMUP + 1, 0, "unused", 1).model.model_dump()
        config = family_of(s["family"]).hf.config(model_fields, dtype="fp32", bos=None, eos=None)
        config.output_router_logits = True  # its load-balancing loss joins the loss, as fm-train's does
        config._attn_implementation = "sdpa"
        from transformers import Qwen3MoeForCausalLM

        return Qwen3MoeForCausalLM(config)
    if s.get("family") == "bert":
        return BertForMaskedLM(BertConfig(
            vocab_size=s["vocab_size"], hidden_size=s["hidden"], intermediate_size=s["ffn_hidden"],
            num_hidden_layers=s["n_layers"], num_attention_heads=s["n_heads"], max_position_embeddings=s["max_seq_len"],
            layer_norm_eps=s["norm_eps"], hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
            attn_implementation="sdpa"))
    return LlamaForCausalLM(LlamaConfig(
        vocab_size=s["vocab_size"], hidden_size=s["hidden"], intermediate_size=s["ffn_hidden"],
        num_hidden_layers=s["n_layers"], num_attention_heads=s["n_heads"], num_key_value_heads=s["n_kv_heads"],
        max_position_embeddings=s["max_seq_len"], tie_word_embeddings=s["tie_embeddings"], attn_implementation="sdpa"))


def run_trainer_driving(total_steps: int, per_round: int, out_dir: str, others: dict[str, Contender],
                        times: dict[str, list[float]]) -> None:
    """Train with ``transformers.Trainer``; after every ``per_round`` of its steps, run one round of ``others``.

    Appends the Trainer's step times (all but the first round) to ``times["hf-trainer"]`` and the
    others' to their own lists; time spent in the others' rounds is excluded from the Trainer's.
    """
    import torch
    from transformers import Trainer, TrainerCallback, TrainingArguments

    ids, labels = fixed_batch()
    labels = hf_labels(ids, labels)

    class Rows(torch.utils.data.Dataset):
        def __len__(self) -> int:
            return MICRO * total_steps

        def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
            return {"input_ids": ids[i % MICRO], "labels": labels[i % MICRO]}

    class Interleave(TrainerCallback):
        def __init__(self) -> None:
            self.last = None

        def on_step_end(self, args, state, control, **kwargs):  # noqa: ANN001 - the Trainer's signature
            now = time.perf_counter()
            first_round = state.global_step <= per_round
            if self.last is not None and not first_round:
                times["hf-trainer"].append(now - self.last)
            if state.global_step % per_round == 0:
                for name, run in others.items():
                    step_times = run(per_round)
                    if not first_round:
                        times[name] += step_times
            self.last = time.perf_counter()  # the others' round is not the Trainer's time

    # fm-train's contender set the torchrun variables for its world-1 group; seeing LOCAL_RANK,
    # accelerate would wrap the Trainer's model in DDP, which a single-process Trainer never has.
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        os.environ.pop(var, None)
    args = TrainingArguments(
        output_dir=out_dir, max_steps=total_steps, per_device_train_batch_size=MICRO, learning_rate=LR,
        adam_beta1=0.9, adam_beta2=0.95, weight_decay=0.1, max_grad_norm=1.0, lr_scheduler_type="cosine",
        warmup_steps=WARMUP, optim="adamw_torch", use_cpu=True, report_to=[], save_strategy="no",
        logging_strategy="no", eval_strategy="no", disable_tqdm=True, dataloader_num_workers=0, seed=1)
    Trainer(model=hf_model(), args=args, train_dataset=Rows(), callbacks=[Interleave()]).train()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--steps-per-round", type=int, default=5)
    parser.add_argument("--zero", type=int, default=0, choices=[0, 1, 2, 3])
    parser.add_argument("--family", default="llama", choices=sorted(SHAPES), help="the model family (llama)")
    args = parser.parse_args()
    global SHAPE
    SHAPE = SHAPES[args.family]
    import torch

    torch.set_num_threads(args.threads)
    total = args.rounds * args.steps_per_round
    with tempfile.TemporaryDirectory() as run_dir:
        contenders = {"fm-train": fm_train_contender(total, args.zero, run_dir, args.steps_per_round),
                      "torch": torch_contender(total), "hf-loop": hf_contender(total)}
        times: dict[str, list[float]] = {name: [] for name in [*contenders, "hf-trainer"]}
        # Round 0 is warm-up for everyone: allocator, kernel choice, first-call costs.
        run_trainer_driving(total, args.steps_per_round, str(Path(run_dir) / "trainer"), contenders, times)
    tps = {name: MICRO * SEQ / statistics.median(t) for name, t in times.items()}
    for name, t in times.items():
        print(json.dumps({"name": name, "median_step_s": round(statistics.median(t), 4),
                          "tokens_per_s": round(tps[name], 1), "steps_measured": len(t)}))
    print(f"fm-train / torch   = {tps['fm-train'] / tps['torch']:.3f} (goal >= 0.95)")
    print(f"fm-train / hf-loop = {tps['fm-train'] / tps['hf-loop']:.3f}")
    print(f"fm-train / hf-trainer = {tps['fm-train'] / tps['hf-trainer']:.3f} (goal >= 1.0)")
    print(f"family {args.family}, shape {SHAPE}, micro_batch {MICRO}, seq_len {SEQ}, fp32, threads {args.threads}, ZeRO-{args.zero}, "
          f"torch {torch.__version__}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
