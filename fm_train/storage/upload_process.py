"""A rank's uploads to object storage, run in a child process at low CPU priority.

fsspec's async backends (s3fs, gcsfs) do their work on one event-loop thread of the calling process:
reading the file, signing and checksumming each part, sending it. In the training process that
thread holds the interpreter lock for every chunk it handles, so the training loop, whose Python
launches each step's kernels, waits for it, and ``setpriority`` on the thread that asked for the
upload does not reach the loop thread that does the work. A child process has its own interpreter
lock and runs at :data:`NICENESS` as a whole (PyTorch's distributed checkpoint moved its async save
to a process for the same interpreter-lock contention). It imports fsspec and fm-train's torch-free
config (not torch: about 1 s to start, once per rank), copies one file per request, and exits when its parent does.

Protocol, one JSON object per line: the parent writes ``{"local", "protocol", "path", "options"}``
to the child's stdin; the child answers ``{"ok": true}`` or ``{"ok": false, "error"}`` on its
stdout; anything a library prints goes to the child's stderr, the rank's log. Torch-free on purpose
(``python -m fm_train.storage.upload_process`` must not import the training stack).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

#: Niceness of the upload process (0 normal, 19 lowest): below the step's compute threads, above idle.
NICENESS = 10


class UploadProcess:
    """The parent's handle on one child process that puts files into object storage, one at a time.

    Started by :meth:`start` or the first :meth:`put`, restarted on the next one if it died; :meth:`put` raises
    ``OSError`` naming the file when the copy fails, so callers retry it like any storage error.
    """

    def __init__(self) -> None:
        self._proc: subprocess.Popen | None = None
        self._lock = threading.Lock()

    @property
    def pid(self) -> int | None:
        """The child's process id while it runs (for CPU accounting)."""
        return self._proc.pid if self._proc is not None and self._proc.poll() is None else None

    def start(self) -> None:
        """Start the child now (it takes about a second), so that the first upload does not wait for it."""
        with self._lock:
            self._child()

    def _child(self) -> subprocess.Popen:
        if self._proc is None or self._proc.poll() is not None:
            self._proc = subprocess.Popen([sys.executable, "-m", "fm_train.storage.upload_process"],
                                          stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1)
        return self._proc

    def put(self, local: Path, remote: Any) -> None:
        """Copy the file ``local`` to ``remote`` (a ``UPath`` on an fsspec filesystem) in the child."""
        job = {"local": str(local), "protocol": remote.protocol, "path": remote.path,
               "options": dict(remote.storage_options)}
        with self._lock:
            proc = self._child()
            try:
                proc.stdin.write(json.dumps(job) + "\n")
                proc.stdin.flush()
                line = proc.stdout.readline()
            except (BrokenPipeError, ValueError):
                line = ""
            if not line:
                code = proc.wait()
                self._proc = None
                raise OSError(f"the upload process exited (code {code}) while copying {local} to {remote}")
        reply = json.loads(line)
        if not reply["ok"]:
            raise OSError(f"copying {local} to {remote}: {reply['error']}")

    def close(self) -> None:
        """End the child (it finishes nothing: call between uploads)."""
        with self._lock:
            if self._proc is not None and self._proc.poll() is None:
                self._proc.stdin.close()
                try:
                    self._proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    self._proc.kill()
                    self._proc.wait()
            self._proc = None


def _exit_with_parent(parent: int) -> None:
    """End this process within a second of its parent's end (a SIGKILLed worker closes no pipe in time
    for a copy in progress). ``PR_SET_PDEATHSIG`` would fire when the parent *thread* that started
    the child ends, which an upload thread does after every checkpoint."""
    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(1.0)
        os._exit(0)

    threading.Thread(target=watch, daemon=True, name="parent-watch").start()


def main() -> int:
    """The child: copy files as the parent asks, until its stdin closes."""
    replies = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)  # a library's print() must not corrupt the replies
    _exit_with_parent(os.getppid())
    try:
        os.setpriority(os.PRIO_PROCESS, 0, NICENESS)  # absolute: a niced parent thread passes its own on
    except OSError:
        pass  # not permitted: uploads at normal priority
    import fsspec

    for line in sys.stdin:
        job = json.loads(line)
        try:
            fs = fsspec.filesystem(job["protocol"], **job["options"])
            fs.put_file(job["local"], job["path"])
            reply: dict[str, Any] = {"ok": True}
        except Exception as exc:  # every backend has its own error types; the parent retries
            reply = {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
        try:
            replies.write(json.dumps(reply) + "\n")
        except BrokenPipeError:  # the parent is gone (a killed worker): nobody to answer
            os._exit(0)
    return 0


if __name__ == "__main__":
    sys.exit(main())
