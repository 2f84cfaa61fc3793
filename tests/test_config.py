"""Config loading: presets, typed overrides, and every cross-field rule with a message naming the field."""

from __future__ import annotations

import copy
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from fm_train.config import MODEL_PRESETS, ConfigError, build_config, dump_config, load_config, parse_override

pytestmark = pytest.mark.unit
ROOT = Path(__file__).resolve().parents[1]


def _with(base: dict, **sections) -> dict:
    out = copy.deepcopy(base)
    for section, values in sections.items():
        if isinstance(values, dict) and isinstance(out.get(section), dict):
            out.setdefault(section, {}).update(values)
        else:
            out[section] = values
    return out


def test_defaults_and_derived_sizes(tiny_config_dict):
    cfg = build_config(tiny_config_dict)
    assert cfg.dp == 2 and cfg.world_size == 2
    assert cfg.global_batch == 2 * 1 * 2
    assert cfg.tokens_per_step == 4 * 32


@pytest.mark.parametrize("text, path, value", [
    ("train.steps=50", ["train", "steps"], 50),
    ("optim.lr=1e-3", ["optim", "lr"], 1e-3),
    ("parallel.activation_checkpointing=true", ["parallel", "activation_checkpointing"], True),
    ("optim.betas=[0.9, 0.99]", ["optim", "betas"], [0.9, 0.99]),
    ("run.name=hello", ["run", "name"], "hello"),
])
def test_override_values_are_typed(text, path, value):
    assert parse_override(text) == (path, value)


def test_overrides_apply_and_win_over_file(tmp_path, tiny_config_dict):
    f = tmp_path / "c.yaml"
    f.write_text(yaml.safe_dump(tiny_config_dict))
    cfg = load_config(f, ["train.steps=77", "optim.betas=[0.8,0.9]", "data.sources.0.weight=2.5"])
    assert cfg.train.steps == 77 and cfg.optim.betas == (0.8, 0.9) and cfg.data.sources[0].weight == 2.5


def test_preset_fills_and_fields_override():
    cfg = build_config({"model": {"preset": "1.1b", "n_layers": 2}, "data": {"seq_len": 128}})
    assert cfg.model.hidden == MODEL_PRESETS["1.1b"]["hidden"] == 2048
    assert cfg.model.n_kv_heads == 4 and cfg.model.n_layers == 2


def test_resolved_config_round_trips(tiny_config_dict):
    cfg = build_config(tiny_config_dict)
    again = build_config(yaml.safe_load(dump_config(cfg)))
    assert again == cfg


def test_all_shipped_configs_validate():
    files = sorted((ROOT / "cluster_configs").glob("*.yaml"))  # run configs only: Ray's files are in ray/
    assert any(f.name == "local.yaml" for f in files)
    for f in files:
        load_config(f)


def test_a_ray_cluster_file_given_as_a_run_config_says_what_it_is():
    ray_file = ROOT / "cluster_configs" / "ray" / "ray_cluster_example.yaml"
    with pytest.raises(ConfigError) as err:
        load_config(ray_file)
    message = str(err.value)
    assert message.count("\n") == 0 and "is a Ray cluster launcher file" in message, message
    assert f"ray up {ray_file}" in message and "cluster_configs/local.yaml" in message


# Each bad config: (mutation, fragment that must appear in the one-line error).
BAD = {
    "world_not_divisible": ({"cluster": {"workers": 3}, "parallel": {"tp": 2}}, "cluster.workers=3"),
    "pp_with_zero2": ({"cluster": {"workers": 2}, "parallel": {"pp": 2, "zero_stage": 2}}, "parallel.zero_stage=2"),
    "heads_not_divisible_by_tp": ({"cluster": {"workers": 6}, "parallel": {"tp": 3}, "model": {"n_heads": 4, "n_kv_heads": 4, "hidden": 64}}, "parallel.tp=3 does not divide model.n_heads=4"),
    "kv_heads_not_divisible_by_tp": ({"cluster": {"workers": 4}, "parallel": {"tp": 4}, "model": {"n_heads": 8, "n_kv_heads": 2, "hidden": 64, "ffn_hidden": 176}}, "model.n_kv_heads=2"),
    "layers_fewer_than_stages": ({"cluster": {"workers": 4}, "parallel": {"pp": 4, "zero_stage": 1}}, "model.n_layers=2"),
    "global_batch_mismatch": ({"train": {"global_batch": 5}}, "train.global_batch=5"),
    "unknown_key": ({"train": {"stepz": 3}}, "train.stepz: unknown key"),
    "unknown_section": ({"trian": {"steps": 3}}, "trian: unknown key"),
    "zero_size": ({"model": {"hidden": 0}}, "model.hidden=0"),
    "negative_size": ({"train": {"micro_batch": -1}}, "train.micro_batch=-1"),
    "bad_enum": ({"precision": "fp8"}, "precision='fp8'"),
    "bad_zero_stage": ({"parallel": {"zero_stage": 4}}, "parallel.zero_stage=4"),
    "seq_longer_than_model": ({"data": {"seq_len": 128}}, "data.seq_len=128"),
    "min_lr_above_lr": ({"optim": {"min_lr": 1.0}}, "optim.min_lr=1.0"),
    "warmup_longer_than_run": ({"optim": {"warmup_steps": 100}}, "optim.warmup_steps=100"),
    "gqa_mismatch": ({"model": {"n_kv_heads": 3}}, "model.n_kv_heads=3"),
    "unknown_preset": ({"model": {"preset": "huge"}}, "model.preset='huge'"),
    "offload_without_zero": ({"parallel": {"zero_stage": 0, "offload_optimizer": True}}, "parallel.offload_optimizer"),
    "tp_across_nodes": ({"cluster": {"workers": 4, "slots_per_node": 2}, "parallel": {"tp": 4}, "model": {"n_heads": 4, "n_kv_heads": 4, "ffn_hidden": 176}}, "cluster.slots_per_node=2"),
    "vocab_not_divisible_by_tp": ({"cluster": {"workers": 2}, "parallel": {"tp": 2},
                                   "model": {"vocab_size": 511, "vocab_multiple": 1}}, "model.vocab_multiple to a multiple of 2"),
}


@pytest.mark.parametrize("name", sorted(BAD))
def test_bad_config_names_the_field(name, tiny_config_dict):
    mutation, fragment = BAD[name]
    with pytest.raises(ConfigError) as info:
        build_config(_with(tiny_config_dict, **mutation))
    assert fragment in str(info.value)


def test_bf16_and_fp16_both_on(tiny_config_dict):
    with pytest.raises(ConfigError, match="bf16 and fp16 are both on"):
        build_config(_with(tiny_config_dict, precision={"bf16": True, "fp16": True}))
    assert build_config(_with(tiny_config_dict, precision={"bf16": True})).precision == "bf16"


def test_missing_data_path_is_an_error_when_required(tmp_path, tiny_config_dict):
    raw = _with(tiny_config_dict, data={"sources": [{"path": str(tmp_path / "nope")}]})
    build_config(raw)  # plan-time: not required
    with pytest.raises(ConfigError, match=r"data.sources\[0\].path=.*does not exist"):
        build_config(raw, require_paths=True)


def test_missing_config_file():
    with pytest.raises(ConfigError, match="does not exist"):
        load_config("no/such/file.yaml")


def test_bad_override_syntax():
    with pytest.raises(ConfigError, match="expected KEY=VALUE"):
        parse_override("train.steps")


def test_errors_are_prefixed_with_the_file(tmp_path, tiny_config_dict):
    f = tmp_path / "bad.yaml"
    f.write_text(yaml.safe_dump(_with(tiny_config_dict, train={"stepz": 1})))
    with pytest.raises(ConfigError, match=rf"^{f}: train.stepz"):
        load_config(f)


@pytest.mark.e2e
def test_cli_exits_nonzero_with_one_line(tmp_path, tiny_config_dict):
    f = tmp_path / "bad.yaml"
    f.write_text(yaml.safe_dump(_with(tiny_config_dict, parallel={"pp": 2, "zero_stage": 3})))
    proc = subprocess.run([sys.executable, "-m", "fm_train.cli", "plan", str(f)], capture_output=True, text=True)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "parallel.zero_stage=3" in lines[0] and lines[0].startswith("fm-train plan: error:")
