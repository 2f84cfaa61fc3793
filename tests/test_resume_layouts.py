"""Resume on another layout through ``run_worker``: dp2 -> dp1, pp2 -> pp1, tp2 -> tp1, pp2 x tp2 -> dp2,
and for the encoder (``bert-`` layouts, masked-LM batches) tp2 -> pp2, pp2 x tp2 -> dp2 and tp2 -> tp2 (bit-identical).

Each source layout trains 4 steps on a tiny real shard directory and saves at steps 2 and 4; a second
run on the target layout resumes from step 2 and trains to step 4. Steps 3-4 must read the same global
samples (data receipts) and log the same losses (1e-4 relative, fp32) as the uninterrupted run, which
holds only if the weights *and* Adam's moments and step count came across. Right after the resume the
target run also saves its state (``PROBE``), and the converter's reader compares every full fp32
weight and moment with the source step: equal to 1e-6, read through each checkpoint's own manifest.

The targets also change the ZeRO stage, so that the resharding writes into every kind of optimizer:
ZeRO-1/2 fragments, ZeRO-3 partitions and a plain torch AdamW (ZeRO-0). dp2 -> dp1 keeps ZeRO-2 and
is resharded by fm-train, as any layout change is.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from distributed import run_distributed

pytestmark = pytest.mark.multiproc

VOCAB, SEQ, MICRO, GLOBAL, STEPS, SAVE_AT = 512, 32, 2, 4, 4, 2
# name -> (dp, tp, pp, zero stage)
LAYOUTS: dict[str, tuple[int, int, int, int]] = {
    "dp2-zero2": (2, 1, 1, 2), "pp2-zero1": (1, 1, 2, 1), "tp2-zero2": (1, 2, 1, 2), "pp2xtp2-zero0": (1, 2, 2, 0),
    "dp1-zero2": (1, 1, 1, 2), "dp1-zero3": (1, 1, 1, 3), "dp1-zero0": (1, 1, 1, 0), "dp2-zero1": (2, 1, 1, 1),
    "bert-tp2-zero2": (1, 2, 1, 2), "bert-pp2-zero1": (1, 1, 2, 1), "bert-pp2xtp2-zero0": (1, 2, 2, 0),
    "bert-dp2-zero1": (2, 1, 1, 1),
}
CASES = [("dp2-zero2", "dp1-zero2"), ("pp2-zero1", "dp1-zero3"), ("tp2-zero2", "dp1-zero0"),
         ("pp2xtp2-zero0", "dp2-zero1"), ("bert-tp2-zero2", "bert-pp2-zero1"), ("bert-pp2xtp2-zero0", "bert-dp2-zero1"),
         ("bert-tp2-zero2", "bert-tp2-zero2")]  # the same layout: bit-identical losses
# The encoder: the shards' 512 tokens plus [CLS], [SEP], [MASK], padded to a multiple of 8 (tp2 splits it).
BERT = {"family": "bert", "n_layers": 4, "hidden": 64, "n_heads": 4, "n_kv_heads": 4, "ffn_hidden": 128,
        "vocab_size": VOCAB + 3, "vocab_multiple": 8, "max_seq_len": 64, "norm_eps": 1e-12, "tie_embeddings": True}
PROBE = "probe"  # sub-directory of a target run: its state saved right after the resume


def raw_config(root: Path, name: str, run: str, resume: str) -> dict[str, Any]:
    dp, tp, pp, zero = LAYOUTS[name]
    return {
        "run": {"name": run, "dir": str(root / run), "seed": 11},
        "model": BERT if name.startswith("bert-") else {
            "n_layers": 4, "hidden": 64, "n_heads": 4, "n_kv_heads": 2, "ffn_hidden": 172, "vocab_size": VOCAB,
            "max_seq_len": 64, "tie_embeddings": True},
        "parallel": {"tp": tp, "pp": pp, "zero_stage": zero},
        "precision": "fp32",
        "data": {"sources": [{"path": str(root / "corpus"), "weight": 1.0}], "seq_len": SEQ, "num_workers": 0},
        "train": {"steps": STEPS, "micro_batch": MICRO, "grad_accum": GLOBAL // (MICRO * dp), "log_every": 1,
                  "eval_every": 0},
        # A low clip acts on every step: the moments and the norm both shape the update.
        "optim": {"lr": 3e-3, "min_lr": 3e-4, "warmup_steps": 2, "grad_clip": 0.5},
        "checkpoint": {"every": SAVE_AT, "keep": 3, "resume": resume},
        "logging": {"tensorboard": False},
        "cluster": {"workers": dp * tp * pp},
    }


def _worker(raw: dict[str, Any]) -> int:
    """Per rank: ``run_worker``; a resumed run first saves what it restored under ``RUN/probe``."""
    from fm_train.config import build_config
    from fm_train.dist.topology import Topology
    from fm_train.engine import checkpointing
    from fm_train.worker import run_worker

    restore = checkpointing.restore

    def restore_and_probe(engine: Any, path: Path, cfg: Any, family: Any, state: Any,
                          tokenizer_hash: str | None) -> None:
        restore(engine, path, cfg, family, state, tokenizer_hash)
        import torch.distributed as dist

        probe_cfg = build_config({**raw, "run": {**raw["run"], "dir": str(Path(raw["run"]["dir"]) / PROBE)}})
        topo = Topology(world=dist.get_world_size(), tp=cfg.parallel.tp, pp=cfg.parallel.pp)
        checkpointing.checkpoint_hook(probe_cfg, family, topo, is_rank0=dist.get_rank() == 0,
                                      tokenizer_hash=tokenizer_hash).save(engine, state)

    checkpointing.restore = restore_and_probe  # type: ignore[assignment]
    return run_worker(build_config(raw))


_DONE: set[str] = set()


@pytest.fixture(scope="module")
def root(dir_with_corpus) -> Path:
    """A module directory holding the session's small shard directory as corpus/ (vocab 512, seq 32)."""
    return dir_with_corpus("resume_layouts")


def train(root: Path, name: str, run: str, resume: str = "auto") -> Path:
    """Run ``run`` on layout ``name`` once per module; every rank must exit with 0. Returns the run dir."""
    if run not in _DONE:
        raw = raw_config(root, name, run, resume)
        codes = run_distributed(_worker, world_size=raw["cluster"]["workers"], args=(raw,), init_process_group=False)
        assert codes == [0] * len(codes)
        _DONE.add(run)
    return root / run


def train_records(run_dir: Path) -> list[dict[str, Any]]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if "loss" in r]


def full_state(step_dir: Path) -> tuple[dict[str, dict[str | None, Any]], int]:
    """Every parameter's full fp32 weight and Adam moments, and Adam's step, of one step directory."""
    from fm_train.checkpoint import read_manifest
    from fm_train.deepspeed_adapter.ckpt_reader import DeepSpeedWeights
    from fm_train.families import family_of

    manifest = read_manifest(step_dir)
    fields = manifest["config"]["model"]
    reader = DeepSpeedWeights(step_dir, manifest, tied=family_of(fields).tied_params(fields))
    tensors = {n: {k: reader.get(n, k).clone() for k in (None, "exp_avg", "exp_avg_sq")} for n in reader.shapes()}
    return tensors, reader.optimizer_step()


@pytest.mark.parametrize(("source", "target"), CASES, ids=[f"{s}-to-{t}" for s, t in CASES])
def test_resume_on_another_layout_continues_the_run(root: Path, source: str, target: str) -> None:
    import torch

    src = train(root, source, source)
    step_dir = src / "checkpoints" / f"step_{SAVE_AT:08d}"
    dst = train(root, target, f"{source}-to-{target}", resume=str(step_dir))

    want, got = train_records(src), train_records(dst)
    assert [r["step"] for r in got] == list(range(SAVE_AT + 1, STEPS + 1))
    for w, g in zip(want[SAVE_AT:], got):
        assert g["data_receipt"] == w["data_receipt"] != "" and g["tokens_seen"] == w["tokens_seen"]
        tolerance = 0.0 if source == target else 1e-4
        assert abs(g["loss"] - w["loss"]) <= tolerance * abs(w["loss"]), (target, g["step"], g["loss"], w["loss"])
        assert g["lr"] == pytest.approx(w["lr"], rel=1e-12)

    saved, saved_step = full_state(step_dir)
    resumed, resumed_step = full_state(dst / PROBE / "checkpoints" / f"step_{SAVE_AT:08d}")
    assert resumed_step == saved_step == SAVE_AT
    assert sorted(resumed) == sorted(saved)
    for name, by_key in saved.items():
        for key, tensor in by_key.items():
            assert torch.allclose(resumed[name][key], tensor, rtol=1e-6, atol=1e-12), (name, key)
    # The moments are a trained optimizer's, not fresh zeros (which would also be "equal" to zeros).
    assert all(by_key["exp_avg_sq"].abs().sum() > 0 for by_key in saved.values())


def test_another_model_shape_is_refused(root: Path) -> None:
    from fm_train.checkpoint import CheckpointError, load_checkpoint
    from fm_train.config import build_config

    src = train(root, "pp2-zero1", "pp2-zero1")
    raw = raw_config(root, "dp1-zero0", "refused", "none")
    raw["model"]["ffn_hidden"] = 176
    with pytest.raises(CheckpointError, match="model.ffn_hidden: checkpoint 172, config 176"):
        load_checkpoint(None, src / "checkpoints" / f"step_{SAVE_AT:08d}", config=build_config(raw))
