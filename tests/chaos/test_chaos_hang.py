"""A worker that hangs (SIGSTOP: a stuck NFS read, a debugger, a wedged driver): the launcher sees
the silence within ``cluster.step_timeout_s``, names the rank and its node in RUN/failures.jsonl,
restarts the group and the run ends identical to an uninterrupted one."""

from __future__ import annotations

import json
import signal
import threading
from pathlib import Path
from typing import Callable

import pytest

from chaos_faults import assert_fault_done, signal_at_step, time_to_resume, wait_until
from chaos_runs import RunResult, assert_same_training, failures, figure, run_launch, tiny_config, write_config

pytestmark = [pytest.mark.ray, pytest.mark.e2e, pytest.mark.slow, pytest.mark.timeout(600)]

# Long enough that a worker's silent start (imports, DeepSpeed's op load) under a loaded CI machine is
# not taken for a hang; short enough to keep the test around a minute and a half.
STEP_TIMEOUT_S = 20


def test_stopped_worker_is_detected_reported_and_restarted(tmp_path: Path, corpus: Path,
                                                           reference: Callable[[int], RunResult]) -> None:
    run = tmp_path / "run"
    config = write_config(tmp_path / "config.yaml",
                          tiny_config(run, corpus, seed=11, step_timeout_s=STEP_TIMEOUT_S))
    fault = signal_at_step(run, 9, (1,), signal.SIGSTOP)
    detected: list[float] = []
    watcher = time_to_resume(run, fault)

    def note_detection() -> None:
        at = wait_until(lambda: bool(failures(run)), timeout_s=300)
        if at is not None:
            detected.append(at)

    threading.Thread(target=note_detection, daemon=True).start()
    result = run_launch(config, run)
    assert_fault_done(fault)
    assert result.code == 0, f"the run did not finish after the hang; see {run / 'logs'}"
    [record] = failures(run)
    placement = json.loads((run / "placement.json").read_text())
    assert record["kind"] == "hung" and record["rank"] == 1 and record["states"]["1"] == "stopped"
    assert (record["node_ip"], record["node_id"]) == (placement["ranks"][1]["node_ip"], placement["ranks"][1]["node_id"])
    assert STEP_TIMEOUT_S <= record["silent_s"] < STEP_TIMEOUT_S + 5
    assert detected and detected[0] - fault.at < STEP_TIMEOUT_S + 15, "hang not reported within the timeout"
    assert_same_training(run, reference(11).run_dir)
    watcher.done.wait(5)
    figure(f"sigstop rank 1 at logged step {fault.step}: reported as hung {detected[0] - fault.at:.0f}s later"
           f" (cluster.step_timeout_s={STEP_TIMEOUT_S}), first step of the new attempt"
           f" {watcher.at or float('nan'):.0f}s after the stop; final state identical")
