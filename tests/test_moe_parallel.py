"""Expert parallelism trains exactly like one process: ep2 under ZeRO-1 and 2, dp4 x ep2, tp2 with the
experts replicated, tp2 x ep2 and pp2 x ep2, router losses on and gradients clipped, loss for loss
against a single rank running the same micro-batches; and the check is sharp: averaging the experts'
gradients over the wrong group is caught (and tp2 caught the q/k norms' gradients left unsummed)."""

from __future__ import annotations

from typing import Any, Iterator

import pytest
import torch

from distributed import run_distributed

pytestmark = pytest.mark.multiproc

STEPS, SEQ, VOCAB, MICRO = 6, 16, 256, 2


def moe_raw(*, workers: int, ep: int, zero: int, accum: int, tp: int = 1, pp: int = 1) -> dict[str, Any]:
    return {
        "run": {"name": "moe-ep", "dir": "runs/unused", "seed": 11},
        "model": {"preset": "moe-tiny", "n_layers": 3, "hidden": 32, "n_heads": 4, "n_kv_heads": 2, "head_dim": 8,
                  "ffn_hidden": 48, "vocab_size": VOCAB, "vocab_multiple": 1, "max_seq_len": SEQ,
                  "moe": {"experts": 4, "top_k": 2, "expert_ffn_hidden": 16, "dense_layers": 1,
                          "aux_loss_coef": 0.05, "z_loss_coef": 0.01}},
        "parallel": {"tp": tp, "pp": pp, "ep": ep, "zero_stage": zero},
        "precision": "fp32",
        "data": {"seq_len": SEQ},
        "train": {"steps": STEPS, "micro_batch": MICRO, "grad_accum": accum, "log_every": 1, "eval_every": 0},
        "optim": {"lr": 1e-2, "min_lr": 1e-3, "warmup_steps": 2, "grad_clip": 0.5, "weight_decay": 0.1},
        "convert": {"at_end": False},
        "cluster": {"workers": workers},
    }


def global_batch(step: int, size: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(500 + step)
    start = torch.randint(0, VOCAB, (size, 1), generator=gen)
    stride = torch.randint(1, 5, (size, 1), generator=gen)
    return (start + stride * torch.arange(SEQ + 1)) % VOCAB


def rank_batches(rank: int, dp: int, accum: int, size: int) -> Iterator[dict[str, Any]]:
    """Micro-batch j of a step on dp rank ``rank`` is rows block ``j * dp + rank`` of the global batch."""
    step = 0
    while True:
        tokens = global_batch(step, size)
        for j in range(accum):
            rows = tokens[(j * dp + rank) * MICRO:(j * dp + rank + 1) * MICRO]
            yield {"input_ids": rows[:, :-1], "labels": rows[:, 1:]}
        step += 1


def _train(cases: list[dict[str, Any]], wrong_expert_group: bool = False) -> list[list[float]]:
    """On every rank: train each case; returns each case's loss per step (mean over the global batch)."""
    import torch.distributed as dist

    import fm_train  # noqa: F401  (registers the families)
    from fm_train.config import build_config
    from fm_train.deepspeed_adapter.grad_norm import GradNormTracker
    from fm_train.dist.groups import ParallelGroups
    from fm_train.dist.topology import Topology
    from fm_train.engine import TrainState, build_engine
    from fm_train.engine import train_module as tm
    from fm_train.engine.pipeline_step import pipeline_train_step
    from fm_train.engine.step import train_step
    from fm_train.families import family_of

    if wrong_expert_group:  # a bug to catch: experts averaged with ranks that hold other experts
        real = tm.register_expert_groups
        tm.register_expert_groups = lambda ep, g, r, _edp, _edp_ranks: real(ep, g, r, g, r)
    out = []
    for case in cases:
        cfg = build_config(moe_raw(**case))
        p = cfg.parallel
        groups = ParallelGroups(Topology(world=dist.get_world_size(), tp=p.tp, pp=p.pp, ep=p.ep))
        family = family_of(cfg.model)
        pipelined = p.pp > 1
        engine, scheduler = build_engine(cfg, tm.build_train_module(cfg, family, groups),
                                         blocks=family.modules().block_types, mpu=None if pipelined else groups)
        experts = [p for n, p in engine.module.named_parameters() if n.endswith("experts.gate_up_proj")]
        assert experts and all(p.shape[0] == 4 // cfg.parallel.ep for p in experts)  # this rank's experts only
        step_fn = pipeline_train_step if pipelined else train_step
        state, norms = TrainState(lr_scheduler=scheduler), GradNormTracker.of(engine)
        batches = rank_batches(groups.coord.dp, cfg.dp, cfg.train.grad_accum, cfg.global_batch)
        losses, clipped = [], False
        for _ in range(STEPS):
            step = step_fn(engine, batches, state, cfg.tokens_per_step, norms)
            total = step.loss_sum.detach().clone()
            if not pipelined:  # the pipeline's loss is already the mean over dp ranks
                dist.all_reduce(total, group=groups.group("dp"))
                total /= cfg.dp
            losses.append(float(total) / step.micro_batches)
            clipped = clipped or step.grad_norm > cfg.optim.grad_clip
        assert clipped, "the gradient norm never exceeded optim.grad_clip: clipping went untested"
        out.append(losses)
    return out


@pytest.fixture(scope="module")
def reference() -> dict[int, list[float]]:
    """One rank, the global batch as grad_accum micro-batches: by global batch size (4 and 8 sequences)."""
    cases = [{"workers": 1, "ep": 1, "zero": 0, "accum": 4}, {"workers": 1, "ep": 1, "zero": 0, "accum": 8}]
    four, eight = run_distributed(_train, 1, args=(cases,))[0]
    return {4: four, 8: eight}


def test_ep2_with_zero1_and_zero2_equal_one_process(reference):
    cases = [{"workers": 2, "ep": 2, "zero": 1, "accum": 2}, {"workers": 2, "ep": 2, "zero": 2, "accum": 2}]
    ep2_zero1, ep2_zero2 = run_distributed(_train, 2, args=(cases,))[0]
    assert ep2_zero1 == pytest.approx(reference[4], rel=1e-5)
    assert ep2_zero2 == pytest.approx(reference[4], rel=1e-5)
    assert reference[4][-1] < reference[4][0]  # it learns


def test_dp4_ep2_with_zero1_equals_one_process(reference):
    [dp4_ep2] = run_distributed(_train, 4, args=([{"workers": 4, "ep": 2, "zero": 1, "accum": 2}],))[0]
    assert dp4_ep2 == pytest.approx(reference[8], rel=1e-5)


def test_experts_averaged_over_the_wrong_group_are_caught(reference):
    [wrong] = run_distributed(_train, 4, args=([{"workers": 4, "ep": 2, "zero": 1, "accum": 2}], True))[0]
    # Near at the first step only: DeepSpeed's start-up broadcast over that group already gave one rank's
    # experts to the other (engine._broadcast_model), then every update averages experts that differ.
    assert wrong[0] == pytest.approx(reference[8][0], rel=1e-4)
    assert wrong != pytest.approx(reference[8], rel=1e-5)
    assert abs(wrong[-1] - reference[8][-1]) > 10 * abs(wrong[0] - reference[8][0])


def test_tp2_with_replicated_experts_equals_one_process(reference):
    [tp2] = run_distributed(_train, 2, args=([{"workers": 2, "tp": 2, "ep": 1, "zero": 1, "accum": 4}],))[0]
    assert tp2 == pytest.approx(reference[4], rel=1e-5)


def test_tp2_ep2_and_pp2_ep2_equal_one_process(reference):
    cases = [{"workers": 4, "tp": 2, "ep": 2, "zero": 1, "accum": 2},
             {"workers": 4, "pp": 2, "ep": 2, "zero": 1, "accum": 2}]
    tp2_ep2, pp2_ep2 = run_distributed(_train, 4, args=(cases,))[0]
    assert tp2_ep2 == pytest.approx(reference[4], rel=1e-5)
    assert pp2_ep2 == pytest.approx(reference[4], rel=1e-5)
