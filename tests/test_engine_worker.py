"""The worker end to end on 2 real gloo ranks: rank env -> DeepSpeed -> loop -> clean exit.

``test_worker_wiring`` replaces the data reader with in-memory batches (so it runs whatever state
``data_shards`` is in); ``test_loss_falls_on_the_default_corpus`` reads the real default corpus.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path
from typing import Any, Iterator

import pytest
import yaml

from distributed import run_distributed

VOCAB, SEQ = 512, 32


def _fake_batches(rank: int, micro: int, state: dict[str, Any] | None = None) -> Iterator[dict[str, Any]]:
    import torch

    n = state["n"] + 1 if state else 0  # resume right after the batch that left `state`
    while True:
        gen = torch.Generator().manual_seed(n * 10 + rank)
        start = torch.randint(0, VOCAB, (micro, 1), generator=gen)
        rows = (start + 3 * torch.arange(SEQ + 1)) % VOCAB
        yield {"input_ids": rows[:, :-1], "labels": rows[:, 1:], "state": {"n": n}, "receipt": f"{n:08x}"}
        n += 1


def _signal_at(batches: Iterator[dict[str, Any]], rank: int, kill_at: int | None) -> Iterator[dict[str, Any]]:
    """Pass batches through; rank 1 receives SIGTERM while it reads batch ``kill_at`` (a preemption)."""
    import os
    import signal

    for batch in batches:
        if kill_at is not None and rank == 1 and batch["state"]["n"] == kill_at:
            os.kill(os.getpid(), signal.SIGTERM)
        yield batch


def _worker_with_fake_data(raw: dict[str, Any], kill_at: int | None = None, beats: str | None = None,
                           launch_start_s: float | None = None) -> int:
    import os

    import torch.distributed as dist

    from fm_train.config import build_config
    from fm_train.dist import heartbeat
    from fm_train.engine import data as engine_data
    from fm_train.worker import run_worker

    if beats is not None:  # every heartbeat of this rank, in order, to RUN/<beats>.<rank>
        beat = heartbeat.Heartbeat.beat

        def logged(self: heartbeat.Heartbeat, step: int, phase: str = "step") -> None:
            with open(f"{beats}.{os.environ['RANK']}", "a") as f:
                f.write(f"{step} {phase}\n")
            beat(self, step, phase)

        heartbeat.Heartbeat.beat = logged  # type: ignore[method-assign]
    if launch_start_s is not None:
        os.environ["FM_TRAIN_LAUNCH_START_S"] = f"{launch_start_s:.3f}"

    engine_data.prepare_sources = lambda cfg, family, is_rank0: [(s.path, s.weight) for s in cfg.data.sources]
    engine_data.check_sources = lambda cfg, sources: None
    engine_data.train_batches = lambda cfg, sources, dp_rank, dp_size, state, **_: _signal_at(
        _fake_batches(dp_rank, cfg.train.micro_batch, state), dp_rank, kill_at)
    engine_data.val_batches = lambda cfg, sources, dp_rank, dp_size, **_: (lambda: [next(_fake_batches(99, 2))])
    code = run_worker(build_config(raw))
    assert not dist.is_initialized(), "the worker must tear its process group down"
    return code


@pytest.mark.multiproc
def test_worker_wiring_and_resume(tiny_config_dict, tmp_path):
    raw = {**tiny_config_dict, "run": {**tiny_config_dict["run"], "dir": str(tmp_path / "run")},
           "train": {**tiny_config_dict["train"], "steps": 6, "log_every": 3, "eval_every": 3},
           "checkpoint": {"every": 4, "keep": 2}, "logging": {"tensorboard": False}}
    launch_start = time.time()
    assert run_distributed(_worker_with_fake_data, world_size=2, args=(raw, None, str(tmp_path / "beats"), launch_start),
                           init_process_group=False) == [0, 0]
    finished = time.time()
    run = tmp_path / "run"
    # The heartbeat says `save` while a checkpoint is written (the launcher then allows cluster.save_timeout_s).
    for rank in (0, 1):
        assert (tmp_path / f"beats.{rank}").read_text().split("\n")[:-1] == [
            "0 ready", "1 step", "2 step", "3 step", "4 save", "4 step", "5 step", "6 save", "6 step"]
    # Goodput counts from the launch's start: start-up, evaluation and saves included, so below the steps' rate.
    assert json.loads((run / "goodput.json").read_text()) == {"launch_start_s": round(launch_start, 3), "tokens_seen": 0}
    resolved = yaml.safe_load((run / "config.resolved.yaml").read_text())
    assert resolved["train"]["steps"] == 6 and resolved["parallel"]["zero_stage"] == 2
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [(r["step"], "val_loss" in r) for r in records] == [(3, False), (3, True), (6, False), (6, True)]
    assert records[2]["data_receipt"] == f"{5:08x}" and records[2]["tokens_seen"] == 6 * 2 * 2 * SEQ
    for r in (records[0], records[2]):
        assert 0 < r["goodput"] < 1 and r["goodput_tokens_per_s"] < r["tokens_per_s"]
        # tokens over the wall time from the launch to the record, which lies before the run's end
        assert r["goodput_tokens_per_s"] >= r["tokens_seen"] / (finished - launch_start)
    assert not (run / "tensorboard").exists()
    # Saved every 4 steps and at the end.
    assert sorted(p.name for p in (run / "checkpoints").glob("step_*")) == ["step_00000004", "step_00000006"]

    # A longer run of the same directory resumes at step 6 and the data right after batch 5.
    raw["train"] = {**raw["train"], "steps": 8, "log_every": 2, "eval_every": 0}
    assert run_distributed(_worker_with_fake_data, world_size=2, args=(raw,), init_process_group=False) == [0, 0]
    resumed = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()][len(records):]
    assert [r["step"] for r in resumed] == [8]
    assert resumed[0]["data_receipt"] == f"{7:08x}" and resumed[0]["tokens_seen"] == 8 * 2 * 2 * SEQ


def test_worker_cli_rejects_a_world_size_mismatch(tmp_path, monkeypatch, capsys, tiny_config_dict):
    from fm_train.worker import add_worker_arguments, run_worker_cli

    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(tiny_config_dict))  # cluster.workers = 2
    monkeypatch.setenv("WORLD_SIZE", "3")
    monkeypatch.setenv("RANK", "0")
    args = add_worker_arguments(argparse.ArgumentParser()).parse_args([str(path), "--set", "train.steps=3"])
    assert args.overrides == ["train.steps=3"]
    assert run_worker_cli(args) == 2
    assert "cluster.workers=2 but the launcher started WORLD_SIZE=3" in capsys.readouterr().err


def _worker_real_data(raw: dict[str, Any]) -> int:
    from fm_train.config import build_config
    from fm_train.worker import run_worker

    return run_worker(build_config(raw))


@pytest.mark.multiproc
def test_loss_falls_on_the_default_corpus(tiny_config_dict, tmp_path):
    data_shards = pytest.importorskip("data_shards")
    if not hasattr(data_shards, "make_train_loader"):
        pytest.skip("data_shards has no streaming reader yet")
    raw = {**tiny_config_dict,
           "run": {**tiny_config_dict["run"], "dir": str(tmp_path / "run")},
           "data": {**tiny_config_dict["data"], "num_workers": 0,
                    "sources": [{"path": str(tmp_path / "corpus"), "default_corpus": True}]},
           "train": {**tiny_config_dict["train"], "steps": 120, "micro_batch": 4, "log_every": 10, "eval_every": 60},
           "optim": {"lr": 3e-3, "min_lr": 3e-4, "warmup_steps": 5}, "logging": {"tensorboard": False}}
    assert run_distributed(_worker_real_data, world_size=2, args=(raw,), init_process_group=False) == [0, 0]
    records = [json.loads(line) for line in (Path(raw["run"]["dir"]) / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in records if "loss" in r]
    vals = [r["val_loss"] for r in records if "val_loss" in r]
    # From chance level (ln vocab = 6.24 nats) to at least 1 nat better in 120 steps of 8 x 32 tokens, drawn in
    # the global order (i.i.d. batches: slower to fit than the windowed order's neighbouring samples).
    assert losses[-1] < math.log(VOCAB) - 1.0, losses
    assert losses[-1] < losses[0], losses
    assert vals[-1] < vals[0], vals
    assert all(r["data_receipt"] for r in records if "loss" in r)


@pytest.mark.multiproc
def test_sigterm_finishes_the_step_saves_and_exits_zero(tiny_config_dict, tmp_path):
    raw = {**tiny_config_dict, "run": {**tiny_config_dict["run"], "dir": str(tmp_path / "run")},
           "train": {**tiny_config_dict["train"], "steps": 8, "log_every": 1, "eval_every": 0},
           "checkpoint": {"every": 0, "keep": 2}, "logging": {"tensorboard": False}}
    # Only rank 1 is signalled; both ranks must agree to stop after the same step.
    assert run_distributed(_worker_with_fake_data, world_size=2, args=(raw, 2),
                           init_process_group=False) == [0, 0]
    run = tmp_path / "run"
    assert (run / "checkpoints" / "latest").read_text().strip() == "step_00000003"
    first = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in first] == [1, 2, 3]
    # Run again: resumes at step 3 and reads the batch right after the last one consumed.
    assert run_distributed(_worker_with_fake_data, world_size=2, args=(raw,), init_process_group=False) == [0, 0]
    resumed = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()][len(first):]
    assert [r["step"] for r in resumed] == [4, 5, 6, 7, 8]
    assert resumed[0]["data_receipt"] == f"{3:08x}" and resumed[-1]["data_receipt"] == f"{7:08x}"
