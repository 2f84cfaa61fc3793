"""``fm-train runs``: the runs under a directory or an object-store prefix, and one run in detail, read from
their run directories or their ``run.storage`` copies.

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

An object-store URI (``s3://bucket/runs``) is read the same way, through the same functions: a ``UPath``
stands where a ``Path`` does (:func:`open_root`), and the few reads that differ (a bounded read, the tail
of ``metrics.jsonl``, a bounded listing) take ranged GETs there instead of opening a file. What a run
with ``run.storage`` puts there (:mod:`fm_train.storage.log_copies`, :mod:`fm_train.storage.upload`,
:mod:`launcher.lease`) is ``config.resolved.yaml``, ``metrics.jsonl`` (copied after each checkpoint
committed there, so its last step may lag the run's), ``checkpoints/`` with ``latest``, ``hf/`` once its
marker is up, and the launch's lease while it runs; there is no ``placement.json``, so the host is the
lease's (``-`` once the run ended), and the start time the lease's too. The first failure to reach
the store (endpoint, credentials, bucket) stops the command with a :class:`RunsError` naming the URI
(:func:`reading`).
"""

from __future__ import annotations

import itertools
import json
import math
import os
import re
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from fm_train.config.storage_uri import uri_errors, uri_scheme
from launcher.lease import LEASE_NAME, Holder, lease_timeout_s
from launcher.runstate import parse_records, step_of, tail_lines

RUN_FILES = ("config.resolved.yaml", "metrics.jsonl", "checkpoints")
MAX_JSON_BYTES = 1 << 20
MAX_ENTRIES = 10_000
"""Entries of one directory or prefix looked at (runs under a root, steps under ``checkpoints/``)."""
TAIL_BYTES = 65536
"""How much of the end of ``metrics.jsonl`` is read for the last records."""
HF_MARKER = ".uploaded.json"
"""Written last into ``<run.storage>/hf/`` (:mod:`fm_train.storage.log_copies`): without it the upload did not
finish."""
_STEP_NAME = re.compile(r"step_[0-9]{8,}")

Location = Any
"""A ``pathlib.Path`` (a local directory) or a ``upath.UPath`` (an object-store prefix): the functions here
use only what both offer (``/``, ``name``, ``is_dir``, ``is_file``, ``exists``, ``is_symlink``) and the
bounded reads below."""


class RunsError(ValueError):
    """A directory that holds no run, or a run name that is not there."""


@dataclass(frozen=True)
class RunSummary:
    """One row of ``fm-train runs``."""

    name: str
    path: Location
    state: str
    step: int | None
    steps: int | None
    loss: float | None
    checkpoint: int | None
    storage: str | None
    started: float | None
    host: str | None


def open_root(where: str | Path) -> Location:
    """``DIR`` or ``URI`` (``s3://bucket/runs``: a prefix holding runs' ``run.storage``, or one run's) as the
    place runs are read from; :class:`RunsError` for a URI whose scheme is unknown or whose backend is missing."""
    if isinstance(where, Path) or uri_scheme(where) is None:
        return Path(str(where).removeprefix("file://"))
    errors = uri_errors("DIR_OR_URI", where)
    if errors:
        raise RunsError(errors[0])
    from upath import UPath

    return UPath(where)


def is_store(location: Location) -> bool:
    """Whether ``location`` is in an object store (a ``UPath``) rather than a local directory."""
    return not isinstance(location, Path)


@contextmanager
def reading(root: Location) -> Iterator[None]:
    """Turn a failure to reach the store that holds ``root`` (no endpoint, refused credentials, no bucket) into
    a :class:`RunsError` naming the URI and what to check; local errors pass unchanged."""
    try:
        yield
    except RunsError:
        raise
    except Exception as exc:  # the backends raise their own types (botocore, aiohttp, google.auth, OSError)
        if not is_store(root):
            raise
        detail = _text(f"{type(exc).__name__}: {exc}")[:300]
        raise RunsError(f"{root} cannot be read ({detail}); check the URI, that its endpoint is reachable from here"
                        " (for s3://: AWS_ENDPOINT_URL or the profile's endpoint_url) and the credentials (for s3://:"
                        " AWS_PROFILE or AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY)") from None


def _children(folder: Location) -> list[Location]:
    """The entries of ``folder`` by name, at most :data:`MAX_ENTRIES` of them; empty when it is not there."""
    try:
        entries = list(itertools.islice(folder.iterdir(), MAX_ENTRIES))
    except (FileNotFoundError, NotADirectoryError):
        return []
    return sorted(entries, key=lambda p: p.name)


def is_run_dir(path: Location) -> bool:
    """Whether ``path`` is a run directory (holds one of the files a launch writes)."""
    return path.is_dir() and not path.is_symlink() and any((path / name).exists() for name in RUN_FILES)


def find_runs(root: Location) -> list[RunSummary]:
    """The runs at ``root``: ``root`` itself when it is a run directory, else its sub-directories that are,
    by name. :class:`RunsError` naming the directory when there are none."""
    if not is_store(root):
        root = Path(root)
    if not root.is_dir():
        if is_store(root):
            raise RunsError(f"{root} holds no run: nothing is stored under that prefix; pass the run.storage URI of a"
                            " run, or the prefix that holds several")
        raise RunsError(f"{root} is not a directory; pass a run directory or one that holds runs (default: runs)")
    if is_run_dir(root):
        return [summarize(root)]
    try:
        children = _children(root)
    except OSError as exc:
        raise RunsError(f"{root} cannot be listed ({exc.strerror or exc}); pass a directory you can read") from None
    runs = [summarize(p) for p in children if is_run_dir(p)]
    if not runs:
        raise RunsError(f"{root} holds no run: a run directory has {', '.join(RUN_FILES)} (what `fm-train launch`"
                        " writes under run.dir, and a run's run.storage holds); pass the directory your runs' run.dir"
                        " lies in, or the prefix of their run.storage")
    return runs


def find_run(root: Location, name: str) -> Location:
    """The run directory ``name`` under ``root`` (or ``root`` itself when it is that run)."""
    if not is_store(root):
        root = Path(root)
    if is_run_dir(root) and root.name == name:
        return root
    candidate = root / name
    if "/" in name or name in ("", ".", "..") or not is_run_dir(candidate):
        try:
            known = [_text(p.name) for p in _children(root) if is_run_dir(p)] if root.is_dir() else []
        except OSError:
            known = []
        raise RunsError(f"no run {_text(repr(name))} in {root}; runs there: {', '.join(known) or 'none'}")
    return candidate


def _config(run: Location) -> dict[str, Any]:
    from fm_train.config.bounded_yaml import MAX_BYTES, YamlBoundError, load_yaml_text

    data = _read(run / "config.resolved.yaml", MAX_BYTES)
    try:
        loaded = None if data is None else load_yaml_text(data.decode("utf-8"))
    except (YamlBoundError, UnicodeDecodeError):
        return {}
    return loaded if isinstance(loaded, dict) else {}


def _section(config: dict[str, Any], name: str) -> dict[str, Any]:
    value = config.get(name)
    return value if isinstance(value, dict) else {}


def _size(path: Location) -> int | None:
    """The size of a stored object (None when it is not one): one metadata request, nothing downloaded."""
    try:
        info = path.fs.info(path.path)
    except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
        return None
    size = info.get("size")
    return size if info.get("type") == "file" and type(size) is int and size >= 0 else None


def _read(path: Location, limit: int = MAX_JSON_BYTES) -> bytes | None:
    """A regular file (not a symlink) of at most ``limit`` bytes, whole; None when it is not there, larger, or
    unreadable. From a store: its size first, then one ranged GET of at most ``limit`` bytes."""
    if is_store(path):
        size = _size(path)
        if size is None or size > limit:
            return None
        try:
            return path.fs.cat_file(path.path, start=0, end=size) if size else b""
        except FileNotFoundError:
            return None
    try:
        if path.is_symlink() or not path.is_file():
            return None
        with path.open("rb") as fh:
            data = fh.read(limit + 1)
    except OSError:
        return None
    return data if len(data) <= limit else None


def _tail(path: Location) -> list[str]:
    """The complete lines among the last :data:`TAIL_BYTES` of ``path`` (a ranged GET from a store)."""
    if not is_store(path):
        return tail_lines(path, TAIL_BYTES)
    size = _size(path)
    if not size:
        return []
    start = max(0, size - TAIL_BYTES)
    lines = path.fs.cat_file(path.path, start=start, end=size).decode("utf-8", errors="replace").splitlines()
    return lines[1:] if start else lines  # the first line of a partial read is cut


def latest_step(run: Location) -> Location | None:
    """The step directory ``RUN/checkpoints/latest`` names, or None: ``latest`` is a small file holding a step
    directory's name (what fm-train writes); a path, a symlink, a name of another form or a step that is not
    there names no checkpoint, so nothing outside the run's ``checkpoints/`` is ever named."""
    data = _read(run / "checkpoints" / "latest", 256)  # a step name is ~13 bytes
    name = None if data is None else data.decode(errors="replace").strip()
    if name is None or not _STEP_NAME.fullmatch(name):
        return None
    target = run / "checkpoints" / name
    return target if target.is_dir() and not target.is_symlink() else None


def _json(path: Location) -> Any:
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


def _last_records(run: Location) -> tuple[int | None, float | None, dict[str, Any]]:
    """``(last step, last training loss, last training record)`` from the tail of ``metrics.jsonl``."""
    path = run / "metrics.jsonl"
    try:
        if not path.is_file() or path.is_symlink():
            return None, None, {}
        records = list(parse_records(_tail(path)))
    except (OSError, RecursionError):
        return None, None, {}
    steps = [r["step"] for r in records if type(r.get("step")) is int]
    trained = [r for r in records if _number(r.get("loss")) is not None and type(r.get("step")) is int]
    last = trained[-1] if trained else {}
    return (max(steps) if steps else None), (_number(last["loss"]) if last else None), last


def _holder(run: Location) -> Holder | None:
    data = _read(run / LEASE_NAME)
    return None if data is None else Holder.parse(data)


def summarize(run: Location) -> RunSummary:
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
    try:  # in a store the config's time is that of its first copy, after the first checkpoint: not the start
        started = holder.started if holder is not None else (
            resolved.stat().st_mtime if not is_store(run) and resolved.is_file() else None)
    except OSError:
        started = None
    storage = run_section.get("storage")
    return RunSummary(name=_text(run.name or str(run)), path=run, state=state, step=step, steps=steps, loss=loss,
                      checkpoint=step_of(latest_step(run)),
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


def describe_run(run: Location) -> str:
    """What ``fm-train runs show NAME`` prints: the row's fields, the layout, every checkpoint, the exports,
    the last training record, and how to resume (from storage: with ``run.storage`` and ``resume auto``, which
    fetches the step storage's ``latest`` names, :mod:`fm_train.checkpoint.fetch`)."""
    s = summarize(run)
    config = _config(run)
    model, parallel, cluster = (_section(config, k) for k in ("model", "parallel", "cluster"))
    _, _, last = _last_records(run)
    steps_dir = run / "checkpoints"
    try:
        saved = [_text(p.name) for p in _children(steps_dir)
                 if _STEP_NAME.fullmatch(p.name) and p.is_dir() and not p.is_symlink()]
    except OSError:
        saved = []
    hf = run / "hf"  # in a store only a finished upload (its marker written last) is an export
    exported = (hf / HF_MARKER).is_file() if is_store(run) else (hf / "config.json").is_file()
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
             f"hf export  {hf if exported else '-'}"]
    if last:
        lines.append(_text("last step  " + ", ".join(f"{k}={v:.4g}" if _number(v) is not None and isinstance(v, float)
                                                    else f"{k}={v}" for k, v in last.items()
                                                    if isinstance(v, (int, float, str)) and not isinstance(v, bool))))
    if s.state != "finished" and s.checkpoint is not None and not is_store(run):
        lines.append(f"resume     fm-train launch {run / 'config.resolved.yaml'} --resume latest")
    elif s.state != "finished" and s.checkpoint is not None:
        # --resume latest reads run.dir only; auto fetches storage's latest into run.dir first.
        lines.append(_text(f"resume     fm-train launch CONFIG --set run.storage={run} --resume auto"))
        lines.append(_text(f"           (CONFIG: a local copy of {run / 'config.resolved.yaml'}; auto fetches the step"
                           " that storage's latest names into run.dir, then resumes from it)"))
    return "\n".join(lines)


def default_root() -> Location:
    """Where ``fm-train runs`` looks without an argument: ``FM_TRAIN_RUNS`` (a directory or a URI) or ``./runs``."""
    return open_root(os.environ.get("FM_TRAIN_RUNS", "runs"))
