"""Train with restarts: build a group, watch it, record what went wrong, and try again within budget.

Failures and hangs spend ``cluster.max_restarts``; preemptions spend their own budget. Every restart
is a whole new group on a new MASTER_PORT; the worker resumes from RUN/checkpoints/latest by itself.
"""

from __future__ import annotations

import signal
import threading
from contextlib import contextmanager
import time
from dataclasses import dataclass, replace
from pathlib import Path
from types import FrameType
from typing import Callable, Iterator

from fm_train.config import ConfigError, FmConfig, build_config, dump_config
from fm_train.dist.env import LAUNCH_START_ENV
from fm_train.dist.topology import Topology
from launcher.cluster import ClusterError, Demand, slots_per_node, wait_for_dead_nodes
from launcher.elastic import choose_layout, describe, full_layout, record_layout_change, wait_for_room, with_layout
from launcher.group import WorkerGroup
from launcher.logsink import LogSink
from launcher.monitor import AttemptWatch, StopRequest, run_attempt
from launcher.options import LaunchOptions
from launcher.outcomes import (
    INPUT_ERROR_EXIT_CODE,
    RENDEZVOUS_EXIT_CODE,
    Failed,
    Hung,
    Outcome,
    Preempted,
    Stopped,
    Succeeded,
    Unplaced,
    append_failure,
)
from launcher.preflight import PreflightError, resolve_on_node, run_preflight
from launcher.progress import Progress
from launcher.runstate import latest_checkpoint


@contextmanager
def catch_stop_signals() -> Iterator[StopRequest]:
    """Turn the first SIGINT/SIGTERM into a graceful stop request; a second one raises KeyboardInterrupt.

    Handlers can only be installed from the main thread; elsewhere (an embedding application) the
    caller keeps its own handling and the request simply never fires.
    """
    request = StopRequest()
    if threading.current_thread() is not threading.main_thread():
        yield request
        return

    def handler(signum: int, frame: FrameType | None) -> None:
        request.count += 1
        if request.count > 1:
            raise KeyboardInterrupt(f"second {signal.Signals(signum).name}: killing the workers now")
        request.signal_name = signal.Signals(signum).name

    previous = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield request
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


@dataclass
class RunPaths:
    """Where a run's files live on the driver and how the workers find them."""

    run_dir: Path
    """Absolute run directory on the driver."""
    run_dir_arg: str
    """``run.dir`` as the config says it (relative to ``workdir`` on every node)."""
    workdir: str
    """The driver's working directory; workers run there when it exists on their node."""


def train(cfg: FmConfig, paths: RunPaths, options: LaunchOptions, say: Callable[[str], None] = print) -> Outcome:
    """Run the worker group until success, a stop, or an exhausted budget; return the final outcome.

    ``cfg`` is the configured layout; after a lost node an attempt may run a smaller one
    (:mod:`launcher.elastic`), and the next restart returns to ``cfg`` when the cluster has room.
    """
    echo_all = cfg.logging.all_ranks if options.all_ranks is None else options.all_ranks
    # Every attempt's workers count goodput from the launch's start (fm_train.engine.goodput).
    options = replace(options, extra_env=(*options.extra_env, (LAUNCH_START_ENV, f"{time.time():.3f}")))
    sink = LogSink(paths.run_dir, echo_all=echo_all)
    progress = Progress(cfg.train.steps, interval_s=options.progress_interval_s)
    failures = preemptions = rendezvous = 0
    attempt = 0
    current = cfg
    saved_at_launch = latest_checkpoint(paths.run_dir)
    outcome: Outcome | None = None  # the previous attempt's, once there is one
    try:
        with catch_stop_signals() as stop:
            while True:
                attempt += 1
                if attempt > 1:
                    chosen = _layout_for_attempt(cfg, current, paths, progress, stop, attempt, say)
                    if isinstance(chosen, str):
                        say(f"not restarting: {chosen}")
                        assert outcome is not None
                        return outcome
                    current = _resume_for_restart(chosen, paths.run_dir, saved_at_launch, say)
                try:
                    outcome, port = _one_attempt(current, paths, options, sink, progress, stop, attempt, say)
                except PreflightError:
                    raise
                except ClusterError as exc:
                    if attempt == 1:
                        raise
                    # The cluster's view lags a lost node by seconds: the next attempt sees it gone.
                    outcome, port = Unplaced(cause=str(exc)), None
                if isinstance(outcome, (Succeeded, Stopped)):
                    return outcome
                record = _record_failure(paths.run_dir, outcome, attempt, port, say)
                say(f"attempt {attempt} {outcome.summary()}")
                _print_last_lines(outcome, sink, say)
                if isinstance(outcome, Preempted):
                    preemptions += 1
                    if preemptions > options.max_preemptions:
                        say(f"giving up: preempted {preemptions} times (budget {options.max_preemptions}); see {record}")
                        return outcome
                    say(f"relaunching after preemption ({preemptions} of {options.max_preemptions}; not counted as a failure)")
                    continue
                if isinstance(outcome, Failed) and outcome.exit_code == INPUT_ERROR_EXIT_CODE:
                    say(f"not restarting: rank {outcome.rank} reported a config, data or checkpoint error (exit code"
                        f" {INPUT_ERROR_EXIT_CODE}), which a restart would only repeat; fix it and launch again")
                    return outcome
                if isinstance(outcome, Failed) and outcome.exit_code == RENDEZVOUS_EXIT_CODE:
                    rendezvous += 1
                    if rendezvous > 1:
                        say(f"not restarting: the ranks failed to connect to each other twice in a row (exit code"
                            f" {RENDEZVOUS_EXIT_CODE}); the lines above name the addresses, ports and fixes")
                        return outcome
                    say("the ranks could not connect to each other; retrying once on a new MASTER_PORT")
                else:
                    rendezvous = 0
                failures += 1
                if failures > cfg.cluster.max_restarts:
                    say(f"giving up after {failures - 1} restarts (cluster.max_restarts={cfg.cluster.max_restarts});"
                        f" last cause: {outcome.summary()}; history in {record}")
                    return outcome
                say(f"restarting the whole group ({failures} of {cfg.cluster.max_restarts} restarts);"
                    " the workers resume from checkpoints/latest")
    finally:
        sink.close()


def _resume_for_restart(cfg: FmConfig, run_dir: Path, saved_at_launch: Path | None,
                        say: Callable[[str], None]) -> FmConfig:
    """The config of a restart: a ``checkpoint.resume`` other than auto (a step, a path, none) chose where
    the launch started; once the run has saved since, a restart continues from that, not from the start."""
    if cfg.checkpoint.resume == "auto" or latest_checkpoint(run_dir) in (None, saved_at_launch):
        return cfg
    say(f"the run saved checkpoints since it started from checkpoint.resume={cfg.checkpoint.resume}: the restart"
        " resumes from its newest (auto)")
    data = cfg.model_dump(mode="json")
    data["checkpoint"]["resume"] = "auto"
    return build_config(data)


def _layout_for_attempt(configured: FmConfig, current: FmConfig, paths: RunPaths, progress: Progress,
                        stop: StopRequest, attempt: int, say: Callable[[str], None]) -> FmConfig | str:
    """The config of the next attempt: the configured layout when it fits (after waiting up to
    ``cluster.node_wait_s`` for a lost node's replacement), else a smaller one, else why not."""
    demand = Demand(1, configured.cluster.cpus_per_worker, configured.cluster.gpus_per_worker)
    wait_for_dead_nodes(say)
    slots = wait_for_room(configured, lambda: slots_per_node(demand), stop=lambda: stop.signal_name is not None,
                          say=say)
    chosen = choose_layout(configured, slots)
    if isinstance(chosen, str):
        return chosen
    try:
        nxt = with_layout(configured, chosen)
    except ConfigError as exc:
        return f"the smaller layout {describe(chosen, configured)} is not a valid config: {exc}"
    before, after = full_layout(current), chosen
    if before != after:
        change = record_layout_change(paths.run_dir, attempt=attempt, configured=configured, before=before,
                                      after=after, slots=slots)
        say(f"layout change: {change['summary']}")
    shrunk = chosen != full_layout(configured)
    progress.set_note(f"{describe(chosen, configured)}, shrunk from {configured.cluster.workers} workers"
                      if shrunk else None)
    return nxt


def _placed_group(cfg: FmConfig, paths: RunPaths, options: LaunchOptions, attempt: int,
                  say: Callable[[str], None]) -> WorkerGroup:
    """The worker slots placed for ``cfg`` (the table and its warnings said) and the nodes' preflight passed;
    nothing started yet. The caller tears the group down."""
    topology = Topology(cfg.world_size, tp=cfg.parallel.tp, pp=cfg.parallel.pp)
    demand = Demand(cfg.cluster.workers, cfg.cluster.cpus_per_worker, cfg.cluster.gpus_per_worker)
    group = WorkerGroup.create(demand, topology, placement_timeout_s=options.placement_timeout_s,
                               socket_ifname=cfg.cluster.socket_ifname)
    try:
        say(f"attempt {attempt}: {topology.world} ranks (dp {topology.dp} x pp {topology.pp} x tp {topology.tp}),"
            f" MASTER_ADDR={group.master_addr} MASTER_PORT={group.master_port}")
        say(group.placement.table())
        for warning in group.placement.warnings:
            say(f"warning: {warning}")
        # With run.storage the nodes share the store, not run.dir: the probes (and a write test) go there.
        shared, shared_arg = ((resolve_on_node(paths.workdir, cfg.run.storage), cfg.run.storage)
                              if cfg.run.storage is not None else (paths.run_dir, paths.run_dir_arg))
        run_preflight(group.node_probes(), run_dir=shared, run_dir_arg=shared_arg,
                      workdir=paths.workdir, sources=[s.path for s in cfg.data.sources], say=say)
    except BaseException:
        group.teardown()
        raise
    return group


def rehearse(cfg: FmConfig, paths: RunPaths, options: LaunchOptions, say: Callable[[str], None] = print) -> None:
    """What a launch does before its workers start, and nothing after: the slots placed on the cluster, the
    placement table, every node's preflight (storage, data, versions); then the slots are released.
    Raises what the launch would (``PlacementError``, ``PreflightError``, ``ClusterError``)."""
    _placed_group(cfg, paths, options, 1, say).teardown()


def _one_attempt(cfg: FmConfig, paths: RunPaths, options: LaunchOptions, sink: LogSink, progress: Progress,
                 stop: StopRequest, attempt: int, say: Callable[[str], None]) -> tuple[Outcome, int]:
    group = _placed_group(cfg, paths, options, attempt, say)
    try:
        group.save_placement(paths.run_dir, attempt)
        if stop.signal_name is not None:
            return Stopped(signal_name=stop.signal_name), group.master_port
        sink.begin_attempt(group.placement, attempt)
        progress.reset()
        group.start(options.worker_command, workdir=paths.workdir, run_dir=paths.run_dir_arg,
                    config_text=dump_config(cfg), attempt=attempt, extra_env=options.extra_env)
        watch = AttemptWatch(group=group, sink=sink, progress=progress, step_timeout_s=cfg.cluster.step_timeout_s,
                             startup_timeout_s=cfg.cluster.startup_timeout_s, save_timeout_s=cfg.cluster.save_timeout_s,
                             total_steps=cfg.train.steps, poll_interval_s=options.poll_interval_s,
                             stop_grace_s=options.stop_grace_s, failure_grace_s=options.failure_grace_s,
                             stop=stop, say=say)
        return run_attempt(watch), group.master_port
    finally:
        group.teardown()


def _record_failure(run_dir: Path, outcome: Outcome, attempt: int, port: int | None, say: Callable[[str], None]) -> Path:
    """Append to RUN/failures.jsonl; a full or read-only disk is reported, not allowed to end the run."""
    try:
        return append_failure(run_dir, outcome, attempt=attempt, master_port=port)
    except OSError as exc:
        path = run_dir / "failures.jsonl"
        say(f"warning: cannot append to {path} ({exc.strerror or exc}); this attempt's outcome is only on this console")
        return path


def _print_last_lines(outcome: Outcome, sink: LogSink, say: Callable[[str], None]) -> None:
    if isinstance(outcome, (Failed, Hung)) and outcome.last_lines:
        say(f"last lines of rank {outcome.rank} (full log: {sink.path(outcome.rank)}):")
        for line in outcome.last_lines[-10:]:
            say(f"    {line}")
