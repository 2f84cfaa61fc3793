"""The GPU path's engine pieces that a CPU can run for real: DeepSpeed 0.19 hands ``fused: true``
to ``torch.optim.AdamW`` (torch has a CPU fused AdamW too), and ``parallel.compile`` trains like
eager. One gloo rank each, through ``build_engine`` and ``train``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from distributed import run_distributed

pytestmark = pytest.mark.multiproc

STEPS = 4


def _batches(vocab: int, seq: int):
    """The same batch every step, so that a working optimizer must lower its loss."""
    tokens = torch.randint(0, vocab, (2, seq + 1), generator=torch.Generator().manual_seed(0))
    while True:
        yield {"input_ids": tokens[:, :-1], "labels": tokens[:, 1:], "state": {}, "receipt": ""}


def _train(raw: dict[str, Any], ds_accelerator: str | None, fused: bool = True) -> dict[str, Any]:
    """Per rank: build the engine (config rendered for ``ds_accelerator``; ``fused=False``: AdamW's
    single-tensor path instead of the rendered fused one) and train; losses and optimizer."""
    import deepspeed

    from fm_train.config import build_config
    from fm_train.engine import MetricsSink, TrainState, build_engine, train
    from fm_train.engine.meter import ThroughputSpec
    from fm_train.engine.train_module import build_train_module
    from fm_train.families import family_of
    from fm_train.parallel.deepspeed_config import deepspeed_config

    deepspeed.init_distributed(dist_backend="gloo")
    cfg = build_config(raw)
    ds = deepspeed_config(cfg, accelerator=ds_accelerator or "cpu")
    if not fused:
        del ds["optimizer"]["params"]["fused"]
    family = family_of(cfg.model)
    engine, scheduler = build_engine(cfg, build_train_module(cfg, family), blocks=family.modules().block_types,
                                     ds_config=ds)
    sink = MetricsSink(cfg.run.dir, enabled=True, tensorboard=False)
    train(engine, _batches(cfg.model.vocab_size, cfg.data.seq_len), TrainState(lr_scheduler=scheduler), cfg,
          sink=sink, spec=ThroughputSpec(cfg.tokens_per_step, 1, 1.0, 1.0))
    sink.close()
    records = [json.loads(line) for line in (Path(cfg.run.dir) / "metrics.jsonl").read_text().splitlines()]
    return {"losses": [r["loss"] for r in records if "loss" in r],
            "optimizer": type(engine.basic_optimizer).__name__,
            "fused": engine.basic_optimizer.defaults.get("fused")}


def _raw(base: dict[str, Any], run_dir: Path, **parallel: Any) -> dict[str, Any]:
    return {**base, "run": {**base["run"], "dir": str(run_dir)}, "cluster": {"workers": 1},
            "train": {**base["train"], "steps": STEPS, "micro_batch": 2},
            "parallel": {**base["parallel"], **parallel}}


def test_deepspeed_builds_torch_fused_adamw_from_the_gpu_config(tiny_config_dict, tmp_path):
    # ZeRO-1: the GPU config of ZeRO-2 also overlaps communication on CUDA streams, which a CPU lacks.
    fused = run_distributed(_train, 1, (_raw(tiny_config_dict, tmp_path / "fused", zero_stage=1), "cuda"), init_process_group=False)[0]
    plain = run_distributed(_train, 1, (_raw(tiny_config_dict, tmp_path / "plain", zero_stage=1), None, False),
                            init_process_group=False)[0]
    assert (fused["optimizer"], fused["fused"]) == ("AdamW", True)
    assert (plain["optimizer"], plain["fused"]) == ("AdamW", None)
    assert fused["losses"] == pytest.approx(plain["losses"], rel=1e-5)  # same update rule, one kernel
    assert plain["losses"][-1] < plain["losses"][0]


@pytest.mark.parametrize("layout", [{"zero_stage": 0}, {"zero_stage": 2, "offload_optimizer": True}, {"zero_stage": 3}],
                         ids=["zero0", "zero2-offload", "zero3"])
def test_cpu_fused_adamw_trains_as_the_single_tensor_path(tiny_config_dict, tmp_path, layout):
    """The CPU config's fused AdamW (ZeRO-Offload's CPU states included) against torch's single-tensor AdamW."""
    fused = run_distributed(_train, 1, (_raw(tiny_config_dict, tmp_path / "fused", **layout), None),
                            init_process_group=False)[0]
    plain = run_distributed(_train, 1, (_raw(tiny_config_dict, tmp_path / "plain", **layout), None, False),
                            init_process_group=False)[0]
    assert (fused["fused"], plain["fused"]) == (True, None)
    assert fused["losses"] == pytest.approx(plain["losses"], rel=1e-5)
    assert fused["losses"][-1] < fused["losses"][0]


@pytest.mark.slow  # the first inductor compile on 2 CPU cores takes minutes (cached afterwards)
def test_compiled_blocks_train_like_eager_with_activation_checkpointing(tiny_config_dict, tmp_path):
    eager = run_distributed(_train, 1, (_raw(tiny_config_dict, tmp_path / "eager", activation_checkpointing=True), None),
                            init_process_group=False)[0]
    compiled = run_distributed(_train, 1, (_raw(tiny_config_dict, tmp_path / "compiled", compile=True,
                                                activation_checkpointing=True), None), init_process_group=False)[0]
    assert compiled["losses"] == pytest.approx(eager["losses"], rel=1e-4)
