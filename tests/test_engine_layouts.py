"""``run_worker`` trains the tensor- and pipeline-parallel layouts exactly like one process.

Every run goes through the real worker on real gloo ranks and a real (tiny) shard directory, built
once for the module: groups, data split, engine, loop, eval, metrics and checkpoints. All layouts
share one global batch of 4 sequences (micro 2 x grad_accum x dp), so their logged losses, gradient
norms, data receipts and (at dp 1) validation losses must equal a single-process run's: that also
checks that the stream is split by dp rank and that tp/pp peers read the same batches. The pipeline run also
saves at step 3; a second run resumed from that step must log bit-identical losses for steps 4-6.

Runs cost a spawn each (DeepSpeed import, gloo rendezvous); they are made lazily, once per module.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from distributed import run_distributed

pytestmark = pytest.mark.multiproc

VOCAB, SEQ, STEPS, MICRO, GLOBAL = 512, 32, 6, 2, 4
# name -> (dp, tp, pp, zero stage); grad_accum = GLOBAL / (MICRO * dp). pp2 x tp2 runs ZeRO-0, whose
# gradient norm the engine measures itself (the ZeRO optimizers record theirs), in the layout where
# that is hardest to get right. pp3 has a middle stage, which reads no data from the engine's side.
LAYOUTS: dict[str, tuple[int, int, int, int]] = {
    "dp1-zero1": (1, 1, 1, 1),
    "tp2-zero2": (1, 2, 1, 2),
    "pp2-zero1": (1, 1, 2, 1),
    "pp3-zero1": (1, 1, 3, 1),
    "dp2xtp2-zero1": (2, 2, 1, 1),
    "pp2xtp2-zero0": (1, 2, 2, 0),
}
REFERENCE = "dp1-zero1"
# Fields that must agree across ranks and layouts (timings and throughput may not).
COMPARED = ("step", "loss", "val_loss", "grad_norm", "lr", "tokens_seen", "data_receipt")


def raw_config(root: Path, name: str, *, resume: str = "auto") -> dict[str, Any]:
    dp, tp, pp, zero = LAYOUTS[name.removesuffix("-resumed")]
    return {
        "run": {"name": name, "dir": str(root / name), "seed": 5},
        "model": {"n_layers": 4, "hidden": 64, "n_heads": 4, "n_kv_heads": 2, "ffn_hidden": 172,
                  "vocab_size": VOCAB, "max_seq_len": 64, "tie_embeddings": True},
        "parallel": {"tp": tp, "pp": pp, "zero_stage": zero},
        "precision": "fp32",
        "data": {"sources": [{"path": str(root / "corpus"), "weight": 1.0}], "seq_len": SEQ, "num_workers": 0,
                 "val_fraction": 0.05},
        "train": {"steps": STEPS, "micro_batch": MICRO, "grad_accum": GLOBAL // (MICRO * dp), "log_every": 1,
                  "eval_every": 3, "eval_batches": 2},
        # A low clip acts on every step, so a wrong global gradient norm would change the losses too.
        "optim": {"lr": 3e-3, "min_lr": 3e-4, "warmup_steps": 2, "grad_clip": 0.5},
        "checkpoint": {"every": 3, "keep": 3, "resume": resume},
        "logging": {"tensorboard": False},
        "cluster": {"workers": dp * tp * pp},
    }


def _worker(raw: dict[str, Any]) -> tuple[int, list[dict[str, Any]]]:
    """Per rank: ``run_worker`` with every record the loop emits kept (the sink writes rank 0's only)."""
    from fm_train.config import build_config
    from fm_train.engine.metrics import MetricsSink
    from fm_train.worker import run_worker

    seen: list[dict[str, Any]] = []
    write = MetricsSink.write

    def keep_and_write(self: MetricsSink, record: dict[str, Any]) -> None:
        seen.append({k: record[k] for k in COMPARED if k in record})
        write(self, record)

    MetricsSink.write = keep_and_write  # type: ignore[method-assign]
    return run_worker(build_config(raw)), seen


_RUNS: dict[str, list[list[dict[str, Any]]]] = {}


@pytest.fixture(scope="module")
def root(dir_with_corpus) -> Path:
    """A module directory holding the session's small shard directory as corpus/ (vocab 512, seq 32)."""
    return dir_with_corpus("layouts")


def run(root: Path, name: str, **kw: Any) -> list[list[dict[str, Any]]]:
    """Per-rank records of the run ``name`` (made on first use); asserts every rank exited with 0."""
    if name not in _RUNS:
        raw = raw_config(root, name, **kw)
        results = run_distributed(_worker, world_size=raw["cluster"]["workers"], args=(raw,),
                                  init_process_group=False)
        assert [code for code, _ in results] == [0] * len(results)
        _RUNS[name] = [records for _, records in results]
    return _RUNS[name]


def logged(root: Path, name: str) -> list[dict[str, Any]]:
    """What rank 0 wrote to ``RUN/metrics.jsonl``."""
    return [json.loads(line) for line in (root / name / "metrics.jsonl").read_text().splitlines()]


def train_records(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [r for r in records if "loss" in r]


def close(a: float, b: float, rel: float) -> bool:
    return abs(a - b) <= rel * abs(b)


@pytest.mark.parametrize("name", [n for n in LAYOUTS if n != REFERENCE])
def test_layout_logs_what_one_process_logs(root: Path, name: str) -> None:
    run(root, REFERENCE)
    run(root, name)
    ref = train_records(logged(root, REFERENCE))
    got_all = logged(root, name)
    got = train_records(got_all)
    assert [r["step"] for r in got] == list(range(1, STEPS + 1))
    ref_vals = [(r["step"], r["val_loss"]) for r in logged(root, REFERENCE) if "val_loss" in r]
    # Train losses are of different batches; the validation batches are the same at steps 3 and 6.
    assert ref_vals[-1][1] < ref_vals[0][1] - 0.05, f"the reference must learn, or equal losses prove little: {ref_vals}"
    for want, have in zip(ref, got):
        step = want["step"]
        assert close(have["loss"], want["loss"], 1e-5), (name, step, have["loss"], want["loss"])
        assert close(have["grad_norm"], want["grad_norm"], 1e-4), (name, step, have["grad_norm"], want["grad_norm"])
        assert have["lr"] == want["lr"] and have["tokens_seen"] == want["tokens_seen"]
        # The same global samples in the same order: tp/pp peers read their replica's batches.
        assert have["data_receipt"] == want["data_receipt"] != ""
    assert all(r["grad_norm"] > 0.5 for r in ref), "clipping must act for the norm to matter"
    vals = [(r["step"], r["val_loss"]) for r in got_all if "val_loss" in r]
    assert [s for s, _ in vals] == [s for s, _ in ref_vals] == [3, 6]
    if LAYOUTS[name][0] == LAYOUTS[REFERENCE][0]:
        # train.eval_batches counts micro-batches per dp rank, so only equal dp sizes share a val set.
        assert all(close(v, w, 1e-5) for (_, v), (_, w) in zip(vals, ref_vals)), (vals, ref_vals)


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_every_rank_reports_the_same_records(root: Path, name: str) -> None:
    per_rank = run(root, name)
    assert len(per_rank[0]) == STEPS + 2  # a train record per step, two evals
    for rank, records in enumerate(per_rank[1:], start=1):
        assert records == per_rank[0], f"{name}: rank {rank} logged other values than rank 0"


def test_pipeline_resume_is_bit_identical(root: Path) -> None:
    run(root, "pp2-zero1")
    step3 = root / "pp2-zero1" / "checkpoints" / "step_00000003"
    assert (step3 / "manifest.json").is_file()
    run(root, "pp2-zero1-resumed", resume=str(step3))
    full, resumed = logged(root, "pp2-zero1"), logged(root, "pp2-zero1-resumed")
    assert [r["step"] for r in train_records(resumed)] == [4, 5, 6]
    for want, have in zip(train_records(full)[3:], train_records(resumed)):
        assert have["loss"] == want["loss"] and have["grad_norm"] == want["grad_norm"], (have, want)
        assert have["data_receipt"] == want["data_receipt"] and have["tokens_seen"] == want["tokens_seen"]
    assert [r for r in resumed if "val_loss" in r] == [r for r in full if "val_loss" in r and r["step"] == 6]


@pytest.mark.parametrize("name", ["tp2-zero2", "pp2-zero1", "pp2xtp2-zero0"])
def test_checkpoint_manifest_maps_layers_for_the_converter(root: Path, name: str) -> None:
    from fm_train.checkpoint import read_manifest
    from fm_train.config import build_config
    from fm_train.families import family_of
    from fm_train.parallel.pipeline import TIED_KEY

    run(root, name)
    _, tp, pp, _ = LAYOUTS[name]
    manifest = read_manifest(root / name / "checkpoints" / "step_00000006")
    model_cfg = build_config(raw_config(root, name)).model
    family = family_of(model_cfg)
    args = family.modules().args(model_cfg)
    assert (manifest["topology"]["tp"], manifest["topology"]["pp"]) == (tp, pp)
    assert {e["index"]: e["module"] for e in manifest["layers"]} == family.modules().pipeline_layer_names(args)
    block = next(e for e in manifest["layers"] if e["module"] == "model.layers.0")["tp_split_dims"]
    assert block["self_attn.q_proj.weight"] == 0 and block["mlp.down_proj.weight"] == 1
    assert block["input_layernorm.weight"] is None
    assert manifest["tied"] == ({TIED_KEY: "model.embed_tokens"} if pp > 1 else {})
    assert manifest["data"]["state"] is not None and manifest["tokens_seen"] == STEPS * GLOBAL * SEQ
    from fm_train.deepspeed_adapter.ckpt_reader import DeepSpeedWeights
    from fm_train.convert.keymap import fm_param_shapes

    # The converter's reader merges the shards into the dense model's full shapes with this manifest.
    fields = manifest["config"]["model"]
    weights = DeepSpeedWeights(root / name / "checkpoints" / "step_00000006", manifest,
                               tied=family_of(fields).tied_params(fields))
    assert weights.shapes() == fm_param_shapes(family_of(fields), fields)


def _tp2_unclipped_norm(raw: dict[str, Any], tokens: Any) -> float:
    """Per rank: one ZeRO-0 fp32 step of the tp2 module without clipping; the tracker's norm."""
    import deepspeed

    from fm_train.config import build_config
    from fm_train.dist.groups import ParallelGroups
    from fm_train.dist.topology import Topology
    from fm_train.engine import GradNormTracker, TrainState, build_engine, train_step
    from fm_train.engine.train_module import build_train_module
    from fm_train.families import family_of

    cfg = build_config(raw)
    deepspeed.init_distributed(dist_backend="gloo")
    groups = ParallelGroups(Topology(world=cfg.world_size, tp=cfg.parallel.tp))
    engine, _ = build_engine(cfg, build_train_module(cfg, family_of(cfg.model), groups), mpu=groups)
    # Neither DeepSpeed's optimizer nor its clipping reports a norm here: the tracker's own hook must.
    assert engine.gradient_clipping() == 0 and not hasattr(engine.optimizer, "_global_grad_norm")
    batch = {"input_ids": tokens[:, :-1], "labels": tokens[:, 1:]}
    out = train_step(engine, iter([batch]), TrainState(), cfg.tokens_per_step, GradNormTracker.of(engine))
    assert out.grad_norm is not None
    return out.grad_norm


def test_unclipped_grad_norm_counts_tp_shards_and_replicas_once(root: Path) -> None:
    import torch

    from fm_train.config import build_config
    from fm_train.engine.train_module import build_train_module
    from fm_train.families import family_of

    raw = raw_config(root, "tp2-zero2")
    raw["parallel"]["zero_stage"], raw["optim"]["grad_clip"], raw["train"]["grad_accum"] = 0, 0.0, 1
    tokens = torch.randint(0, VOCAB, (MICRO, SEQ + 1), generator=torch.Generator().manual_seed(3))
    dense_cfg = build_config({**raw, "parallel": {"tp": 1, "pp": 1, "zero_stage": 0}, "cluster": {"workers": 1}})
    dense = build_train_module(dense_cfg, family_of(dense_cfg.model))
    dense(tokens[:, :-1], tokens[:, 1:]).backward()
    want = torch.nn.utils.get_total_norm([p.grad for p in dense.parameters()]).item()
    norms = run_distributed(_tp2_unclipped_norm, world_size=2, args=(raw, tokens))
    assert all(close(n, want, 1e-5) for n in norms), (norms, want)


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_every_layout_converts_verified_against_its_engine_probe(root: Path, name: str, tmp_path: Path) -> None:
    """The worker's saves carry the live engine's probe; conversion checks the export against it, and the
    probe itself does not depend on the layout (the layouts train the same weights)."""
    from fm_train.checkpoint import read_manifest
    from fm_train.convert.probe import compare, read_probe
    from fm_train.convert import convert_checkpoint

    run(root, REFERENCE)
    run(root, name)
    step_dir = root / name / "checkpoints" / "step_00000006"
    manifest = read_manifest(step_dir)
    assert manifest["probe"]["file"] in manifest["checksums"]["files"]
    said: list[str] = []
    convert_checkpoint(step_dir, tmp_path / "hf", dtype="fp32", progress=said.append)
    assert any(m.startswith("verified against the engine's probe") for m in said), said
    reference = read_probe(root / REFERENCE / "checkpoints" / "step_00000006", manifest)
    assert reference is not None
    diff = compare(read_probe(step_dir, manifest), reference, 1e-4)
    assert diff.ok, (name, diff.describe())
