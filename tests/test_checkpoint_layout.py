"""Step directories, the commit marker, ``latest``, retention, compatibility checks, graceful stop."""

from __future__ import annotations

import json
import logging
import os
import signal
from pathlib import Path

import pytest

import test_checkpoint_support as S
from fm_train.checkpoint import (
    CheckpointError,
    apply_retention,
    build_manifest,
    find_resume_point,
    load_checkpoint,
    resolve_checkpoint,
)
from fm_train.checkpoint.layout import read_latest, write_latest
from fm_train.checkpoint.manifest import complete_manifest, write_manifest
from fm_train.config import build_config
from fm_train.engine.signals import StopRequest
from fm_train.dist import Topology

pytestmark = pytest.mark.unit


def _fake_step(ckpt: Path, step: int, *, complete: bool) -> Path:
    """A step dir with one file and, if complete, a valid manifest (what save_checkpoint commits)."""
    cfg = build_config(S.tiny_raw(2, 2))
    d = ckpt / f"step_{step:08d}"
    d.mkdir(parents=True)
    (d / "mp_rank_00_model_states.pt").write_bytes(b"x" * step)
    if complete:
        part = build_manifest(cfg, Topology(world=2), data_state={"i": step}, tokens_seen=step, tokenizer_hash="h")
        write_manifest(d, complete_manifest(part, step=step, tag=d.name, files={"mp_rank_00_model_states.pt": step},
                                            rng_files=[]))
    return d


def test_resume_auto_none_and_explicit(tmp_path: Path, caplog) -> None:
    ckpt = tmp_path / "checkpoints"
    assert find_resume_point(tmp_path, "auto") is None
    s1 = _fake_step(ckpt, 1, complete=True)
    write_latest(ckpt, s1)
    _fake_step(ckpt, 2, complete=False)  # killed mid-save
    with caplog.at_level(logging.WARNING, logger="fm_train.checkpoint"):
        assert find_resume_point(tmp_path, "auto") == s1
    assert "step_00000002" in caplog.text and "incomplete" in caplog.text
    assert find_resume_point(tmp_path, "none") is None
    assert find_resume_point(tmp_path, str(s1)) == s1
    with pytest.raises(CheckpointError, match="step_00000002 has no manifest.json"):
        find_resume_point(tmp_path, str(ckpt / "step_00000002"))
    assert resolve_checkpoint(tmp_path) == s1 and resolve_checkpoint(ckpt) == s1


def test_latest_refuses_an_incomplete_dir(tmp_path: Path) -> None:
    d = _fake_step(tmp_path, 5, complete=False)
    with pytest.raises(CheckpointError, match="no manifest.json"):
        write_latest(tmp_path, d)
    assert read_latest(tmp_path) is None


def test_retention_keeps_newest_and_latest(tmp_path: Path) -> None:
    for s in (1, 2, 3, 4):
        _fake_step(tmp_path, s, complete=True)
    _fake_step(tmp_path, 0, complete=False)   # older incomplete: cleaned
    _fake_step(tmp_path, 9, complete=False)   # newer than every complete one: kept (may be in flight)
    write_latest(tmp_path, tmp_path / "step_00000001")  # e.g. resumed from 1: never deleted
    deleted = {p.name for p in apply_retention(tmp_path, keep=2)}
    assert deleted == {"step_00000000", "step_00000002"}
    left = sorted(p.name for p in tmp_path.iterdir() if p.is_dir())
    assert left == ["step_00000001", "step_00000003", "step_00000004", "step_00000009"]


def test_load_refuses_other_model_shape_or_tokenizer(tmp_path: Path) -> None:
    d = _fake_step(tmp_path, 3, complete=True)
    other = build_config(S.tiny_raw(2, 2, n_layers=3))
    with pytest.raises(CheckpointError, match=r"model.n_layers: checkpoint 2, config 3"):
        load_checkpoint(None, d, config=other)
    with pytest.raises(CheckpointError, match="tokenizer hash: checkpoint h, data zzz"):
        load_checkpoint(None, d, config=build_config(S.tiny_raw(2, 2)), tokenizer_hash="zzz")


def test_manifest_records_versions_and_layers(tmp_path: Path) -> None:
    d = _fake_step(tmp_path, 7, complete=True)
    m = json.loads((d / "manifest.json").read_text())
    assert m["step"] == 7 and m["topology"] == {"world": 2, "dp": 2, "tp": 1, "pp": 1, "ep": 1, "sp": 1, "zero_stage": 2,
                                                "precision": "fp32"}
    assert {"torch", "deepspeed", "transformers", "fm_train", "python"} <= set(m["versions"])
    assert [e["module"] for e in m["layers"]] == ["model.embed_tokens", "model.layers.0", "model.layers.1",
                                                  "model.norm", "lm_head"]
    assert m["config"]["model"]["hidden"] == 64 and m["data"] == {"state": {"i": 7}, "tokenizer_hash": "h"}


def test_stop_request_turns_signals_into_a_flag() -> None:
    before = signal.getsignal(signal.SIGTERM)
    with StopRequest() as stop:
        assert not stop.requested
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop.requested and stop.signal_name == "SIGTERM"
    assert signal.getsignal(signal.SIGTERM) is before


def test_dp_change_is_resharded_only_for_partitioned_state(tmp_path: Path) -> None:
    from fm_train.checkpoint.resume import needs_reshard

    d = _fake_step(tmp_path, 1, complete=True)  # ZeRO-2, dp2
    m = json.loads((d / "manifest.json").read_text())
    assert not needs_reshard(m, 1, 1, 2, dp=2)
    assert needs_reshard(m, 1, 1, 2, dp=1)
    m["topology"]["zero_stage"] = 0  # whole optimizer state in mp_rank_00_model_states.pt
    assert not needs_reshard(m, 1, 1, 0, dp=1)
    # tp, pp or ZeRO-stage changes are resharded too: one path for every layout change.
    m["topology"]["zero_stage"] = 2
    assert needs_reshard(m, 2, 1, 2, dp=1) and needs_reshard(m, 1, 1, 1, dp=2)
    assert not needs_reshard(m, 1, 1, 2) and not needs_reshard(m, 1, 1, None)
