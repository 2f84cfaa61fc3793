"""Faults injected from outside, as an operator or the kernel would: signals to worker processes at
chosen moments, found through the process table (never through a hook in the product).

``launch`` blocks the test's main thread, so every injector runs in a daemon thread that watches the
run directory, acts once, and records what it did and when in a :class:`Fault`.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import psutil

from chaos_runs import last_step, step_dir


@dataclass
class Fault:
    """What an injector did: when (monotonic), at which logged step, and a free-form note."""

    at: float | None = None
    step: int | None = None
    note: str = ""
    done: threading.Event = field(default_factory=threading.Event)
    error: BaseException | None = None


def worker_pids(run_dir: Path) -> dict[int, int]:
    """rank -> pid of the live ``fm_train.cli worker`` processes of this run (their argv names its config)."""
    config = str((run_dir / "config.resolved.yaml").resolve())
    found: dict[int, int] = {}
    for proc in psutil.process_iter(["pid", "cmdline"]):
        cmd = proc.info["cmdline"] or []
        if "worker" not in cmd or config not in cmd:
            continue
        try:
            if proc.status() == psutil.STATUS_ZOMBIE:
                continue
            found[int(proc.environ()["RANK"])] = proc.info["pid"]
        except (psutil.Error, KeyError, ValueError):
            continue
    return found


def wait_for_workers(run_dir: Path, world: int = 2, timeout_s: float = 120) -> dict[int, int]:
    """The pids of all ``world`` ranks, once every one of them runs."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        pids = worker_pids(run_dir)
        if len(pids) == world:
            return pids
        time.sleep(0.05)
    raise TimeoutError(f"the {world} workers of {run_dir} did not all appear within {timeout_s}s")


def _in_thread(target: Callable[[Fault], None]) -> Fault:
    fault = Fault()

    def run() -> None:
        try:
            target(fault)
        except BaseException as exc:  # surfaced by the test through Fault.error
            fault.error = exc
        finally:
            fault.done.set()

    threading.Thread(target=run, daemon=True).start()
    return fault


def wait_step(run_dir: Path, step: int, timeout_s: float = 300) -> int:
    """Block until rank 0 logged ``step`` in RUN/metrics.jsonl; returns the step it logged."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        reached = last_step(run_dir)
        if reached >= step:
            return reached
        time.sleep(0.01)
    raise TimeoutError(f"{run_dir} never logged step {step} within {timeout_s}s")


def signal_at_step(run_dir: Path, step: int, ranks: tuple[int, ...], signum: int, timeout_s: float = 300) -> Fault:
    """Send ``signum`` to the workers of ``ranks`` once rank 0 logged ``step`` (first attempt)."""

    def act(fault: Fault) -> None:
        fault.step = wait_step(run_dir, step, timeout_s)
        pids = wait_for_workers(run_dir)
        for rank in ranks:
            os.kill(pids[rank], signum)
        fault.at = time.monotonic()
        fault.note = f"{signal.Signals(signum).name} to ranks {list(ranks)} at logged step {fault.step}"

    return _in_thread(act)


def kill_during_save(run_dir: Path, after_step: int, rank: int = 0, timeout_s: float = 300) -> Fault:
    """SIGKILL rank ``rank`` while a checkpoint save is in flight (its step dir exists, its manifest not).

    The save of a tiny model takes milliseconds, so the injector freezes both workers (SIGSTOP) the
    moment a new step directory appears, checks that the manifest is still missing, and only then
    kills; if the save won the race it lets the workers go on and waits for the next checkpoint.
    """

    def act(fault: Fault) -> None:
        wait_step(run_dir, after_step, timeout_s)
        pids = wait_for_workers(run_dir)
        ckpts = run_dir / "checkpoints"
        seen = {p.name for p in ckpts.glob("step_*")} if ckpts.is_dir() else set()
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            fresh = [p for p in ckpts.glob("step_*") if p.name not in seen] if ckpts.is_dir() else []
            if not fresh:
                time.sleep(0.001)
                continue
            for pid in pids.values():
                os.kill(pid, signal.SIGSTOP)
            target = fresh[0]
            if (target / "manifest.json").exists():
                seen.add(target.name)  # the save finished before the freeze: try the next one
                for pid in pids.values():
                    os.kill(pid, signal.SIGCONT)
                continue
            os.kill(pids[rank], signal.SIGKILL)
            for pid in pids.values():
                if pid != pids[rank]:
                    os.kill(pid, signal.SIGCONT)
            fault.at = time.monotonic()
            fault.step = int(target.name.split("_")[1])
            fault.note = f"SIGKILL to rank {rank} while saving {target.name} ({len(list(target.rglob('*')))} entries written, no manifest)"
            return
        raise TimeoutError(f"no checkpoint save of {run_dir} could be caught in flight within {timeout_s}s")

    return _in_thread(act)


def corrupt_at_step(run_dir: Path, step: int, damage: Callable[[], str], timeout_s: float = 300) -> Fault:
    """Call ``damage`` (which returns a description) once rank 0 logged ``step``."""

    def act(fault: Fault) -> None:
        fault.step = wait_step(run_dir, step, timeout_s)
        fault.note = damage()
        fault.at = time.monotonic()

    return _in_thread(act)


def time_to_resume(run_dir: Path, fault: Fault, timeout_s: float = 300) -> Fault:
    """Measure from ``fault.at`` to the first metrics record of the next attempt (``.at`` holds seconds).

    The next attempt is recognised by RUN/failures.jsonl gaining a line, then metrics.jsonl growing.
    """
    from chaos_runs import failures, metrics

    before = len(failures(run_dir))  # counted now, before the fault can cause a new line

    def act(result: Fault) -> None:
        if not fault.done.wait(timeout_s) or fault.at is None:
            return
        if wait_until(lambda: len(failures(run_dir)) > before, timeout_s) is None:
            return
        count = len(metrics(run_dir))
        back = wait_until(lambda: len(metrics(run_dir)) > count, timeout_s, interval_s=0.02)
        if back is not None:
            result.at = back - fault.at
            result.step = min(r["step"] for r in metrics(run_dir)[count:] if isinstance(r.get("step"), int))

    return _in_thread(act)


def wait_until(predicate: Callable[[], bool], timeout_s: float = 300, interval_s: float = 0.05) -> float | None:
    """Monotonic time at which ``predicate`` first held, or None after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return time.monotonic()
        time.sleep(interval_s)
    return None


def assert_fault_done(fault: Fault, timeout_s: float = 5) -> None:
    """The injector ran to its end without an error (a scenario whose fault never fired proves nothing)."""
    assert fault.done.wait(timeout_s), "the fault injector never finished"
    if fault.error is not None:
        raise AssertionError(f"the fault injector failed: {fault.error!r}") from fault.error
    assert fault.at is not None, "the fault was never injected"


__all__ = ["Fault", "assert_fault_done", "corrupt_at_step", "kill_during_save", "signal_at_step", "step_dir",
           "time_to_resume", "wait_for_workers", "wait_until", "worker_pids"]
