"""Watch one attempt until it ends and say how: succeeded, failed, hung, preempted or stopped.

The driver polls every actor; each poll brings new log lines, metrics records, the exit code, the
process state and the rank's own heartbeat (:mod:`fm_train.dist.heartbeat`: the last step it
finished). Two rules find a hang:

* per rank: a rank whose heartbeat has not moved for ``cluster.step_timeout_s`` is hung, however
  much any rank prints (a chatty rank must not hide a stuck one); before a rank's first beat the
  limit is ``cluster.startup_timeout_s``, and while its heartbeat says ``save`` (a checkpoint being
  written, committed or uploaded) it is ``cluster.save_timeout_s``. The rule applies once any rank of
  the attempt has beaten, so worker commands that do not write heartbeats are judged by the next rule alone;
* for the group: no log line or metrics record from any rank for ``cluster.step_timeout_s``
  (``cluster.save_timeout_s`` while a rank is saving).

Until the first metrics record arrives the group limit is ``cluster.startup_timeout_s`` instead:
loading a large model or checkpoint, or building an op, may be silent for longer than any step.
"""

from __future__ import annotations

import signal
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import ray

from launcher.group import WorkerGroup
from launcher.logsink import LogSink
from launcher.outcomes import Failed, Hung, Outcome, Preempted, Stopped, Succeeded, cause_rank
from launcher.progress import Progress

#: The heartbeat phase a worker records while it saves a checkpoint (fm_train.engine.checkpointing).
SAVE_PHASE = "save"

_SIGTERM_CODES = (-signal.SIGTERM, 128 + signal.SIGTERM)


@dataclass
class StopRequest:
    """Set by the driver's signal handler; read by the monitor loop."""

    signal_name: str | None = None
    count: int = 0


@dataclass
class AttemptWatch:
    """Everything the monitor needs for one attempt."""

    group: WorkerGroup
    sink: LogSink
    progress: Progress
    step_timeout_s: float
    startup_timeout_s: float
    total_steps: int
    poll_interval_s: float
    stop_grace_s: float
    failure_grace_s: float
    stop: StopRequest
    say: Callable[[str], None]
    exit_codes: dict[int, int] = field(default_factory=dict)
    states: dict[int, str] = field(default_factory=dict)
    last_output: dict[int, float] = field(default_factory=dict)
    beats: dict[int, tuple[tuple[int, str] | None, float]] = field(default_factory=dict)
    """rank -> (last heartbeat (step, phase) or None, seconds since it last changed)."""
    trained: bool = False  # a metrics record arrived: the start-up is over
    save_timeout_s: float = 3600.0

    def silence_limit(self) -> tuple[float, str]:
        """The silence that counts as a hang now, and the setting that sets it."""
        saving = any(b is not None and b[1] == SAVE_PHASE for r, (b, _) in self.beats.items() if r not in self.exit_codes)
        if saving and self.save_timeout_s > self.step_timeout_s:
            return self.save_timeout_s, f"cluster.save_timeout_s={self.save_timeout_s:g}, while a rank saves"
        if self.trained:
            return self.step_timeout_s, f"cluster.step_timeout_s={self.step_timeout_s:g}"
        limit = max(self.startup_timeout_s, self.step_timeout_s)
        return limit, f"cluster.startup_timeout_s={limit:g}, before the first metrics record"


def describe_exit(code: int) -> str:
    """``exited with code 3`` or ``killed by SIGKILL``."""
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exited with code {code}"


def _short(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"


def run_attempt(w: AttemptWatch) -> Outcome:
    """Poll until the attempt ends; stop the survivors of a failure; return the typed outcome."""
    start = time.monotonic()
    last_progress = start
    w.last_output = {r: start for r in range(len(w.group.actors))}
    pending: dict[Any, int] = {a.poll.remote(): r for r, a in enumerate(w.group.actors)}
    while True:
        round_start = time.monotonic()
        ready, _ = ray.wait(list(pending), num_returns=len(pending), timeout=w.poll_interval_s) if pending else ([], [])
        again: list[int] = []
        for ref in ready:
            rank = pending.pop(ref)
            try:
                result = ray.get(ref)
            except ray.exceptions.RayError as exc:
                # The actor or its node died: there is no exit code, only Ray's account of it.
                return _fail(w, rank, None, f"worker actor died ({_short(exc)}); node lost or actor killed")
            if _absorb(w, rank, result):
                last_progress = time.monotonic()
            if result["exit_code"] is None:
                again.append(rank)
            else:
                w.exit_codes[rank] = result["exit_code"]
        if w.stop.signal_name is not None:
            return _stopped(w)
        bad = sorted(r for r, c in w.exit_codes.items() if c != 0 and c not in _SIGTERM_CODES)
        if bad:
            rank = bad[0]
            return _fail(w, rank, w.exit_codes[rank], describe_exit(w.exit_codes[rank]))
        if len(w.exit_codes) == len(w.group.actors):
            return _all_exited(w)
        now = time.monotonic()
        stalled = stalled_rank(w.beats, set(w.exit_codes), step_timeout_s=w.step_timeout_s,
                               startup_timeout_s=max(w.startup_timeout_s, w.step_timeout_s), states=w.states,
                               quiet_s={r: now - t for r, t in w.last_output.items()}, save_timeout_s=w.save_timeout_s)
        if stalled is not None:
            return _rank_hung(w, *stalled)
        silent = time.monotonic() - last_progress
        if silent > w.silence_limit()[0]:
            return _hung(w, silent)
        # Polls answer at once; pace the rounds so the driver does not spin.
        time.sleep(max(0.0, w.poll_interval_s - (time.monotonic() - round_start)))
        pending.update({w.group.actors[r].poll.remote(): r for r in again})


def _absorb(w: AttemptWatch, rank: int, result: dict) -> bool:
    """Route one poll result to the logs and the progress line; True when it carried a heartbeat."""
    now = time.monotonic()
    for stream, line in result["lines"]:
        w.sink.write(rank, stream, line)
    if result["dropped"]:
        w.sink.note(rank, f"{result['dropped']} lines were dropped (the driver polled too late)")
    for line in w.progress.update(result["metrics"]):
        w.say(line)
    w.states[rank] = result["state"]
    if "heartbeat" in result:
        beat = result["heartbeat"]
        w.beats[rank] = (tuple(beat) if beat is not None else None, float(result["heartbeat_age_s"]))
    w.trained = w.trained or bool(result["metrics"])
    alive = bool(result["lines"] or result["metrics"])
    if alive:
        w.last_output[rank] = now
    return alive


def _drain(w: AttemptWatch) -> None:
    """Collect the output the workers wrote while being stopped (the last lines matter most)."""
    refs = {a.poll.remote(): r for r, a in enumerate(w.group.actors)}
    ready, _ = ray.wait(list(refs), num_returns=len(refs), timeout=10)
    for ref in ready:
        try:
            _absorb(w, refs[ref], ray.get(ref))
        except ray.exceptions.RayError:
            pass


def _node(w: AttemptWatch, rank: int) -> tuple[str, str]:
    r = w.group.placement.by_rank(rank)
    return r.node_ip, r.node_id


def _fail(w: AttemptWatch, rank: int, code: int | None, cause: str) -> Failed:
    w.say(f"rank {rank} {cause}; stopping the other workers")
    # Read who had ended before anything is sent: a rank killed from outside (SIGKILL, the OOM killer)
    # must not be mistaken for one the launcher's own stop killed.
    own = {**w.group.exited(), **w.exit_codes}
    stopped = {r: c for r, c in enumerate(w.group.stop_all(w.failure_grace_s)) if c is not None}
    _drain(w)
    culprit = cause_rank(own, stopped, rank, stopped=_SIGTERM_CODES)
    if culprit != rank:  # the first rank only lost a peer; this one failed by itself
        rank, code = culprit, {**stopped, **own}[culprit]
        cause = describe_exit(code)
    ip, nid = _node(w, rank)
    return Failed(rank=rank, node_ip=ip, node_id=nid, exit_code=code, cause=cause, last_lines=w.sink.last_lines(rank))


def _hung(w: AttemptWatch, silent: float) -> Hung:
    # A stopped process (SIGSTOP, a debugger) is the prime suspect; otherwise whoever went quiet first.
    stopped = [r for r, s in sorted(w.states.items()) if s == "stopped" and r not in w.exit_codes]
    running = [r for r in range(len(w.group.actors)) if r not in w.exit_codes]
    suspect = stopped[0] if stopped else min(running or [0], key=lambda r: (w.last_output.get(r, 0.0), r))
    states = dict(sorted(w.states.items()))
    quiet = time.monotonic() - w.last_output.get(suspect, 0.0)
    cause = f"process state {states.get(suspect, 'unknown')}, last output {quiet:.0f}s ago"
    w.say(f"no log or metrics line from any rank for {silent:.0f}s ({w.silence_limit()[1]});"
          f" suspect rank {suspect}: {cause}; stopping the workers")
    last = w.sink.last_lines(suspect)
    w.group.stop_all(w.failure_grace_s)
    _drain(w)
    ip, nid = _node(w, suspect)
    return Hung(rank=suspect, node_ip=ip, node_id=nid, silent_s=silent, cause=cause, last_lines=last, states=states)


def stalled_rank(beats: dict[int, tuple[tuple[int, str] | None, float]], exited: set[int], *,
                 step_timeout_s: float, startup_timeout_s: float, states: dict[int, str] | None = None,
                 quiet_s: dict[int, float] | None = None,
                 save_timeout_s: float | None = None) -> tuple[int, str] | None:
    """``(rank, why)`` of the rank whose heartbeat stopped moving for longer than its limit, or None.

    Pure (unit-tested). In a collective hang every rank stalls; the suspect is a stopped process
    (SIGSTOP, a debugger) if any, else the rank furthest behind (lowest step), else the one whose
    output went quiet first (``quiet_s``: seconds since its last line), else the longest still.
    No rank has beaten yet: None (the group rule decides). A rank whose heartbeat says ``save`` is
    judged by ``save_timeout_s`` (None: the step's limit).
    """
    running = {r: b for r, b in beats.items() if r not in exited}
    if not any(beat is not None for beat, _ in running.values()):
        return None
    stalled = []
    for rank, (beat, age) in running.items():
        if beat is None:
            limit, name = startup_timeout_s, "cluster.startup_timeout_s"
        elif beat[1] == SAVE_PHASE and save_timeout_s is not None:
            limit, name = save_timeout_s, "cluster.save_timeout_s"
        else:
            limit, name = step_timeout_s, "cluster.step_timeout_s"
        if age > limit:
            stopped = (states or {}).get(rank) == "stopped"
            quiet = (quiet_s or {}).get(rank, 0.0)
            stalled.append((not stopped, beat[0] if beat is not None else -1, -quiet, -age, rank, beat, age, name, limit))
    if not stalled:
        return None
    *_, rank, beat, age, name, limit = min(stalled)
    where = f"after step {beat[0]} ({beat[1]})" if beat is not None else "before its first step"
    return rank, f"its heartbeat has not moved for {age:.0f}s {where} ({name}={limit:g})"


def _rank_hung(w: AttemptWatch, rank: int, why: str) -> Hung:
    others = ", ".join(f"rank {r} at step {b[0]}" for r, (b, _) in sorted(w.beats.items()) if b is not None and r != rank)
    cause = f"{why}; process state {w.states.get(rank, 'unknown')}" + (f"; {others}" if others else "")
    w.say(f"rank {rank} is stuck: {cause}; stopping the workers")
    last, states = w.sink.last_lines(rank), dict(sorted(w.states.items()))  # before stopping changes them
    silent = w.beats.get(rank, (None, 0.0))[1]
    w.group.stop_all(w.failure_grace_s)
    _drain(w)
    ip, nid = _node(w, rank)
    return Hung(rank=rank, node_ip=ip, node_id=nid, silent_s=silent, cause=cause, last_lines=last, states=states)


def _stopped(w: AttemptWatch) -> Stopped:
    name = w.stop.signal_name or "signal"
    w.say(f"{name} received: asking the workers to save and stop (SIGKILL in {w.stop_grace_s:.0f}s; press Ctrl-C again to kill now)")
    w.group.stop_all(w.stop_grace_s)
    _drain(w)
    return Stopped(signal_name=name, last_step=_reached(w))


def _reached(w: AttemptWatch) -> int | None:
    try:
        state = ray.get(w.group.actors[0].run_state.remote(), timeout=30)
    except (ray.exceptions.RayError, ray.exceptions.GetTimeoutError):
        return w.progress.last_step
    steps = [s for s in (state["latest_step"], state["metrics_step"], w.progress.last_step) if s is not None]
    return max(steps) if steps else None


def _all_exited(w: AttemptWatch) -> Outcome:
    reached = _reached(w)
    signalled = sorted(r for r, c in w.exit_codes.items() if c in _SIGTERM_CODES)
    if signalled:
        return Preempted(ranks=tuple(signalled), last_step=reached,
                         cause="workers were killed by a SIGTERM the launcher did not send")
    if reached is not None and reached >= w.total_steps:
        return Succeeded(final_step=reached)
    return Preempted(ranks=tuple(sorted(w.exit_codes)), last_step=reached,
                     cause=f"all workers exited 0 before train.steps={w.total_steps} (stopped by the cluster?)")
