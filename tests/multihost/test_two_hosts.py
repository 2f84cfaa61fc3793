"""fm-train on two hosts with their own IPs and disks (namespaced, see hosts.py), through the real
``fm-train launch`` and ``fm-train submit`` commands, with no network variable set by hand.

Each test trains the chaos suite's tiny model (fp32, ZeRO-2, deterministic) against one shared
two-host Ray cluster; the driver runs on host a, the Ray head. Order matters only at the end: the
node-loss test takes host b down and brings it back.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import threading
import time
import uuid
from pathlib import Path
from typing import Callable, Sequence

import pytest

from chaos_runs import (
    EVERY,
    STEPS,
    assert_same_training,
    failures,
    figure,
    final_weights,
    metrics,
    train_records,
    write_config,
    tiny_config,
)
from chaos_faults import wait_step, worker_pids
from hosts import BIN, LOCAL_DIR, Network, RayCluster, host, revive

pytestmark = [pytest.mark.multihost, pytest.mark.ray, pytest.mark.e2e, pytest.mark.timeout(900)]

ROOT = Path(__file__).resolve().parents[2]
RANK_LINE = "rank {rank}: node "


def two_host_config(run: Path, corpus: Path, **cluster: object) -> dict:
    """The chaos config with one worker per host (each worker takes a whole 2-CPU host)."""
    cfg = tiny_config(run, corpus, max_restarts=3)
    cfg["cluster"].update({"workers": 2, "cpus_per_worker": 2, "startup_timeout_s": 300})
    cfg["cluster"].update(cluster)
    return cfg


def launch(network: Network, cluster: RayCluster, config: Path, log: Path, *, timeout_s: float = 400,
           during: Callable[[], None] | None = None, args: Sequence[str] = ()) -> tuple[int, str]:
    """``fm-train launch CONFIG --address HEAD [ARGS]`` on host a; ``during`` runs in a thread meanwhile."""
    driver = host(network, "a").popen([BIN / "fm-train", "launch", config, "--address", cluster.address,
                                       "--failure-grace-s", "3", "--placement-timeout-s", "60", *args],
                                      cluster.env(), log=log, cwd=ROOT)
    thread = threading.Thread(target=during, daemon=True) if during else None
    if thread:
        thread.start()
    try:
        code = driver.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        # Say where the run stood: the pytest report alone shows only the wait that ran out.
        pytest.fail(f"fm-train launch still running after {timeout_s:.0f}s; its log ends:\n{log.read_text()[-6000:]}")
    finally:
        if driver.poll() is None:
            driver.kill()
    if thread:
        thread.join(timeout=60)
    return code, log.read_text()


def rank_ips(run: Path, world: int) -> dict[int, str]:
    """rank -> the node IP each worker printed about itself (its own view, not the launcher's table)."""
    out = {}
    for rank in range(world):
        lines = [l for l in (run / "logs" / f"rank_{rank:03d}.log").read_text().splitlines()
                 if RANK_LINE.format(rank=rank) in l]
        assert lines, f"rank {rank} never said where it runs"
        out[rank] = lines[-1].split(RANK_LINE.format(rank=rank), 1)[1].split(",", 1)[0]
    return out


@pytest.fixture(scope="package")
def reference(network: Network, cluster: RayCluster, corpus: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The uninterrupted dp2 run across the two hosts, converted at the end (the first done-when)."""
    root = tmp_path_factory.mktemp("mh-reference")
    cfg = two_host_config(root / "run", corpus)
    cfg["convert"] = {"at_end": True, "dtype": "fp32"}
    code, out = launch(network, cluster, write_config(root / "config.yaml", cfg), root / "driver.log")
    assert code == 0, out[-4000:]
    return root / "run"


def test_dp2_across_two_hosts_trains_and_converts(network: Network, reference: Path):
    ips = rank_ips(reference, 2)
    assert sorted(ips.values()) == sorted([host(network, "a").ip, host(network, "b").ip])
    placement = json.loads((reference / "placement.json").read_text())
    assert {r["rank"]: r["node_ip"] for r in placement["ranks"]} == ips
    assert all(r["interface"] not in ("", "-", "lo") for r in placement["ranks"])
    assert (reference / "hf" / "config.json").is_file() and list((reference / "hf").glob("*.safetensors"))
    assert sorted(train_records(reference)) == list(range(1, STEPS + 1))


def test_dp2_x_tp2_on_two_hosts_keeps_each_tp_pair_on_one_host(network: Network, cluster: RayCluster, corpus: Path,
                                                                 tmp_path: Path):
    cfg = two_host_config(tmp_path / "run", corpus, workers=4, cpus_per_worker=1)
    cfg["parallel"] = {"tp": 2, "pp": 1, "zero_stage": 1}
    cfg["train"]["steps"] = 6
    cfg["convert"] = {"at_end": True, "dtype": "fp32"}
    code, out = launch(network, cluster, write_config(tmp_path / "config.yaml", cfg), tmp_path / "driver.log")
    assert code == 0, out[-4000:]
    ips = rank_ips(tmp_path / "run", 4)
    assert ips[0] == ips[1] and ips[2] == ips[3] and ips[0] != ips[2], ips  # tp pairs are (0, 1) and (2, 3)
    assert (tmp_path / "run" / "hf" / "config.json").is_file()


def test_sigkill_of_the_worker_on_the_second_host_resumes_identically(network: Network, cluster: RayCluster,
                                                                      corpus: Path, reference: Path, tmp_path: Path):
    run = tmp_path / "run"
    b = host(network, "b")
    killed: dict[str, int] = {}

    def kill_b_worker() -> None:
        killed["step"] = wait_step(run, 9)
        [pid] = [pid for pid in worker_pids(run).values() if pid in b.pids()]
        os.kill(pid, signal.SIGKILL)
        killed["pid"] = pid

    config = write_config(tmp_path / "config.yaml", two_host_config(run, corpus))
    code, out = launch(network, cluster, config, tmp_path / "driver.log", during=kill_b_worker)
    assert code == 0, out[-4000:]
    assert "pid" in killed, "the worker on host b was never found"
    [record] = [r for r in failures(run) if r["kind"] != "checkpoint_fallback"]
    assert record["kind"] == "failed" and record["node_ip"] in (host(network, "a").ip, b.ip)
    assert_same_training(run, reference)


def test_without_a_shared_filesystem_the_launch_stops_before_step_1(network: Network, cluster: RayCluster,
                                                                    corpus: Path, tmp_path: Path):
    run = LOCAL_DIR / f"run-{uuid.uuid4().hex[:8]}"  # each host's own disk: two different directories
    config = write_config(tmp_path / "config.yaml", two_host_config(run, corpus))
    started = time.monotonic()
    code, out = launch(network, cluster, config, tmp_path / "driver.log")
    assert code != 0
    assert "preflight failed before step 1" in out and "the run directory is not shared" in out, out[-3000:]
    assert host(network, "a").ip in out and host(network, "b").ip in out and "NFS" in out
    assert not host(network, "a").private(run / "metrics.jsonl").exists()
    assert not host(network, "b").private(run / "metrics.jsonl").exists()
    assert time.monotonic() - started < 120


def test_submit_from_a_laptop_runs_the_job_on_the_two_host_cluster(network: Network, cluster: RayCluster,
                                                                   corpus: Path, tmp_path: Path):
    # The job ships a project directory as its working_dir, and the config must lie inside it: a copy
    # of the project (the code the job runs) with the config added.
    project = tmp_path / "project"
    shutil.copytree(ROOT, project, ignore=shutil.ignore_patterns(".venv", ".git", "runs", "data", "__pycache__",
                                                                 ".pytest_cache", "*.egg-info"))
    cfg = two_host_config(tmp_path / "run", corpus)
    cfg["train"]["steps"] = 6
    config = write_config(project / "jobs" / "config.yaml", cfg)
    laptop = host(network, "laptop")
    submitted = laptop.run([BIN / "fm-train", "submit", config.relative_to(project), "--working-dir", project,
                            "--address", cluster.dashboard, "--wait"], cluster.env(), cwd=project, timeout=500,
                           check=False)
    job_id = submitted.stdout.strip().splitlines()[0] if submitted.stdout.strip() else "?"
    logs = laptop.run([BIN / "fm-train", "logs", job_id, "--address", cluster.dashboard], cluster.env(), cwd=project,
                      check=False).stdout
    assert submitted.returncode == 0, f"job {job_id}: {submitted.stderr[-2000:]}\n{logs[-3000:]}"
    assert "training succeeded" in logs
    assert sorted(train_records(tmp_path / "run")) == list(range(1, 7))
    assert len(set(rank_ips(tmp_path / "run", 2).values())) == 2


def test_losing_the_second_host_the_run_finishes_on_the_first(network: Network, cluster: RayCluster, corpus: Path,
                                                              reference: Path, tmp_path: Path):
    run = tmp_path / "run"
    b = host(network, "b")
    lost: dict[str, float] = {}

    def power_off_b() -> None:
        lost["step"] = wait_step(run, 9)
        lost["at"] = time.time()
        lost["killed"] = b.kill_all()

    cfg = two_host_config(run, corpus, min_workers=1, node_wait_s=5)
    started = time.monotonic()
    try:
        code, out = launch(network, cluster, write_config(tmp_path / "config.yaml", cfg), tmp_path / "driver.log",
                           during=power_off_b)
    finally:
        revive(network, cluster)
    assert code == 0, out[-4000:]
    assert lost.get("killed"), "host b was not taken down"
    changes = [r for r in failures(run) if r["kind"] == "layout_change"]
    assert len(changes) == 1 and changes[0]["to"] == {"workers": 1, "grad_accum": 2}, failures(run)
    resumed_at = changes[0]["step"]
    assert 0 < resumed_at < lost["step"] + 1 and "layout change: dp 2" in out and "shrunk from 2 workers" in out
    assert any(r.get("event") == "layout_change" for r in metrics(run))
    got, want = train_records(run), train_records(reference)
    assert sorted(got) == list(range(1, STEPS + 1))
    after = [s for s in range(resumed_at + 1, STEPS + 1)]
    worst = max(abs(got[s]["loss"] - want[s]["loss"]) / abs(want[s]["loss"]) for s in after)
    assert worst <= 1e-5, f"losses after the loss differ from the two-host run by {worst:.2e} (relative)"
    assert got[STEPS]["data_receipt"] == want[STEPS]["data_receipt"]
    assert got[STEPS]["tokens_seen"] == want[STEPS]["tokens_seen"]  # the same global batch at every step
    assert set(rank_ips(run, 1).values()) == {host(network, "a").ip}
    assert final_weights(run, STEPS).keys() == final_weights(reference, STEPS).keys()
    changed = time.mktime(time.strptime(changes[0]["time"][:19], "%Y-%m-%dT%H:%M:%S"))  # local time, as written
    figure(f"host b powered off at logged step {lost['step']} ({lost['killed']} processes); layout change to"
           f" 1 worker {changed - lost['at']:.0f}s later, resumed from step {resumed_at}; worst relative loss"
           f" difference after it {worst:.1e}; run {time.monotonic() - started:.0f}s")


def test_losing_the_second_host_inside_a_checkpoint_save_the_run_finishes_on_the_first(
        network: Network, cluster: RayCluster, corpus: Path, tmp_path: Path):
    """Host b powers off while both ranks are inside the save of step 12, held there by the save's test
    hook (FM_TRAIN_TEST_HOLD_SAVE), so the loss lands inside the save every time. The rank on host a
    then fails in the save's next collective: a lost peer (exit 5), not a checkpoint error (exit 2,
    which would end the run); the launcher shrinks to host a and resumes from step 6, still latest."""
    run, hold = tmp_path / "run", tmp_path / "hold"  # both on the machine's shared filesystem
    hold.mkdir()
    tag = f"step_{2 * EVERY:08d}"  # the second save: the first must stay latest
    (hold / tag).touch()
    b = host(network, "b")
    lost: dict[str, int] = {}

    def power_off_b_inside_the_save() -> None:
        deadline = time.monotonic() + 300
        while not all((hold / f"{tag}.rank_{r:05d}").exists() for r in range(2)):
            if time.monotonic() > deadline:
                return
            time.sleep(0.05)
        lost["killed"] = b.kill_all()
        (hold / tag).unlink()  # the survivor goes on into the save, without its peer

    cfg = two_host_config(run, corpus, min_workers=1, node_wait_s=5)
    command = f"env FM_TRAIN_TEST_HOLD_SAVE={hold} {{python}} -m fm_train.cli worker {{config}}"
    try:
        code, out = launch(network, cluster, write_config(tmp_path / "config.yaml", cfg), tmp_path / "driver.log",
                           during=power_off_b_inside_the_save, args=["--worker-command", command])
    finally:
        revive(network, cluster)
    assert lost.get("killed"), f"the save of {tag} was never held on both ranks:\n{out[-3000:]}"
    assert code == 0, out[-4000:]
    assert "free disk space" not in out and "not restarting" not in out, out[-4000:]
    assert all(r.get("exit_code") != 2 for r in failures(run)), failures(run)
    logs = "".join((run / "logs" / f"rank_{r:03d}.log").read_text() for r in range(2))
    assert f"saving {tag} stopped because a peer or the network went away" in logs, logs[-3000:]
    changes = [r for r in failures(run) if r["kind"] == "layout_change"]
    assert len(changes) == 1 and changes[0]["to"] == {"workers": 1, "grad_accum": 2}, failures(run)
    assert changes[0]["step"] == EVERY, changes  # the step before the interrupted save stayed latest
    assert sorted(train_records(run)) == list(range(1, STEPS + 1))
    assert (run / "checkpoints" / "latest").read_text().strip() == f"step_{STEPS:08d}"


def test_with_object_storage_only_the_run_survives_a_kill_on_the_second_host_and_converts(
        network: Network, cluster: RayCluster, corpus: Path, reference: Path, tmp_path: Path):
    """No shared filesystem: the shards and the checkpoints live in an S3 store (moto's server on host a,
    reached over the switch) and run.dir is each host's own disk. The worker on host b is SIGKILLed
    once a step is committed in storage; the restarted group fetches the step committed in storage and trains exactly the
    uninterrupted run's losses; the driver converts from storage at the end."""
    import sys

    a, b = host(network, "a"), host(network, "b")
    bucket = f"mh-{uuid.uuid4().hex[:8]}"
    upload = ("import sys, boto3, fsspec\n"
              f"boto3.client('s3').create_bucket(Bucket={bucket!r})\n"
              f"fsspec.filesystem('s3').put(sys.argv[1] + '/', 's3://{bucket}/corpus/', recursive=True)\n")
    a.run([sys.executable, "-c", upload, str(corpus)], cluster.env())
    run = LOCAL_DIR / f"run-{uuid.uuid4().hex[:8]}"
    cfg = two_host_config(run, corpus)
    cfg["run"]["storage"] = f"s3://{bucket}/run"
    cfg["data"].update(sources=[{"path": f"s3://{bucket}/corpus"}], cache_dir=str(LOCAL_DIR / "shard-cache"))
    cfg["convert"] = {"at_end": True, "dtype": "fp32"}
    killed: dict[str, int] = {}

    def records() -> dict[int, dict]:
        # Rank 0 writes metrics.jsonl to its own node's run.dir, and Ray may place it on either host
        # (again at each attempt); the steps redone after the restart log the same values.
        merged: dict[int, dict] = {}
        for h in (a, b):
            if h.private(run / "metrics.jsonl").is_file():
                merged.update(train_records(h.private(run)))
        return merged

    # The kill comes once storage holds a committed step (what the restart must fetch): a watcher on
    # host a, started before the launch (its interpreter takes a second to start), exits when it sees one.
    watch = ("import time, fsspec\nfs = fsspec.filesystem('s3')\n"
             f"while not fs.exists('{bucket}/run/checkpoints/latest'):\n    fs.invalidate_cache()\n    time.sleep(0.05)\n")
    watcher = a.popen([sys.executable, "-c", watch], cluster.env(), log=tmp_path / "watcher.log")

    def kill_b_worker() -> None:
        deadline = time.monotonic() + 300
        while watcher.poll() is None and time.monotonic() < deadline:
            time.sleep(0.01)
        killed["step"] = max(records(), default=0)
        [pid] = [pid for pid in worker_pids(run).values() if pid in b.pids()]
        os.kill(pid, signal.SIGKILL)
        killed["pid"] = pid

    try:
        code, out = launch(network, cluster, write_config(tmp_path / "config.yaml", cfg), tmp_path / "driver.log",
                           during=kill_b_worker)
    finally:
        watcher.kill()
    assert code == 0, out[-4000:]
    assert "pid" in killed, "the worker on host b was never found"
    logs = "".join((a.private(run) / "logs" / f"rank_{r:03d}.log").read_text() for r in range(2))  # the driver's
    assert "fetching step_" in out + logs
    got, want = records(), train_records(reference)
    assert sorted(got) == list(range(1, STEPS + 1))
    assert [got[s]["loss"] for s in want] == [want[s]["loss"] for s in want]
    assert got[STEPS]["data_receipt"] == want[STEPS]["data_receipt"]
    assert (a.private(run) / "hf" / "config.json").is_file(), out[-3000:]
    latest = a.run([sys.executable, "-c", f"import fsspec; print(fsspec.filesystem('s3').cat_file("
                    f"'{bucket}/run/checkpoints/latest').decode().strip())"], cluster.env()).stdout.strip()
    assert latest == f"step_{STEPS:08d}"
    # The converted model reached the bucket too, its marker last (run.storage holds the run's results).
    assert f"model in storage    s3://{bucket}/run/hf" in out, out[-3000:]
    marker = a.run([sys.executable, "-c", f"import fsspec; print(sorted(__import__('json').loads(fsspec.filesystem("
                    f"'s3').cat_file('{bucket}/run/hf/.uploaded.json'))['files']))"], cluster.env()).stdout
    assert "config.json" in marker and ".safetensors" in marker, marker
