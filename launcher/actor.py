"""The Ray actor that holds one device slot and runs one rank's worker command as a subprocess.

The actor reserves the bundle's resources and supervises the process; the training itself is the
subprocess, so a crash in training code cannot take the supervisor down, and the launcher never needs
to import what the worker imports. Output is captured line by line and handed to the driver on
``poll``; the driver keeps the logs and decides what happened.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import deque
from pathlib import Path
from typing import IO, Any, Sequence

from fm_train.dist.heartbeat import HEARTBEAT_ENV, read_heartbeat
from launcher import preflight
from launcher.netif import interface_for_ip, node_socket_env
from launcher.options import render_command
from launcher.runstate import MetricsTail, run_state
from launcher.versions import software

# Lines kept for a driver that polls late; beyond this the oldest are dropped (and counted) rather
# than growing the actor's memory without bound.
_MAX_BUFFERED_LINES = 20000


class WorkerProcess:
    """Supervises one worker subprocess (wrapped with ``ray.remote`` by :mod:`launcher.group`)."""

    def __init__(self) -> None:
        self._proc: subprocess.Popen[bytes] | None = None
        self._lines: deque[tuple[str, str]] = deque()
        self._dropped = 0
        self._lock = threading.Lock()
        self._readers: list[threading.Thread] = []
        self._metrics: MetricsTail | None = None
        self._run_dir: Path | None = None
        # Node-local (the actor's temp dir), one per actor: the rank's progress record (launcher.monitor).
        self._heartbeat = Path(tempfile.mkdtemp(prefix="fm-train-heartbeat-")) / "rank"
        self._beat: tuple[int, str] | None = None
        self._beat_seen = time.monotonic()

    def describe(self) -> dict[str, Any]:
        """Where this actor landed: node id and IP, the interface that carries that IP, the socket-interface
        variables the node's environment sets, GPU ids, host and process ids."""
        import ray

        ip = ray.util.get_node_ip_address()
        return {"node_id": ray.get_runtime_context().get_node_id(), "node_ip": ip, "interface": interface_for_ip(ip),
                "socket_env": node_socket_env(os.environ), "gpu_ids": [str(g) for g in ray.get_gpu_ids()],
                "hostname": socket.gethostname(), "pid": os.getpid(), "cwd": os.getcwd()}

    def preflight_write(self, workdir: str, run_dir: str, token: str, who: str) -> dict[str, Any]:
        """First preflight round on this node: write its probe; report its software."""
        return {"error": preflight.write_probe(preflight.resolve_on_node(workdir, run_dir), token, who),
                "software": software()}

    def preflight_check(self, workdir: str, run_dir: str, token: str, others: list[str],
                        sources: list[str]) -> dict[str, Any]:
        """Second round: whose probes this node sees and what its data sources' index.json hold."""
        return preflight.check_node(workdir, run_dir, token, others, sources)

    def preflight_cleanup(self, workdir: str, run_dir: str, token: str) -> None:
        """Remove this node's view of the probes."""
        preflight.remove_probes(preflight.resolve_on_node(workdir, run_dir), token)

    def free_port(self) -> int:
        """A TCP port free on this node right now (the rank-0 actor picks MASTER_PORT)."""
        with socket.socket() as s:
            s.bind(("", 0))
            return int(s.getsockname()[1])

    def start(self, command: Sequence[str], env: dict[str, str], workdir: str, run_dir: str, config_text: str,
              tail_metrics: bool) -> dict[str, Any]:
        """Start the worker command; returns its pid, argv and the directory it runs in.

        ``workdir`` is the driver's working directory; where it does not exist (another machine without
        a shared filesystem) the actor's own directory is used, and the resolved config is written there.
        """
        if self._proc is not None and self._proc.poll() is None:
            raise RuntimeError("a worker process is already running in this actor")
        cwd = Path(workdir) if Path(workdir).is_dir() else Path.cwd()
        self._run_dir = run_path = preflight.resolve_on_node(workdir, run_dir)
        config_path = run_path / "config.resolved.yaml"
        if not config_path.is_file() or config_path.read_text() != config_text:
            # Only differs on a node that does not share the driver's filesystem (or holds a stale copy).
            config_path.parent.mkdir(parents=True, exist_ok=True)
            tmp = config_path.with_name(f".{config_path.name}.{os.getpid()}")
            tmp.write_text(config_text)
            os.replace(tmp, config_path)
        argv = render_command(command, python=sys.executable, config=config_path)
        self._metrics = MetricsTail(run_path / "metrics.jsonl") if tail_metrics else None
        self._heartbeat.parent.mkdir(parents=True, exist_ok=True)
        self._heartbeat.unlink(missing_ok=True)
        self._beat, self._beat_seen = None, time.monotonic()
        full_env = {**os.environ, **env, "PYTHONUNBUFFERED": "1", HEARTBEAT_ENV: str(self._heartbeat)}
        # A session of its own: signals reach the worker and every process it forks (data loaders).
        self._proc = subprocess.Popen(argv, cwd=str(cwd), env=full_env, stdin=subprocess.DEVNULL,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
        self._readers = [threading.Thread(target=self._read, args=(self._proc.stdout, "out"), daemon=True),
                         threading.Thread(target=self._read, args=(self._proc.stderr, "err"), daemon=True)]
        for t in self._readers:
            t.start()
        return {"pid": self._proc.pid, "argv": argv, "cwd": str(cwd)}

    def _read(self, stream: IO[bytes] | None, name: str) -> None:
        if stream is None:
            return
        for raw in iter(stream.readline, b""):
            line = raw.decode("utf-8", errors="replace").rstrip("\r\n")
            with self._lock:
                if len(self._lines) >= _MAX_BUFFERED_LINES:
                    self._lines.popleft()
                    self._dropped += 1
                self._lines.append((name, line))
        stream.close()

    def poll(self) -> dict[str, Any]:
        """New output lines and metrics records, the exit code (None while running), the process state, and
        the rank's heartbeat (last ``(step, phase)`` it recorded) with the seconds since it last changed."""
        proc = self._proc
        code = None if proc is None else proc.poll()
        if code is not None:
            # The process is gone; let the readers drain what it wrote last before reporting.
            for t in self._readers:
                t.join(timeout=2.0)
        with self._lock:
            lines, self._lines = list(self._lines), deque()
            dropped, self._dropped = self._dropped, 0
        metrics = self._metrics.read() if self._metrics is not None else []
        beat = read_heartbeat(self._heartbeat)
        if beat is not None and beat != self._beat:
            self._beat, self._beat_seen = beat, time.monotonic()
        return {"lines": lines, "dropped": dropped, "exit_code": code, "metrics": metrics, "state": self._state(),
                "heartbeat": self._beat, "heartbeat_age_s": time.monotonic() - self._beat_seen}

    def _state(self) -> str:
        if self._proc is None:
            return "not started"
        if self._proc.poll() is not None:
            return "exited"
        try:
            import psutil

            return str(psutil.Process(self._proc.pid).status())
        except Exception:  # psutil missing or the process just exited
            return "unknown"

    def send_signal(self, signum: int) -> bool:
        """Signal the worker's process group; False when there is no running process."""
        proc = self._proc
        if proc is None or proc.poll() is not None:
            return False
        try:
            os.killpg(proc.pid, signum)
        except ProcessLookupError:
            return False
        if signum == signal.SIGTERM:
            # A stopped (SIGSTOP, debugger) process only sees SIGTERM once it runs again.
            os.killpg(proc.pid, signal.SIGCONT)
        return True

    def returncode(self) -> int | None:
        """The worker's exit code, None while it runs (or before it started); sends nothing."""
        return None if self._proc is None else self._proc.poll()

    def stop(self, grace_s: float) -> int | None:
        """SIGTERM, wait up to ``grace_s`` for a clean exit (the worker saves), then SIGKILL; returns the exit code."""
        proc = self._proc
        if proc is None:
            return None
        if proc.poll() is None and self.send_signal(signal.SIGTERM):
            deadline = time.monotonic() + grace_s
            while proc.poll() is None and time.monotonic() < deadline:
                time.sleep(0.05)
        # SIGKILL the group even after a clean exit: forked helpers (data loaders) must not outlive it.
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        proc.wait(timeout=30)
        shutil.rmtree(self._heartbeat.parent, ignore_errors=True)
        return proc.returncode

    def run_state(self) -> dict[str, int | None]:
        """Newest checkpoint step and last metrics step as seen from this node."""
        return run_state(self._run_dir) if self._run_dir is not None else {"latest_step": None, "metrics_step": None}
