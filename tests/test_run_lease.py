"""The run directory's lease: a second launch is refused naming the first; a gone holder's lease is
taken over with a line; the lease is renewed while held and removed at the end.

Holders are real processes running the real lease code; the refused launch is the real CLI.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from launcher.lease import LEASE_NAME, LeaseError, run_lease

pytestmark = pytest.mark.unit
ROOT = Path(__file__).resolve().parents[1]
HOLD = """
import sys
from pathlib import Path
from launcher.lease import run_lease
with run_lease(Path(sys.argv[1]), sys.argv[2] or None, say=print):
    print("held", flush=True)
    if sys.argv[3] == "die":
        import os
        os._exit(9)  # killed: the lease file stays behind
    sys.stdin.read()
"""


def _holder(run_dir: Path, storage: str = "", then: str = "wait") -> subprocess.Popen:
    """A process holding the lease of ``run_dir``, started and confirmed."""
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(run_dir), storage, then], cwd=ROOT, text=True,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    assert proc.stdout is not None and proc.stdout.readline().strip() == "held"
    return proc


def _lease(path: Path) -> dict:
    return json.loads((path / LEASE_NAME).read_text())


def test_a_second_launch_is_refused_naming_the_first(tmp_path: Path, tiny_config_dict: dict):
    run_dir = tmp_path / "run"
    first = _holder(run_dir)
    try:
        before = (run_dir / LEASE_NAME).read_bytes()
        config = tmp_path / "run.yaml"
        config.write_text(yaml.safe_dump({**tiny_config_dict, "run": {"name": "t", "dir": str(run_dir)}}))
        proc = subprocess.run([sys.executable, "-m", "launcher", "launch", str(config)], cwd=ROOT, text=True,
                              capture_output=True, timeout=120, stdin=subprocess.DEVNULL)
        assert proc.returncode == 2, proc.stderr
        error = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
        assert len(error) == 1 and "Traceback" not in proc.stderr, proc.stderr
        assert f"host {socket.gethostname()} pid {first.pid} " in error[0] and "in use by another launch" in error[0]
        assert (run_dir / LEASE_NAME).read_bytes() == before  # the holder's lease is untouched
        assert not (run_dir / "config.resolved.yaml").exists()  # nothing of the first run overwritten
    finally:
        first.communicate("", timeout=30)
    assert first.returncode == 0 and not (run_dir / LEASE_NAME).exists()  # released at the end


def test_a_lease_whose_process_is_gone_is_taken_over_with_a_line(tmp_path: Path):
    dead = _holder(tmp_path, then="die")
    dead.wait(timeout=30)
    assert _lease(tmp_path)["pid"] == dead.pid
    lines: list[str] = []
    with run_lease(tmp_path, None, say=lines.append):
        assert _lease(tmp_path)["pid"] == os.getpid()
    assert len(lines) == 1 and "took over" in lines[0]
    assert f"pid {dead.pid} " in lines[0] and f"its process {dead.pid} on this host is gone" in lines[0]
    assert not (tmp_path / LEASE_NAME).exists()


def _foreign(run_dir: Path, renewed_ago_s: float) -> None:
    now = time.time()
    (run_dir / LEASE_NAME).write_text(json.dumps({"host": "other-host", "pid": 4242, "pid_started": 1.0,
                                                  "started": now - 3600, "renewed": now - renewed_ago_s,
                                                  "token": "t0"}))


def test_another_hosts_lease_holds_until_it_is_not_renewed_within_the_timeout(tmp_path: Path):
    _foreign(tmp_path, renewed_ago_s=5)
    with pytest.raises(LeaseError, match=r"in use by another launch: host other-host pid 4242 \(started .*"
                                         r" renewed 5 s ago\)"):
        with run_lease(tmp_path, None, say=print, timeout_s=120):
            pass
    assert _lease(tmp_path)["token"] == "t0"
    _foreign(tmp_path, renewed_ago_s=300)
    lines: list[str] = []
    with run_lease(tmp_path, None, say=lines.append, timeout_s=120):
        pass
    assert len(lines) == 1 and "host other-host pid 4242" in lines[0] and "not renewed for 300 s" in lines[0]


def test_the_storage_lease_is_held_too_and_both_are_renewed_then_removed(tmp_path: Path):
    run_dir, storage = tmp_path / "run", tmp_path / "bucket"
    with run_lease(run_dir, str(storage), say=print, timeout_s=0.4):
        first = _lease(run_dir)["renewed"], _lease(storage)["renewed"]
        time.sleep(0.5)
        assert _lease(run_dir)["renewed"] > first[0] and _lease(storage)["renewed"] > first[1]
        # Another run directory on the same storage: refused, and its own run lease is not left behind.
        with pytest.raises(LeaseError, match=f"run {storage / LEASE_NAME} is in use .* pid {os.getpid()} "):
            with run_lease(tmp_path / "other", str(storage), say=print):
                pass
        assert not (tmp_path / "other" / LEASE_NAME).exists()
    assert not (run_dir / LEASE_NAME).exists() and not (storage / LEASE_NAME).exists()


def test_an_object_store_lease_refuses_a_second_holder(tmp_path: Path):
    from upath import UPath

    storage = "memory://fm-train-lease-test/run"
    with run_lease(tmp_path / "a", storage, say=print):
        assert json.loads((UPath(storage) / LEASE_NAME).read_bytes())["pid"] == os.getpid()
        with pytest.raises(LeaseError, match="in use by another launch"):
            with run_lease(tmp_path / "b", storage, say=print):
                pass
    assert not (UPath(storage) / LEASE_NAME).exists()
