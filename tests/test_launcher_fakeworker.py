"""A small real worker for launcher tests, standing in for ``fm-train worker`` (no torch, fast start).

Run as ``python tests/test_launcher_fakeworker.py CONFIG [--step-s S] [--startup-s S] [--crash-rank R
--crash-step K --crash-code C]``. It honours the worker contract the launcher relies on:

* reads RANK / WORLD_SIZE / LOCAL_RANK / LOCAL_WORLD_SIZE / MASTER_ADDR / MASTER_PORT;
* resumes from RUN/checkpoints/latest (a file naming ``step_XXXXXXXX``; manifest.json written last);
* ranks advance in lockstep through a file barrier (like a collective: one stuck rank stalls all);
* rank 0 appends ``{step, loss, tokens_per_s}`` to RUN/metrics.jsonl and checkpoints every
  ``checkpoint.every`` steps and at the end;
* SIGTERM: finish the step, save (rank 0), exit 0;
* every rank records each finished step in its heartbeat file (``FM_TRAIN_HEARTBEAT``).

``--stall-rank R --stall-step K`` makes rank R stop silently before step K (stuck in a collective)
while the others print a line every 0.2 s as they wait for it (a chatty rank that must not hide it).

Each rank writes RUN/pids/rank_N.pid and prints one ``FAKE_ENV {json}`` line with its environment
and its raylet's pid (inherited from the Ray worker that started it), so tests can check placement
independently of the launcher's own table. The pytest test below checks the script itself.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import yaml

from fm_train.dist.heartbeat import Heartbeat

_STOP = False


def _on_sigterm(signum, frame) -> None:  # noqa: ANN001 - signal handler signature
    global _STOP
    _STOP = True


def _latest_step(ckpt_dir: Path) -> int:
    latest = ckpt_dir / "latest"
    if not latest.is_file():
        return 0
    name = latest.read_text().strip()
    if not (ckpt_dir / name / "manifest.json").is_file():
        return 0
    return int(name.split("_")[1])


def _save(ckpt_dir: Path, step: int) -> None:
    step_dir = ckpt_dir / f"step_{step:08d}"
    step_dir.mkdir(parents=True, exist_ok=True)
    (step_dir / "manifest.json").write_text(json.dumps({"step": step}))
    tmp = ckpt_dir / "latest.tmp"
    tmp.write_text(step_dir.name)
    os.replace(tmp, ckpt_dir / "latest")


def _barrier(sync_dir: Path, step: int, rank: int, world: int) -> bool:
    """Wait until every rank reached ``step``; False if told to stop while waiting (a peer is gone)."""
    (sync_dir / f"{step}_{rank}").touch()
    started = last_word = time.monotonic()
    while not all((sync_dir / f"{step}_{r}").exists() for r in range(world)):
        if _STOP:
            return False
        if time.monotonic() - last_word > 0.2 and time.monotonic() - started > 1.0:
            print(f"rank {rank}: still waiting for my peers at step {step}", flush=True)
            last_word = time.monotonic()
        time.sleep(0.01)
    return True


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("config")
    parser.add_argument("--step-s", type=float, default=0.05)
    parser.add_argument("--startup-s", type=float, default=0.0, help="silent seconds before the first step")
    parser.add_argument("--crash-rank", type=int, default=-1)
    parser.add_argument("--crash-step", type=int, default=-1)
    parser.add_argument("--crash-code", type=int, default=3)
    parser.add_argument("--stall-rank", type=int, default=-1)
    parser.add_argument("--stall-step", type=int, default=-1)
    args = parser.parse_args(argv)
    signal.signal(signal.SIGTERM, _on_sigterm)

    cfg = yaml.safe_load(Path(args.config).read_text())
    run_dir = Path(cfg["run"]["dir"])
    steps, every = int(cfg["train"]["steps"]), int(cfg["checkpoint"]["every"]) or 10**9
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    ckpt_dir = run_dir / "checkpoints"
    sync_dir = run_dir / "sync" / os.environ["MASTER_PORT"]
    for d in (ckpt_dir, sync_dir, run_dir / "pids"):
        d.mkdir(parents=True, exist_ok=True)
    (run_dir / "pids" / f"rank_{rank}.pid").write_text(str(os.getpid()))
    env = {k: os.environ.get(k) for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "NODE_RANK",
                                          "MASTER_ADDR", "MASTER_PORT", "CUDA_VISIBLE_DEVICES", "FM_TRAIN_NODE_ID",
                                          "FM_TRAIN_ATTEMPT", "RAY_RAYLET_PID")}
    print("FAKE_ENV " + json.dumps(env), flush=True)

    deadline = time.monotonic() + args.startup_s  # a silent start-up (a large model load), SIGTERM-able
    while time.monotonic() < deadline and not _STOP:
        time.sleep(0.05)
    step = _latest_step(ckpt_dir)
    print(f"rank {rank}: starting at step {step} of {steps}", flush=True)
    heartbeat = Heartbeat.from_environ()
    heartbeat.beat(step, "ready")
    while step < steps and not _STOP:
        if rank == args.stall_rank and step + 1 >= args.stall_step:
            while not _STOP:  # stuck, silent, until the launcher stops it
                time.sleep(0.05)
            break
        if not _barrier(sync_dir, step + 1, rank, world):
            # Told to stop inside the barrier: save like a stop between steps (the trainer saves on SIGTERM).
            print(f"rank {rank}: stopped while waiting for peers at step {step + 1}", flush=True)
            break
        time.sleep(args.step_s)
        step += 1
        if rank == args.crash_rank and step >= args.crash_step:  # also after a resume past it
            print(f"rank {rank}: crashing on purpose at step {step}", file=sys.stderr, flush=True)
            return args.crash_code
        if rank == 0:
            with (run_dir / "metrics.jsonl").open("a") as fh:
                fh.write(json.dumps({"step": step, "loss": 10.0 / step, "tokens_per_s": 1000.0}) + "\n")
            if step % every == 0 or step == steps:
                _save(ckpt_dir, step)
        print(f"rank {rank}: step {step}", flush=True)
        heartbeat.beat(step)
    if _STOP and rank == 0:
        _save(ckpt_dir, step)
    print(f"rank {rank}: exiting at step {step} ({'SIGTERM' if _STOP else 'done'})", flush=True)
    return 0


def test_fake_worker_resumes_from_latest(tmp_path: Path) -> None:
    """The stand-in itself: a single rank runs to train.steps and a rerun resumes at the saved step."""
    cfg = {"run": {"dir": str(tmp_path / "run")}, "train": {"steps": 4}, "checkpoint": {"every": 2}}
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    env = {**os.environ, "RANK": "0", "WORLD_SIZE": "1", "MASTER_PORT": "1"}
    cmd = [sys.executable, __file__, str(tmp_path / "c.yaml"), "--step-s", "0"]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=60, check=True).stdout
    assert "starting at step 0" in out and "exiting at step 4" in out
    assert (tmp_path / "run/checkpoints/latest").read_text() == "step_00000004"
    again = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=60, check=True).stdout
    assert "starting at step 4" in again


if __name__ == "__main__":
    sys.exit(main())
