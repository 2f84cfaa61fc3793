"""Converter throughput and memory against a plain copy of the same bytes.

    .venv/bin/python bench/bench_convert.py [--preset 125m] [--zero 2] [--workdir DIR]

1. Builds a real DeepSpeed checkpoint of the preset's shape (one rank, bf16, ZeRO ``--zero``, one
   optimizer step so the optimizer files hold Adam moments too) with ``save_checkpoint``.
2. Runs ``convert_checkpoint`` in fresh subprocesses: bf16 without verification (2 GiB shards, then
   64 MiB shards), bf16 with verification, and fp32 without verification. Each child samples its own
   ``/proc/self/status`` every 20 ms: peak RSS, and peak anonymous RSS (heap: what the converter
   allocates; the rest of RSS is file pages of the memory-mapped checkpoint, which the kernel can drop).
   Times: end to end (package imports excluded), and the weight phase alone (first tensor read to last shard
   written), since at this size fixed costs (transformers' lazy imports, the meta model, the tokenizer)
   are a large share.
3. Copies the bf16 output's bytes with ``shutil.copyfile`` on the same disk (the floor for writing
   that many bytes) and prints GB/s of both and their ratio.

Prints one JSON line per measurement, then a summary. Takes about 2-3 minutes on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))


def _raw(preset: str, zero: int, tokenizer_root: str) -> dict[str, Any]:
    return {
        "run": {"name": f"bench-{preset}", "dir": "runs/bench", "seed": 1},
        "model": {"preset": preset, "max_seq_len": 256},
        "parallel": {"tp": 1, "pp": 1, "zero_stage": zero},
        "precision": "bf16",
        "data": {"sources": [{"path": tokenizer_root, "weight": 1.0}], "seq_len": 32},
        "train": {"steps": 1, "micro_batch": 1, "grad_accum": 1},
        "optim": {"warmup_steps": 0},
        "cluster": {"workers": 1},
    }


def _make_checkpoint(raw: dict[str, Any], run_dir: str) -> None:
    """One rank: build the engine, take one step, save with the checkpoint API."""
    import torch

    import test_checkpoint_support as S
    from fm_train.checkpoint import save_checkpoint
    from fm_train.config import build_config

    cfg = build_config(raw)
    engine = S.build_engine(cfg)
    ids = torch.randint(0, cfg.model.vocab_size, (1, 33))
    loss = engine(ids[:, :-1], ids[:, 1:])
    engine.backward(loss)
    engine.step()
    save_checkpoint(engine, Path(run_dir), 1, manifest=S.make_manifest(cfg, 1), keep=1, is_rank0=True)


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def _child(step_dir: str, out: str, dtype: str, verify: bool, shard_mb: int) -> None:
    """Convert once and print seconds, output bytes and peak (anonymous) RSS as JSON."""
    peaks = {"rss": 0, "anon": 0}
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            peaks["rss"] = max(peaks["rss"], _status_kib("VmRSS"))
            peaks["anon"] = max(peaks["anon"], _status_kib("RssAnon"))
            time.sleep(0.02)

    # Package imports are not conversion work: load them before the clock starts.
    import torch  # noqa: F401
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig  # noqa: F401

    from fm_train.convert import convert_checkpoint

    marks: dict[str, float] = {}

    def progress(msg: str) -> None:
        # The weight phase: from the first tensor read to the last shard written.
        if msg.startswith("reading"):
            marks["start"] = time.perf_counter()
        if msg.startswith("wrote model"):
            marks["end"] = time.perf_counter()

    base_anon = _status_kib("RssAnon")
    threading.Thread(target=sample, daemon=True).start()
    t0 = time.perf_counter()
    convert_checkpoint(Path(step_dir), Path(out), dtype=dtype, verify=verify, max_shard_bytes=shard_mb * 2**20,
                       progress=progress)
    seconds = time.perf_counter() - t0
    done.set()
    weights = sum(p.stat().st_size for p in Path(out).glob("*.safetensors"))
    print(json.dumps({"seconds": seconds, "weight_phase_seconds": marks["end"] - marks["start"],
                      "weight_bytes": weights, "peak_rss_mib": peaks["rss"] / 1024,
                      "peak_anon_mib": peaks["anon"] / 1024, "anon_after_imports_mib": base_anon / 1024}))


def _run_child(step_dir: Path, out: Path, dtype: str, verify: bool, shard_mb: int) -> dict[str, Any]:
    cmd = [sys.executable, __file__, "--child", str(step_dir), str(out), dtype, str(int(verify)), str(shard_mb)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "2"})
    if proc.returncode != 0:
        raise SystemExit(f"child failed:\n{proc.stderr[-3000:]}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    result.update(dtype=dtype, verify=verify, shard_mb=shard_mb)
    result["gb_per_s"] = result["weight_bytes"] / result["seconds"] / 1e9
    result["weight_phase_gb_per_s"] = result["weight_bytes"] / result["weight_phase_seconds"] / 1e9
    return result


def _copy_baseline(src_dir: Path, dst_dir: Path) -> dict[str, Any]:
    dst_dir.mkdir()
    files = sorted(src_dir.glob("*.safetensors"))
    t0 = time.perf_counter()
    for f in files:
        shutil.copyfile(f, dst_dir / f.name)
    seconds = time.perf_counter() - t0
    nbytes = sum(f.stat().st_size for f in files)
    return {"what": "plain copy", "seconds": seconds, "bytes": nbytes, "gb_per_s": nbytes / seconds / 1e9}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="125m")
    parser.add_argument("--zero", type=int, default=2, choices=(1, 2, 3))
    parser.add_argument("--workdir", type=Path, default=None, help="scratch dir (default: a temp dir, removed)")
    parser.add_argument("--child", nargs=5, metavar=("STEP", "OUT", "DTYPE", "VERIFY", "SHARD_MB"))
    args = parser.parse_args()
    if args.child:
        step, out, dtype, verify, shard_mb = args.child
        _child(step, out, dtype, verify == "1", int(shard_mb))
        return

    from distributed import run_distributed
    from fm_train.dist.env import ensure_extension_cache
    from test_checkpoint_support import write_tokenizer

    ensure_extension_cache()
    work = args.workdir or Path(tempfile.mkdtemp(prefix="bench-convert-"))
    try:
        write_tokenizer(work / "data")
        t0 = time.perf_counter()
        run_distributed(_make_checkpoint, 1, args=(_raw(args.preset, args.zero, str(work / "data")), str(work / "run")))
        step_dir = next((work / "run/checkpoints").glob("step_*"))
        ckpt_bytes = sum(p.stat().st_size for p in step_dir.rglob("*") if p.is_file())
        print(json.dumps({"what": "checkpoint", "preset": args.preset, "zero": args.zero, "bytes": ckpt_bytes,
                          "build_seconds": time.perf_counter() - t0}), flush=True)
        runs = []
        for i, (dtype, verify, shard_mb) in enumerate([("bf16", False, 2048), ("bf16", False, 64),
                                                       ("bf16", True, 2048), ("fp32", False, 2048)]):
            r = _run_child(step_dir, work / f"hf{i}", dtype, verify, shard_mb)
            runs.append(r)
            print(json.dumps({"what": "convert", **r}), flush=True)
        copy = _copy_baseline(work / "hf0", work / "copy")
        print(json.dumps(copy), flush=True)
        plain = runs[0]
        print(f"\nconvert bf16 (no verify) end to end {plain['gb_per_s']:.3f} GB/s, weight phase "
              f"{plain['weight_phase_gb_per_s']:.3f} GB/s; plain copy {copy['gb_per_s']:.3f} GB/s; ratios "
              f"{plain['gb_per_s'] / copy['gb_per_s']:.3f} / {plain['weight_phase_gb_per_s'] / copy['gb_per_s']:.3f}")
        for r in runs:
            print(f"  {r['dtype']} verify={r['verify']} shard={r['shard_mb']}MiB: {r['seconds']:.2f}s "
                  f"(weights {r['weight_phase_seconds']:.2f}s), "
                  f"{r['weight_bytes'] / 2**20:.0f} MiB out, peak RSS {r['peak_rss_mib']:.0f} MiB, peak anon "
                  f"{r['peak_anon_mib']:.0f} MiB (after imports {r['anon_after_imports_mib']:.0f})")
    finally:
        if args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
