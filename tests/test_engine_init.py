"""ZeRO-3 builds the model already partitioned (``deepspeed.zero.Init``) with the seeded init of every layout.

On 2 gloo ranks, for tied and untied embeddings: the module from ``build_train_module`` holds only
this rank's half of every parameter (no full tensor left behind), and training it gives the same
losses, step by step, as DeepSpeed partitioning the dense seeded model itself (the old path).
"""

from __future__ import annotations

from typing import Any

import pytest

from distributed import run_distributed

pytestmark = pytest.mark.multiproc

STEPS, SEQ, VOCAB, MICRO = 3, 32, 512, 2


def _config(base: dict[str, Any], run_dir: str, tie: bool):
    from fm_train.config import build_config

    return build_config(base, [f"run.dir={run_dir}", "parallel.zero_stage=3", "precision=fp32",
                               f"model.tie_embeddings={str(tie).lower()}", f"model.vocab_size={VOCAB}",
                               f"data.seq_len={SEQ}", f"train.micro_batch={MICRO}", "optim.warmup_steps=0"])


def _batch(step: int, rank: int):
    import torch

    gen = torch.Generator().manual_seed(100 * step + rank)
    tokens = torch.randint(0, VOCAB, (MICRO, SEQ + 1), generator=gen)
    return tokens[:, :-1], tokens[:, 1:]


def _param_bytes(module) -> tuple[int, int]:
    """(bytes of the ZeRO-3 partitions this rank holds, bytes of full tensors still allocated)."""
    parts = sum(p.ds_tensor.numel() * p.ds_tensor.element_size() for p in module.parameters())
    full = sum(p.data.numel() * p.element_size() for p in module.parameters())
    return parts, full


def _losses(cfg, module) -> tuple[list[float], tuple[int, int], list[list[str]]]:
    from fm_train.engine import build_engine, weight_decay_groups

    # Which weights decay must not depend on the build (partitioned parameters look 1-D).
    groups = [g["names"] for g in weight_decay_groups(module, cfg.optim.weight_decay)]
    engine, _ = build_engine(cfg, module)
    # Measured before the first step: from then on DeepSpeed keeps parameters smaller than
    # stage3_param_persistence_threshold gathered, which in this tiny model is all of them.
    after = _param_bytes(engine.module)
    opt = engine.optimizer  # fp32: the optimizer updates the partitions, no second fp32 copy (zero3_master)
    shared = all(m is p for m, p in zip(opt.fp32_partitioned_groups_flat, opt.fp16_partitioned_groups_flat))
    out = []
    for step in range(STEPS):
        ids, labels = _batch(step, engine.global_rank)
        loss = engine(ids, labels)
        engine.backward(loss)
        engine.step()
        out.append(loss.item())
    engine.destroy()
    return out, after, groups, shared


def _compare_builds(base: dict[str, Any], root: str) -> dict[str, Any]:
    from fm_train.engine.train_module import ModelWithLoss, build_dense_model, build_train_module
    from fm_train.families import family_of

    out: dict[str, Any] = {}
    for tie in (True, False):
        cfg = _config(base, f"{root}/tie{tie}", tie)
        family = family_of(cfg.model)
        module = build_train_module(cfg, family)
        built = _param_bytes(module)
        partitioned, after, groups, shared = _losses(cfg, module)
        # The old path: the whole seeded model on every rank, partitioned by deepspeed.initialize.
        dense_model = ModelWithLoss(build_dense_model(cfg, family), family.modules().loss(family.modules().args(cfg.model)))
        dense, _, dense_groups, _ = _losses(cfg, dense_model)
        out[f"tie{tie}"] = {"partitioned": partitioned, "dense": dense, "built": built, "after_engine": after,
                            "model_bytes": family.sizes.parameter_count(cfg.model) * 4, "groups": groups,
                            "dense_groups": dense_groups, "master_shared": shared}
    return out


_CACHE: dict[str, Any] = {}


# Function-scoped because tiny_config_dict is; the 2-rank run happens once per module.
@pytest.fixture
def results(tiny_config_dict, tmp_path_factory) -> list[dict[str, Any]]:
    if "results" not in _CACHE:
        root = str(tmp_path_factory.mktemp("init"))
        _CACHE["results"] = run_distributed(_compare_builds, world_size=2, args=(tiny_config_dict, root))
    return _CACHE["results"]


@pytest.mark.parametrize("case", ["tieTrue", "tieFalse"])
def test_zero3_init_trains_like_the_dense_build(results, case):
    for rank, per_rank in enumerate(results):
        got, want = per_rank[case]["partitioned"], per_rank[case]["dense"]
        assert got == pytest.approx(want, rel=1e-6), f"rank {rank}: losses {got} != dense build {want}"
        assert got[-1] != got[0]  # the optimizer did step: later losses are not the first one repeated
        assert per_rank[case]["groups"] == per_rank[case]["dense_groups"]


@pytest.mark.parametrize("case", ["tieTrue", "tieFalse"])
@pytest.mark.parametrize("when", ["built", "after_engine"])
def test_each_rank_holds_about_half_of_the_parameters(results, case, when):
    for rank, per_rank in enumerate(results):
        parts, full = per_rank[case][when]
        total = per_rank[case]["model_bytes"]
        assert full == 0, f"rank {rank} ({when}): {full} bytes of full parameters are still allocated"
        # 1/dp of the model, plus at most one element of padding per parameter tensor.
        assert total / 2 <= parts <= total / 2 + 4 * 64, f"rank {rank} ({when}): {parts} partition bytes, model {total}"


@pytest.mark.parametrize("case", ["tieTrue", "tieFalse"])
def test_fp32_master_weights_are_the_partitions_themselves(results, case):
    # DeepSpeed would clone them (a device-vs-name comparison that is never equal): 4 B/param per rank.
    assert all(per_rank[case]["master_shared"] for per_rank in results)
