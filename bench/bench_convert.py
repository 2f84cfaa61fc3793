"""Converter throughput and memory against a plain copy of the same bytes, and verification memory
against the model's size.

    .venv/bin/python bench/bench_convert.py [--preset 125m] [--layers N] [--zero 2] [--workdir DIR]

1. Builds a real DeepSpeed checkpoint of the preset's shape (``--layers``: fewer decoder blocks, to fit
   a bigger width on this machine; one rank, bf16, ZeRO ``--zero``, one optimizer step so the optimizer
   files hold Adam moments too) with ``save_checkpoint``; it carries the engine's probe logits.
2. Runs ``convert_checkpoint`` in fresh subprocesses: bf16 without verification (2 GiB shards and 64 MiB
   shards, ``--reps`` times, interleaved with step 4's baselines), bf16 with verification (against the
   probe, one weight at a time), and fp32 without
   verification. Each child samples its own ``/proc/self/status`` every 10 ms: peak RSS, and peak
   anonymous RSS (heap: what the converter allocates; the rest of RSS is file pages of memory-mapped
   files, which the kernel can drop), overall and during verification alone.
   Times: end to end (package imports excluded), and the weights phase alone (the first tensor read
   from the checkpoint to the last byte of the last shard written).
3. Loads the verified export the way verification did before it went block by block (the whole model
   with ``AutoModelForCausalLM.from_pretrained`` in fp32) and runs the same probe: the memory baseline.
4. Copies the bf16 output's bytes with ``shutil.copyfile`` on the same disk (the floor for writing
   that many bytes), and writes the same bytes from memory with one ``write()`` per file (the floor for
   any writer that produces its bytes in user space); the summary gives median ratios of their times
   to the converter's weights phase.

Prints one JSON line per measurement, then a summary. Takes about 2-3 minutes on 2 CPU cores for 125m.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
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


def _raw(preset: str, layers: int | None, zero: int, tokenizer_root: str) -> dict[str, Any]:
    model: dict[str, Any] = {"preset": preset, "max_seq_len": 256}
    if layers is not None:
        model["n_layers"] = layers
    return {
        "run": {"name": f"bench-{preset}", "dir": "runs/bench", "seed": 1},
        "model": model,
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


class _Sampler:
    """Peak RSS and anonymous RSS of this process, overall and per named phase, sampled every 10 ms."""

    def __init__(self) -> None:
        self.phase = "start"
        self.peaks: dict[str, dict[str, int]] = {}
        self.base_anon = _status_kib("RssAnon")
        self._done = threading.Event()
        threading.Thread(target=self._run, daemon=True).start()

    def _run(self) -> None:
        while not self._done.is_set():
            self.sample()
            time.sleep(0.01)

    def sample(self) -> None:
        rss, anon = _status_kib("VmRSS"), _status_kib("RssAnon")
        for key in ("all", self.phase):
            peak = self.peaks.setdefault(key, {"rss": 0, "anon": 0, "anon_at_start": anon})
            peak["rss"], peak["anon"] = max(peak["rss"], rss), max(peak["anon"], anon)

    def enter(self, phase: str) -> None:
        self.sample()
        self.phase = phase
        self.sample()

    def stop(self) -> None:
        self.sample()
        self._done.set()

    def mib(self, phase: str, what: str) -> float:
        return self.peaks.get(phase, {}).get(what, 0) / 1024


def _child(step_dir: str, out: str, dtype: str, verify: bool, shard_mb: int) -> None:
    """Convert once and print seconds, output bytes and peak (anonymous) RSS as JSON."""
    # Package imports are not conversion work: load them before the clock starts.
    import torch  # noqa: F401
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig  # noqa: F401

    from fm_train.convert import convert_checkpoint

    marks: dict[str, float] = {}
    sampler = _Sampler()

    def progress(msg: str) -> None:
        now = time.perf_counter()
        if msg.startswith("writing"):  # the weights phase: first tensor read ...
            marks["weights_start"] = now
            sampler.enter("weights")
        if msg.startswith("wrote model"):  # ... to the last shard written
            marks["weights_end"] = now
            sampler.enter("after_weights")
        if msg.startswith("verifying"):
            marks["verify_start"] = now
            sampler.enter("verify")

    t0 = time.perf_counter()
    convert_checkpoint(Path(step_dir), Path(out), dtype=dtype, verify=verify, max_shard_bytes=shard_mb * 2**20,
                       progress=progress)
    seconds = time.perf_counter() - t0
    sampler.stop()
    weights = sum(p.stat().st_size for p in Path(out).glob("*.safetensors"))
    result = {"seconds": seconds, "weight_phase_seconds": marks["weights_end"] - marks["weights_start"],
              "weight_bytes": weights, "peak_rss_mib": sampler.mib("all", "rss"),
              "peak_anon_mib": sampler.mib("all", "anon"), "anon_after_imports_mib": sampler.base_anon / 1024}
    if verify:
        result["verify_seconds"] = t0 + seconds - marks["verify_start"]
        result["verify_peak_anon_mib"] = sampler.mib("verify", "anon")
        result["verify_added_anon_mib"] = sampler.mib("verify", "anon") - sampler.mib("verify", "anon_at_start")
    print(json.dumps(result))


def _full_load_child(hf_dir: str, step_dir: str) -> None:
    """The pre-block-by-block verification's memory: the whole export in fp32, then the probe forward."""
    import torch
    from transformers import AutoModelForCausalLM

    from fm_train.checkpoint import read_manifest
    from fm_train.convert.probe import read_probe

    record = read_probe(Path(step_dir), read_manifest(Path(step_dir)))
    sampler = _Sampler()
    sampler.enter("verify")
    t0 = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(hf_dir, local_files_only=True, dtype=torch.float32).eval()
    with torch.no_grad():
        model(input_ids=record["input_ids"])
    seconds = time.perf_counter() - t0
    sampler.stop()
    print(json.dumps({"seconds": seconds, "verify_peak_anon_mib": sampler.mib("verify", "anon"),
                      "verify_added_anon_mib": sampler.mib("verify", "anon") - sampler.mib("verify", "anon_at_start"),
                      "peak_rss_mib": sampler.mib("all", "rss")}))


def _run_child(*child_args: str) -> dict[str, Any]:
    cmd = [sys.executable, __file__, "--child", *child_args]
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "2"})
    if proc.returncode != 0:
        raise SystemExit(f"child failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _run_convert(step_dir: Path, out: Path, dtype: str, verify: bool, shard_mb: int) -> dict[str, Any]:
    result = _run_child("convert", str(step_dir), str(out), dtype, str(int(verify)), str(shard_mb))
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


def _write_baseline(src_dir: Path, dst_dir: Path) -> dict[str, Any]:
    """The floor for any writer that makes its bytes in memory: ``write()`` of the output's bytes,
    already in memory, into new files (a copy moves them inside the kernel instead)."""
    import numpy as np

    dst_dir.mkdir()
    files = sorted(src_dir.glob("*.safetensors"))
    data = [np.fromfile(f, dtype=np.uint8) for f in files]
    t0 = time.perf_counter()
    for f, arr in zip(files, data):
        with open(dst_dir / f.name, "wb") as fh:
            fh.write(memoryview(arr))
    seconds = time.perf_counter() - t0
    nbytes = sum(a.nbytes for a in data)
    return {"what": "write() from memory", "seconds": seconds, "bytes": nbytes, "gb_per_s": nbytes / seconds / 1e9}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="125m", help="model preset of the checkpoint (default 125m)")
    parser.add_argument("--layers", type=int, default=None, help="decoder blocks (default: the preset's)")
    parser.add_argument("--zero", type=int, default=2, choices=(1, 2, 3), help="ZeRO stage of the checkpoint")
    parser.add_argument("--reps", type=int, default=3, help="interleaved convert/baseline runs (default 3)")
    parser.add_argument("--workdir", type=Path, default=None, help="scratch dir (default: a temp dir, removed)")
    parser.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        if args.child[0] == "convert":
            step, out, dtype, verify, shard_mb = args.child[1:]
            _child(step, out, dtype, verify == "1", int(shard_mb))
        else:
            _full_load_child(*args.child[1:])
        return

    from distributed import run_distributed
    from fm_train.dist.env import ensure_extension_cache
    from test_checkpoint_support import write_tokenizer

    ensure_extension_cache()
    work = args.workdir or Path(tempfile.mkdtemp(prefix="bench-convert-"))
    try:
        write_tokenizer(work / "data")
        t0 = time.perf_counter()
        raw = _raw(args.preset, args.layers, args.zero, str(work / "data"))
        run_distributed(_make_checkpoint, 1, args=(raw, str(work / "run")))
        step_dir = next((work / "run/checkpoints").glob("step_*"))
        ckpt_bytes = sum(p.stat().st_size for p in step_dir.rglob("*") if p.is_file())
        print(json.dumps({"what": "checkpoint", "preset": args.preset, "layers": args.layers, "zero": args.zero,
                          "bytes": ckpt_bytes, "build_seconds": time.perf_counter() - t0}), flush=True)
        # The headline ratio: bf16 conversions and plain copies of their output, interleaved, medians
        # (the machine is shared: a single pair can be off by 2x either way).
        reps = []
        for rep in range(args.reps):
            one = _run_convert(step_dir, work / f"hf-rep{rep}", "bf16", False, 2048)
            many = _run_convert(step_dir, work / f"hf-rep{rep}-64", "bf16", False, 64)
            copy = _copy_baseline(work / f"hf-rep{rep}", work / f"copy{rep}")
            write = _write_baseline(work / f"hf-rep{rep}", work / f"write{rep}")
            reps.append((one, many, copy, write))
            for line in ({"what": "convert", **one}, {"what": "convert", **many}, copy, write):
                print(json.dumps(line), flush=True)
            for d in (f"copy{rep}", f"write{rep}", f"hf-rep{rep}-64") + ((f"hf-rep{rep}",) if rep else ()):
                shutil.rmtree(work / d)
        runs = [reps[0][0], reps[0][1]]
        for i, (dtype, verify, shard_mb) in enumerate([("bf16", True, 2048), ("fp32", False, 2048)], start=1):
            r = _run_convert(step_dir, work / f"hf{i}", dtype, verify, shard_mb)
            runs.append(r)
            print(json.dumps({"what": "convert", **r}), flush=True)
        full = _run_child("full-load", str(work / "hf1"), str(step_dir))
        print(json.dumps({"what": "whole-model verification baseline", **full}), flush=True)

        def median(values: Any) -> float:
            return statistics.median(list(values))

        print(f"\nbf16 export without verification, medians of {args.reps} interleaved runs (weights phase s / "
              "copy s / write() s: " + ", ".join(f"{o['weight_phase_seconds']:.3f}+{m['weight_phase_seconds']:.3f}/"
                                                 f"{c['seconds']:.3f}/{w['seconds']:.3f}" for o, m, c, w in reps) + ")")
        for label, k in (("one 2 GiB-capped file", 0), ("64 MiB shards, written in parallel", 1)):
            vs_copy = median(c["seconds"] / r[k]["weight_phase_seconds"] for *r, c, _ in reps)
            vs_write = median(w["seconds"] / r[k]["weight_phase_seconds"] for *r, _, w in reps)
            end_to_end = median(c["seconds"] / r[k]["seconds"] for *r, c, _ in reps)
            print(f"  {label}: weights phase {vs_copy:.3f} of a plain copy's speed, {vs_write:.3f} of a write() of the "
                  f"same bytes from memory; end to end {end_to_end:.3f} of the copy")
        verified, fp32 = runs[2], runs[3]
        fp32_model_mib = fp32["weight_bytes"] / 2**20
        print(f"verification: +{verified['verify_added_anon_mib']:.0f} MiB anon (one weight at a time) vs "
              f"+{full['verify_added_anon_mib']:.0f} MiB (whole model), for a {fp32_model_mib:.0f} MiB fp32 model: "
              f"{verified['verify_added_anon_mib'] / fp32_model_mib:.2f} / "
              f"{full['verify_added_anon_mib'] / fp32_model_mib:.2f} of one fp32 copy; "
              f"{verified['verify_seconds']:.1f} s vs {full['seconds']:.1f} s")
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
