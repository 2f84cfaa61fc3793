"""Topology math against DeepSpeed's own PipeModelDataParallelTopology, and the planner's rank table."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from fm_train.dist.topology import Topology, node_slot

pytestmark = pytest.mark.unit
ROOT = Path(__file__).resolve().parents[1]

LAYOUTS = [(w, tp, pp) for w in (1, 2, 4, 6, 8, 12, 16, 32, 64) for tp in (1, 2, 4, 8) for pp in (1, 2, 4, 8)
           if w % (tp * pp) == 0]


@pytest.mark.parametrize("world, tp, pp", LAYOUTS)
def test_matches_deepspeed(world, tp, pp):
    from deepspeed.runtime.pipe.topology import PipeModelDataParallelTopology

    ours = Topology(world=world, tp=tp, pp=pp)
    theirs = PipeModelDataParallelTopology(num_pp=pp, num_mp=tp, num_dp=ours.dp)
    for c in ours.coords:
        assert theirs.get_rank(pipe=c.pp, data=c.dp, model=c.tp) == c.rank
        assert theirs.get_coord(c.rank).pipe == c.pp and theirs.get_coord(c.rank).data == c.dp
    assert sorted(map(sorted, ours.tp_groups())) == sorted(map(sorted, theirs.get_axis_comm_lists("model"))) or tp == 1
    assert sorted(map(sorted, ours.dp_groups())) == sorted(map(sorted, theirs.get_axis_comm_lists("data"))) or ours.dp == 1
    assert sorted(map(sorted, ours.pp_groups())) == sorted(map(sorted, theirs.get_axis_comm_lists("pipe"))) or pp == 1


def test_tp_peers_are_consecutive_and_node_local():
    topo = Topology(world=64, tp=8, pp=4)
    for group in topo.tp_groups():
        assert group == list(range(group[0], group[0] + 8))
        assert len({node_slot(r, 8)[0] for r in group}) == 1


def test_group_membership_partitions_the_world():
    topo = Topology(world=24, tp=2, pp=3)
    for groups in (topo.tp_groups(), topo.dp_groups(), topo.pp_groups()):
        assert sorted(r for g in groups for r in g) == list(range(24))
    assert topo.group_of(5, "tp") == [4, 5]


def test_bad_layout_is_refused():
    with pytest.raises(ValueError, match="not divisible"):
        Topology(world=6, tp=4)


@pytest.mark.e2e
def test_plan_prints_64_rank_table():
    out = subprocess.run([sys.executable, "-m", "fm_train.cli", "plan", str(ROOT / "cluster_configs/h100_70b_8node.yaml"),
                          "--no-config"], capture_output=True, text=True, check=True).stdout
    rows = [line.split() for line in out.splitlines() if line.strip() and line.split()[0].isdigit()]
    assert len(rows) == 64
    topo = Topology(world=64, tp=8, pp=4)
    for rank, node, slot, dp, pp, tp in ((int(x) for x in r) for r in rows):
        c = topo.coord(rank)
        assert (node, slot) == divmod(rank, 8) and (dp, pp, tp) == (c.dp, c.pp, c.tp)


def test_memory_estimate_follows_zero_stages(tiny_config_dict):
    from fm_train.config import build_config
    from fm_train.families import family_of
    from fm_train.plan.memory import estimate_memory

    def estimate(raw: dict):
        cfg = build_config(raw)
        return estimate_memory(cfg, family_of(cfg.model))

    base = {**tiny_config_dict, "cluster": {"workers": 4}}
    est = {z: estimate({**base, "parallel": {"zero_stage": z}}) for z in (0, 1, 2, 3)}
    assert est[1].optimizer == pytest.approx(est[0].optimizer / 4)
    assert est[2].grads == pytest.approx(est[0].grads / 4) and est[1].grads == est[0].grads
    assert est[3].params == pytest.approx(est[0].params / 4) and est[2].params == est[0].params
    ckpt = estimate({**base, "parallel": {"activation_checkpointing": True}})
    assert ckpt.activations < est[2].activations


def test_parameter_count_matches_published_shapes():
    from fm_train.config import build_config
    from fm_train.families import family_of

    def parameter_count(shape) -> int:
        return family_of(shape).sizes.parameter_count(shape)

    # TinyLlama-1.1B and Llama-2-7B as published.
    assert parameter_count(build_config({"model": {"preset": "1.1b"}, "data": {"seq_len": 128}}).model) == 1_100_048_384
    assert parameter_count(build_config({"model": {"preset": "7b"}, "data": {"seq_len": 128}}).model) == 6_738_415_616


@pytest.mark.parametrize("recipe", sorted(p.name for p in (ROOT / "cluster_configs").glob("h100_*.yaml")))
def test_every_gpu_recipe_plans_to_fit_its_card_with_the_settings_plan_fit_chooses(recipe):
    from fm_train.config import load_config

    path = ROOT / "cluster_configs" / recipe
    out = subprocess.run([sys.executable, "-m", "fm_train.cli", "plan", str(path), "--no-config", "--fit", "72"],
                         capture_output=True, text=True, check=True).stdout
    card = next(line for line in out.splitlines() if line.startswith("# card:"))
    assert card.startswith("# card: fits") and "of 80 GiB (cluster.gpu_memory_gib)" in card, card
    # The recipe is what the planner derives: applying its choice changes nothing (no full recomputation
    # where memory allows, the smallest tp, the lowest ZeRO stage).
    apply = next(line for line in out.splitlines() if line.startswith("#   apply: ")).removeprefix("#   apply: ")
    overrides = [o for o in apply.split() if o != "--set"]
    assert load_config(path, overrides).model_dump() == load_config(path).model_dump(), (recipe, apply)


def test_plan_warns_when_the_peak_exceeds_the_card_and_names_the_fixes():
    from fm_train.cli.plan import card_fit

    warning = card_fit(140.08, 80, "cluster.gpu_memory_gib")
    assert warning.startswith("# warning: the planned peak 140.08 GiB exceeds the 80 GiB card") and "60.08 GiB" in warning
    assert "train.micro_batch" in warning and "parallel.activation_checkpointing" in warning
    out = subprocess.run([sys.executable, "-m", "fm_train.cli", "plan", str(ROOT / "cluster_configs/h100_7b_2node.yaml"),
                          "--no-config", "--set", "train.micro_batch=64"], capture_output=True, text=True,
                         check=True).stdout
    assert "# warning: the planned peak" in out and "exceeds the 80 GiB card (cluster.gpu_memory_gib)" in out


def test_plan_names_the_smallest_sequence_parallel_size_that_fits():
    """The 8B 32k recipe at sp 1 needs 176 GiB: the plan names the smallest sp that fits alone (4, under
    ZeRO-2 and ZeRO-3), with its peak; the activations fall with sp."""
    recipe = str(ROOT / "cluster_configs/h100_8b_32k_1node.yaml")

    def plan(*overrides: str) -> str:
        sets = [arg for o in overrides for arg in ("--set", o)]
        return subprocess.run([sys.executable, "-m", "fm_train.cli", "plan", recipe, "--no-config", *sets],
                              capture_output=True, text=True, check=True).stdout

    def gib(out: str, row: str) -> float:
        return float(next(line for line in out.splitlines() if line.startswith(f"#   {row}")).split()[-2])

    sp1 = plan("parallel.sp=1")
    assert "each of these fits alone: parallel.sp=4 with train.grad_accum=32 (peak" in sp1  # the global batch stays
    assert "fits alone: parallel.sp=4 with train.grad_accum=32 (peak" in plan("parallel.sp=1", "parallel.zero_stage=3")
    sp8 = plan()
    assert gib(sp8, "activations") == pytest.approx(gib(sp1, "activations") / 8, rel=1e-3)
    assert "(sp 8 within dp)" in sp8 and "x dp 8 / sp 8" in sp8


def test_the_70b_recipe_fits_without_recomputation_thanks_to_the_tp_sequence_split():
    recipe = str(ROOT / "cluster_configs/h100_70b_8node.yaml")
    whole = subprocess.run([sys.executable, "-m", "fm_train.cli", "plan", recipe, "--no-config", "--set",
                            "parallel.tp_sequence_parallel=false"], capture_output=True, text=True, check=True).stdout
    assert "exceeds the 80 GiB card" in whole and "fits alone: parallel.tp_sequence_parallel=true (peak 56.29 GiB)" in whole
    split = subprocess.run([sys.executable, "-m", "fm_train.cli", "plan", recipe], capture_output=True, text=True,
                           check=True).stdout
    assert "activation_checkpointing: false" in split and "tp_sequence_parallel: true" in split
    assert "# card: fits, peak 56.29 GiB of 80 GiB" in split


def test_plan_estimates_the_step_time_from_a_stated_roofline():
    out = subprocess.run([sys.executable, "-m", "fm_train.cli", "plan", str(ROOT / "cluster_configs/h100_7b_2node.yaml"),
                          "--no-config"], capture_output=True, text=True, check=True).stdout
    line = next(x for x in out.splitlines() if x.startswith("# step time:"))
    assert "assumed 40% MFU of the 989 TFLOP/s peak (cluster.gpu_peak_tflops), not a measurement" in line
    flops = float(next(x for x in out.splitlines() if x.startswith("# model:")).split("; ")[1].split()[0])
    seconds = float(line.split("~")[1].split(" s")[0])
    assert seconds == pytest.approx(flops / (16 * 989e12 * 0.4), rel=0.01)
    half = subprocess.run([sys.executable, "-m", "fm_train.cli", "plan", str(ROOT / "cluster_configs/h100_7b_2node.yaml"),
                           "--no-config", "--mfu", "0.2"], capture_output=True, text=True, check=True).stdout
    slower = next(x for x in half.splitlines() if x.startswith("# step time:"))
    assert "assumed 20% MFU" in slower and float(slower.split("~")[1].split(" s")[0]) == pytest.approx(2 * seconds, rel=0.01)


def test_plan_fit_names_the_cheapest_setting_and_fails_when_nothing_fits():
    recipe = str(ROOT / "cluster_configs/h100_7b_2node.yaml")
    out = subprocess.run([sys.executable, "-m", "fm_train.cli", "plan", recipe, "--no-config", "--fit", "40"],
                         capture_output=True, text=True, check=True).stdout
    chosen = next(x for x in out.splitlines() if x.startswith("# fit 40 GiB: "))
    # Recomputation costs most: tp 4 fits 40 GiB without it under ZeRO-3 (grad_accum raised to keep the global
    # batch), before tp 8 under ZeRO-1 ...
    assert chosen.startswith("# fit 40 GiB: tp 4, zero stage 3, grad_accum 32, no recomputation: peak "), chosen
    assert float(chosen.rsplit("peak ", 1)[1].split()[0]) <= 40
    apply = next(x for x in out.splitlines() if x.startswith("#   apply: "))
    assert "--set parallel.tp=4 --set parallel.zero_stage=3 --set train.grad_accum=32" in apply
    assert "also fits: tp 8, zero stage 1, grad_accum 64, no recomputation" in out
    # ... and the smaller tp sizes fit by recomputing some blocks, each named with its cost.
    tp1 = next(x for x in out.splitlines() if x.startswith("#   also fits: tp 1, "))
    assert "recompute" in tp1 and "of 32 blocks per stage (+~" in tp1 and float(tp1.rsplit("peak ", 1)[1].split()[0]) <= 40
    none = subprocess.run([sys.executable, "-m", "fm_train.cli", "plan", recipe, "--no-config", "--fit", "5"],
                          capture_output=True, text=True)
    assert none.returncode == 1 and "# fit 5 GiB: no setting fits" in none.stdout and "lower train.micro_batch" in none.stdout
    bad = subprocess.run([sys.executable, "-m", "fm_train.cli", "plan", recipe, "--fit", "-3"], capture_output=True,
                         text=True)
    assert bad.returncode == 2 and "-3 is not a positive number of GiB" in bad.stderr
