"""Tensor parallelism's overlapped region entry (``parallel.tp_overlap``): the same training as the synchronous
path, loss for loss and weight for weight, through real DeepSpeed engines on gloo (Llama with biased q/k/v under
ZeRO-2 and gradient accumulation, Megatron sequence parallelism with and without recomputed blocks, BERT, the MoE
family's attention), and the overlap is real: every weight gradient of a region is computed while its input
gradient's collective is in flight, started before and waited after."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from distributed import run_distributed

pytestmark = pytest.mark.multiproc

STEPS, SEQ, MICRO, ACCUM = 3, 16, 2, 2

# name -> (model fields, parallel fields)
LAYOUTS: dict[str, tuple[dict[str, Any], dict[str, Any]]] = {
    "llama-tp2-zero2-bias": ({"preset": "tiny", "qkv_bias": True}, {"zero_stage": 2}),
    "llama-tp2-zero1-tpsp": ({"preset": "tiny"}, {"zero_stage": 1, "tp_sequence_parallel": True}),
    "llama-tp2-zero1-tpsp-recompute": ({"preset": "tiny"}, {"zero_stage": 1, "tp_sequence_parallel": True,
                                                            "activation_checkpointing": True}),
    "bert-tp2-zero1": ({"preset": "bert-tiny", "n_kv_heads": 4}, {"zero_stage": 1}),
    "moe-tp2-zero2": ({"preset": "moe-tiny"}, {"zero_stage": 2}),
}
SHAPE = {"n_layers": 2, "hidden": 32, "n_heads": 4, "ffn_hidden": 64, "vocab_size": 128, "vocab_multiple": 1,
         "max_seq_len": SEQ}


def raw(model: dict[str, Any], parallel: dict[str, Any], overlap: bool) -> dict[str, Any]:
    shape = {k: v for k, v in SHAPE.items() if k != "ffn_hidden" or model["preset"] != "moe-tiny"}
    return {
        "run": {"name": "overlap", "dir": "runs/unused", "seed": 5},
        "model": {**shape, **model},
        "parallel": {"tp": 2, "tp_overlap": overlap, **parallel},
        "precision": "fp32",
        "data": {"seq_len": SEQ},
        "train": {"steps": STEPS, "micro_batch": MICRO, "grad_accum": ACCUM, "log_every": 1, "eval_every": 0},
        "optim": {"lr": 1e-2, "min_lr": 1e-3, "warmup_steps": 1, "grad_clip": 0.5, "weight_decay": 0.1},
        "convert": {"at_end": False},
        "cluster": {"workers": 2},
    }


def _batches(vocab: int, masked: bool):
    gen = torch.Generator().manual_seed(31)
    while True:
        rows = torch.randint(4, vocab, (MICRO, SEQ + 1), generator=gen)
        if masked:  # the encoder's labels: a token where it is masked, -100 elsewhere
            inputs = rows[:, :-1]
            mask = torch.rand(inputs.shape, generator=gen) < 0.3
            yield {"input_ids": inputs.masked_fill(mask, 3), "labels": inputs.masked_fill(~mask, -100)}
        else:
            yield {"input_ids": rows[:, :-1], "labels": rows[:, 1:]}


class _Recorder:
    """The order of the tp collectives' starts and waits and of the deferred weight gradients (one process)."""

    def __init__(self) -> None:
        import torch.distributed as dist

        from fm_train.parallel import tensor_parallel

        self.events: list[str] = []
        real_grads, self.active = tensor_parallel.weight_grads, False

        def weight_grads(*args: Any) -> list[torch.Tensor]:
            self.events.append("weight_grad")
            return real_grads(*args)

        def recording(collective, start: str, wait: str):
            def call(*args: Any, async_op: bool = False, **kwargs: Any):
                work = collective(*args, async_op=async_op, **kwargs)
                if not (async_op and self.active):
                    return work
                self.events.append(start)
                waited, events = work.wait, self.events

                class Work:
                    def wait(self) -> Any:
                        events.append(wait)
                        return waited()
                return Work()
            return call

        tensor_parallel.weight_grads = weight_grads
        dist.all_reduce = recording(dist.all_reduce, "start", "wait")
        dist.reduce_scatter_single = recording(dist.reduce_scatter_single, "start", "wait")
        # the regathered input's all-gather, started by the region's first linear backward
        dist.all_gather_single = recording(dist.all_gather_single, "gather", "gathered")


def _train(cases: dict[str, tuple[dict[str, Any], dict[str, Any]]]) -> dict[str, Any]:
    import torch.distributed as dist

    import fm_train  # noqa: F401  (registers the families)
    from fm_train.config import build_config
    from fm_train.deepspeed_adapter.comm import init_distributed
    from fm_train.deepspeed_adapter.grad_norm import GradNormTracker
    from fm_train.dist.env import RankEnv
    from fm_train.dist.groups import ParallelGroups
    from fm_train.dist.topology import Topology
    from fm_train.engine import TrainState, build_engine
    from fm_train.engine.step import train_step
    from fm_train.engine.train_module import build_train_module
    from fm_train.families import family_of
    from fm_train.parallel.tensor_parallel import ColumnParallelLinear

    init_distributed(RankEnv.from_environ())
    recorder = _Recorder()
    out: dict[str, Any] = {}
    for name, (model, parallel) in cases.items():
        runs = {}
        for overlap in (False, True):
            cfg = build_config(raw(model, parallel, overlap))
            groups = ParallelGroups(Topology(world=dist.get_world_size(), tp=2))
            family = family_of(cfg.model)
            module = build_train_module(cfg, family, groups)
            linears = [m for m in module.modules() if isinstance(m, ColumnParallelLinear)]
            assert linears and all(m.tp.overlap == (overlap and cfg.parallel.zero_stage < 3) for m in linears), name
            engine, scheduler = build_engine(cfg, module, blocks=family.modules().block_types, mpu=groups)
            state, norms = TrainState(lr_scheduler=scheduler), GradNormTracker.of(engine)
            batches = _batches(cfg.model.vocab_size, masked=model["preset"] == "bert-tiny")
            losses = []
            recorder.events.clear()
            recorder.active = overlap
            for _ in range(STEPS):
                step = train_step(engine, batches, state, cfg.tokens_per_step, norms)
                losses.append(float(step.loss_sum) / step.micro_batches)
            recorder.active = False
            runs[overlap] = (losses, {n: p.detach().clone() for n, p in module.named_parameters()},
                             list(recorder.events))
        (before, sync, _), (after, weights, events) = runs[False], runs[True]
        # the largest difference from the synchronous run's weights, relative to their largest entry
        drift = {n: ((w - sync[n]).abs().max() / sync[n].abs().max().clamp_min(1e-12)).item() for n, w in weights.items()}
        out[name] = (before, after, drift, events)
    return out


def _overlapped(events: list[str]) -> bool:
    """Every weight gradient computed between a collective's start and its wait, and every start waited."""
    in_flight = False
    for event in (e for e in events if e in ("start", "wait", "weight_grad")):
        if event == "weight_grad" and not in_flight:
            return False
        in_flight = {"start": True, "wait": False}.get(event, in_flight)
    return not in_flight


@pytest.fixture(scope="module")
def trained() -> list[dict[str, Any]]:
    return run_distributed(_train, world_size=2, args=(LAYOUTS,))


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_the_overlapped_entry_trains_like_the_synchronous_path(trained, name: str) -> None:
    for rank, results in enumerate(trained):
        before, after, drift, events = results[name]
        assert before[-1] != before[0], f"{name}: the losses must move for their match to mean something"
        assert after == pytest.approx(before, rel=1e-6, abs=0), f"{name} rank {rank}: {after} vs {before}"
        assert max(drift.values()) < 1e-6, f"{name} rank {rank}: {drift}"
        regions = (1 if name.startswith("moe") else 2) * SHAPE["n_layers"] * STEPS * ACCUM
        starts = events.count("start")
        assert starts == regions, f"{name}: {starts} overlapped entries"
        assert events.count("weight_grad") > starts and _overlapped(events), f"{name} rank {rank}: {events[:12]}"
        # Under the regathered sequence split each region's input is gathered again asynchronously, waited for
        # just before its weight gradients (blocks recomputed keep the gathered input instead).
        regathered = name == "llama-tp2-zero1-tpsp"
        assert events.count("gather") == events.count("gathered") == (regions if regathered else 0), name
        if regathered:  # the reduce-scatter is queued first, then the entry waits for its input
            assert all(events[i + 1] == "gathered" for i, e in enumerate(events) if e == "start"), events[:12]


class _Toy(torch.nn.Module):
    """A region whose second column linear is applied to a transformed input (not the region's input)."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = torch.nn.Linear(8, 16), torch.nn.Linear(8, 16)
        self.out = torch.nn.Linear(16, 8, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(torch.nn.functional.silu(self.a(x)) * self.b(x * 2))


def _toy_grads() -> dict[str, dict[str, float]]:
    import torch.distributed as dist

    from fm_train.parallel.tensor_parallel import TPGroup, apply_tensor_parallel
    from fm_train.parallel.tp_plan import TPPlan

    plan = TPPlan(modules={"a": "column", "b": "column", "out": "row"}, regions=("region",))
    out = {}
    for case in ("plain", "frozen a.weight", "input without grad"):
        grads = {}
        for overlap in (False, True):
            torch.manual_seed(0)
            model = torch.nn.Sequential()
            model.add_module("region", _Toy())
            apply_tensor_parallel(model, TPGroup(dist.group.WORLD, dist.get_rank(), 2, overlap=overlap), plan)
            if case == "frozen a.weight":
                model.region.a.weight.requires_grad_(False)
            x = torch.randn(2, 5, 8, generator=torch.Generator().manual_seed(1),
                            requires_grad=case != "input without grad")
            model(x).square().sum().backward()
            grads[overlap] = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
            if x.grad is not None:
                grads[overlap]["input"] = x.grad
        assert grads[False].keys() == grads[True].keys(), (case, grads[False].keys(), grads[True].keys())
        out[case] = {n: (g - grads[True][n]).abs().max().item() for n, g in grads[False].items()}
    return out


def test_a_linear_not_applied_to_the_region_input_and_frozen_weights_keep_their_gradients() -> None:
    for rank, cases in enumerate(run_distributed(_toy_grads, world_size=2)):
        for case, diffs in cases.items():
            assert diffs and max(diffs.values()) < 1e-6, f"rank {rank}, {case}: {diffs}"
