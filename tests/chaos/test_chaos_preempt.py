"""Preemption: SIGTERM to every worker (what a spot reclaim or a Kubernetes eviction sends).

The launcher is given no preemption budget, so it gives up at once, as a driver that is itself
preempted would; ``fm-train launch`` run again must then continue exactly where the run stood.
"""

from __future__ import annotations

import signal
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest

from chaos_faults import Fault, assert_fault_done, signal_at_step
from chaos_runs import (
    RunResult,
    assert_same_training,
    failures,
    figure,
    last_step,
    latest_step,
    run_launch,
    tiny_config,
    write_config,
)

pytestmark = [pytest.mark.ray, pytest.mark.e2e, pytest.mark.slow, pytest.mark.timeout(600)]

TERM_STEP = 9


@dataclass
class Preempted:
    """The two launches of one preempted run and what the first one left behind."""

    run: Path
    first: RunResult
    second: RunResult
    fault: Fault
    reached: int
    """Last step rank 0 logged before the workers stopped."""
    latest_after_first: int | None
    """The step ``checkpoints/latest`` named when the first launch returned."""
    first_failures: list[dict]


@pytest.fixture(scope="module")
def preempted(tmp_path_factory: pytest.TempPathFactory, corpus: Path) -> Preempted:
    """SIGTERM both workers at step >= 9 of a run that checkpoints only at its end, then launch again."""
    root = tmp_path_factory.mktemp("chaos-preempt")
    run = root / "run"
    # checkpoint.every=0: the only checkpoint before the end can be the one the SIGTERM asks for.
    config = write_config(root / "config.yaml", tiny_config(run, corpus, seed=11, every=0))
    fault = signal_at_step(run, TERM_STEP, (0, 1), signal.SIGTERM)
    first = run_launch(config, run, max_preemptions=0)
    assert_fault_done(fault)
    reached, latest, records = last_step(run), latest_step(run), failures(run)
    second = run_launch(config, run)
    return Preempted(run=run, first=first, second=second, fault=fault, reached=reached,
                     latest_after_first=latest, first_failures=records)


def test_launching_again_after_preemption_continues_exactly(preempted: Preempted,
                                                            reference: Callable[[int], RunResult]) -> None:
    p = preempted
    assert p.first.code == 1, "with max_preemptions=0 the first launch must give up after the preemption"
    [record] = p.first_failures
    assert record["kind"] == "preempted" and record["last_step"] >= TERM_STEP
    assert p.second.code == 0, f"the relaunch did not finish; see {p.run / 'logs'}"
    assert_same_training(p.run, reference(11).run_dir)
    figure(f"sigterm to all workers at logged step {p.fault.step}: first launch ended in {p.first.seconds:.0f}s,"
           f" checkpoints/latest then named step {p.latest_after_first}; relaunch {p.second.seconds:.0f}s;"
           " losses after resume and final weights identical")


def test_sigterm_makes_the_workers_save_and_exit_0(preempted: Preempted) -> None:
    p = preempted
    assert p.latest_after_first is not None and p.latest_after_first >= p.fault.step, (
        f"SIGTERM at step {p.fault.step} left checkpoints/latest at {p.latest_after_first}: the work since the last"
        " checkpoint is lost")
    assert p.latest_after_first == p.reached
    [record] = p.first_failures
    assert "exited 0" in record["cause"], record["cause"]
