"""The MoE family's configuration: presets, the sizes the planner and MFU read, and every bad value
refused by name with its fix."""

from __future__ import annotations

import pytest

import fm_train  # noqa: F401  (registers the families with the config loader)
from fm_train.config import ConfigError, build_config

pytestmark = pytest.mark.unit


def moe(**over):
    raw = {"model": {"preset": "moe-tiny"}, "cluster": {"workers": 2}, "convert": {"at_end": False}}
    for key, value in over.items():
        section, _, field = key.partition("__")
        if not field:
            raw[section] = value
            continue
        raw.setdefault(section, {})
        if "__" in field:
            sub, _, leaf = field.partition("__")
            raw[section].setdefault(sub, {})[leaf] = value
        else:
            raw[section][field] = value
    return build_config(raw)


def test_a_preset_s_experts_merge_with_the_fields_a_config_sets():
    cfg = moe(model__moe__top_k=4)
    assert (cfg.model.moe.experts, cfg.model.moe.top_k, cfg.model.moe.expert_ffn_hidden) == (8, 4, 128)


@pytest.mark.parametrize("preset", ["olmoe-1b-7b", "qwen3-30b-a3b", "mixtral-8x7b"])
def test_published_shapes_have_their_published_sizes(preset):
    from fm_train.families import family_of
    from fm_train.families.qwen3_moe.shape import active_parameter_count

    cfg = build_config({"model": {"preset": preset, "vocab_multiple": 1}})
    total, active = family_of(cfg.model).sizes.parameter_count(cfg.model), active_parameter_count(cfg.model)
    # As their model cards say (billions, total and active per token), to the cards' rounding.
    published = {"olmoe-1b-7b": (6.9, 1.3), "qwen3-30b-a3b": (30.5, 3.3), "mixtral-8x7b": (46.7, 12.9)}[preset]
    assert (total / 1e9, active / 1e9) == pytest.approx(published, rel=0.02)


def test_flops_per_token_count_the_active_experts_only():
    from fm_train.families import family_of

    sizes = family_of("qwen3_moe").sizes
    few, many = moe(model__moe__top_k=1), moe(model__moe__top_k=2)
    expert = 3 * many.model.hidden * many.model.moe.expert_ffn_hidden
    routed = many.model.n_layers - many.model.moe.dense_layers
    assert sizes.flops_per_token(many.model, 128) - sizes.flops_per_token(few.model, 128) == 6 * routed * expert
    assert sizes.parameter_count(many.model) == sizes.parameter_count(few.model)


@pytest.mark.parametrize(("over", "message"), [
    ({"model__moe__top_k": 9}, "model.moe.top_k=9 exceeds model.moe.experts=8"),
    ({"model__moe__capacity_factor": 0.5}, "model.moe.capacity_factor=0.5 is below 1.0"),
    ({"model__moe__dense_layers": 4}, "model.moe.dense_layers=4 leaves none of the model.n_layers=4"),
    ({"parallel__ep": 3, "cluster__workers": 3}, "parallel.ep=3 does not divide model.moe.experts=8"),
    ({"parallel__ep": 2, "cluster__workers": 3}, "parallel.ep=2 does not divide the data-parallel size 3"),
    ({"parallel__ep": 2, "parallel__zero_stage": 3}, "parallel.ep=2 with parallel.zero_stage=3"),
    ({"parallel__ep": 2, "parallel__zero_stage": 0}, "parallel.ep=2 with parallel.zero_stage=0"),
    ({"precision": "fp16"}, "precision=fp16 with model.family=qwen3_moe"),
    ({"parallel__ep": 2, "parallel__tp": 2, "cluster__workers": 2}, "parallel.ep=2 does not divide the data-parallel size 1"),
    ({"model__head_dim": 15}, "the head width 15 is odd"),
])
def test_bad_moe_settings_are_refused_naming_the_field_and_the_fix(over, message):
    with pytest.raises(ConfigError, match=message.replace(".", r"\.").replace("(", r"\(")):
        moe(**over)


def test_expert_parallelism_of_a_model_without_experts_is_refused():
    with pytest.raises(ConfigError, match=r"parallel\.ep=2 splits experts, but model\.family=llama has none"):
        build_config({"model": {"preset": "tiny"}, "parallel": {"ep": 2}, "cluster": {"workers": 2}})
    with pytest.raises(ConfigError, match=r"model\.family=qwen3_moe needs the model\.moe section"):
        build_config({"model": {"family": "qwen3_moe"}})


@pytest.mark.e2e
@pytest.mark.parametrize(("recipe", "world", "zero", "sizes"), [  # ZeRO stages from `plan --fit 72`
    ("h100_olmoe_1node", 8, 1, ("6,919,100,416 parameters", "1,281,955,840 active per token")),
    ("h100_qwen3_30b_a3b_4node", 32, 2, ("30,532,122,624 parameters", "3,353,032,704 active per token")),
])
def test_moe_recipes_plan_to_fit_an_h100_with_each_expert_group_on_one_node(recipe, world, zero, sizes):
    import subprocess
    import sys
    from pathlib import Path

    from fm_train.dist.topology import Topology

    root = Path(__file__).resolve().parents[1]
    out = subprocess.run([sys.executable, "-m", "fm_train.cli", "plan", str(root / f"cluster_configs/{recipe}.yaml"),
                          "--no-config"], capture_output=True, text=True, check=True, cwd=root).stdout
    assert f"# layout: world={world} = pp 1 x dp {world} (ep 8 within dp) x tp 1; zero stage {zero}; bf16" in out, out
    assert all(size in out for size in sizes) and "N active" in out, out
    a2a = next(line for line in out.splitlines() if line.startswith("#   all-to-all (ep)"))
    assert 0.05 < float(a2a.split()[3]) < 2, a2a  # GiB: one routed block's buffers, bf16, 4k tokens
    total = next(line for line in out.splitlines() if line.startswith("#   total (peak)"))
    assert 10 < float(total.split()[3]) < 72, total  # GiB: fits an 80 GiB H100 with room to spare
    rows = [[int(x) for x in line.split()] for line in out.splitlines() if line.strip() and line.split()[0].isdigit()]
    node_of = {rank: node for rank, node, *_ in rows}
    assert len(node_of) == world
    for group in Topology(world=world, ep=8).ep_groups():  # the all-to-all never leaves a node
        assert len({node_of[r] for r in group}) == 1, group


def test_expert_parallelism_composes_with_tp_and_pp():
    assert moe(parallel__ep=2, parallel__tp=2, cluster__workers=4).dp == 2
    assert moe(parallel__ep=2, parallel__pp=2, parallel__zero_stage=1, cluster__workers=4).dp == 2


def test_the_plan_counts_the_all_to_all_buffers_of_expert_parallelism():
    from fm_train.families import family_of
    from fm_train.plan.memory import estimate_memory

    family = family_of("qwen3_moe")
    one, two = (moe(parallel__ep=ep, precision="fp32", data__seq_len=64, train__micro_batch=2) for ep in (1, 2))
    assert estimate_memory(one, family).dispatch == 0.0
    copies = 64 * 2 * two.model.moe.top_k
    routed = two.model.n_layers - two.model.moe.dense_layers
    assert estimate_memory(two, family).dispatch == 2 * copies * two.model.hidden * 4 + routed * copies * 8
