"""``submit`` / ``status`` / ``logs`` against a real, throwaway ``ray start --head`` with a job server.

The head runs with RAY_AUTH_MODE=disabled and every port on 127.0.0.1: it is private to this test
and stopped after it (by killing exactly the processes it started; `ray stop` would hit other users'
Ray instances on the machine). The job runs ``python -m launcher launch`` with the small fake
worker, so it exercises the working_dir upload, the job's driver joining the cluster through
RAY_ADDRESS and the launcher inside a Ray Job.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import pytest

pytestmark = [pytest.mark.ray, pytest.mark.e2e, pytest.mark.timeout(400)]  # ~75 s on 2 cores
ROOT = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env.update(RAY_AUTH_MODE="disabled", RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0", RAY_USAGE_STATS_ENABLED="0",
               PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")
    return env


@pytest.fixture(scope="module")
def job_server():
    """A head node with a dashboard on 127.0.0.1; yields its http address."""
    gcs_port, dash_port = _free_port(), _free_port()
    temp_dir = tempfile.mkdtemp(prefix="fmray", dir="/tmp")  # short: Ray's socket paths must fit 107 bytes
    ray_bin = str(Path(sys.executable).parent / "ray")
    head = subprocess.Popen([ray_bin, "start", "--head", "--block", f"--port={gcs_port}", "--num-cpus=2",
                             "--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={dash_port}",
                             f"--temp-dir={temp_dir}", "--disable-usage-stats"],
                            env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    address = f"http://127.0.0.1:{dash_port}"
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if _cli("status", "raysubmit_none", "--address", address).stderr.count("cannot reach") == 0:
                break
            assert head.poll() is None, "ray start --head exited early"
            time.sleep(2)
        yield address
    finally:
        procs = [head, *(psutil.Process(head.pid).children(recursive=True) if head.poll() is None else [])]
        for p in procs:
            try:
                p.terminate()
            except (psutil.NoSuchProcess, ProcessLookupError):
                pass
        gone, alive = psutil.wait_procs([psutil.Process(p.pid) for p in procs if psutil.pid_exists(p.pid)], timeout=5)
        for p in alive:
            p.kill()
        shutil.rmtree(temp_dir, ignore_errors=True)


def _cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "launcher", *args], cwd=ROOT, env=_env(), capture_output=True,
                          text=True, timeout=timeout)


def test_submitted_launch_runs_to_success(job_server, tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    (data / "index.json").write_text("{}")
    run = tmp_path / "run"
    sub = _cli("submit", "cluster_configs/two_node_cpu.yaml", "--address", job_server,
               "--set", f"run.dir={run}", "--set", "cluster.workers=2", "--set", "parallel.tp=1",
               "--set", "train.steps=5", "--set", "optim.warmup_steps=0", "--set", "checkpoint.every=2", "--set", "convert.at_end=false",
               "--set", f"data.sources.0.path={data}",
               "--worker-command", "{python} tests/test_launcher_fakeworker.py {config} --step-s 0.05")
    assert sub.returncode == 0, sub.stderr
    bad = _cli("submit", "cluster_configs/two_node_cpu.yaml", "--address", job_server, "--set", "train.steps=5")
    assert bad.returncode == 2 and "optim.warmup_steps=30 exceeds train.steps=5" in bad.stderr  # checked before submitting
    job_id = sub.stdout.strip().splitlines()[-1]
    assert "python -m launcher launch cluster_configs/two_node_cpu.yaml" in sub.stderr

    deadline, state = time.monotonic() + 240, ""
    while time.monotonic() < deadline:
        state = _cli("status", job_id, "--address", job_server).stdout.strip()
        if state.split(":")[0] in ("SUCCEEDED", "FAILED", "STOPPED"):
            break
        time.sleep(3)
    logs = _cli("logs", job_id, "--address", job_server).stdout
    assert state.startswith("SUCCEEDED"), logs[-3000:]
    assert "training succeeded (final step 5)" in logs and "[rank 0 node 127.0.0.1]" in logs
    assert (run / "checkpoints" / "latest").read_text() == "step_00000005"
    assert sorted(p.name for p in (run / "logs").iterdir()) == ["rank_000.log", "rank_001.log"]
