"""What training waits for when checkpoints go to object storage, measured in one run.

One DeepSpeed process (ZeRO-2, fp32) of a preset trains a fixed batch; each save goes through
``save_checkpoint`` as the worker calls it. Three ways, interleaved ``--reps`` times, the order
rotating, each timed save after the same untimed local save and ``--steps`` idle steps (the baseline
for the step times):

- **local**: the save to ``run.dir`` alone (what training waits for without storage);
- **background**: the same save with ``run.storage`` on an S3 server, uploads in the background:
  the time ``save_checkpoint`` takes to return, and how much slower the steps that run while the
  upload is in flight are than steps with no upload (goal: wait <= local save, steps <= 5% slower);
- **synchronous**: the save, then the upload waited for (what a trainer that uploads on its own
  thread, as Ray Train's ``report`` does, waits for).

The S3 server is moto's, in a separate process on loopback: it stands in for a remote store and
serves from memory (no network latency), but its CPU time (parsing every upload in Python) comes out
of this 2-core machine's, which a remote store's does not: the overlap figure is a worst case.
``--store-niceness 19`` runs the server at the lowest priority, closer to a store whose CPU is not
the node's. ``--pin`` gives the step a core of its own (CPU 0, one compute thread) and puts the S3
server and the upload process on the others: a node whose upload does not run on the step's cores,
as on a GPU node, where the step runs on the accelerator and the host's cores are mostly idle. The
uploads themselves run in the rank's upload process (``fm_train.storage.upload_process``); its CPU time is
reported too: what the node pays for an upload.

Usage: .venv/bin/python bench/bench_checkpoint_upload.py [--preset tiny] [--reps 3] [--steps 8] [--store-niceness 0]
       [--pin]
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _cpu_seconds(pid: int) -> float:
    """User + system CPU time of process ``pid`` so far (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def start_s3() -> subprocess.Popen:
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    os.environ.update(AWS_ENDPOINT_URL=f"http://127.0.0.1:{port}", AWS_ACCESS_KEY_ID="bench",
                      AWS_SECRET_ACCESS_KEY="bench", AWS_DEFAULT_REGION="us-east-1")
    import boto3

    for _ in range(100):
        try:
            boto3.client("s3").create_bucket(Bucket="bench")
            return proc
        except Exception:
            time.sleep(0.1)
    proc.kill()
    raise RuntimeError("moto server did not start")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="tiny", help="model preset (tiny, 125m, ...; default tiny)")
    parser.add_argument("--reps", type=int, default=3, help="interleaved repetitions of each way (default 3)")
    parser.add_argument("--steps", type=int, default=8, help="idle steps timed before each timed save (default 8)")
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--micro-batch", type=int, default=4)
    parser.add_argument("--store-niceness", type=int, default=0, help="niceness of the S3 server process (default 0)")
    parser.add_argument("--pin", action="store_true",
                        help="the step on CPU 0 with one thread; the S3 server and the upload process on the other CPUs")
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT))
    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    cpus = sorted(os.sched_getaffinity(0))
    if args.pin and len(cpus) < 2:
        parser.error(f"--pin needs at least 2 CPUs, this process may use {len(cpus)}")
    others = set(cpus[1:]) if args.pin else set(cpus)
    server = start_s3()
    os.setpriority(os.PRIO_PROCESS, server.pid, args.store_niceness)
    os.sched_setaffinity(server.pid, others)
    if args.pin:
        # Before torch starts its compute threads: they inherit the calling thread's affinity.
        os.sched_setaffinity(0, {cpus[0]})
        os.environ["OMP_NUM_THREADS"] = "1"
    try:
        return _run(args, server.pid, others)
    finally:
        server.kill()


def _run(args: argparse.Namespace, server_pid: int, upload_cpus: set[int]) -> int:
    import torch

    if args.pin:
        torch.set_num_threads(1)

    from fm_train.checkpoint import build_manifest, save_checkpoint
    from fm_train.storage.upload import CheckpointUploader
    from fm_train.config import build_config
    from fm_train.dist import Topology
    from fm_train.dist.env import RankEnv, ensure_extension_cache
    from fm_train.engine import build_engine
    from fm_train.deepspeed_adapter.comm import init_distributed
    from fm_train.engine.train_module import build_train_module
    from fm_train.families import family_of
    from fm_train.families.spec import manifest_layers

    ensure_extension_cache()
    init_distributed(RankEnv.from_environ())
    tmp = Path(tempfile.mkdtemp(prefix="fm-train-bench-upload-"))
    cfg = build_config({
        "run": {"dir": str(tmp / "run"), "seed": 1}, "model": {"preset": args.preset}, "precision": "fp32",
        "parallel": {"zero_stage": 2}, "cluster": {"workers": 1}, "data": {"seq_len": args.seq_len},
        "train": {"steps": 10**6, "micro_batch": args.micro_batch, "eval_every": 0},
        "checkpoint": {"keep": 1}})
    family = family_of(cfg.model)
    engine, _ = build_engine(cfg, build_train_module(cfg, family))
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, cfg.model.vocab_size, (args.micro_batch, args.seq_len + 1), generator=gen)
    topo = Topology(world=1, tp=1, pp=1)
    manifest = build_manifest(cfg, topo, data_state={}, tokens_seen=0, layers=manifest_layers(family, cfg))
    uploader = CheckpointUploader("s3://bench/run", rank=0, keep=1)
    os.sched_setaffinity(uploader._process.pid, upload_cpus)  # it inherited the training process's CPUs
    step = [0]

    def train_steps(n: int) -> list[float]:
        times = []
        for _ in range(n):
            t = time.perf_counter()
            loss = engine(tokens[:, :-1], tokens[:, 1:])
            engine.backward(loss)
            engine.step()
            step[0] += 1
            times.append(time.perf_counter() - t)
        return times

    size = 0
    results: dict[str, list[float]] = {}

    def record(key: str, value: float) -> None:
        results.setdefault(key, []).append(value)

    def save(with_uploader: bool, way: str | None = None) -> float:
        """One save; ``way`` set: its wait and phases go into the results under that name."""
        nonlocal size
        # Each save starts with the previous one's pages on disk: otherwise a save that follows a short
        # case pays for the kernel still writing back the last 1.6 GB (125m), and the cases are not alike.
        os.sync()
        phases: dict[str, float] = {}
        t = time.perf_counter()
        step_dir = save_checkpoint(engine, Path(cfg.run.dir), step[0], manifest=manifest, keep=1, is_rank0=True,
                                   uploader=uploader if with_uploader else None, timings=phases)
        elapsed = time.perf_counter() - t
        size = sum(p.stat().st_size for p in step_dir.rglob("*") if p.is_file())
        if way is not None:
            record(way, elapsed)
            record(f"{way}: files", phases["files"])
            record(f"{way}: upload's share", phases.get("waiting for the previous upload", 0.0)
                   + phases.get("hand-over to the upload", 0.0))
        return elapsed

    def local() -> None:
        save(False, "local")

    def background() -> None:
        server_cpu, client_cpu = _cpu_seconds(server_pid), _cpu_seconds(uploader._process.pid)
        save(True, "background")
        t = time.perf_counter()
        while uploader.busy:  # steps that run while this rank's upload is in flight
            results.setdefault("steps_overlap", []).extend(train_steps(1))
        record("upload", time.perf_counter() - t)
        record("server_cpu", _cpu_seconds(server_pid) - server_cpu)
        record("client_cpu", _cpu_seconds(uploader._process.pid) - client_cpu)

    def synchronous() -> None:
        t = time.perf_counter()
        save(True, "synchronous: save")
        uploader.wait()
        record("synchronous", time.perf_counter() - t)

    train_steps(3)  # warm up
    save(True)  # starts the upload process and warms the store's connection
    uploader.wait()
    # Every timed save follows the same thing, an untimed local save and the idle steps: how fast a save
    # writes its files here depends on what ran before it (on this VM a save right after a local save
    # and a few steps wrote 1.6 GB 2-4 s slower than one after an upload, with no upload involved), and
    # a fixed sequence charged that to one way. The order of the ways also rotates from rep to rep.
    ways = [local, background, synchronous]
    for rep in range(args.reps):
        for way in ways[rep % 3:] + ways[:rep % 3]:
            train_steps(1)  # each save is of a new step (a step already saved is not written again)
            save(False)
            results.setdefault("steps_idle", []).extend(train_steps(args.steps))
            way()
    med = {k: statistics.median(v) for k, v in results.items()}
    where = (f"step on CPU {sorted(os.sched_getaffinity(0))}, server and upload process on CPUs {sorted(upload_cpus)}"
             if args.pin else f"everything on CPUs {sorted(upload_cpus)}")
    print(f"preset {args.preset}: {size / 2**20:.1f} MiB per checkpoint; {args.reps} interleaved reps; {where},"
          f" load avg {os.getloadavg()[0]:.1f}")
    for way in ("local", "background", "synchronous"):
        print(f"{way}: waits {', '.join(f'{t:.2f}' for t in results[way])} s (in rep order)")
    print(f"training waits for the save: local {med['local']:.2f} s | background upload {med['background']:.2f} s"
          f" ({med['background'] / med['local']:.2f} x local) | synchronous save + upload {med['synchronous']:.2f} s"
          f" ({med['synchronous'] / med['local']:.2f} x local)")
    share = "background: upload's share"
    print(f"of the background save: the upload's part (waiting for the previous upload + hand-over)"
          f" {med[share] * 1e3:.1f} ms; writing the files {med['background: files']:.2f} s"
          f" (local save: {med['local: files']:.2f} s; synchronous: {med['synchronous: save: files']:.2f} s)")
    print(f"upload in the background took {med['upload']:.2f} s (median), of which the S3 server process used"
          f" {med['server_cpu']:.2f} CPU-s of this machine's cores (niceness {args.store_niceness}) and the upload"
          f" process {med['client_cpu']:.2f} CPU-s; {len(results['steps_overlap'])} steps ran"
          f" meanwhile: median step {med['steps_overlap'] * 1e3:.0f} ms vs {med['steps_idle'] * 1e3:.0f} ms without an"
          f" upload ({med['steps_overlap'] / med['steps_idle']:.2f} x)")
    uploader.close()
    engine.destroy()
    return 0


if __name__ == "__main__":
    sys.exit(main())
