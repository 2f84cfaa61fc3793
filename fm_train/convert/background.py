"""``convert.every``: verified Hugging Face exports while training goes on, made by a separate process.

Rank 0 hands each committed step due for export (``step % convert.every == 0``) to
:class:`BackgroundExports`. The step's files are hard-linked first into a hidden snapshot
(``RUN/hf_steps/.source-step_X-PID``; milliseconds, no bytes copied), so ``checkpoint.keep`` may delete
the step meanwhile without pulling the files from under the export. A child process, started once
(``python -m fm_train.convert.background``) at :data:`NICENESS` (SCHED_IDLE on Linux) with one compute
thread, runs the same conversion as ``fm-train convert`` on it: every file checked against the manifest's
checksums, the
Hugging Face directory built in a staging folder, its logits verified against the probe the training
engine saved with the checkpoint, then renamed to ``RUN/hf_steps/step_X`` (:mod:`fm_train.convert.out_dir`);
then ``RUN/hf_steps/latest``, the upload to ``<run.storage>/hf_steps/step_X/`` (marker last) and
``convert.keep`` (:mod:`fm_train.convert.exports_dir`). A child of its own: the conversion's Python
never holds the training process's interpreter lock (as :mod:`fm_train.storage.upload_process`); the
training process only keeps one thread blocked on the child's replies.

One export runs at a time; a step due while one runs waits, and a newer due step replaces a waiting
one (said in the log). A failed export is a log line and a ``hf_export_failed`` record in
``RUN/failures.jsonl``; training goes on and the next due step tries again. Without a shared
``run.dir`` (rank 0's disk holds only its own ranks' files) the child waits for the step's commit in
``run.storage`` and converts it from there, read in place. A SIGTERM or the parent's end stops the child
with nothing published (the staging folder is removed, or by the next conversion if killed outright).

Protocol, one JSON object per line: the parent writes ``{"step", "step_dir", "run_dir", "dtype", "keep",
"storage", "retries", "commit_wait_s"}``; the child answers ``{"ok", "step", "out", "seconds", "notes"}``
or ``{"ok": false, "step", "error"}``; its progress goes to stderr (the rank's log).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable

from fm_train.checkpoint.events import record_event
from fm_train.convert.exports_dir import export_name, exports_root

log = logging.getLogger("fm_train.convert")

NICENESS = 19
"""The export process's niceness (and, on Linux, the SCHED_IDLE policy): the step's compute threads and the
checkpoint uploads come first."""
FAILED_EVENT = "hf_export_failed"
"""The ``kind`` of the record a failed export appends to ``RUN/failures.jsonl``."""
SOURCE_PREFIX = ".source-"


def snapshot(step_dir: Path, root: Path) -> Path:
    """Hard-link every file of ``step_dir`` into a hidden folder under ``root``; returns it, or ``step_dir``
    itself when the file system refuses hard links (the export then reads the step in place, and a
    ``checkpoint.keep`` that deletes it first makes that export fail, said as such)."""
    target = root / f"{SOURCE_PREFIX}{step_dir.name}-{os.getpid()}"
    shutil.rmtree(target, ignore_errors=True)
    try:
        for path in sorted(step_dir.rglob("*")):
            rel = path.relative_to(step_dir)
            if path.is_dir() and not path.is_symlink():
                (target / rel).mkdir(parents=True, exist_ok=True)
            elif path.is_file() and not path.is_symlink():
                (target / rel).parent.mkdir(parents=True, exist_ok=True)
                os.link(path, target / rel)
    except OSError as exc:
        shutil.rmtree(target, ignore_errors=True)
        log.warning("cannot hard-link %s into %s (%s); the export reads it in place", step_dir, root, exc)
        return step_dir
    return target


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _drop(source: Path) -> None:
    if source.name.startswith(SOURCE_PREFIX):
        shutil.rmtree(source, ignore_errors=True)


class BackgroundExports:
    """Rank 0's handle on the export process: :meth:`submit` committed steps, :meth:`close` at the end."""

    def __init__(self, run_dir: Path, *, dtype: str, keep: int, storage: str | None, retries: int,
                 end_wait_s: float, commit_wait_s: float = 3600.0, say: Callable[[str], None] | None = None) -> None:
        self.run_dir, self.root = Path(run_dir), exports_root(run_dir)
        self.job = {"run_dir": str(self.run_dir), "dtype": dtype, "keep": keep, "storage": storage,
                    "retries": retries, "commit_wait_s": commit_wait_s}
        self.end_wait_s = end_wait_s
        self.say = say or (lambda line: print(line, flush=True))
        self.written: list[str] = []
        self.failed: dict[str, str] = {}
        self._pending: tuple[int, Path] | None = None
        self._running: int | None = None
        self._cond = threading.Condition()
        self._proc: subprocess.Popen | None = None
        self._thread: threading.Thread | None = None
        self._closing = False
        self._clean_leftovers()

    def _clean_leftovers(self) -> None:
        """Remove what a killed earlier attempt left in ``RUN/hf_steps``: snapshots of processes that are gone,
        and staging folders of dead export processes (never anything published)."""
        from data_shards.staging import remove_stale_staging

        for folder in sorted(self.root.glob(f"{SOURCE_PREFIX}*")):
            pid = folder.name.rpartition("-")[2]
            if pid.isdigit() and not _alive(int(pid)):
                shutil.rmtree(folder, ignore_errors=True)
        for line in remove_stale_staging(self.root, ".step_"):
            self.say(line)

    @property
    def pid(self) -> int | None:
        """The export process's id while it runs (for CPU accounting)."""
        return self._proc.pid if self._proc is not None and self._proc.poll() is None else None

    def submit(self, step: int, step_dir: Path) -> None:
        """Export committed ``step_dir`` (``step``) in the background; returns at once."""
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            source = snapshot(step_dir, self.root)
        except OSError as exc:  # e.g. a full disk: this export fails, training does not
            self._report(step, {"ok": False, "error": f"preparing the export in {self.root}: {exc}"})
            return
        with self._cond:
            if self._pending is not None:
                old, old_source = self._pending
                _drop(old_source)
                busy = f"the export of step {self._running} still runs" if self._running is not None else "it waited"
                self.say(f"hf export of step {old} skipped: step {step} is due and {busy}")
            self._pending = (step, source)
            if self._thread is None:
                self._thread = threading.Thread(target=self._serve, daemon=True, name="hf-exports")
                self._thread.start()
            self._cond.notify_all()

    def _serve(self) -> None:
        while True:
            with self._cond:
                while self._pending is None and not self._closing:
                    self._cond.wait()
                if self._pending is None:
                    return
                (step, source), self._pending = self._pending, None
                self._running = step
            try:
                reply = self._ask({**self.job, "step": step, "step_dir": str(source)})
            finally:
                _drop(source)
            if not self._closing:  # else close() stopped it and says so
                self._report(step, reply)
            with self._cond:
                self._running = None
                self._cond.notify_all()

    def _child(self) -> subprocess.Popen:
        if self._proc is None or self._proc.poll() is not None:
            env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
                   "HF_HUB_DISABLE_PROGRESS_BARS": "1", "TOKENIZERS_PARALLELISM": "false",
                   "CUDA_VISIBLE_DEVICES": ""}  # the conversion runs on the CPU; the GPUs are training's
            self._proc = subprocess.Popen([sys.executable, "-m", "fm_train.convert.background"], env=env,
                                          stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1)
        return self._proc

    def _ask(self, job: dict[str, Any]) -> dict[str, Any]:
        """Send one job, wait for its answer (this thread blocks in ``readline``, outside the GIL)."""
        proc = self._child()
        try:
            assert proc.stdin is not None and proc.stdout is not None
            proc.stdin.write(json.dumps(job) + "\n")
            proc.stdin.flush()
            line = proc.stdout.readline()
        except (BrokenPipeError, ValueError, OSError):
            line = ""
        if not line:
            code = proc.wait()
            self._proc = None
            return {"ok": False, "step": job["step"], "error": f"the export process exited (code {code})"}
        return json.loads(line)

    def _report(self, step: int, reply: dict[str, Any]) -> None:
        name = export_name(step)
        if reply.get("ok"):
            self.written.append(name)
            self.failed.pop(name, None)
            notes = "; ".join(reply.get("notes") or [])
            self.say(f"hf export of step {step}: {reply['out']} verified and written in {reply['seconds']:.1f} s"
                     + (f" ({notes})" if notes else ""))
            return
        error = " ".join(str(reply.get("error")).split())
        self.failed[name] = error
        self.say(f"hf export of step {step} failed: {error}; training goes on and the next due step is exported"
                 f" again (by hand: fm-train convert {self.run_dir / 'checkpoints' / name} --out "
                 f"{self.root / name})")
        record_event(self.run_dir, FAILED_EVENT, f"the Hugging Face export of step {step} failed: {error}",
                     step=step)

    def close(self, wait_s: float | None = None) -> list[str]:
        """Wait up to ``wait_s`` (default ``convert.end_wait_s``) for the waiting and running exports,
        then stop the process; returns one line per export of this run (written, failed, unfinished)."""
        deadline = time.monotonic() + (self.end_wait_s if wait_s is None else wait_s)
        with self._cond:
            while (self._pending is not None or self._running is not None) and time.monotonic() < deadline:
                self._cond.wait(timeout=max(0.0, min(1.0, deadline - time.monotonic())))
            unfinished = [s for s in (self._running, self._pending[0] if self._pending else None) if s is not None]
            if self._pending is not None:
                _drop(self._pending[1])
                self._pending = None
            self._closing = True
            self._cond.notify_all()
        self._stop_child(graceful=not unfinished)
        lines = [f"hf exports written: {', '.join(self.written)} (in {self.root})"] if self.written else []
        lines += [f"hf export of {name} failed: {error}" for name, error in self.failed.items()]
        lines += [f"hf export of step {s} unfinished after {self.end_wait_s:g} s (convert.end_wait_s): stopped,"
                  f" nothing published for it; convert it by hand with fm-train convert" for s in unfinished]
        return lines

    def _stop_child(self, graceful: bool) -> None:
        proc, self._proc = self._proc, None
        if proc is None or proc.poll() is not None:
            return
        if not graceful:
            proc.terminate()  # the child removes its staging folder on SIGTERM
        try:
            if proc.stdin is not None:
                proc.stdin.close()
        except OSError:
            pass
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _exit_with_parent(parent: int) -> None:
    """End this process when its parent ends (SIGTERM to ourselves: the staging folder is removed)."""
    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(1.0)
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=watch, daemon=True, name="parent-watch").start()


def main() -> int:
    """The child: export steps as the parent asks, until its stdin closes."""
    replies = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)  # a library's print() must not corrupt the replies

    def stop(signum: int, _frame: Any) -> None:
        raise SystemExit(128 + signum)  # unwinds the conversion: its staging folder is removed

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C: the worker finishes, then closes us
    _exit_with_parent(os.getppid())
    try:
        os.setpriority(os.PRIO_PROCESS, 0, NICENESS)
        # SCHED_IDLE: only the time no other task wants (below niceness 19); Linux only.
        os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
    except (AttributeError, OSError):
        pass  # not permitted or not Linux: the niceness alone, or normal priority
    import torch

    torch.set_num_threads(1)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # a bar per weight load in the rank's log
    from fm_train.convert.export_step import export_step

    for line in sys.stdin:
        job = json.loads(line)
        start = time.perf_counter()
        try:
            out, notes = export_step(job, progress=lambda m: print(f"hf export: {m}", file=sys.stderr, flush=True))
            reply: dict[str, Any] = {"ok": True, "step": job["step"], "out": str(out), "notes": notes,
                                     "seconds": time.perf_counter() - start}
        except Exception as exc:  # any failure is the parent's report; the process serves the next step
            reply = {"ok": False, "step": job["step"], "error": f"{type(exc).__name__}: {exc}"}
        try:
            replies.write(json.dumps(reply) + "\n")
        except BrokenPipeError:
            return 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
