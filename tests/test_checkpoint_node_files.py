"""A node without a shared ``run.dir`` fetches from ``run.storage`` only the files its ranks read.

Unit tests pin the rule (own files, plus the files of the rank's pipeline stage that are not one
rank's own; every file on another layout or without a ``writers`` record) and the checks' split of a
directory that holds part of the files. The end-to-end tests run the real worker with every rank on
its own disk (its own ``run.dir``): each fetches its part of the step committed in storage, holds
fewer files than the step has, and the resumed losses equal those of a resume from the whole
directory, for dp2 ZeRO-1 (the optimizer partition is per rank) and pp2 (the layer files are per
stage); a second resume on the same disks completes a node's own staged step, and rank 0's retention
reaches every disk.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from distributed import run_distributed
from test_engine_worker import _worker_with_fake_data

from fm_train.dist import Topology

STEP = "step_00000004"


def _manifest(world: int, tp: int, pp: int, zero_stage: int, writers: list[list[str]] | None) -> dict:
    out = {"topology": {"world": world, "dp": world // (tp * pp), "tp": tp, "pp": pp, "zero_stage": zero_stage}}
    if writers is not None:
        out["writers"] = writers
    return out


DP2 = [["mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_optim_states.pt", "rng/rank_00000.pt",
        "probe.safetensors", "zero_to_fp32.py"],
       ["zero_pp_rank_1_mp_rank_00_optim_states.pt", "rng/rank_00001.pt"]]
PP2 = [["layer_00-model_states.pt", "layer_01-model_states.pt", "mp_rank_00_model_states.pt",
        "zero_pp_rank_0_mp_rank_00_optim_states.pt", "rng/rank_00000.pt"],
       ["layer_02-model_states.pt", "layer_03-model_states.pt", "mp_rank_01_model_states.pt",
        "zero_pp_rank_0_mp_rank_01_optim_states.pt", "rng/rank_00001.pt"]]


@pytest.mark.unit
def test_a_data_parallel_rank_reads_the_shared_weights_and_its_own_partition() -> None:
    from fm_train.checkpoint.node_files import files_for_ranks

    topo = Topology(world=2)
    assert files_for_ranks(_manifest(2, 1, 1, 1, DP2), [1], topo, 1) == [
        "mp_rank_00_model_states.pt", "probe.safetensors", "rng/rank_00001.pt",
        "zero_pp_rank_1_mp_rank_00_optim_states.pt", "zero_to_fp32.py"]
    assert files_for_ranks(_manifest(2, 1, 1, 1, DP2), [0, 1], topo, 1) == sorted(DP2[0] + DP2[1])


@pytest.mark.unit
def test_a_pipeline_stage_reads_only_its_own_layers() -> None:
    from fm_train.checkpoint.node_files import files_for_ranks

    # Every stage's mp_rank file too: DeepSpeed's loader counts them against the saved model-parallel size.
    assert files_for_ranks(_manifest(2, 1, 2, 1, PP2), [1], Topology(world=2, pp=2), 1) == sorted(
        PP2[1] + ["mp_rank_00_model_states.pt"])
    # tp2 x pp2: a stage's tp ranks share its layer files (DeepSpeed's pipeline loader globs all of them).
    pp2tp2 = [["layer_00-model_00-model_states.pt", "zero_pp_rank_0_mp_rank_00_optim_states.pt"],
              ["layer_00-model_01-model_states.pt", "zero_pp_rank_0_mp_rank_01_optim_states.pt"],
              ["layer_02-model_00-model_states.pt", "zero_pp_rank_0_mp_rank_02_optim_states.pt"],
              ["layer_02-model_01-model_states.pt", "zero_pp_rank_0_mp_rank_03_optim_states.pt"]]
    got = files_for_ranks(_manifest(4, 2, 2, 1, pp2tp2), [1], Topology(world=4, tp=2, pp=2), 1)
    assert got == ["layer_00-model_00-model_states.pt", "layer_00-model_01-model_states.pt",
                   "zero_pp_rank_0_mp_rank_01_optim_states.pt"]


@pytest.mark.unit
def test_another_layout_or_an_older_manifest_needs_every_file() -> None:
    from fm_train.checkpoint.node_files import files_for_ranks

    assert files_for_ranks(_manifest(2, 1, 1, 1, DP2), [1], Topology(world=2), 2) is None  # another ZeRO stage
    assert files_for_ranks(_manifest(2, 1, 1, 1, DP2), [1], Topology(world=2, tp=2), 1) is None
    assert files_for_ranks(_manifest(2, 1, 1, 1, None), [1], Topology(world=2), 1) is None


@pytest.mark.unit
def test_the_checks_split_the_held_files_among_the_ranks_that_hold_them(tmp_path: Path) -> None:
    from fm_train.checkpoint.integrity import find_damage
    from fm_train.checkpoint.node_files import checking_share, write_held

    files = ["a.pt", "b.pt", "c.pt", "d.pt"]
    assert checking_share(tmp_path, files, 1, 4) == ["b.pt"]  # a whole directory: every rank takes a share
    write_held(tmp_path, [2, 3], ["a.pt", "c.pt", "d.pt"])
    assert checking_share(tmp_path, files, 2, 4) == ["a.pt", "d.pt"]
    assert checking_share(tmp_path, files, 3, 4) == ["c.pt"]
    assert checking_share(tmp_path, files, 0, 4) is None
    # find_damage takes a held record only as the fetch writes it: exactly the files its ranks read.
    step = tmp_path / "step"
    step.mkdir()
    writers = [[f"zero_pp_rank_{r}_mp_rank_00_optim_states.pt"] for r in range(4)]
    writers[0].append("mp_rank_00_model_states.pt")
    manifest = {"files": {name: 1 for names in writers for name in names},
                "topology": {"world": 4, "tp": 1, "pp": 1, "zero_stage": 1}, "writers": writers}
    held = ["mp_rank_00_model_states.pt", "zero_pp_rank_2_mp_rank_00_optim_states.pt",
            "zero_pp_rank_3_mp_rank_00_optim_states.pt"]
    for name in held:
        (step / name).write_bytes(b"x")
    write_held(step, [2, 3], held)
    assert find_damage(step, manifest, rank=2, world=4) == []  # zero_pp_rank_0/1 are not held here: not checked
    problems = find_damage(step, manifest, rank=0, world=4)
    assert len(problems) == 1 and "holds only the files ranks [2, 3] read" in problems[0]
    write_held(step, [2, 3], held[:1])  # a record exempting more than the fetch left out: refused
    assert any("it does not list the files ranks [2, 3] read" in p for p in find_damage(step, manifest, rank=2, world=4))


def _worker_on_own_disk(raw: dict, base: str) -> int:
    """The fake-data worker with ``run.dir`` = ``base/rankR``: no rank sees another's files."""
    raw = {**raw, "run": {**raw["run"], "dir": f"{base}/rank{os.environ['RANK']}"}}
    return _worker_with_fake_data(raw)


def _raw(tiny: dict, run_dir: Path, steps: int, storage: Path | None, parallel: dict) -> dict:
    return {**tiny, "run": {**tiny["run"], "dir": str(run_dir), "storage": str(storage) if storage else None},
            "parallel": {**tiny["parallel"], **parallel},
            "train": {**tiny["train"], "steps": steps, "log_every": 1, "eval_every": 0},
            # Constant after warmup: runs of different lengths then take the same steps (no decay to the end).
            "optim": {**tiny["optim"], "schedule": "constant"},
            "checkpoint": {"every": 2, "keep": 2}, "logging": {"tensorboard": False}}


def _losses(run_dir: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())
            if "loss" in r}


@pytest.mark.multiproc
@pytest.mark.parametrize("parallel", [{"zero_stage": 1}, {"pp": 2, "zero_stage": 1}], ids=["dp2-zero1", "pp2"])
def test_each_disk_fetches_only_its_ranks_files_and_resumes_the_same(tiny_config_dict, tmp_path, parallel) -> None:
    store = tmp_path / "store"
    first = _raw(tiny_config_dict, tmp_path / "first", 4, store, parallel)
    assert run_distributed(_worker_with_fake_data, world_size=2, args=(first,), init_process_group=False) == [0, 0]
    manifest = json.loads((store / "checkpoints" / STEP / "manifest.json").read_text())
    every = {*manifest["files"], *manifest["rng"]["files"]}

    shutil.copytree(tmp_path / "first", tmp_path / "whole")  # the reference: a resume from every file
    whole = _raw(tiny_config_dict, tmp_path / "whole", 8, None, parallel)
    assert run_distributed(_worker_with_fake_data, world_size=2, args=(whole,), init_process_group=False) == [0, 0]

    own = tmp_path / "own"
    raw = _raw(tiny_config_dict, own / "rank0", 6, store, parallel)
    assert run_distributed(_worker_on_own_disk, world_size=2, args=(raw, str(own)), init_process_group=False) == [0, 0]
    for rank in (0, 1):
        step = own / f"rank{rank}" / "checkpoints" / STEP
        held = {p.relative_to(step).as_posix() for p in step.rglob("*") if p.is_file()} & every
        assert held < every, f"rank {rank} fetched every file"
        assert f"rng/rank_{1 - rank:05d}.pt" not in held and f"rng/rank_{rank:05d}.pt" in held
        assert json.loads((step / ".held.json").read_text())["ranks"] == [rank]
        assert set(manifest["writers"][rank]) <= held
    resumed, want = _losses(own / "rank0"), _losses(tmp_path / "whole")
    assert sorted(resumed) == [5, 6] and [resumed[s] for s in (5, 6)] == [want[s] for s in (5, 6)]
    assert (store / "checkpoints" / "latest").read_text().strip() == "step_00000006"
    # Once more to step 8 on the same disks: rank 1's own staged step 6 has no manifest there (rank 0
    # commits), so it fetches the rest of its part; rank 0's retention (keep 2) removes step 4 on both.
    longer = {**raw, "train": {**raw["train"], "steps": 8}}
    assert run_distributed(_worker_on_own_disk, world_size=2, args=(longer, str(own)), init_process_group=False) == [0, 0]
    resumed, want = _losses(own / "rank0"), _losses(tmp_path / "whole")
    assert [resumed[s] for s in (7, 8)] == [want[s] for s in (7, 8)]
    for rank in (0, 1):
        assert not (own / f"rank{rank}" / "checkpoints" / STEP).exists()
    # Rank 0's logs are copied next to the checkpoints: the history outlives rank 0's disk.
    assert _losses(store) == _losses(own / "rank0")
    assert (store / "config.resolved.yaml").read_bytes() == (own / "rank0" / "config.resolved.yaml").read_bytes()
