"""``fm-train convert`` from object storage: read in place against download-then-convert, in one run.

One DeepSpeed process (ZeRO-2, fp32) of a preset trains one step and saves a checkpoint (with the
engine's probe), which is uploaded to an S3 server on loopback (moto's, as in
``bench_checkpoint_upload.py``). Then, interleaved ``--reps`` times:

- **in place**: ``fm-train convert s3://... --out DIR`` (the DeepSpeed files read by ranged GETs,
  only the fp32 weights' byte ranges; no local copy);
- **download first**: the whole step directory copied to a local temp dir, then converted there
  (what the converter did before it read in place).

Reported: the bytes each way moves from storage and how much lands on local disk, and the wall
times (median) with their ratio. moto serves from memory over loopback, so the time ratio leaves
out a real store's bandwidth, where the bytes ratio is what would count.

Usage: .venv/bin/python bench/bench_convert_storage.py [--preset 125m] [--reps 3]
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_checkpoint_upload import free_port, start_s3  # noqa: E402  (the bench directory is not a package)


def _checkpoint(preset: str, tmp: Path, seq_len: int, micro_batch: int) -> Path:
    """Train one step of ``preset`` and save it; returns the step directory."""
    import torch

    from fm_train.checkpoint import build_manifest, save_checkpoint
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
    cfg = build_config({
        "run": {"dir": str(tmp / "run"), "seed": 1}, "model": {"preset": preset}, "precision": "fp32",
        "parallel": {"zero_stage": 2}, "cluster": {"workers": 1}, "data": {"seq_len": seq_len},
        "train": {"steps": 1, "micro_batch": micro_batch, "eval_every": 0}, "optim": {"warmup_steps": 0},
        "checkpoint": {"keep": 1}})
    family = family_of(cfg.model)
    engine, _ = build_engine(cfg, build_train_module(cfg, family))
    tokens = torch.randint(0, cfg.model.vocab_size, (micro_batch, seq_len + 1), generator=torch.Generator().manual_seed(0))
    loss = engine(tokens[:, :-1], tokens[:, 1:])
    engine.backward(loss)
    engine.step()
    manifest = build_manifest(cfg, Topology(world=1), data_state={}, tokens_seen=0, layers=manifest_layers(family, cfg))
    save_checkpoint(engine, Path(cfg.run.dir), 1, manifest=manifest, keep=1, is_rank0=True)
    engine.destroy()
    return Path(cfg.run.dir) / "checkpoints" / "step_00000001"


def _convert(argv: list[str]) -> tuple[float, str]:
    """Run ``fm-train convert`` in this process; (seconds, its stderr)."""
    from fm_train.cli import main

    err = io.StringIO()
    t = time.perf_counter()
    with contextlib.redirect_stderr(err):
        code = main(["convert", *argv])
    if code != 0:
        raise RuntimeError(f"fm-train convert {' '.join(argv)} failed:\n{err.getvalue()}")
    return time.perf_counter() - t, err.getvalue()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="125m", help="model preset (default 125m)")
    parser.add_argument("--reps", type=int, default=3, help="interleaved repetitions of each way (default 3)")
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--micro-batch", type=int, default=2)
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT))
    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    server = start_s3()
    try:
        return _run(args)
    finally:
        server.kill()


def _run(args: argparse.Namespace) -> int:
    import fsspec

    from fm_train.storage import ranged_reads

    tmp = Path(tempfile.mkdtemp(prefix="fm-train-bench-convert-"))
    step = _checkpoint(args.preset, tmp, args.seq_len, args.micro_batch)
    size = sum(p.stat().st_size for p in step.rglob("*") if p.is_file())
    fs = fsspec.filesystem("s3")
    fs.put(str(step), f"bench/conv/checkpoints/{step.name}", recursive=True)
    fs.pipe_file("bench/conv/checkpoints/latest", step.name.encode())
    common = ["--no-tokenizer", "--dtype", "fp32", "--overwrite"]
    times: dict[str, list[float]] = {"in_place": [], "download": []}
    fetched = []
    for rep in range(-1, args.reps):  # rep -1 warms up both ways (imports, the S3 client): not timed
        before = ranged_reads.bytes_fetched()
        seconds, err = _convert(["s3://bench/conv", "--out", str(tmp / "hf_in_place"), *common])
        assert "verified against the engine's probe" in err, err
        if rep >= 0:
            times["in_place"].append(seconds)
            fetched.append(ranged_reads.bytes_fetched() - before)
        t = time.perf_counter()
        local = tmp / f"download_{rep + 1}" / "checkpoints" / step.name
        fs.get(f"bench/conv/checkpoints/{step.name}", str(local), recursive=True)
        seconds, err = _convert([str(local), "--out", str(tmp / "hf_download"), *common])
        assert "verified against the engine's probe" in err, err
        if rep >= 0:
            times["download"].append(time.perf_counter() - t)
    med = {k: statistics.median(v) for k, v in times.items()}
    moved = statistics.median(fetched)
    print(f"preset {args.preset}: a {size / 2**20:.1f} MiB step (ZeRO-2, fp32, dp 1); {args.reps} interleaved reps;"
          f" cpus={os.cpu_count()}, load avg {os.getloadavg()[0]:.1f}")
    print(f"in place: {moved / 2**20:.1f} MiB of tensors read from storage ({moved / size:.2f} of the step), none"
          f" written locally; {med['in_place']:.2f} s")
    print(f"download first: {size / 2**20:.1f} MiB read and written locally; {med['download']:.2f} s"
          f" (in place takes {med['in_place'] / med['download']:.2f} x the time)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
