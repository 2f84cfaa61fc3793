"""The one-line precision notice a job prints before it starts."""

from __future__ import annotations

from pathlib import Path

import pytest

from fm_train.config import build_config, load_config
from fm_train.config.notices import precision_notice

pytestmark = pytest.mark.unit
ROOT = Path(__file__).resolve().parents[1]


def _cfg(tiny_config_dict: dict, precision: str, gpus: float):
    raw = {**tiny_config_dict, "precision": precision,
           "cluster": {**tiny_config_dict.get("cluster", {}), "gpus_per_worker": gpus}}
    return build_config(raw)


def test_fp32_on_cpu_says_why_and_how_to_pick_bf16(tiny_config_dict):
    line = precision_notice(_cfg(tiny_config_dict, "fp32", 0))
    assert line is not None and "\n" not in line
    assert "fp32" in line and "gpus_per_worker=0" in line and "--set precision=bf16" in line


def test_bf16_on_cpu_says_what_it_costs(tiny_config_dict):
    line = precision_notice(_cfg(tiny_config_dict, "bf16", 0))
    assert line is not None and "\n" not in line and "--set precision=fp32" in line


@pytest.mark.parametrize("precision", ["fp32", "bf16", "fp16"])
def test_gpu_runs_get_no_notice(tiny_config_dict, precision):
    assert precision_notice(_cfg(tiny_config_dict, precision, 1)) is None


def test_the_shipped_local_recipe_explains_its_fp32():
    cfg = load_config(ROOT / "cluster_configs" / "local.yaml", [])
    assert cfg.precision == "fp32" and "fp32" in (precision_notice(cfg) or "")
