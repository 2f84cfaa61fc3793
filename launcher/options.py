"""What a launch needs besides the run config: the worker command, timeouts and logging choices.

These are properties of *how* a run is supervised, not of the run itself, so they live here rather
than in :class:`fm_train.config.FmConfig` (the resolved config stays the same whatever the launcher).
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

PYTHON_PLACEHOLDER = "{python}"
CONFIG_PLACEHOLDER = "{config}"

# The worker command contract: argv, not a shell string. ``{python}`` becomes the interpreter of the
# Ray worker on that node (the cluster's environment, not the driver's), ``{config}`` the absolute path
# of RUN/config.resolved.yaml.
DEFAULT_WORKER_COMMAND: tuple[str, ...] = (PYTHON_PLACEHOLDER, "-m", "fm_train.cli", "worker", CONFIG_PLACEHOLDER)


@dataclass(frozen=True)
class LaunchOptions:
    """How the launcher supervises a run (see the CLI help of ``fm-train launch`` for each field)."""

    address: str | None = None
    """Ray address to join; overrides ``cluster.address`` and RAY_ADDRESS (None: use those)."""
    worker_command: tuple[str, ...] = DEFAULT_WORKER_COMMAND
    """argv run once per rank, with ``{python}`` and ``{config}`` substituted on the worker's node."""
    all_ranks: bool | None = None
    """Echo every rank's log lines, not only rank 0's (None: ``logging.all_ranks`` decides)."""
    stop_grace_s: float = 120.0
    """After SIGTERM on Ctrl-C or driver shutdown: how long workers get to save before SIGKILL."""
    failure_grace_s: float = 20.0
    """After a peer failed or hung: survivors usually block in a collective, so SIGKILL comes sooner."""
    max_preemptions: int = 20
    """Relaunches after preemption; a budget separate from ``cluster.max_restarts``."""
    placement_timeout_s: float = 120.0
    """How long to wait for the placement group to be scheduled before giving up."""
    connect_timeout_s: float = 10.0
    """TCP reachability timeout for a cluster address, so a wrong address fails fast."""
    poll_interval_s: float = 0.5
    """How often the driver collects log lines, exit codes and metrics from the workers."""
    progress_interval_s: float = 10.0
    """Minimum seconds between two progress lines on the driver."""
    post_training: bool = True
    """Build the default corpus before and convert + sample after training (tests turn this off)."""
    extra_env: tuple[tuple[str, str], ...] = field(default_factory=tuple)
    """Additional environment variables for every worker process."""

    def __post_init__(self) -> None:
        if not self.worker_command:
            raise ValueError("worker_command is empty; it must be an argv list such as ['{python}', 'train.py', '{config}']")
        for name in ("stop_grace_s", "failure_grace_s", "placement_timeout_s", "connect_timeout_s", "poll_interval_s"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name}={getattr(self, name)} must be positive")


def parse_worker_command(text: str) -> tuple[str, ...]:
    """Split a ``--worker-command`` string the POSIX-shell way into argv (it is never run by a shell)."""
    argv = tuple(shlex.split(text))
    if not argv:
        raise ValueError("--worker-command is empty")
    if CONFIG_PLACEHOLDER not in " ".join(argv):
        raise ValueError(f"--worker-command {text!r} does not mention {CONFIG_PLACEHOLDER}; the worker needs the resolved config path")
    return argv


def render_command(template: Sequence[str], *, python: str, config: str | Path) -> list[str]:
    """Substitute the placeholders of a worker command template (on the worker's node)."""
    return [part.replace(PYTHON_PLACEHOLDER, python).replace(CONFIG_PLACEHOLDER, str(config)) for part in template]
