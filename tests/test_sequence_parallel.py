"""Ulysses sequence parallelism trains exactly like one process: sp2 under ZeRO-2 and ZeRO-3, sp2 x dp2 (with
activation checkpointing: the recomputed blocks exchange again), tp2 x sp2, a grouped-query shape with
fewer kv heads than sp, with and without document masking, loss for loss against a single rank running
the same micro-batches, gradients clipped; and the check is sharp: chunks at the wrong positions are caught."""

from __future__ import annotations

from typing import Any, Iterator

import pytest
import torch

from distributed import run_distributed

pytestmark = pytest.mark.multiproc

STEPS, SEQ, VOCAB, MICRO, EOS = 5, 16, 128, 2, 3


def raw(*, workers: int, sp: int = 1, tp: int = 1, pp: int = 1, zero: int = 2, accum: int, kv: int = 2,
        docs: bool = False, recompute: bool = False, tpsp: bool = False) -> dict[str, Any]:
    return {
        "run": {"name": "sp", "dir": "runs/unused", "seed": 5},
        "model": {"preset": "tiny", "n_layers": 2, "hidden": 32, "n_heads": 4, "n_kv_heads": kv, "ffn_hidden": 64,
                  "vocab_size": VOCAB, "vocab_multiple": 1, "max_seq_len": SEQ, "tie_embeddings": False},
        "parallel": {"tp": tp, "pp": pp, "sp": sp, "zero_stage": zero, "activation_checkpointing": recompute,
                     "tp_sequence_parallel": tpsp},
        "precision": "fp32",
        "data": {"seq_len": SEQ, "document_masking": docs},
        "train": {"steps": STEPS, "micro_batch": MICRO, "grad_accum": accum, "log_every": 1, "eval_every": 0},
        "optim": {"lr": 1e-2, "min_lr": 1e-3, "warmup_steps": 1, "grad_clip": 0.5, "weight_decay": 0.1},
        "convert": {"at_end": False},
        "cluster": {"workers": workers},
    }


def global_batch(step: int, size: int) -> torch.Tensor:
    """Token rows with EOS tokens at random places: several documents per sample."""
    gen = torch.Generator().manual_seed(900 + step)
    tokens = torch.randint(4, VOCAB, (size, SEQ + 1), generator=gen)
    ends = torch.rand(size, SEQ + 1, generator=gen) < 0.2
    return torch.where(ends, torch.full_like(tokens, EOS), tokens)


def rank_batches(reader: int, readers: int, accum: int, size: int, docs: bool) -> Iterator[dict[str, Any]]:
    """Micro-batch j of a step for data rank ``reader``: rows block ``j * readers + reader`` of the global batch."""
    from data_shards.loader import document_ids

    step = 0
    while True:
        tokens = global_batch(step, size)
        for j in range(accum):
            rows = tokens[(j * readers + reader) * MICRO:(j * readers + reader + 1) * MICRO]
            batch = {"input_ids": rows[:, :-1], "labels": rows[:, 1:]}
            if docs:
                batch["document_ids"] = torch.from_numpy(document_ids(rows[:, :-1].numpy(), EOS))
            yield batch
        step += 1


def _train(cases: list[dict[str, Any]], unshifted_positions: bool = False,
           unsummed_norms: bool = False) -> list[list[float]]:
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
    from fm_train.deepspeed_adapter.comm import init_distributed
    from fm_train.dist.env import RankEnv
    from fm_train.model.attention import CoreAttention

    init_distributed(RankEnv.from_environ())  # DeepSpeed adopts the harness's group (a pipeline needs it built)
    if unsummed_norms:  # a bug to catch: the norms' partial gradients left unsummed over the tp ranks
        from fm_train.parallel import tensor_parallel

        tensor_parallel._register_summed_grads = lambda *args, **kwargs: None
    out = []
    for case in cases:
        cfg = build_config(raw(**case))
        p = cfg.parallel
        topo = Topology(world=dist.get_world_size(), tp=p.tp, pp=p.pp, sp=p.sp)
        groups = ParallelGroups(topo)
        family = family_of(cfg.model)
        module = tm.build_train_module(cfg, family, groups)
        wrapped = [m for m in module.modules() if type(m).__name__ == "UlyssesAttention"]
        assert len(wrapped) == (cfg.model.n_layers // p.pp if p.sp > 1 else 0)  # this stage's blocks
        assert sum(isinstance(m, CoreAttention) for m in module.modules()) == cfg.model.n_layers // p.pp
        if unshifted_positions:  # a bug to catch: every chunk's RoPE positions counted from 0
            real = tm.local_inputs

            def without_positions(*args: Any, **kwargs: Any) -> Any:
                ids, labels, extra = real(*args, **kwargs)
                extra.pop("position_ids", None)
                return ids, labels, extra

            tm.local_inputs = without_positions
        pipelined = p.pp > 1
        engine, scheduler = build_engine(cfg, module, blocks=family.modules().block_types,
                                         mpu=groups if p.tp > 1 and not pipelined else None)
        state, norms = TrainState(lr_scheduler=scheduler), GradNormTracker.of(engine)
        batches = rank_batches(topo.batch_rank(groups.rank), topo.batch_dp, cfg.train.grad_accum, cfg.global_batch,
                               cfg.data.document_masking)
        losses, clipped = [], False
        for _ in range(STEPS):
            step = (pipeline_train_step if pipelined else train_step)(engine, batches, state, cfg.tokens_per_step,
                                                                       norms)
            total = step.loss_sum.detach().clone()
            if not pipelined:  # the pipeline's loss is already the mean over dp ranks
                dist.all_reduce(total, group=groups.group("dp"))
                total /= cfg.dp
            losses.append(float(total) / step.micro_batches)
            clipped = clipped or step.grad_norm > cfg.optim.grad_clip
        assert clipped, "the gradient norm never exceeded optim.grad_clip: clipping went untested"
        out.append(losses)
    return out


REFERENCES = [{"kv": 2}, {"kv": 2, "docs": True}, {"kv": 1, "docs": True}]


@pytest.fixture(scope="module")
def reference() -> dict[tuple, list[float]]:
    """One rank, four sequences a step as grad_accum micro-batches, for each model shape and masking."""
    cases = [{"workers": 1, "zero": 0, "accum": 2, **r} for r in REFERENCES]
    results = run_distributed(_train, 1, args=(cases,))[0]
    return {tuple(sorted(r.items())): losses for r, losses in zip(REFERENCES, results)}


def ref(reference, **shape) -> list[float]:
    return reference[tuple(sorted(shape.items()))]


def test_sp2_with_zero2_and_zero3_equals_one_process(reference):
    cases = [{"workers": 2, "sp": 2, "zero": 2, "accum": 2, "kv": 2},
             {"workers": 2, "sp": 2, "zero": 2, "accum": 2, "kv": 2, "docs": True},
             {"workers": 2, "sp": 2, "zero": 3, "accum": 2, "kv": 2},
             {"workers": 2, "sp": 2, "zero": 3, "accum": 2, "kv": 2, "docs": True},
             {"workers": 2, "sp": 2, "zero": 2, "accum": 2, "kv": 1, "docs": True}]
    plain, docs, zero3, zero3_docs, gqa_docs = run_distributed(_train, 2, args=(cases,))[0]
    assert plain == pytest.approx(ref(reference, kv=2), rel=1e-5)
    assert docs == pytest.approx(ref(reference, kv=2, docs=True), rel=1e-5)
    assert zero3 == pytest.approx(ref(reference, kv=2), rel=1e-5)
    assert zero3_docs == pytest.approx(ref(reference, kv=2, docs=True), rel=1e-5)
    assert gqa_docs == pytest.approx(ref(reference, kv=1, docs=True), rel=1e-5)  # 1 kv head, sp 2
    assert docs != pytest.approx(plain, rel=1e-3)  # the mask changes what is computed
    assert plain[-1] < plain[0]  # it learns


def test_sp2_dp2_and_tp2_sp2_equal_one_process(reference):
    cases = [{"workers": 4, "sp": 2, "zero": 2, "accum": 1, "kv": 2},
             {"workers": 4, "sp": 2, "zero": 2, "accum": 1, "kv": 2, "docs": True, "recompute": True},
             {"workers": 4, "sp": 2, "tp": 2, "zero": 1, "accum": 2, "kv": 2, "docs": True},
             {"workers": 4, "sp": 2, "tp": 2, "zero": 1, "accum": 2, "kv": 2}]
    sp2_dp2, sp2_dp2_docs, tp2_sp2_docs, tp2_sp2 = run_distributed(_train, 4, args=(cases,))[0]
    assert sp2_dp2 == pytest.approx(ref(reference, kv=2), rel=1e-5)
    assert sp2_dp2_docs == pytest.approx(ref(reference, kv=2, docs=True), rel=1e-5)  # recomputed, exchanged again
    # tp2 leaves 1 kv head per tp rank, fewer than sp: repeated for the exchange
    assert tp2_sp2_docs == pytest.approx(ref(reference, kv=2, docs=True), rel=1e-5)
    assert tp2_sp2 == pytest.approx(ref(reference, kv=2), rel=1e-5)


def test_chunks_at_the_wrong_positions_are_caught(reference):
    [wrong] = run_distributed(_train, 2, args=([{"workers": 2, "sp": 2, "zero": 2, "accum": 2, "kv": 2}], True))[0]
    assert wrong != pytest.approx(ref(reference, kv=2), rel=1e-5)


def test_tensor_parallel_sequence_parallelism_equals_one_process(reference):
    """tp2 with the sequence split outside the tp matmuls (norms and residuals on seq / 2 tokens), with and
    without document masking, and with the blocks recomputed; 2 ranks, ZeRO-1."""
    cases = [{"workers": 2, "tp": 2, "tpsp": True, "zero": 1, "accum": 2, "kv": 2},
             {"workers": 2, "tp": 2, "tpsp": True, "zero": 1, "accum": 2, "kv": 2, "docs": True},
             {"workers": 2, "tp": 2, "tpsp": True, "zero": 1, "accum": 2, "kv": 2, "recompute": True}]
    plain, docs, recomputed = run_distributed(_train, 2, args=(cases,))[0]
    assert plain == pytest.approx(ref(reference, kv=2), rel=1e-5)  # regions gather their input again in backward
    assert docs == pytest.approx(ref(reference, kv=2, docs=True), rel=1e-5)
    assert recomputed == pytest.approx(ref(reference, kv=2), rel=1e-5)  # recomputed blocks: no regathering


def test_tp2_sp2_and_pp2_tp2_with_tensor_parallel_sequence_parallelism_equal_one_process(reference):
    cases = [{"workers": 4, "tp": 2, "sp": 2, "tpsp": True, "zero": 2, "accum": 2, "kv": 2, "docs": True},
             {"workers": 4, "tp": 2, "pp": 2, "tpsp": True, "zero": 1, "accum": 2, "kv": 2}]
    both, pipelined = run_distributed(_train, 4, args=(cases,))[0]
    assert both == pytest.approx(ref(reference, kv=2, docs=True), rel=1e-5)
    assert pipelined == pytest.approx(ref(reference, kv=2), rel=1e-5)  # stages pass seq / tp tokens on


def test_unsummed_norm_gradients_are_caught(reference):
    case = {"workers": 2, "tp": 2, "tpsp": True, "zero": 1, "accum": 2, "kv": 2}
    [wrong] = run_distributed(_train, 2, args=([case], False, True))[0]
    assert wrong[0] == pytest.approx(ref(reference, kv=2)[0], rel=1e-5)  # the same model until the first update
    assert wrong != pytest.approx(ref(reference, kv=2), rel=1e-5)


def test_pp2_sp2_and_pp2_with_document_masking_equal_one_process(reference):
    """The stages pass the chunk's positions (and the document ids) on with the hidden states: pp2 x sp2 with
    one kv head and masking, pp2 x sp2, and pp2 x dp2 with masking and activation checkpointing (the
    stages recompute their blocks with the positions and ids they received)."""
    cases = [{"workers": 4, "pp": 2, "sp": 2, "zero": 1, "accum": 2, "kv": 1, "docs": True},
             {"workers": 4, "pp": 2, "sp": 2, "zero": 1, "accum": 2, "kv": 2},
             {"workers": 4, "pp": 2, "zero": 1, "accum": 1, "kv": 2, "docs": True, "recompute": True}]
    sp_docs, sp_plain, docs = run_distributed(_train, 4, args=(cases,))[0]
    assert sp_docs == pytest.approx(ref(reference, kv=1, docs=True), rel=1e-5)
    assert sp_plain == pytest.approx(ref(reference, kv=2), rel=1e-5)
    assert docs == pytest.approx(ref(reference, kv=2, docs=True), rel=1e-5)
