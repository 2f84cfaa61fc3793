"""Weights & Biases through the real worker, in W&B's offline mode (no network): the run's name, project and
tags, every training record logged at its step with the values of ``metrics.jsonl``, and a resumed run
continuing the same W&B run. The check reads the ``.wandb`` file W&B wrote (a LevelDB-style log of
protobuf records, parsed here with W&B's own message classes)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from distributed import run_distributed
from test_engine_worker import _worker_with_fake_data

pytestmark = pytest.mark.multiproc


def wandb_records(path: Path) -> list[Any]:
    """The protobuf records of a ``run-<id>.wandb`` file: a 7-byte header, then 32 KiB blocks of chunks
    (4-byte CRC, 2-byte length, 1-byte type: full, first, middle, last)."""
    from wandb.proto import wandb_internal_pb2

    data, block, pos = path.read_bytes(), 32768, 7
    assert data[:4] == b":W&B", data[:8]
    chunks, partial = [], b""
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        length, kind = int.from_bytes(data[pos + 4:pos + 6], "little"), data[pos + 6]
        chunk, pos = data[pos + 7:pos + 7 + length], pos + 7 + length
        if kind == 1:
            chunks.append(chunk)
        elif kind == 2:
            partial = chunk
        elif kind == 3:
            partial += chunk
        elif kind == 4:
            chunks.append(partial + chunk)
    records = []
    for chunk in chunks:
        record = wandb_internal_pb2.Record()
        record.ParseFromString(chunk)
        records.append(record)
    return records


def logged(run_file: Path) -> tuple[Any, dict[int, dict[str, float]]]:
    """``(the run record, {step: {key: value}})`` of one offline W&B run."""
    records = wandb_records(run_file)
    run = next(r.run for r in records if r.WhichOneof("record_type") == "run")
    history: dict[int, dict[str, float]] = {}
    for r in records:
        if r.WhichOneof("record_type") == "history":
            row = {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in r.history.item}
            history.setdefault(int(row.pop("_step")), {}).update(row)
    return run, history


def test_wandb_offline_logs_every_record_and_a_resume_continues_the_same_run(tiny_config_dict: dict[str, Any],
                                                                              tmp_path: Path, monkeypatch) -> None:
    pytest.importorskip("wandb", reason="the wandb extra (pip install 'fm-train[wandb]'); the test extra has it")
    for var, value in {"WANDB_SILENT": "true", "WANDB_CONFIG_DIR": tmp_path / "wandb-config",
                       "WANDB_CACHE_DIR": tmp_path / "wandb-cache", "WANDB_DATA_DIR": tmp_path / "wandb-data"}.items():
        monkeypatch.setenv(var, str(value))
    run_dir = tmp_path / "run"
    raw = {**tiny_config_dict, "run": {**tiny_config_dict["run"], "name": "wb-tiny", "dir": str(run_dir)},
           "train": {**tiny_config_dict["train"], "steps": 4, "log_every": 1, "eval_every": 0},
           "checkpoint": {"every": 2, "keep": 2},
           "logging": {"tensorboard": False, "wandb": True, "wandb_mode": "offline", "wandb_project": "fm-test",
                       "wandb_tags": ["tiny", "ci"]}}
    assert run_distributed(_worker_with_fake_data, world_size=2, args=(raw,), init_process_group=False) == [0, 0]
    [first] = sorted((run_dir / "wandb").glob("offline-run-*"))
    [run_file] = first.glob("run-*.wandb")
    run, history = logged(run_file)
    assert (run.project, run.display_name, list(run.tags)) == ("fm-test", "wb-tiny", ["tiny", "ci"])
    jsonl = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert sorted(history) == [1, 2, 3, 4] == [r["step"] for r in jsonl]
    for r in jsonl:
        assert history[r["step"]]["train/loss"] == pytest.approx(r["loss"], rel=1e-12)
        assert history[r["step"]]["train/tokens_seen"] == r["tokens_seen"]

    # The same run directory trained further resumes from step 4 and continues the same W&B run.
    raw["train"] = {**raw["train"], "steps": 6}
    assert run_distributed(_worker_with_fake_data, world_size=2, args=(raw,), init_process_group=False) == [0, 0]
    later = [d for d in sorted((run_dir / "wandb").glob("offline-run-*")) if d != first]
    assert len(later) == 1 and later[0].name.endswith(run.run_id)
    again, more = logged(next(later[0].glob("run-*.wandb")))
    assert again.run_id == run.run_id and sorted(more) == [5, 6]


def test_wandb_without_the_package_is_a_config_error_naming_the_extra(tiny_config_dict: dict[str, Any],
                                                                      monkeypatch) -> None:
    import importlib.util

    from fm_train.config import ConfigError, build_config

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    raw = {**tiny_config_dict, "logging": {"wandb": True}}
    with pytest.raises(ConfigError, match=r"logging\.wandb=true, but the wandb package is not installed: pip install"
                                          r" 'fm-train\[wandb\]'"):
        build_config(raw, require_paths=True)
    assert build_config(raw).logging.wandb  # plan (no path checks) on a machine without it still works
