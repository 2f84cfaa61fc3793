"""Which layout the next attempt runs: the configured one when the cluster has room, else a smaller one.

After a node is lost the launcher waits ``cluster.node_wait_s`` for room for the whole layout (an
autoscaler or an operator replacing the machine). When none comes and ``cluster.min_workers`` allows,
the run goes on with fewer data-parallel replicas: ``tp`` and ``pp`` stay, ``dp`` shrinks, and
``train.grad_accum`` grows by the same factor, so the global batch (and with it the loss curve, the
LR schedule and the data order, which are all defined per global step) is unchanged. The workers
resume from ``latest`` through the layout-change path of the checkpoints. A later restart goes back
to the configured layout as soon as the cluster has room for it again.

The choice is a pure function of the configured layout and the slots per node (unit-tested).
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

from fm_train.config import FmConfig, build_config
from launcher.runstate import latest_checkpoint, step_of


@dataclass(frozen=True)
class Layout:
    """World size and gradient accumulation of one attempt (tp and pp never change)."""

    workers: int
    grad_accum: int


def full_layout(cfg: FmConfig) -> Layout:
    """The configured layout."""
    return Layout(cfg.cluster.workers, cfg.train.grad_accum)


def placeable(workers: int, tp: int, slots_per_node: Sequence[int]) -> bool:
    """Whether ``workers`` slots fit with every tensor-parallel group on one node.

    A node with ``s`` free slots holds ``s // tp`` whole tp groups; when tp is larger than any node
    (groups must cross nodes anyway) only the total counts.
    """
    if not slots_per_node:
        return False
    if tp > max(slots_per_node):
        return sum(slots_per_node) >= workers
    return sum((s // tp) * tp for s in slots_per_node) >= workers


def choose_layout(cfg: FmConfig, slots_per_node: Sequence[int]) -> Layout | str:
    """The largest layout that fits ``slots_per_node`` and keeps the global batch, or why there is none.

    ``cfg`` is the configured (full) run. Candidates go from ``cluster.workers`` down to
    ``cluster.min_workers`` (default: no shrinking) in steps of ``tp x pp``.
    """
    full = full_layout(cfg)
    model_parallel = cfg.parallel.tp * cfg.parallel.pp
    if placeable(full.workers, cfg.parallel.tp, slots_per_node):
        return full
    floor = cfg.cluster.min_workers or full.workers
    have = sum(slots_per_node)
    if floor == full.workers:
        return (f"the cluster has {have} free slot(s) ({_per_node(slots_per_node)}) and the run needs"
                f" {full.workers}; set cluster.min_workers (a multiple of tp x pp = {model_parallel}) to let it go on"
                " with fewer workers, or add nodes")
    per_replica = cfg.global_batch  # in sequences
    rejected = []
    for workers in range(full.workers - model_parallel, floor - 1, -model_parallel):
        dp = workers // model_parallel
        carved = [f"parallel.{axis}={size}" for axis, size in (("ep", cfg.parallel.ep), ("sp", cfg.parallel.sp))
                  if dp % size]
        if carved:
            rejected.append(f"{workers} workers (dp {dp} is not a multiple of {' and '.join(carved)})")
            continue
        readers = dp // cfg.parallel.sp  # the sp ranks of a group share their samples
        if per_replica % (cfg.train.micro_batch * readers):
            rejected.append(f"{workers} workers (dp {dp} / sp {cfg.parallel.sp} does not divide the global batch of"
                            f" {per_replica} sequences in micro-batches of {cfg.train.micro_batch})")
            continue
        if placeable(workers, cfg.parallel.tp, slots_per_node):
            return Layout(workers, per_replica // (cfg.train.micro_batch * readers))
    detail = f"; not possible: {', '.join(rejected)}" if rejected else ""
    return (f"no layout between cluster.min_workers={floor} and cluster.workers={full.workers} fits the"
            f" {have} free slot(s) left ({_per_node(slots_per_node)}) with tp groups of {cfg.parallel.tp} on one"
            f" node{detail}")


def _per_node(slots: Sequence[int]) -> str:
    return " + ".join(str(s) for s in slots) + " per node" if slots else "no live node"


def with_layout(cfg: FmConfig, layout: Layout) -> FmConfig:
    """``cfg`` for ``layout``: a new validated config (the configured one is never changed)."""
    data = cfg.model_dump(mode="json")
    data["cluster"]["workers"] = layout.workers
    data["train"]["grad_accum"] = layout.grad_accum
    if data["cluster"].get("min_workers") and data["cluster"]["min_workers"] > layout.workers:
        data["cluster"]["min_workers"] = layout.workers
    return build_config(data)


def describe(layout: Layout, cfg: FmConfig) -> str:
    """``dp 2 x pp 1 x tp 2 (4 workers), grad_accum 1``."""
    p = cfg.parallel
    return (f"dp {layout.workers // (p.tp * p.pp)} x pp {p.pp} x tp {p.tp} ({layout.workers} workers),"
            f" grad_accum {layout.grad_accum}")


def wait_for_room(cfg: FmConfig, free_slots: Callable[[], list[int]], *, stop: Callable[[], bool],
                  say: Callable[[str], None], poll_s: float = 2.0, report_s: float = 30.0,
                  clock: Callable[[], float] = time.monotonic, sleep: Callable[[float], None] = time.sleep) -> list[int]:
    """Slots per node once the configured layout fits, or what is left after ``cluster.node_wait_s``."""
    slots = free_slots()
    if placeable(cfg.cluster.workers, cfg.parallel.tp, slots) or cfg.cluster.node_wait_s <= 0:
        return slots
    deadline = clock() + cfg.cluster.node_wait_s
    say(f"the cluster has room for {sum(slots)} of {cfg.cluster.workers} workers ({_per_node(slots)}): waiting up to"
        f" {cfg.cluster.node_wait_s:g}s (cluster.node_wait_s) for a node to join")
    next_report = clock() + report_s
    while clock() < deadline and not stop():
        sleep(poll_s)
        slots = free_slots()
        if placeable(cfg.cluster.workers, cfg.parallel.tp, slots):
            say(f"room for all {cfg.cluster.workers} workers again ({_per_node(slots)})")
            return slots
        if clock() >= next_report:
            say(f"still {sum(slots)} of {cfg.cluster.workers} slots; {max(0.0, deadline - clock()):.0f}s left to wait")
            next_report = clock() + report_s
    return slots


def record_layout_change(run_dir: Path, *, attempt: int, configured: FmConfig, before: Layout, after: Layout,
                         slots: Sequence[int]) -> dict[str, Any]:
    """Append the change to RUN/failures.jsonl and RUN/metrics.jsonl (no worker runs now); returns the record."""
    step = step_of(latest_checkpoint(run_dir))
    summary = (f"{describe(before, configured)} -> {describe(after, configured)} from step {step or 0}; the global"
               f" batch stays {configured.global_batch} sequences ({_per_node(slots)} free)")
    record = {"time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "attempt": attempt, "kind": "layout_change",
              "summary": summary, "step": step or 0, "from": asdict(before), "to": asdict(after),
              "configured": asdict(full_layout(configured)), "global_batch": configured.global_batch,
              "slots_per_node": list(slots)}
    metrics = {"step": step or 0, "event": "layout_change", "workers": after.workers, "grad_accum": after.grad_accum,
               "from_workers": before.workers, "from_grad_accum": before.grad_accum}
    for name, line in (("failures.jsonl", record), ("metrics.jsonl", metrics)):
        try:
            with (run_dir / name).open("a") as fh:
                fh.write(json.dumps(line) + "\n")
        except OSError:
            pass  # a full disk must not end the run here; the driver's line still says it
    return record
