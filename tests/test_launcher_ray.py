"""The launcher on a real two-node Ray cluster (``ray.cluster_utils.Cluster``, 2 CPUs per node).

Workers are ``tests/test_launcher_fakeworker.py``, a small real program that keeps the worker
contract (rank env, lockstep steps, metrics, checkpoints/latest, SIGTERM saves), so placement,
restarts, hang detection and preemption are exercised for real without the trainer. One test runs the
trainer itself (dp2 x tp2 over the two nodes).
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path
from typing import Callable

import psutil
import pytest
import yaml

from launcher.cluster import ClusterError
from launcher.job import launch
from launcher.options import LaunchOptions

pytestmark = [pytest.mark.ray, pytest.mark.timeout(300)]

FAKE_WORKER = str(Path(__file__).with_name("test_launcher_fakeworker.py"))


@pytest.fixture(scope="module")
def two_nodes():
    """Head (2 CPUs, resource node_a) + one worker node (2 CPUs, resource node_b), shared by the module."""
    import ray
    from ray.cluster_utils import Cluster

    if ray.is_initialized():  # a session-wide local Ray from another module cannot host two nodes
        ray.shutdown()
    saved_auth = os.environ.get("RAY_AUTH_MODE")
    cluster = Cluster(initialize_head=True,
                      head_node_args={"num_cpus": 2, "resources": {"node_a": 2}, "include_dashboard": False})
    cluster.add_node(num_cpus=2, resources={"node_b": 2})
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, log_to_driver=False, configure_logging=False)
    yield cluster
    ray.shutdown()
    cluster.shutdown()
    # ray.init exports RAY_AUTH_MODE=token into this process; do not leak it into other tests.
    if saved_auth is None:
        os.environ.pop("RAY_AUTH_MODE", None)
    else:
        os.environ["RAY_AUTH_MODE"] = saved_auth


@pytest.fixture(autouse=True)
def idle_cluster(two_nodes):
    """Start each test on an idle cluster (actors of the previous test release their CPUs asynchronously)."""
    import ray

    deadline = time.monotonic() + 30
    while ray.available_resources().get("CPU", 0) < 4 and time.monotonic() < deadline:
        time.sleep(0.2)
    yield


def write_config(tmp_path: Path, *, workers: int, tp: int = 1, steps: int = 6, max_restarts: int = 2,
                 step_timeout_s: float = 60, startup_timeout_s: float = 600, every: int = 2) -> Path:
    data = tmp_path / "data"
    data.mkdir(exist_ok=True)
    (data / "index.json").write_text("{}")
    cfg = {
        "run": {"name": "t", "dir": str(tmp_path / "run")},
        "model": {"n_layers": 2, "hidden": 64, "n_heads": 4, "n_kv_heads": 2, "ffn_hidden": 172, "vocab_size": 512,
                  "max_seq_len": 64},
        "parallel": {"tp": tp, "pp": 1},
        "precision": "fp32",
        "data": {"sources": [{"path": str(data), "default_corpus": True}], "seq_len": 32},
        "train": {"steps": steps, "micro_batch": 2, "log_every": 1, "eval_every": 0},
        "optim": {"warmup_steps": 0},
        "checkpoint": {"every": every},
        "convert": {"at_end": False},
        "cluster": {"workers": workers, "max_restarts": max_restarts, "step_timeout_s": step_timeout_s,
                    "startup_timeout_s": startup_timeout_s},
    }
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def options(*worker_args: str, **kw) -> LaunchOptions:
    command = ("{python}", FAKE_WORKER, "{config}", *worker_args)
    return LaunchOptions(worker_command=command, post_training=False, stop_grace_s=5, failure_grace_s=2,
                         poll_interval_s=0.2, progress_interval_s=0.5, placement_timeout_s=60, **kw)


def run_dir(tmp_path: Path) -> Path:
    return tmp_path / "run"


def metrics_step(run: Path) -> int:
    path = run / "metrics.jsonl"
    if not path.is_file():
        return 0
    steps = [json.loads(line)["step"] for line in path.read_text().splitlines() if line.strip()]
    return max(steps, default=0)


def when_step(run: Path, step: int, action: Callable[[], None], timeout_s: float = 120) -> threading.Thread:
    """Run ``action`` in a thread once rank 0 logged ``step`` (the launcher blocks the main thread)."""

    def watch() -> None:
        deadline = time.monotonic() + timeout_s
        while metrics_step(run) < step and time.monotonic() < deadline:
            time.sleep(0.05)
        action()

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    return thread


def pid_of(run: Path, rank: int) -> int:
    return int((run / "pids" / f"rank_{rank}.pid").read_text())


def failures(run: Path) -> list[dict]:
    path = run / "failures.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []


def fake_envs(run: Path, rank: int) -> list[dict]:
    text = (run / "logs" / f"rank_{rank:03d}.log").read_text()
    return [json.loads(line.split(" ", 1)[1]) for line in text.splitlines() if line.startswith("FAKE_ENV ")]


def raylet_node_id(raylet_pid: int) -> str:
    """The Ray node a raylet process serves, found from its socket name (independent of the launcher)."""
    import ray

    args = psutil.Process(raylet_pid).cmdline()
    socket = next(a.split("=", 1)[1] for a in args if a.startswith("--raylet_socket_name="))
    return next(n["NodeID"] for n in ray.nodes() if n["RayletSocketName"] == socket)


def test_dp2_tp2_places_each_tp_pair_on_one_node(two_nodes, tmp_path, capsys):
    cfg = write_config(tmp_path, workers=4, tp=2, steps=3)
    assert launch(cfg, [], options("--step-s", "0.05")) == 0
    run = run_dir(tmp_path)
    table = json.loads((run / "placement.json").read_text())
    ranks = table["ranks"]
    assert [r["rank"] for r in ranks] == [0, 1, 2, 3] and [r["tp"] for r in ranks] == [0, 1, 0, 1]
    assert [r["dp"] for r in ranks] == [0, 0, 1, 1]
    assert ranks[0]["node_id"] == ranks[1]["node_id"] != ranks[2]["node_id"] == ranks[3]["node_id"]
    assert [r["local_rank"] for r in ranks] == [0, 1, 0, 1] and {r["local_world_size"] for r in ranks} == {2}
    # What each worker process saw, and which raylet it really hangs under.
    for r in ranks:
        env = fake_envs(run, r["rank"])[-1]
        assert env["RANK"] == str(r["rank"]) and env["WORLD_SIZE"] == "4" and env["LOCAL_RANK"] == str(r["local_rank"])
        assert env["MASTER_ADDR"] == table["master_addr"] and env["MASTER_PORT"] == str(table["master_port"])
        assert env["FM_TRAIN_NODE_ID"] == r["node_id"]
        assert raylet_node_id(int(env["RAY_RAYLET_PID"])) == r["node_id"]
    out = capsys.readouterr().out
    assert "rank  node ip" in out and "[rank 0 node " in out and "[rank 1 node" not in out
    assert "progress: step 3/3 (100%)" in out
    assert (run / "logs" / "rank_003.log").read_text().count("rank 3: step") == 3


def test_insufficient_slots_is_refused_before_anything_starts(two_nodes, tmp_path):
    cfg = write_config(tmp_path, workers=6)
    with pytest.raises(ClusterError, match=r"needs 6 workers x 1 CPU, cluster has 4 CPUs free"):
        launch(cfg, [], options())
    assert not (run_dir(tmp_path) / "logs").exists()


def test_sigkilled_worker_restarts_the_group_and_finishes(two_nodes, tmp_path, capsys):
    cfg = write_config(tmp_path, workers=2, steps=12, max_restarts=2)
    run = run_dir(tmp_path)
    killer = when_step(run, 4, lambda: os.kill(pid_of(run, 1), signal.SIGKILL))
    assert launch(cfg, [], options("--step-s", "0.1")) == 0
    killer.join()
    [record] = failures(run)
    assert record["kind"] == "failed" and record["rank"] == 1 and record["exit_code"] == -signal.SIGKILL
    assert "killed by SIGKILL" in record["cause"]
    first, second = fake_envs(run, 0)[-2:]
    assert (first["FM_TRAIN_ATTEMPT"], second["FM_TRAIN_ATTEMPT"]) == ("1", "2")
    assert first["MASTER_PORT"] != second["MASTER_PORT"]
    log0 = (run / "logs" / "rank_000.log").read_text()
    resumed = [int(line.split("starting at step ")[1].split()[0]) for line in log0.splitlines() if "starting at step" in line]
    assert resumed[0] == 0 and resumed[1] >= 4  # the second attempt resumed from checkpoints/latest
    assert metrics_step(run) == 12
    assert "restarting the whole group (1 of 2 restarts)" in capsys.readouterr().out


def test_exceeding_max_restarts_exits_nonzero_with_the_cause(two_nodes, tmp_path, capsys):
    cfg = write_config(tmp_path, workers=2, steps=6, max_restarts=1)
    code = launch(cfg, [], options("--crash-rank", "1", "--crash-step", "2", "--crash-code", "3"))
    assert code == 1
    records = failures(run_dir(tmp_path))
    assert [r["attempt"] for r in records] == [1, 2] and {r["exit_code"] for r in records} == {3}
    assert any("crashing on purpose" in line for line in records[-1]["last_lines"])
    out = capsys.readouterr().out
    assert "giving up after 1 restarts (cluster.max_restarts=1)" in out
    assert "rank 1 on node" in out and "exited with code 3" in out


def test_input_error_exit_code_is_not_restarted(two_nodes, tmp_path, capsys):
    cfg = write_config(tmp_path, workers=2, steps=6, max_restarts=2)
    code = launch(cfg, [], options("--crash-rank", "1", "--crash-step", "2", "--crash-code", "2"))
    assert code == 1
    assert [r["attempt"] for r in failures(run_dir(tmp_path))] == [1]
    assert "not restarting: rank 1 reported a config, data or checkpoint error" in capsys.readouterr().out


def test_stopped_worker_is_detected_as_a_hang(two_nodes, tmp_path, capsys):
    cfg = write_config(tmp_path, workers=2, steps=10_000, max_restarts=0, step_timeout_s=3)
    run = run_dir(tmp_path)
    stopped_at: list[float] = []

    def stop_rank_1() -> None:
        stopped_at.append(time.monotonic())
        os.kill(pid_of(run, 1), signal.SIGSTOP)

    when_step(run, 3, stop_rank_1)
    assert launch(cfg, [], options("--step-s", "0.05")) == 1
    detected_after = time.monotonic() - stopped_at[0]
    [record] = failures(run)
    assert record["kind"] == "hung" and record["rank"] == 1 and record["states"]["1"] == "stopped"
    assert detected_after < 3 + 2 + 15  # timeout + grace + teardown, not minutes
    assert not psutil.pid_exists(pid_of(run, 1)) or psutil.Process(pid_of(run, 1)).status() == "zombie"
    assert "suspect rank 1" in capsys.readouterr().out


def test_a_stuck_rank_is_found_by_its_heartbeat_although_its_peer_keeps_printing(two_nodes, tmp_path, capsys):
    cfg = write_config(tmp_path, workers=2, steps=10_000, max_restarts=0, step_timeout_s=3)
    started = time.monotonic()
    assert launch(cfg, [], options("--step-s", "0.05", "--stall-rank", "1", "--stall-step", "5")) == 1
    [record] = failures(run_dir(tmp_path))
    assert record["kind"] == "hung" and record["rank"] == 1, record
    assert "heartbeat has not moved" in record["cause"] and "after step 4" in record["cause"], record
    assert "rank 0 at step 4" in record["cause"], record
    assert "still waiting for my peers" in (run_dir(tmp_path) / "logs" / "rank_000.log").read_text()
    assert time.monotonic() - started < 60
    assert "rank 1 is stuck" in capsys.readouterr().out


def test_a_slow_start_is_not_a_hang_but_a_silent_one_is(two_nodes, tmp_path, capsys):
    for case in ("slow", "stuck"):
        (tmp_path / case).mkdir()
    # 6 s of silence before the first step: longer than step_timeout_s, within startup_timeout_s.
    cfg = write_config(tmp_path / "slow", workers=2, steps=4, max_restarts=0, step_timeout_s=2, startup_timeout_s=60)
    assert launch(cfg, [], options("--startup-s", "6")) == 0
    assert failures(run_dir(tmp_path / "slow")) == []
    # A start-up that stays silent past startup_timeout_s is a hang, said as such.
    cfg = write_config(tmp_path / "stuck", workers=2, steps=4, max_restarts=0, step_timeout_s=2, startup_timeout_s=4)
    started = time.monotonic()
    assert launch(cfg, [], options("--startup-s", "120")) == 1
    assert time.monotonic() - started < 60
    [record] = failures(run_dir(tmp_path / "stuck"))
    assert record["kind"] == "hung"
    assert "cluster.startup_timeout_s=4, before the first metrics record" in capsys.readouterr().out


def test_preemption_relaunches_without_spending_restarts(two_nodes, tmp_path):
    cfg = write_config(tmp_path, workers=2, steps=8, max_restarts=0)
    run = run_dir(tmp_path)
    when_step(run, 3, lambda: [os.kill(pid_of(run, r), signal.SIGTERM) for r in (0, 1)])
    assert launch(cfg, [], options("--step-s", "0.1")) == 0
    [record] = failures(run)
    assert record["kind"] == "preempted" and record["last_step"] >= 3
    assert metrics_step(run) == 8


def test_ctrl_c_on_the_driver_saves_and_exits_130(two_nodes, tmp_path, capsys):
    cfg = write_config(tmp_path, workers=2, steps=10_000, every=1000)
    run = run_dir(tmp_path)
    when_step(run, 3, lambda: os.kill(os.getpid(), signal.SIGINT))
    assert launch(cfg, [], options("--step-s", "0.05")) == 130
    latest = (run / "checkpoints" / "latest").read_text()
    assert 3 <= int(latest.split("_")[1]) < 10_000  # saved on SIGTERM, not at a checkpoint.every boundary
    assert failures(run) == []
    assert "(SIGTERM)" in (run / "logs" / "rank_000.log").read_text()
    assert "stopped by SIGINT" in capsys.readouterr().out


@pytest.mark.timeout(600)
def test_real_trainer_dp2_tp2_keeps_each_tp_pair_on_one_node(two_nodes, tmp_path):
    """The trainer itself (not the fake worker): 4 ranks dp2 x tp2 over the two nodes, to the last step."""
    from data_shards import build_default_corpus

    data = build_default_corpus(tmp_path / "data", vocab_size=512, seq_len=32, max_bytes=200_000)
    raw = {
        "run": {"name": "tp-on-ray", "dir": str(tmp_path / "run")},
        "model": {"n_layers": 2, "hidden": 64, "n_heads": 4, "n_kv_heads": 2, "ffn_hidden": 172, "vocab_size": 512,
                  "max_seq_len": 64},
        "parallel": {"tp": 2, "pp": 1, "zero_stage": 1},
        "precision": "fp32",
        "data": {"sources": [{"path": str(data)}], "seq_len": 32, "num_workers": 0},
        "train": {"steps": 3, "micro_batch": 2, "log_every": 1, "eval_every": 0},
        "optim": {"warmup_steps": 0},
        "checkpoint": {"every": 3},
        "convert": {"at_end": False},
        "logging": {"tensorboard": False},
        "cluster": {"workers": 4, "max_restarts": 0},
    }
    cfg = tmp_path / "config.yaml"
    cfg.write_text(yaml.safe_dump(raw))
    opts = LaunchOptions(post_training=False, stop_grace_s=10, failure_grace_s=5, poll_interval_s=0.5,
                         progress_interval_s=1.0, placement_timeout_s=120)
    assert launch(cfg, [], opts) == 0
    run = run_dir(tmp_path)
    ranks = json.loads((run / "placement.json").read_text())["ranks"]
    assert [(r["dp"], r["tp"]) for r in ranks] == [(0, 0), (0, 1), (1, 0), (1, 1)]
    assert ranks[0]["node_id"] == ranks[1]["node_id"] != ranks[2]["node_id"] == ranks[3]["node_id"]
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3] and all(r["loss"] > 0 for r in records)
    assert (run / "checkpoints" / "latest").read_text().strip() == "step_00000003"
