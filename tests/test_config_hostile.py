"""Hostile configs: YAML bombs, cycles, deep nesting, absurd numbers and booleans end in one line, at once.

Issue 25, finding 7: a 568-byte YAML with nine levels of aliases kept `fm-train plan` busy for
minutes; `--set cluster.workers=1e9` hung it; `--set train.steps=true` ran 1 step; `--set
run.name=1e5` was refused as a number. Every case here goes through the real `fm-train plan`.
"""

from __future__ import annotations

import subprocess
import sys
import time

import pytest
import yaml

from fm_train.cli import main
from fm_train.config import ConfigError, build_config, load_config
from fm_train.config.bounded_yaml import MAX_BYTES

pytestmark = pytest.mark.unit


def _laughs(levels: int) -> str:
    """A "billion laughs" document: each level is nine aliases of the level below (9**levels values)."""
    lines = ["a0: &a0 [x, x, x, x, x, x, x, x, x]"]
    lines += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 9)}]" for i in range(1, levels)]
    return "\n".join(lines + [f"run: {{name: *a{levels - 1}}}"]) + "\n"


def _plan(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, list[str], float]:
    """Run `fm-train plan` in this process: exit code, stderr lines and seconds taken."""
    start = time.monotonic()
    code = main(["plan", "--no-config", *argv])
    took = time.monotonic() - start
    return code, capsys.readouterr().err.strip().splitlines(), took


HOSTILE_FILES = {
    "aliases_of_aliases": (_laughs(6), "expands to more than"),
    "alias_cycle": ("run: &a {name: [*a]}\n", "a cycle"),
    "deep_sequence": ("run: " + "[" * 100_000 + "]" * 100_000 + "\n", "nested deeper than"),
    "deep_mapping": ("run: " + "{a: " * 50_000 + "1" + "}" * 50_000 + "\n", "nested deeper than"),
    "integer_of_5000_digits": ("train: {steps: " + "9" * 5000 + "}\n", "a value cannot be read"),
    "bad_yaml": ("run: {name: [unclosed\n", "not valid YAML"),
}


@pytest.mark.parametrize("name", sorted(HOSTILE_FILES))
def test_hostile_yaml_is_one_line_at_once(name, tmp_path, capsys):
    text, fragment = HOSTILE_FILES[name]
    f = tmp_path / "hostile.yaml"
    f.write_text(text)
    code, lines, took = _plan(capsys, str(f))
    assert code == 2 and len(lines) == 1, lines[:3]
    assert lines[0].startswith(f"fm-train plan: error: {f}: ") and fragment in lines[0], lines[0][:300]
    assert len(lines[0]) < 400 and took < 2.0


def test_oversized_and_binary_files_are_refused_before_parsing(tmp_path, capsys):
    big, binary = tmp_path / "big.yaml", tmp_path / "binary.yaml"
    big.write_text("run: {name: " + "a" * MAX_BYTES + "}\n")
    binary.write_bytes(b"run:\n  name: \xff\xfe\n")
    for f, fragment in ((big, "bytes a config may have"), (binary, "not UTF-8")):
        code, lines, _ = _plan(capsys, str(f))
        assert code == 2 and len(lines) == 1 and fragment in lines[0], lines[:2]


@pytest.mark.e2e
def test_nine_levels_of_aliases_end_within_seconds(tmp_path):
    """The reproduced finding, through the console entry point in a fresh process."""
    f = tmp_path / "laughs.yaml"
    f.write_text(_laughs(9))
    proc = subprocess.run([sys.executable, "-m", "fm_train.cli", "plan", str(f)], capture_output=True,
                          text=True, timeout=60)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and "expands to more than" in lines[0], proc.stderr[:300]


@pytest.mark.parametrize("override, fragment", [
    ("cluster.workers=1e9", "cluster.workers=1000000000.0: Input should be less than or equal to 1048576"),
    ("train.steps=true", "train.steps=True: a boolean (true/false) is not a number"),
    ("parallel.zero_stage=true", "parallel.zero_stage=True: a boolean"),
    ("optim.betas=[true, 0.9]", "optim.betas=[True, 0.9]: a boolean"),
    ("optim.lr=.inf", "optim.lr=inf: must be a finite number"),
    ("cluster.step_timeout_s=.nan", "cluster.step_timeout_s=nan: must be a finite number"),
    ("checkpoint.upload_retries=60", "checkpoint.upload_retries=60: Input should be less than or equal to 16"),
])
def test_absurd_overrides_are_refused_at_once(override, fragment, capsys):
    code, lines, took = _plan(capsys, "cluster_configs/local.yaml", "--set", override)
    assert code == 2 and len(lines) == 1 and fragment in lines[0], lines[:2]
    assert took < 2.0


def test_booleans_in_the_file_are_not_counts(tmp_path, tiny_config_dict):
    tiny_config_dict["train"]["steps"] = True
    f = tmp_path / "c.yaml"
    f.write_text(yaml.safe_dump(tiny_config_dict))
    with pytest.raises(ConfigError, match="train.steps=True: a boolean"):
        load_config(f)
    tiny_config_dict["train"]["steps"] = 10
    assert build_config(tiny_config_dict, ["model.tie_embeddings=false"]).model.tie_embeddings is False


@pytest.mark.parametrize("override, name", [("run.name=1e5", "1e5"), ("run.name=1.5e5", "1.5e5"),
                                            ("run.name=2024", "2024"), ("run.name=true", "true")])
def test_text_fields_keep_the_users_text(override, name, tiny_config_dict):
    assert build_config(tiny_config_dict, [override]).run.name == name


def test_null_quotes_and_numbers_still_typed(tiny_config_dict):
    cfg = build_config(tiny_config_dict, ["run.storage=null", "train.steps=1e3", "data.sources.0.path=007",
                                          'run.dir="quoted"'])
    assert cfg.run.storage is None and cfg.train.steps == 1000 and cfg.data.sources[0].path == "007"
    assert cfg.run.dir == "quoted"


def test_bounds_sit_above_real_runs(tiny_config_dict):
    """1024 GPUs on 128 nodes, a billion steps, 128k context pass; one worker past the bound does not."""
    cfg = build_config(tiny_config_dict, ["cluster.workers=1024", "cluster.slots_per_node=8", "train.steps=1e9",
                                          "parallel.tp=2", "train.grad_accum=64", "model.max_seq_len=131072",
                                          "data.seq_len=131072", "model.vocab_size=262144"])
    assert cfg.world_size == 1024 and cfg.train.steps == 10**9
    with pytest.raises(ConfigError, match="cluster.workers=1048577: Input should be less than or equal to 1048576"):
        build_config(tiny_config_dict, ["cluster.workers=1048577"])


def test_anchors_load_within_the_bound(tmp_path, tiny_config_dict):
    """Anchors, aliases and merge keys are ordinary YAML; only their expansion past the bound is refused."""
    doc = {k: v for k, v in tiny_config_dict.items() if k not in ("data", "checkpoint")}
    f = tmp_path / "anchors.yaml"
    f.write_text(yaml.safe_dump(doc) + "data:\n  seq_len: 32\n  sources:\n"
                 "  - &src {path: data/stdlib, weight: 1.0, default_corpus: true}\n  - *src\n"
                 "checkpoint: {<<: &ck {every: 5, keep: 2}, keep: 4}\n")
    cfg = load_config(f)
    assert len(cfg.data.sources) == 2 and (cfg.checkpoint.every, cfg.checkpoint.keep) == (5, 4)
    f.write_text(_laughs(5))  # 9**5 = 59,049 values from 80 bytes of aliases
    with pytest.raises(ConfigError, match="expands to more than 50,000 values"):
        load_config(f)


def test_error_messages_are_bounded(tmp_path, capsys):
    f = tmp_path / "flood.yaml"
    unknown = {f"key{i}": "v" * 10_000 for i in range(60)}
    f.write_text(yaml.safe_dump({"run": {"seed": "s" * 200_000, **unknown}}))
    code, lines, _ = _plan(capsys, str(f))
    assert code == 2 and len(lines) <= 21 and "more problems" in lines[-1]
    assert max(len(line) for line in lines) < 500


def test_mixed_key_types_in_precision_are_one_line(tiny_config_dict):
    """A mapping whose keys are a number and a string cannot be sorted: still a message, not a TypeError."""
    with pytest.raises(ConfigError, match=r"precision: unknown key\(s\) \['1', 'x'\]"):
        build_config({**tiny_config_dict, "precision": {1: True, "x": True}})


def test_an_init_from_dir_whose_config_json_is_not_utf8_is_refused_naming_it(tmp_path):
    hf = tmp_path / "hf"
    hf.mkdir()
    (hf / "config.json").write_bytes(b'{"model_type": "llama", "hidden_size": \xff\xfe}')
    with pytest.raises(ConfigError, match=r"cannot read .*config\.json"):
        build_config({"model": {"init_from": str(hf)}})
