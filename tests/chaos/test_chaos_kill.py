"""SIGKILL of a worker, between checkpoints and in the middle of a save: the launcher restarts the
group, the workers resume from the last complete checkpoint, and the run ends exactly where an
uninterrupted run ends (same losses, data receipt and fp32 weights, bit for bit)."""

from __future__ import annotations

import signal
from pathlib import Path
from typing import Callable

import pytest

from chaos_faults import assert_fault_done, kill_during_save, signal_at_step, time_to_resume
from chaos_runs import (
    EVERY,
    RunResult,
    assert_same_training,
    failures,
    figure,
    rank_log,
    run_launch,
    step_dir,
    tiny_config,
    write_config,
)

pytestmark = [pytest.mark.ray, pytest.mark.e2e, pytest.mark.timeout(600)]


def _kill_and_compare(tmp_path: Path, corpus: Path, reference: Callable[[int], RunResult], *, seed: int,
                      kill_step: int, rank: int) -> None:
    run = tmp_path / "run"
    config = write_config(tmp_path / "config.yaml", tiny_config(run, corpus, seed=seed))
    fault = signal_at_step(run, kill_step, (rank,), signal.SIGKILL)
    resume = time_to_resume(run, fault)
    result = run_launch(config, run)
    assert_fault_done(fault)
    assert result.code == 0, f"the run did not finish after the kill; see {run / 'logs'}"
    [record] = failures(run)
    assert record["kind"] == "failed" and record["rank"] == rank and record["exit_code"] == -signal.SIGKILL
    assert "killed by SIGKILL" in record["cause"] and record["node_ip"]
    attempt2 = rank_log(run, 0).split("===== attempt 2")[1]
    if fault.step > EVERY:  # a checkpoint was complete before the kill: the restart resumes from it
        assert "resumed from" in attempt2
    elif fault.step < EVERY:  # killed before the first save: a fresh start is right
        assert "resumed from" not in attempt2
    assert_same_training(run, reference(seed).run_dir)
    resume.done.wait(5)
    figure(f"sigkill rank {rank} seed {seed}: killed at logged step {fault.step}; first step of the new attempt"
           f" (step {resume.step}) {resume.at or float('nan'):.0f}s after the kill; run {result.seconds:.0f}s"
           f" (reference {reference(seed).seconds:.0f}s); final weights, losses and receipt identical")


def test_sigkill_of_a_worker_restarts_and_ends_identical(tmp_path: Path, corpus: Path,
                                                         reference: Callable[[int], RunResult]) -> None:
    _kill_and_compare(tmp_path, corpus, reference, seed=11, kill_step=9, rank=1)


@pytest.mark.slow
@pytest.mark.parametrize(("seed", "kill_step", "rank"), [(11, 15, 0), (23, 4, 1)])
def test_sigkill_at_other_steps_and_seeds(tmp_path: Path, corpus: Path, reference: Callable[[int], RunResult],
                                          seed: int, kill_step: int, rank: int) -> None:
    _kill_and_compare(tmp_path, corpus, reference, seed=seed, kill_step=kill_step, rank=rank)


@pytest.mark.slow
def test_sigkill_during_a_checkpoint_save(tmp_path: Path, corpus: Path, reference: Callable[[int], RunResult]) -> None:
    run = tmp_path / "run"
    config = write_config(tmp_path / "config.yaml", tiny_config(run, corpus, seed=11))
    fault = kill_during_save(run, after_step=1, rank=0)
    resume = time_to_resume(run, fault)
    result = run_launch(config, run)
    assert_fault_done(fault)
    assert result.code == 0, f"the run did not finish after the kill; see {run / 'logs'}"
    killed = step_dir(run, fault.step).name
    [record] = failures(run)
    assert record["kind"] == "failed" and record["rank"] == 0 and record["exit_code"] == -signal.SIGKILL
    attempt2 = rank_log(run, 0).split("===== attempt 2")[1]
    # The partial directory never counts as a checkpoint: the surviving rank, whose save fails when its
    # peer dies, removes it and says so; or the restart finds it, reports it and ignores it.
    removed = f"saving {killed} in {run / 'checkpoints'} failed" in rank_log(run, 1).split("===== attempt 2")[0]
    assert removed or ("ignoring incomplete checkpoint" in attempt2 and killed in attempt2)
    assert f"resumed from {step_dir(run, fault.step)}" not in attempt2
    previous = f"step_{fault.step - 6:08d}" if fault.step > 6 else None
    if previous:
        assert f"resumed from {run / 'checkpoints' / previous}" in attempt2
    else:
        assert "resumed from" not in attempt2  # the first save was killed: a fresh start is right
    # Saving that step again replaced the leftover (a complete dir now, or pruned by retention).
    assert not step_dir(run, fault.step).exists() or (step_dir(run, fault.step) / "manifest.json").is_file()
    assert_same_training(run, reference(11).run_dir)
    resume.done.wait(5)
    figure(f"sigkill during save of {killed}: {fault.note}; partial dir"
           f" {'removed by the surviving rank' if removed else 'ignored and reported at restart'}; first step of the new attempt {resume.at or float('nan'):.0f}s"
           f" after the kill, resumed from {previous or 'scratch'}; run {result.seconds:.0f}s; final state identical")
