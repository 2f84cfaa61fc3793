"""Before step 1: prove that every node sees the same run directory, the same data and the same software.

Without a shared filesystem each node keeps its own ranks' part of every checkpoint; the run trains to
the end and can neither resume nor convert. The check is a two-round handshake through the run
directory itself: every participant (the driver and one worker actor per node) writes a probe file
``RUN/.preflight/<token>/<who>.json``, then every participant looks for everybody else's. Each node
also fingerprints every data source's ``index.json`` and reports its software versions. Any
difference stops the launch at once with the node, the path and the fixes.

The node-side halves (:func:`write_probe`, :func:`check_node`) are plain functions that the worker
actor calls; :func:`run_preflight` is the driver's side.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

from fm_train.config.storage_uri import uri_scheme
from launcher.cluster import ClusterError
from launcher.versions import mismatches, software

PREFLIGHT_DIR = ".preflight"
DRIVER = "driver"


class PreflightError(ClusterError):
    """A node cannot see the run's storage or data, or runs other software; the message says which."""


def resolve_on_node(workdir: str, path: str) -> Any:
    """``path`` as a worker on this node resolves it: relative to the driver's working directory when
    that directory exists here, else to the actor's own (a node without the driver's filesystem); an
    object-store URI (``run.storage``) is the same place from everywhere (a ``UPath``)."""
    if uri_scheme(path) is not None:
        from upath import UPath

        return UPath(path)
    base = Path(workdir) if Path(workdir).is_dir() else Path.cwd()
    return (base / path).resolve()


def write_probe(run_dir: Path, token: str, who: str) -> str | None:
    """Write this participant's probe; returns an error text instead of raising (the driver reports it)."""
    folder = run_dir / PREFLIGHT_DIR / token
    probe = json.dumps({"who": who, "token": token})
    try:
        if not isinstance(folder, Path):  # object storage: one PUT is atomic
            (folder / f"{who}.json").write_text(probe)
            return None
        folder.mkdir(parents=True, exist_ok=True)
        tmp = folder / f".{who}.tmp"
        tmp.write_text(probe)
        os.replace(tmp, folder / f"{who}.json")
    except OSError as exc:
        return f"cannot write {folder}: {exc.strerror or exc}"
    except Exception as exc:  # object storage: no credentials, no bucket, no write permission
        return f"cannot write {folder}: {type(exc).__name__}: {exc}"
    return None


def missing_probes(run_dir: Path, token: str, others: Sequence[str]) -> list[str]:
    """The participants whose probe this one cannot read (with the right token) in ``run_dir``."""
    folder = run_dir / PREFLIGHT_DIR / token
    missing = []
    for who in others:
        try:
            ok = json.loads((folder / f"{who}.json").read_text()).get("token") == token
        except Exception:  # missing, unreadable, not JSON; on object storage also refused or unreachable
            ok = False
        if not ok:
            missing.append(who)
    return missing


def index_fingerprint(source: Path) -> str:
    """sha256 of ``source/index.json`` (raises OSError when it cannot be read)."""
    return hashlib.sha256((source / "index.json").read_bytes()).hexdigest()


def check_node(workdir: str, run_dir: str, token: str, others: Sequence[str], sources: Sequence[str]) -> dict[str, Any]:
    """A node's second round: whose probes it sees, and the fingerprint (or error) of every data source."""
    run_path = resolve_on_node(workdir, run_dir)
    data: dict[str, str] = {}
    for src in sources:
        if uri_scheme(src) is not None:  # object storage: the same bucket from every node
            from data_shards.storage import as_location

            path = as_location(src)
            try:
                data[src] = index_fingerprint(path)
            except Exception as exc:  # no credentials, no bucket, endpoint unreachable from this node
                data[src] = f"error: cannot read {src.rstrip('/')}/index.json ({type(exc).__name__}: {exc})"
            continue
        path = resolve_on_node(workdir, src)
        try:
            data[src] = index_fingerprint(path)
        except OSError as exc:
            data[src] = f"error: cannot read {path / 'index.json'} ({exc.strerror or exc})"
    return {"run_dir": str(run_path), "missing": missing_probes(run_path, token, others), "data": data}


def remove_probes(run_dir: Path, token: str) -> None:
    """Remove this view's probe directory (and ``.preflight`` once it is empty)."""
    if not isinstance(run_dir, Path):
        try:
            folder = run_dir / PREFLIGHT_DIR / token
            folder.fs.rm(folder.path, recursive=True)
        except Exception:
            pass  # best effort: a few bytes of probes left in the bucket
        return
    shutil.rmtree(run_dir / PREFLIGHT_DIR / token, ignore_errors=True)
    try:
        (run_dir / PREFLIGHT_DIR).rmdir()
    except OSError:
        pass


@dataclass(frozen=True)
class NodeProbe:
    """One node taking part, through one of its worker actors."""

    node_id: str
    node_ip: str
    actor: Any


_SHARED_FS_FIX = ("every node (and the driver) must see the same run directory at the same path: put run.dir on a"
                  " filesystem that every node mounts (NFS, Lustre, a mounted bucket), or launch on one node")


def run_preflight(nodes: Sequence[NodeProbe], *, run_dir: Any, run_dir_arg: str, workdir: str,
                  sources: Sequence[str], timeout_s: float = 120.0, say: Callable[[str], None] = print) -> None:
    """Raise :class:`PreflightError` unless every node sees the run directory, the data and our software.

    ``run_dir`` is where the probes go: the run directory, or ``run.storage`` when the run has one
    (then a write there from every node is also the check that each node may write to the store).
    """
    import ray

    token = uuid.uuid4().hex[:12]
    names = {n.node_id: n.node_ip for n in nodes}
    everyone = [DRIVER, *names]
    label = {DRIVER: "the driver", **{nid: f"node {ip} ({nid[:8]})" for nid, ip in names.items()}}
    mine = software()
    problems: list[str] = []
    try:
        error = write_probe(run_dir, token, DRIVER)
        if error:
            raise PreflightError(f"preflight: the driver {error}")
        written = ray.get([n.actor.preflight_write.remote(workdir, run_dir_arg, token, n.node_id) for n in nodes],
                          timeout=timeout_s)
        for n, result in zip(nodes, written):
            if result["error"]:
                problems.append(f"{label[n.node_id]} {result['error']}")
            wrong = mismatches(mine, result["software"])
            if wrong:
                problems.append(f"{label[n.node_id]} runs other software than the driver: {'; '.join(wrong)};"
                                " install the same fm-train checkout and versions on every node (or submit with"
                                " `fm-train submit`, which ships the project directory)")
        checked = ray.get([n.actor.preflight_check.remote(workdir, run_dir_arg, token,
                                                          [w for w in everyone if w != n.node_id], list(sources))
                           for n in nodes], timeout=timeout_s)
        driver_missing = missing_probes(run_dir, token, list(names))
        problems += _storage_problems(nodes, checked, driver_missing, label, run_dir)
        problems += _data_problems(nodes, checked, label)
    finally:
        cleanup = [n.actor.preflight_cleanup.remote(workdir, run_dir_arg, token) for n in nodes]
        ray.wait(cleanup, num_returns=len(cleanup), timeout=30)
        remove_probes(run_dir, token)
    if problems:
        raise PreflightError("preflight failed before step 1:\n  - " + "\n  - ".join(problems))
    say(f"preflight: {len(nodes)} node(s) and the driver see {run_dir} and the same data"
        f" ({len(sources)} source(s)); software matches")


def _storage_problems(nodes: Sequence[NodeProbe], checked: Sequence[dict[str, Any]], driver_missing: Sequence[str],
                      label: dict[str, str], run_dir: Path) -> list[str]:
    """One problem when the participants see more than one copy of the run directory, naming the copies."""
    blind = {DRIVER: set(driver_missing), **{n.node_id: set(r["missing"]) for n, r in zip(nodes, checked)}}
    paths = {DRIVER: str(run_dir), **{n.node_id: r["run_dir"] for n, r in zip(nodes, checked)}}
    views: list[list[str]] = []  # participants that see each other's probes share one copy
    for who in blind:
        for view in views:
            if all(who not in blind[o] and o not in blind[who] for o in view):
                view.append(who)
                break
        else:
            views.append([who])
    if len(views) == 1:
        return []
    copies = "; ".join(f"{' and '.join(label[w] for w in view)} see one at {paths[view[0]]}" for view in views)
    return [f"the run directory is not shared: there are {len(views)} copies ({copies}); {_SHARED_FS_FIX}"]


def _data_problems(nodes: Sequence[NodeProbe], checked: Sequence[dict[str, Any]], label: dict[str, str]) -> list[str]:
    out = []
    for src in (checked[0]["data"] if checked else {}):
        seen = {n.node_id: r["data"][src] for n, r in zip(nodes, checked)}
        errors = {nid: v for nid, v in seen.items() if v.startswith("error:")}
        for nid, v in errors.items():
            out.append(f"data source {src}: {label[nid]} {v[len('error: '):]}; put the shards on a filesystem every"
                       " node mounts, or copy the shard directory to the same path on every node")
        good = {v for nid, v in seen.items() if nid not in errors}
        if len(good) > 1:
            groups = {}
            for nid, v in seen.items():
                if nid not in errors:
                    groups.setdefault(v[:12], []).append(label[nid])
            detail = "; ".join(f"index.json sha256 {h}... on {', '.join(who)}" for h, who in groups.items())
            out.append(f"data source {src} differs between nodes ({detail}): every node must read the same shards")
    return out
