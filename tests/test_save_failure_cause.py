"""A checkpoint save that fails is classified by its cause (issue 25, finding 9).

Two real worker processes (``python -m fm_train.cli worker``, what the launcher runs) train the tiny
model on the real default-corpus shards. The save of step 4 is held open on both ranks by the save's
test hook (``FM_TRAIN_TEST_HOLD_SAVE``); rank 1 is SIGKILLed while it is held, then the save goes
on. Rank 0's next collective inside the save (DeepSpeed's barrier) fails with gloo's "Connection
closed by peer": that is a lost peer (exit 5, restart or shrink), not a checkpoint error (exit 2, "free
disk space"), and ``latest`` still names step 2. The classification itself is checked on a real
full-device write (``/dev/full``) and on the launcher's choice of the failing rank.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from distributed import free_port

ROOT = Path(__file__).resolve().parents[1]


def _config(tiny_config_dict: dict, run: Path, corpus: Path) -> dict:
    return {**tiny_config_dict,
            "run": {**tiny_config_dict["run"], "dir": str(run)},
            "data": {**tiny_config_dict["data"], "num_workers": 0, "sources": [{"path": str(corpus)}]},
            "train": {**tiny_config_dict["train"], "steps": 6, "log_every": 1, "eval_every": 0},
            "checkpoint": {"every": 2, "keep": 3},
            "logging": {"tensorboard": False}}


def _start_rank(rank: int, config: Path, port: int, hold: Path, log: Path) -> subprocess.Popen:
    env = {**os.environ, "RANK": str(rank), "WORLD_SIZE": "2", "LOCAL_RANK": str(rank), "LOCAL_WORLD_SIZE": "2",
           "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "OMP_NUM_THREADS": "1",
           "FM_TRAIN_TEST_HOLD_SAVE": str(hold)}
    return subprocess.Popen([sys.executable, "-m", "fm_train.cli", "worker", str(config)], cwd=ROOT, env=env,
                            stdout=log.open("w"), stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)


def _wait_for(paths: list[Path], procs: list[subprocess.Popen], logs: list[Path], timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while not all(p.exists() for p in paths):
        dead = [i for i, p in enumerate(procs) if p.poll() is not None]
        if dead or time.monotonic() > deadline:
            tails = "\n".join(f"--- rank {i}:\n{log.read_text()[-3000:]}" for i, log in enumerate(logs))
            pytest.fail(f"the save was never held on every rank (exited: {dead}):\n{tails}")
        time.sleep(0.1)


@pytest.mark.multiproc
@pytest.mark.timeout(600)
def test_a_peer_killed_inside_the_save_is_a_peer_failure_and_latest_stays(tiny_config_dict, corpus, tmp_path):
    run, hold = tmp_path / "run", tmp_path / "hold"
    hold.mkdir()
    (hold / "step_00000004").touch()  # hold the second save: the first one (step 2) must stay latest
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump(_config(tiny_config_dict, run, corpus)))
    port, logs = free_port(), [tmp_path / "rank0.log", tmp_path / "rank1.log"]
    procs = [_start_rank(r, config, port, hold, logs[r]) for r in range(2)]
    try:
        _wait_for([hold / f"step_00000004.rank_{r:05d}" for r in range(2)], procs, logs, timeout_s=400)
        procs[1].send_signal(signal.SIGKILL)
        procs[1].wait(timeout=30)
        (hold / "step_00000004").unlink()  # rank 0 goes on into the save, without its peer
        code = procs[0].wait(timeout=180)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    out = logs[0].read_text()
    assert code == 5, f"rank 0 exited {code}, not the peer-failure code 5:\n{out[-3000:]}"
    [line] = [l for l in out.splitlines() if l.startswith("fm-train worker: rank")]
    assert "rank 0: saving step_00000004 stopped because a peer or the network went away" in line, line
    assert "by peer" in line and "still names step_00000002" in line, line
    assert "free disk space" not in out and "Traceback" not in out
    ckpt = run / "checkpoints"
    assert (ckpt / "latest").read_text().strip() == "step_00000002"
    assert (ckpt / "step_00000002" / "manifest.json").is_file()
    assert not (ckpt / "step_00000004" / "manifest.json").exists()


@pytest.mark.unit
def test_a_full_disk_is_local_and_a_lost_peer_is_not():
    from fm_train.dist.peer_loss import PeerLost, is_peer_failure

    with pytest.raises(OSError) as full:
        with open("/dev/full", "wb", buffering=0) as fh:  # a real ENOSPC from the kernel
            fh.write(b"x")
    assert not is_peer_failure(full.value)
    # torch.save's own words for a full disk, and gloo's for a peer that went away.
    assert not is_peer_failure(RuntimeError("basic_ios::clear: iostream error"))
    assert not is_peer_failure(RuntimeError("PytorchStreamWriter failed writing file data/0: file write failed"))
    gloo = RuntimeError("[../third_party/gloo/gloo/transport/tcp/pair.cc:553] Connection closed by peer"
                        " [10.213.7.2]:1964. This is typically caused by a remote worker crashing.")
    assert is_peer_failure(gloo) and is_peer_failure(ConnectionResetError(104, "Connection reset by peer"))
    try:
        try:
            raise gloo
        except RuntimeError as exc:
            raise ValueError("wrapped by a library") from exc
    except ValueError as wrapped:
        assert is_peer_failure(wrapped)
    assert is_peer_failure(PeerLost("rank 0: saving step_00000004 stopped"))


@pytest.mark.unit
def test_the_launcher_blames_the_rank_that_failed_by_itself_not_the_one_that_lost_it():
    from launcher.outcomes import PEER_FAILURE_EXIT_CODE, cause_rank

    sigterm = (-15, 143)
    peer = PEER_FAILURE_EXIT_CODE
    # Rank 1's disk filled up (exit 2); rank 0, in a collective with it, lost its peer (exit 5).
    assert cause_rank({0: peer, 1: 2}, {}, 0, stopped=sigterm) == 1
    # ... or rank 1 was still writing its error when the launcher stopped it: its own code still counts.
    assert cause_rank({0: peer}, {0: peer, 1: 2}, 0, stopped=sigterm) == 1
    # Something outside SIGKILLed rank 1 (a user, the OOM killer) before rank 0 noticed: rank 1 is the cause,
    # also when both exits arrive in the same poll round and rank 0 is looked at first.
    assert cause_rank({0: peer, 1: -9}, {0: peer, 1: -9}, 0, stopped=sigterm) == 1
    # Rank 1's node is gone (no exit code), or the launcher's stop killed it: rank 0's peer failure stands.
    assert cause_rank({0: peer}, {0: peer}, 0, stopped=sigterm) == 0
    assert cause_rank({0: peer}, {0: peer, 1: -9, 2: 143, 3: 0}, 0, stopped=sigterm) == 0
    assert cause_rank({0: peer, 2: -15}, {0: peer, 2: -15}, 0, stopped=sigterm) == 0
    # A first failure of its own is the cause whatever the others say.
    assert cause_rank({0: 2, 1: peer}, {}, 0, stopped=sigterm) == 0
    assert cause_rank({0: -9, 1: 3}, {}, 0, stopped=sigterm) == 0
