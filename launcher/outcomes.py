"""Typed outcomes of one attempt (and of a whole run): what happened, to which rank, on which node.

Each outcome knows whether it may be retried and under which budget: failures and hangs spend
``cluster.max_restarts``; preemptions spend a separate budget because the workers did nothing wrong.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import ClassVar, Collection, Mapping, Union


# The worker's contract: exit code 2 means bad input (config, data or checkpoint) that fails the same
# way on every attempt, so the launcher reports it instead of spending cluster.max_restarts on it.
# Every other non-zero code is a failure to restart from, e.g. 3: the worker recorded something (a
# shard found bad under data.on_bad_shard: skip) that the next attempt works around.
INPUT_ERROR_EXIT_CODE = 2

# Exit code 4: the ranks could not connect to each other (rendezvous or gloo/NCCL mesh), and the
# worker printed the addresses and ports involved. A port taken in between may explain one such
# failure; a second in a row is a network or interface problem that restarting cannot fix.
RENDEZVOUS_EXIT_CODE = 4

# Exit code 5: a collective failed because a peer or the network went away (a rank or node lost in a
# step or in a checkpoint save). The rank did nothing wrong: restart from the last checkpoint (the
# runner shrinks the layout when a node is gone), as for any failure. It is a symptom, never a cause:
# when another rank failed by itself in the same attempt, that rank's code says what happened.
PEER_FAILURE_EXIT_CODE = 5


@dataclass(frozen=True)
class Succeeded:
    """Every rank exited 0 and the run reached ``train.steps``."""

    final_step: int | None = None
    kind: ClassVar[str] = "succeeded"

    def summary(self) -> str:
        """One line for the driver's output."""
        return f"succeeded (final step {self.final_step})" if self.final_step is not None else "succeeded"


@dataclass(frozen=True)
class Failed:
    """A worker process exited non-zero, or its actor or node died."""

    rank: int
    node_ip: str
    node_id: str
    exit_code: int | None
    cause: str
    last_lines: tuple[str, ...] = ()
    kind: ClassVar[str] = "failed"

    def summary(self) -> str:
        """One line naming the rank, the node and the exit code."""
        code = "no exit code" if self.exit_code is None else f"exit code {self.exit_code}"
        return f"failed: rank {self.rank} on node {self.node_ip} ({self.node_id[:8]}), {code}: {self.cause}"


@dataclass(frozen=True)
class Hung:
    """No rank produced a log or metrics line for ``cluster.step_timeout_s``."""

    rank: int
    node_ip: str
    node_id: str
    silent_s: float
    cause: str
    last_lines: tuple[str, ...] = ()
    states: dict[int, str] = field(default_factory=dict)
    kind: ClassVar[str] = "hung"

    def summary(self) -> str:
        """One line naming the suspect rank and how long the group was silent."""
        return f"hung: no progress for {self.silent_s:.0f}s; suspect rank {self.rank} on node {self.node_ip} ({self.node_id[:8]}): {self.cause}"


@dataclass(frozen=True)
class Preempted:
    """The workers were asked to stop by someone other than the launcher and exited cleanly."""

    ranks: tuple[int, ...]
    cause: str
    last_step: int | None = None
    kind: ClassVar[str] = "preempted"

    def summary(self) -> str:
        """One line with the ranks that stopped and the step they reached."""
        return f"preempted at step {self.last_step}: {self.cause} (ranks {list(self.ranks)})"


@dataclass(frozen=True)
class Stopped:
    """The driver was interrupted (Ctrl-C, SIGTERM); workers were told to save and stop."""

    signal_name: str
    last_step: int | None = None
    kind: ClassVar[str] = "stopped"

    def summary(self) -> str:
        """One line with the signal and the step the workers reached."""
        return f"stopped by {self.signal_name} at step {self.last_step}; resume by launching the same config again"


@dataclass(frozen=True)
class Unplaced:
    """A restart could not place or start its workers (a node died while the group was being built)."""

    cause: str
    kind: ClassVar[str] = "unplaced"

    def summary(self) -> str:
        """One line with the cluster's answer."""
        return f"could not start the workers: {self.cause}"


Outcome = Union[Succeeded, Failed, Hung, Preempted, Stopped, Unplaced]

# Shell convention for a process ended by a signal: 128 + signal number (SIGINT 2, SIGTERM 15).
_STOP_EXIT = {"SIGINT": 130, "SIGTERM": 143}


def cause_rank(own: Mapping[int, int], after_stop: Mapping[int, int | None], first: int, *,
               stopped: Collection[int] = ()) -> int:
    """The rank whose exit says why an attempt failed: ``first`` (the first rank seen failing), unless it
    only lost a peer (:data:`PEER_FAILURE_EXIT_CODE`) and another rank failed by itself.

    ``own`` holds the exit codes of ranks that ended before the launcher stopped anyone: any code there but
    0, the peer code and ``stopped`` (a worker ending on SIGTERM) is a failure of its own, a signal too
    (something outside killed it). ``after_stop`` holds the codes the launcher's stop returned: there a
    signal is the launcher's own SIGKILL, so only a positive code counts. Otherwise a disk filling up on
    rank 1 (exit 2: do not restart) could be reported as rank 0's lost peer (exit 5: restart)."""
    if own.get(first) != PEER_FAILURE_EXIT_CODE:
        return first

    def failed(code: int | None, *, signals: bool) -> bool:
        return (code is not None and code != 0 and code != PEER_FAILURE_EXIT_CODE and code not in stopped
                and (signals or code > 0))

    before = sorted(r for r, c in own.items() if failed(c, signals=True))
    later = sorted(r for r, c in after_stop.items() if r not in own and failed(c, signals=False))
    return (before or later or [first])[0]


def exit_code(outcome: Outcome) -> int:
    """Process exit status of ``fm-train launch`` for a final outcome."""
    if isinstance(outcome, Succeeded):
        return 0
    if isinstance(outcome, Stopped):
        return _STOP_EXIT.get(outcome.signal_name, 1)
    return 1


def to_record(outcome: Outcome, *, attempt: int, master_port: int | None) -> dict:
    """A JSON-ready line for RUN/failures.jsonl."""
    record = {"time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "attempt": attempt, "kind": outcome.kind,
              "summary": outcome.summary(), "master_port": master_port}
    record.update({k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(outcome).items()})
    if "states" in record:
        record["states"] = {str(k): v for k, v in record["states"].items()}
    return record


def append_failure(run_dir: Path, outcome: Outcome, *, attempt: int, master_port: int | None) -> Path:
    """Append one outcome to RUN/failures.jsonl (the history a user reads after a bad night)."""
    path = run_dir / "failures.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as fh:
        fh.write(json.dumps(to_record(outcome, attempt=attempt, master_port=master_port)) + "\n")
    return path
