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
import math
import os
import re
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
    try:
        children = sorted(root.iterdir())
    except OSError as exc:
        raise RunsError(f"{root} cannot be listed ({exc.strerror or exc}); pass a directory you can read") from None
    runs = [summarize(p) for p in children if is_run_dir(p)]
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
        try:
            known = [_text(p.name) for p in sorted(root.iterdir()) if is_run_dir(p)] if root.is_dir() else []
        except OSError:
            known = []
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


def _read(path: Path, limit: int = MAX_JSON_BYTES) -> bytes | None:
    """At most ``limit`` bytes of a regular file (not a symlink); None when it is not there or unreadable."""
    try:
        if path.is_symlink() or not path.is_file():
            return None
        with path.open("rb") as fh:
            data = fh.read(limit + 1)
    except OSError:
        return None
    return data if len(data) <= limit else None


def _json(path: Path) -> Any:
    data = _read(path)
    try:
        return None if data is None else json.loads(data)
    except (ValueError, RecursionError):
        return None


def _number(value: Any) -> float | None:
    """A finite number from a record (not a bool), else None."""
    if type(value) not in (int, float):
        return None
    try:
        number = float(value)
    except OverflowError:
        return None
    return number if math.isfinite(number) else None


_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")


def _text(value: Any) -> str:
    """A value read from a run directory as printable text (no terminal control sequences)."""
    return _CONTROL.sub("?", str(value))


def _last_records(run: Path) -> tuple[int | None, float | None, dict[str, Any]]:
    """``(last step, last training loss, last training record)`` from the tail of ``metrics.jsonl``."""
    path = run / "metrics.jsonl"
    try:
        if not path.is_file() or path.is_symlink():
            return None, None, {}
        records = list(parse_records(tail_lines(path)))
    except (OSError, RecursionError):
        return None, None, {}
    steps = [r["step"] for r in records if type(r.get("step")) is int]
    trained = [r for r in records if _number(r.get("loss")) is not None and type(r.get("step")) is int]
    last = trained[-1] if trained else {}
    return (max(steps) if steps else None), (_number(last["loss"]) if last else None), last


def _holder(run: Path) -> Holder | None:
    data = _read(run / LEASE_NAME)
    return None if data is None else Holder.parse(data)


def summarize(run: Path) -> RunSummary:
    """The row of one run directory."""
    config = _config(run)
    run_section, train = _section(config, "run"), _section(config, "train")
    step, loss, _ = _last_records(run)
    steps = train.get("steps") if type(train.get("steps")) is int else None
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
    try:
        started = holder.started if holder is not None else (resolved.stat().st_mtime if resolved.is_file() else None)
    except OSError:
        started = None
    storage = run_section.get("storage")
    return RunSummary(name=_text(run.name), path=run, state=state, step=step, steps=steps, loss=loss,
                      checkpoint=step_of(latest_checkpoint(run)),
                      storage=_text(storage) if isinstance(storage, str) else None, started=started,
                      host=None if host is None else _text(host))


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
    try:
        saved = sorted(_text(p.name) for p in steps_dir.glob("step_*") if p.is_dir() and not p.is_symlink()) \
            if steps_dir.is_dir() else []
    except OSError:
        saved = []
    holder = _holder(run)
    lines = [_text(f"run        {s.name}  ({s.path})"),
             f"state      {s.state}" + (_text(f": {holder.describe(time.time())}") if holder is not None else ""),
             f"step       {_or_dash(s.step)} of {_or_dash(s.steps)}" + ("" if s.loss is None else f", loss {s.loss:.4f}"),
             _text(f"model      {model.get('family', '-')} {model.get('preset') or ''}".rstrip()),
             _text("layout     " + " ".join(f"{k}={parallel[k]}" for k in ("tp", "pp", "sp", "ep", "zero_stage")
                                            if k in parallel) + f", workers={cluster.get('workers', '-')}"),
             f"storage    {_or_dash(s.storage)}",
             f"started    {_when(s.started)} on {_or_dash(s.host)}",
             f"latest     {'-' if s.checkpoint is None else f'step {s.checkpoint}'}",
             f"saved      {', '.join(saved) or '-'}",
             f"hf export  {run / 'hf' if (run / 'hf' / 'config.json').is_file() else '-'}"]
    if last:
        lines.append(_text("last step  " + ", ".join(f"{k}={v:.4g}" if _number(v) is not None and isinstance(v, float)
                                                    else f"{k}={v}" for k, v in last.items()
                                                    if isinstance(v, (int, float, str)) and not isinstance(v, bool))))
    if s.state != "finished" and s.checkpoint is not None:
        lines.append(f"resume     fm-train launch {run / 'config.resolved.yaml'} --resume latest")
    return "\n".join(lines)


def default_root() -> Path:
    """Where ``fm-train runs`` looks without an argument: ``FM_TRAIN_RUNS`` or ``./runs``."""
    return Path(os.environ.get("FM_TRAIN_RUNS", "runs"))
