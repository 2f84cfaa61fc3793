"""Evaluation under ``data.on_bad_shard``: it leaves out what training leaves out, and a shard that
only evaluation reads bad is recorded and left out after the restart, as when training reads it.

Real runs of the worker (tiny model, a few steps) on shards built here, one of them damaged.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sysconfig
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml

from distributed import run_distributed

pytestmark = pytest.mark.multiproc

SEQ = 32
VAL_FRACTION = 0.1


@pytest.fixture(scope="module")
def shards(tmp_path_factory: pytest.TempPathFactory, corpus: Path) -> Path:
    """Several small shards of stdlib text (the session corpus's tokenizer, vocab 512, seq_len 32)."""
    from data_shards import BuildOptions, build_shards
    from data_shards.index import read_index

    root = tmp_path_factory.mktemp("eval-bad-shards")
    text = root / "text.txt"
    text.write_text((Path(sysconfig.get_paths()["stdlib"]) / "json" / "decoder.py").read_text() * 3)
    out = build_shards(BuildOptions(inputs=[str(text)], out=root / "pristine", seq_len=SEQ,
                                    tokenizer_dir=corpus / "tokenizer", shard_size=100_000, workers=0, progress=False))
    assert len(read_index(root / "pristine").shards) >= 4, out
    return root / "pristine"


def _copy(shards: Path, dst: Path) -> Path:
    return Path(shutil.copytree(shards, dst))


def _config(tmp_path: Path, data: Path, workers: int) -> dict[str, Any]:
    return {
        "run": {"name": "eval-skip", "dir": str(tmp_path / "run"), "seed": 5},
        "model": {"n_layers": 1, "hidden": 32, "n_heads": 2, "n_kv_heads": 2, "ffn_hidden": 64,
                  "vocab_size": 512, "max_seq_len": SEQ, "tie_embeddings": True},
        "parallel": {"tp": 1, "pp": 1, "zero_stage": 1},
        "precision": "fp32",
        "data": {"sources": [{"path": str(data), "weight": 1.0}], "seq_len": SEQ, "num_workers": 0,
                 "on_bad_shard": "skip", "val_fraction": VAL_FRACTION},
        # eval_batches past the split's size: every validation sample is read at each evaluation.
        "train": {"steps": 4, "micro_batch": 2, "grad_accum": 1, "eval_every": 2, "eval_batches": 10_000,
                  "log_every": 1},
        "optim": {"lr": 1e-3, "min_lr": 1e-4, "warmup_steps": 1},
        "checkpoint": {"every": 0},
        "logging": {"tensorboard": False},
        "cluster": {"workers": workers},
    }


def _val_losses(run: Path) -> list[tuple[int, float]]:
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["val_loss"]) for r in records if "val_loss" in r]


def _worker_cli(config_path: str) -> int:
    """One rank through ``fm-train worker``'s entry, which maps RestartNeeded to its exit code."""
    from fm_train.worker import add_worker_arguments, run_worker_cli

    return run_worker_cli(add_worker_arguments(argparse.ArgumentParser()).parse_args([config_path]))


def test_evaluation_leaves_out_a_shard_truncated_before_the_start(shards: Path, tmp_path: Path) -> None:
    from data_shards.index import read_index

    data = _copy(shards, tmp_path / "data")
    shard = data / read_index(data).shards[1].name
    shard.write_bytes(shard.read_bytes()[:5000])  # the start-up check sees the short file
    raw = _config(tmp_path, data, workers=2)
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(raw))
    # Before the fix the validation loader (policy "fail") stopped the run at the first evaluation.
    assert run_distributed(_worker_cli, world_size=2, args=(str(path),), init_process_group=False) == [0, 0]
    vals = _val_losses(Path(raw["run"]["dir"]))
    assert [step for step, _ in vals] == [2, 4] and all(math.isfinite(v) for _, v in vals), vals
    assert not (Path(raw["run"]["dir"]) / "bad_shards").exists()  # found at start-up: nothing to record


def test_a_shard_found_bad_first_by_evaluation_is_recorded_and_left_out(shards: Path, tmp_path: Path) -> None:
    from data_shards.index import read_index
    from data_shards.order import val_counts
    from fm_train.worker import RESTART_EXIT_CODE

    data = _copy(shards, tmp_path / "data")
    index = read_index(data)
    entry = index.shards[2]
    held = int(val_counts(np.array([e.samples for e in index.shards]), VAL_FRACTION)[2])
    assert held >= 3, held
    with open(data / entry.name, "r+b") as fh:
        # The tar headers of the shard's validation tail, all but the last one (which the start-up check
        # reads): training never reads these samples, only evaluation does.
        for local in range(entry.samples - held, entry.samples - 1):
            fh.seek(local * index.stride_bytes)
            fh.write(b"\xff" * 100)
    raw = _config(tmp_path, data, workers=1)
    # Without it training's first read of the shard finds the damage by its sha256 (the default): the
    # per-sample check is what leaves these samples to evaluation alone.
    raw["data"]["verify_sha256"] = False
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(raw))
    run = Path(raw["run"]["dir"])

    assert run_distributed(_worker_cli, world_size=1, args=(str(path),), init_process_group=False) == [RESTART_EXIT_CODE]
    [recorded] = (run / "bad_shards").glob("*.json")
    record = json.loads(recorded.read_text())
    assert record["key"] == f"0:{entry.name}" and "corrupted at sample" in record["message"], record
    assert _val_losses(run) == []  # the first evaluation found it

    # The restart leaves the recorded shard out of evaluation too (before the fix it read it again).
    assert run_distributed(_worker_cli, world_size=1, args=(str(path),), init_process_group=False) == [0]
    vals = _val_losses(run)
    assert [step for step, _ in vals] == [2, 4] and all(math.isfinite(v) for _, v in vals), vals
