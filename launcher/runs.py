"""``fm-train runs``: the runs under a directory, and one run in detail, read from their run directories.

A run directory is what ``fm-train launch`` writes: ``config.resolved.yaml`` (the worker's resolved
config), ``metrics.jsonl``, ``checkpoints/`` with ``latest``, ``placement.json``, ``hf/`` and, while a
launch holds it, ``.fm-train-lease.json``. Everything here reads those files as untrusted input: the
YAML through the bounded safe loader, JSON within a size bound, the ``latest`` pointer only when it
names a step directory inside ``checkpoints/`` (:func:`launcher.runstate.latest_checkpoint`), and
nothing is written. A file that is missing or damaged leaves its column empty (``-``) instead of
stopping the listing.

State: ``running`` while a launch holds the lease (renewed within ``FM_TRAIN_LEASE_TIMEOUT_S``, and on
this host its process is alive), ``finished`` once the last logged step reached ``train.steps``,
``stopped`` otherwise (preempted, failed, or stopped by hand: ``--resume latest`` continues it).
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from launcher.lease import LEASE_NAME, Holder, lease_timeout_s
from launcher.runstate import latest_checkpoint, parse_records, step_of, tail_lines

RUN_FILES = ("config.resolved.yaml", "metrics.jsonl", "checkpoints")
MAX_JSON_BYTES = 1 << 20


class RunsError(ValueError):
    """A directory that holds no run, or a run name that is not there."""


@dataclass(frozen=True)
class RunSummary:
    """One row of ``fm-train runs``."""

    name: str
    path: Path
    state: str
    step: int | None
    steps: int | None
    loss: float | None
    checkpoint: int | None
    storage: str | None
    started: float | None
    host: str | None


def is_run_dir(path: Path) -> bool:
    """Whether ``path`` is a run directory (holds one of the files a launch writes)."""
    return path.is_dir() and not path.is_symlink() and any((path / name).exists() for name in RUN_FILES)


def find_runs(root: Path) -> list[RunSummary]:
    """The runs at ``root``: ``root`` itself when it is a run directory, else its sub-directories that are,
    by name. :class:`RunsError` naming the directory when there are none."""
    root = Path(root)
    if not root.is_dir():
        raise RunsError(f"{root} is not a directory; pass a run directory or one that holds runs (default: runs)")
    if is_run_dir(root):
        return [summarize(root)]
    runs = [summarize(p) for p in sorted(root.iterdir()) if is_run_dir(p)]
    if not runs:
        raise RunsError(f"{root} holds no run: a run directory has {', '.join(RUN_FILES)} (what `fm-train launch`"
                        " writes under run.dir); pass the directory your runs' run.dir lies in")
    return runs


def find_run(root: Path, name: str) -> Path:
    """The run directory ``name`` under ``root`` (or ``root`` itself when it is that run)."""
    root = Path(root)
    if is_run_dir(root) and root.name == name:
        return root
    candidate = root / name
    if "/" in name or name in ("", ".", "..") or not is_run_dir(candidate):
        known = [p.name for p in sorted(root.iterdir()) if is_run_dir(p)] if root.is_dir() else []
        raise RunsError(f"no run {name!r} in {root}; runs there: {', '.join(known) or 'none'}")
    return candidate


def _config(run: Path) -> dict[str, Any]:
    from fm_train.config.bounded_yaml import YamlBoundError, load_yaml_file

    path = run / "config.resolved.yaml"
    if not path.is_file() or path.is_symlink():
        return {}
    try:
        loaded = load_yaml_file(path)
    except YamlBoundError:
        return {}
    return loaded if isinstance(loaded, dict) else {}


def _section(config: dict[str, Any], name: str) -> dict[str, Any]:
    value = config.get(name)
    return value if isinstance(value, dict) else {}


def _json(path: Path) -> Any:
    if not path.is_file() or path.is_symlink():
        return None
    with path.open("rb") as fh:
        data = fh.read(MAX_JSON_BYTES + 1)
    if len(data) > MAX_JSON_BYTES:
        return None
    try:
        return json.loads(data)
    except ValueError:
        return None


def _last_records(run: Path) -> tuple[int | None, float | None, dict[str, Any]]:
    """``(last step, last training loss, last training record)`` from the tail of ``metrics.jsonl``."""
    path = run / "metrics.jsonl"
    if not path.is_file() or path.is_symlink():
        return None, None, {}
    records = list(parse_records(tail_lines(path)))
    steps = [r["step"] for r in records if isinstance(r.get("step"), int)]
    trained = [r for r in records if isinstance(r.get("loss"), (int, float)) and isinstance(r.get("step"), int)]
    last = trained[-1] if trained else {}
    return (max(steps) if steps else None), (float(last["loss"]) if last else None), last


def _holder(run: Path) -> Holder | None:
    path = run / LEASE_NAME
    if not path.is_file() or path.is_symlink():
        return None
    with path.open("rb") as fh:
        return Holder.parse(fh.read(MAX_JSON_BYTES))


def summarize(run: Path) -> RunSummary:
    """The row of one run directory."""
    config = _config(run)
    run_section, train = _section(config, "run"), _section(config, "train")
    step, loss, _ = _last_records(run)
    steps = train.get("steps") if isinstance(train.get("steps"), int) else None
    holder = _holder(run)
    now = time.time()
    if holder is not None and holder.gone(now, lease_timeout_s()) is None:
        state = "running"
    elif step is not None and steps is not None and step >= steps:
        state = "finished"
    else:
        state = "stopped"
    placement = _json(run / "placement.json")
    ranks = placement.get("ranks") if isinstance(placement, dict) else None
    host = holder.host if holder is not None else None
    if host is None and isinstance(ranks, list) and ranks and isinstance(ranks[0], dict):
        host = str(ranks[0].get("node_ip")) if ranks[0].get("node_ip") is not None else None
    resolved = run / "config.resolved.yaml"
    started = holder.started if holder is not None else (resolved.stat().st_mtime if resolved.is_file() else None)
    storage = run_section.get("storage")
    return RunSummary(name=run.name, path=run, state=state, step=step, steps=steps, loss=loss,
                      checkpoint=step_of(latest_checkpoint(run)), storage=storage if isinstance(storage, str) else None,
                      started=started, host=host)


def _when(seconds: float | None) -> str:
    return "-" if seconds is None else time.strftime("%Y-%m-%d %H:%M", time.localtime(seconds))


def _or_dash(value: Any) -> str:
    return "-" if value is None else str(value)


def format_runs(runs: list[RunSummary]) -> str:
    """The table ``fm-train runs`` prints."""
    header = ("NAME", "STATE", "STEP", "LOSS", "CHECKPOINT", "STORAGE", "STARTED", "HOST")
    rows = [(r.name, r.state, f"{_or_dash(r.step)}/{_or_dash(r.steps)}",
             "-" if r.loss is None else f"{r.loss:.4f}", _or_dash(r.checkpoint), _or_dash(r.storage),
             _when(r.started), _or_dash(r.host)) for r in runs]
    widths = [max(len(str(row[i])) for row in [header, *rows]) for i in range(len(header))]
    return "\n".join("  ".join(str(cell).ljust(w) for cell, w in zip(row, widths)).rstrip() for row in [header, *rows])


def describe_run(run: Path) -> str:
    """What ``fm-train runs show NAME`` prints: the row's fields, the layout, every checkpoint, the exports,
    the last training record, and how to resume."""
    s = summarize(run)
    config = _config(run)
    model, parallel, cluster = (_section(config, k) for k in ("model", "parallel", "cluster"))
    _, _, last = _last_records(run)
    steps_dir = run / "checkpoints"
    saved = sorted(p.name for p in steps_dir.glob("step_*") if p.is_dir() and not p.is_symlink()) \
        if steps_dir.is_dir() else []
    holder = _holder(run)
    lines = [f"run        {s.name}  ({s.path})",
             f"state      {s.state}" + (f": {holder.describe(time.time())}" if holder is not None else ""),
             f"step       {_or_dash(s.step)} of {_or_dash(s.steps)}" + ("" if s.loss is None else f", loss {s.loss:.4f}"),
             f"model      {model.get('family', '-')} {model.get('preset') or ''}".rstrip(),
             "layout     " + " ".join(f"{k}={parallel[k]}" for k in ("tp", "pp", "sp", "ep", "zero_stage")
                                      if k in parallel) + f", workers={cluster.get('workers', '-')}",
             f"storage    {_or_dash(s.storage)}",
             f"started    {_when(s.started)} on {_or_dash(s.host)}",
             f"latest     {'-' if s.checkpoint is None else f'step {s.checkpoint}'}",
             f"saved      {', '.join(saved) or '-'}",
             f"hf export  {run / 'hf' if (run / 'hf' / 'config.json').is_file() else '-'}"]
    if last:
        lines.append("last step  " + ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                                              for k, v in last.items() if isinstance(v, (int, float, str))))
    if s.state != "finished" and s.checkpoint is not None:
        lines.append(f"resume     fm-train launch {run / 'config.resolved.yaml'} --resume latest")
    return "\n".join(lines)


def default_root() -> Path:
    """Where ``fm-train runs`` looks without an argument: ``FM_TRAIN_RUNS`` or ``./runs``."""
    return Path(os.environ.get("FM_TRAIN_RUNS", "runs"))
