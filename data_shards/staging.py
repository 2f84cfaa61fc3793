"""Staging folders of shard builds: created with their owner recorded, removed by the next run once the
owner is dead.

A build writes into a fresh hidden folder (``.partial-*`` inside ``--out``, or ``fm-train-shard-*``
in the temp directory for an object-store ``--out``) and moves the finished files out of it. A build
that is SIGKILLed, or whose machine loses power, cannot remove its folder; the next build in the same
place does, but only when the folder's ``.owner`` record says it belongs to a process of this host
that no longer runs (pid plus the kernel's start time, so a reused pid is not mistaken for the owner).
A folder of another host, or one without a readable record, is left alone.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import uuid
from pathlib import Path

OWNER_NAME = ".owner"
LOCAL_PREFIX = ".partial-"  # inside --out: same filesystem, so the commit is a set of renames
TEMP_PREFIX = "fm-train-shard-"  # in the temp directory, for builds uploaded to object storage


def process_start_time(pid: int) -> str | None:
    """The kernel's start time of ``pid`` (field 22 of /proc/PID/stat), None where there is no /proc;
    "zombie" for a process that has exited but is not reaped yet."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return "gone"
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2:].split()  # the command name in (...) may hold spaces
    return "zombie" if fields[0] in ("Z", "X") else fields[19]


def make_staging(parent: Path, prefix: str) -> Path:
    """A fresh folder ``parent/prefix<pid>-<random>`` recording its owner; created with ``mkdir``, so its
    mode follows the umask (``tempfile.mkdtemp`` would make it 0700 whatever the umask says)."""
    parent.mkdir(parents=True, exist_ok=True)
    staging = parent / f"{prefix}{os.getpid()}-{uuid.uuid4().hex[:12]}"
    staging.mkdir()
    owner = {"pid": os.getpid(), "host": socket.gethostname(), "start": process_start_time(os.getpid())}
    (staging / OWNER_NAME).write_text(json.dumps(owner), encoding="utf-8")
    return staging


def _owner_is_dead(folder: Path) -> int | None:
    """The pid of ``folder``'s owner if that process of this host is certainly gone, else None."""
    try:
        owner = json.loads((folder / OWNER_NAME).read_text(encoding="utf-8"))
        pid, host, start = owner["pid"], owner["host"], owner["start"]
    except (OSError, ValueError, KeyError, TypeError):
        return None  # no record (being created, or not ours): leave it
    if type(pid) is not int or pid <= 0 or host != socket.gethostname() or pid == os.getpid():
        return None
    now = process_start_time(pid)
    if now in ("gone", "zombie") or (now is not None and start is not None and now != start):
        return pid
    if now is None:  # no /proc: ask the kernel whether the pid exists at all
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return pid
        except PermissionError:
            pass
    return None


def remove_stale_staging(parent: Path, prefix: str) -> list[str]:
    """Remove the staging folders in ``parent`` whose owner died; one line per folder removed.

    Only real folders (not symlinks) of this user are considered."""
    lines: list[str] = []
    try:
        candidates = sorted(parent.glob(f"{prefix}*"))
    except OSError:
        return lines
    for folder in candidates:
        try:
            if folder.is_symlink() or not folder.is_dir() or folder.stat().st_uid != os.getuid():
                continue
        except OSError:
            continue
        pid = _owner_is_dead(folder)
        if pid is not None:
            shutil.rmtree(folder, ignore_errors=True)
            lines.append(f"removed the staging folder {folder} of an interrupted build (pid {pid} is gone)")
    return lines
