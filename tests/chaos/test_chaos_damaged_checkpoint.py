"""A relaunch over damaged checkpoints, through ``fm-train launch``'s code path: a flipped byte in the
newest checkpoint makes the run resume from the previous one (loudly: rank 0's line, a
``checkpoint_fallback`` record in RUN/failures.jsonl) and end exactly like the uninterrupted run; when
every checkpoint is damaged the launch fails with the worker's exit 2 instead of training from scratch.

Each scenario damages a private copy of the session's reference run (24 steps, checkpoints 12, 18, 24).
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Callable

import pytest

from chaos_runs import (
    STEPS,
    RunResult,
    assert_same_training,
    failures,
    figure,
    metrics,
    rank_log,
    run_launch,
    step_dir,
    tiny_config,
    write_config,
)

pytestmark = [pytest.mark.ray, pytest.mark.e2e, pytest.mark.timeout(600)]


def _flip_byte(path: Path) -> str:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    return path.name


def _copy_reference(reference: Callable[[int], RunResult], tmp_path: Path, corpus: Path) -> tuple[Path, Path]:
    run = tmp_path / "run"
    shutil.copytree(reference(11).run_dir, run)
    return run, write_config(tmp_path / "config.yaml", tiny_config(run, corpus, seed=11))


def test_a_damaged_newest_checkpoint_resumes_from_the_previous_one(tmp_path: Path, corpus: Path,
                                                                    reference: Callable[[int], RunResult]) -> None:
    run, config = _copy_reference(reference, tmp_path, corpus)
    damaged = _flip_byte(step_dir(run, STEPS) / "zero_pp_rank_1_mp_rank_00_optim_states.pt")
    result = run_launch(config, run)
    assert result.code == 0, f"the relaunch failed; see {run / 'logs'}"
    [record] = failures(run)
    assert record["kind"] == "checkpoint_fallback" and record["chosen"].endswith("step_00000018"), record
    assert f"{damaged} (sha256 differs" in record["summary"]
    log = rank_log(run, 0)
    assert "fm-train: resuming from" in log and "resumed from" in log and "step_00000018" in log
    assert (run / "checkpoints" / f"step_{STEPS:08d}.damaged").is_dir()
    assert_same_training(run, reference(11).run_dir)  # steps 19..24 again, bit-identical; a fresh step 24 saved
    figure(f"damaged newest checkpoint: resumed from step 18 and finished identical in {result.seconds:.0f}s")


def test_only_damaged_checkpoints_fail_the_launch_instead_of_a_fresh_start(
        tmp_path: Path, corpus: Path, reference: Callable[[int], RunResult]) -> None:
    run, config = _copy_reference(reference, tmp_path, corpus)
    for step in (12, 18, 24):
        _flip_byte(step_dir(run, step) / "mp_rank_00_model_states.pt")
    before = len(metrics(run))
    result = run_launch(config, run)
    assert result.code != 0
    [record] = failures(run)
    assert record["kind"] == "failed" and record["exit_code"] == 2, record  # an input error: not retried
    log = rank_log(run, 0)
    assert "none is intact" in log and "checkpoint.allow_fresh_start=true" in log
    assert len(metrics(run)) == before, "it trained from scratch over the run"
    assert all(step_dir(run, s).is_dir() for s in (12, 18, 24))  # refused: nothing moved
