"""Data parallel with ZeRO 0-3 trains exactly like one process on the same global batches.

All DeepSpeed runs share one spawn of 2 gloo ranks (importing DeepSpeed twice per case would
dominate the time); each case builds a fresh module and engine. The reference is a plain PyTorch
AdamW loop in the test process over the same global batches, with the same decay groups, schedule
and clipping, so these tests also check that the rendered DeepSpeed config means what it says.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Iterator

import pytest
import torch

from distributed import run_distributed

pytestmark = pytest.mark.multiproc

STEPS = 10
GLOBAL_BATCH = 8
SEQ = 32
VOCAB = 512
DP = 2

CASES: dict[str, dict[str, Any]] = {
    **{f"zero{s}-fp32": {"zero": s, "precision": "fp32", "micro": 4, "accum": 1} for s in range(4)},
    **{f"zero{s}-bf16": {"zero": s, "precision": "bf16", "micro": 4, "accum": 1} for s in range(4)},
    "zero2-fp32-micro2x2": {"zero": 2, "precision": "fp32", "micro": 2, "accum": 2},
    # bf16 accumulating over micro-batches: in fp32 (train.grad_accum_dtype), DeepSpeed's own report checked below.
    **{f"zero{s}-bf16-micro2x2": {"zero": s, "precision": "bf16", "micro": 2, "accum": 2} for s in (1, 2, 3)},
    "zero3-fp32-actckpt": {"zero": 3, "precision": "fp32", "micro": 4, "accum": 1, "actckpt": True},
}
METRICS_CASE = "zero2-fp32-micro2x2"


def make_config(base: dict[str, Any], run_dir: str, *, workers: int, zero: int, precision: str, micro: int,
                accum: int, actckpt: bool = False):
    from fm_train.config import build_config

    return build_config(base, [
        f"run.dir={run_dir}", f"cluster.workers={workers}", f"parallel.zero_stage={zero}",
        f"parallel.activation_checkpointing={str(actckpt).lower()}", f"precision={precision}",
        f"train.steps={STEPS}", f"train.micro_batch={micro}", f"train.grad_accum={accum}",
        "train.log_every=1", "train.eval_every=5", "train.eval_batches=2", "optim.warmup_steps=3",
        "optim.lr=3e-3", "optim.min_lr=3e-4", "optim.weight_decay=0.1", "optim.grad_clip=1.0",
        f"data.seq_len={SEQ}", f"model.vocab_size={VOCAB}",
    ])


def global_batch(step: int, size: int = GLOBAL_BATCH) -> torch.Tensor:
    """``size`` arithmetic progressions mod VOCAB (learnable), ``SEQ + 1`` tokens each, fixed by ``step``."""
    gen = torch.Generator().manual_seed(1000 + step)
    start = torch.randint(0, VOCAB, (size, 1), generator=gen)
    stride = torch.randint(1, 8, (size, 1), generator=gen)
    return (start + stride * torch.arange(SEQ + 1)) % VOCAB


def rank_batches(rank: int, dp: int, micro: int, accum: int) -> Iterator[dict[str, Any]]:
    """Rank ``rank``'s share of each global batch: micro-batch j of a step is rows ``(j*dp + rank)*micro ...``."""
    step = 0
    while True:
        tokens = global_batch(step)
        for j in range(accum):
            rows = tokens[(j * dp + rank) * micro:(j * dp + rank + 1) * micro]
            yield {"input_ids": rows[:, :-1], "labels": rows[:, 1:], "state": {"step": step, "micro": j},
                   "receipt": f"r{step:04d}"}
        step += 1


def val_batches() -> list[dict[str, Any]]:
    tokens = global_batch(-1, size=4)
    return [{"input_ids": tokens[:, :-1], "labels": tokens[:, 1:]}]


def _train_all_cases(base: dict[str, Any], root: str) -> dict[str, list[dict[str, Any]]]:
    """Runs on every rank: train each case with DeepSpeed; rank 0 returns each case's metrics records."""
    import torch.distributed as dist

    from fm_train.engine import MetricsSink, TrainState, build_engine, train
    from fm_train.engine.loop import throughput_spec
    from fm_train.engine.meter import ThroughputSpec
    from fm_train.engine.train_module import build_train_module
    from fm_train.families import family_of

    rank = dist.get_rank()
    out: dict[str, list[dict[str, Any]]] = {}
    for name, case in CASES.items():
        run_dir = Path(root) / name
        cfg = make_config(base, str(run_dir), workers=DP, **case)
        family = family_of(cfg.model)
        # family: ZeRO-3 keeps every block gathered here (the budget holds them), as the worker would
        engine, scheduler = build_engine(cfg, build_train_module(cfg, family), blocks=family.modules().block_types,
                                         family=family)
        state = TrainState(lr_scheduler=scheduler)
        sink = MetricsSink(run_dir, enabled=rank == 0, tensorboard=name == METRICS_CASE)
        # A fixed peak keeps the matmul probe out of all but the metrics case.
        spec = (throughput_spec(cfg, family, engine.device) if name == METRICS_CASE
                else ThroughputSpec(cfg.tokens_per_step, DP, 1.0, 1.0))
        accum_dtype, optimizer = str(engine.get_data_types()[1]), type(engine.optimizer).__name__
        train(engine, rank_batches(rank, DP, case["micro"], case["accum"]), state, cfg, sink=sink,
              val_batches=val_batches, spec=spec)
        sink.close()
        engine.destroy()
        if rank == 0:
            out[name] = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
            out[name].append({"final_state": state.state_dict() | {"lr_scheduler": None},
                              "grad_accum_dtype": accum_dtype, "optimizer": optimizer})
    dist.barrier()
    return out


def reference_losses(base: dict[str, Any]) -> list[float]:
    """The same training in one process with plain torch AdamW: loss of each step's global batch."""
    from fm_train.engine import build_lr_scheduler, weight_decay_groups
    from fm_train.engine.train_module import build_train_module
    from fm_train.families import family_of

    cfg = make_config(base, "unused", workers=1, zero=0, precision="fp32", micro=GLOBAL_BATCH, accum=1)
    module = build_train_module(cfg, family_of(cfg.model))
    o = cfg.optim
    opt = torch.optim.AdamW(weight_decay_groups(module, o.weight_decay), lr=o.lr, betas=o.betas, eps=o.eps)
    sched = build_lr_scheduler(opt, o, cfg.train.steps)
    losses = []
    for step in range(STEPS):
        tokens = global_batch(step)
        loss = module(tokens[:, :-1], tokens[:, 1:])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(module.parameters(), o.grad_clip)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses


_CACHE: dict[str, Any] = {}


# Function-scoped because tiny_config_dict is; the expensive results are computed once per module.
@pytest.fixture
def runs(tiny_config_dict, tmp_path_factory) -> dict[str, list[dict[str, Any]]]:
    if "runs" not in _CACHE:
        root = tmp_path_factory.mktemp("engine_eq")
        _CACHE["runs"] = run_distributed(_train_all_cases, world_size=DP, args=(tiny_config_dict, str(root)))[0]
    return _CACHE["runs"]


@pytest.fixture
def reference(tiny_config_dict) -> list[float]:
    if "reference" not in _CACHE:
        torch.set_num_threads(1)
        _CACHE["reference"] = reference_losses(tiny_config_dict)
    return _CACHE["reference"]


def train_losses(records: list[dict[str, Any]]) -> list[float]:
    return [r["loss"] for r in records if "loss" in r]


@pytest.mark.parametrize("case", list(CASES))
def test_dp2_loss_matches_single_process(runs, reference, case):
    losses = train_losses(runs[case])
    assert len(losses) == STEPS
    tol = 2e-2 if CASES[case]["precision"] == "bf16" else 1e-5
    for step, (got, want) in enumerate(zip(losses, reference)):
        assert got == pytest.approx(want, rel=tol), f"{case}: step {step + 1} loss {got} != single-process {want}"
    # The data must also have been learnt: a no-op optimizer would pass the first step only.
    assert reference[-1] < reference[0] - 0.1


def test_metrics_jsonl_has_every_key(runs):
    records = runs[METRICS_CASE]
    train_records = [r for r in records if "loss" in r]
    eval_records = [r for r in records if "val_loss" in r]
    assert [r["step"] for r in train_records] == list(range(1, STEPS + 1))
    assert [r["step"] for r in eval_records] == [5, 10]
    for r in train_records:
        for key in ("lr", "grad_norm", "tokens_per_s", "tokens_per_s_per_device", "mfu", "step_time_s", "peak_mem_gib"):
            assert isinstance(r[key], float) and math.isfinite(r[key]) and r[key] > 0, (key, r)
        assert r["tokens_per_s_per_device"] == pytest.approx(r["tokens_per_s"] / DP)
        assert 0 < r["mfu"] < 1
        assert r["data_receipt"] == f"r{r['step'] - 1:04d}"
        assert r["tokens_seen"] == r["step"] * GLOBAL_BATCH * SEQ
    assert all(math.isfinite(r["val_loss"]) for r in eval_records)
    assert eval_records[1]["val_loss"] < eval_records[0]["val_loss"]
    # lr follows the schedule: warmup 3 steps to 3e-3, then decays.
    lrs = [r["lr"] for r in train_records]
    assert lrs[:3] == pytest.approx([1e-3, 2e-3, 3e-3])
    assert lrs[3] > lrs[-1] >= 3e-4
    final = records[-1]["final_state"]
    assert final["step"] == STEPS and final["data_state"] == {"step": STEPS - 1, "micro": 1}


def test_bf16_gradients_accumulate_in_fp32_with_zero(runs):
    for case, spec in CASES.items():
        facts = runs[case][-1]
        if spec["precision"] == "bf16":
            # ZeRO-0 has no fp32 path in DeepSpeed; ZeRO-1 then runs its BF16_Optimizer (fp32 gradient buffers).
            assert facts["grad_accum_dtype"] == ("torch.bfloat16" if spec["zero"] == 0 else "torch.float32"), (case, facts)
            if spec["zero"] == 1:
                assert facts["optimizer"] == "BF16_Optimizer", (case, facts)


def test_grad_norm_is_reported_in_every_stage(runs):
    for case in CASES:
        norms = [r["grad_norm"] for r in runs[case] if "loss" in r]
        assert all(n is not None and n > 0 for n in norms), (case, norms)
