"""``model.vocab_size: auto`` (the default): the model's vocabulary is the shards' tokenizer plus the
family's special tokens it lacks, resolved before anything is planned or built; a number still wins.
On the session's real shards (a 512-token tokenizer), through ``fm-train plan`` and the resolver the
worker calls; the worker's own resolution is checked by the runs in test_bert_pipeline.py."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest

from fm_train.cli import main
from fm_train.config import ConfigError, build_config

pytestmark = pytest.mark.unit


def _raw(source: Path | str, family: str = "llama", **model: object) -> dict:
    preset = {"llama": "tiny", "bert": "bert-tiny", "qwen3_moe": "moe-tiny"}[family]
    model = {"preset": preset, "max_seq_len": 64, "vocab_size": "auto", **model}  # presets name a number
    return {"model": model, "data": {"sources": [{"path": str(source)}], "seq_len": 32}}


def _plan(capsys: pytest.CaptureFixture[str], tmp_path: Path, raw: dict) -> tuple[int, str, str]:
    import yaml

    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(raw))
    code = main(["plan", str(path)])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_auto_is_the_default_and_a_number_still_wins() -> None:
    assert build_config({}).model.vocab_size == "auto"
    assert build_config({"model": {"vocab_size": 600}}).model.vocab_size == 600
    assert build_config({}, ["model.vocab_size=auto"]).model.vocab_size == "auto"
    with pytest.raises(ConfigError, match="model.vocab_size"):
        build_config({"model": {"vocab_size": "many"}})


@pytest.mark.parametrize(("family", "want"), [("llama", 512), ("qwen3_moe", 512), ("bert", 516)])
def test_plan_prints_the_vocabulary_auto_resolves_to_from_real_shards(capsys, tmp_path: Path, corpus: Path,
                                                                      family: str, want: int) -> None:
    code, out, err = _plan(capsys, tmp_path, _raw(corpus, family))
    assert code == 0, err
    assert re.search(rf"vocab_size: {want}[,}}\n]", out)  # the resolved config is printed with the number
    line = next(x for x in out.splitlines() if x.startswith("# vocabulary:"))
    assert f"auto = {want}: the tokenizer of {corpus} (512 tokens, index.json)" in line
    assert ("plus 4 bert special tokens ([CLS], [SEP], [MASK], [PAD])" in line) == (family == "bert")


def test_a_number_wins_and_is_checked_as_before(capsys, tmp_path: Path, corpus: Path) -> None:
    code, out, _ = _plan(capsys, tmp_path, _raw(corpus, "bert", vocab_size=600))
    assert code == 0 and re.search(r"vocab_size: 600[,}\n]", out) and "# vocabulary:" not in out
    from fm_train.engine.data import check_sources

    cfg = build_config(_raw(corpus, vocab_size=500))
    with pytest.raises(ValueError, match="has 512 tokens but model.vocab_size is 500"):
        check_sources(cfg, [(str(corpus), 1.0)])


def test_the_worker_s_resolution_is_re_checked_by_the_config_rules(corpus: Path) -> None:
    import data_shards

    from fm_train.families import family_of
    from fm_train.families.vocab import resolve_vocab

    info = data_shards.check_sources([str(corpus)])
    for family, want in (("llama", 512), ("bert", 516)):
        cfg = build_config(_raw(corpus, family))
        resolved = resolve_vocab(cfg, family_of(cfg.model), info)
        assert resolved.model.vocab_size == want
        assert resolved.model.padded_vocab_size == -(-want // 128) * 128  # rounded by vocab_multiple as a number is
        assert resolve_vocab(resolved, family_of(cfg.model), info) is resolved  # a number is never resolved again
    cfg = build_config(_raw(corpus, vocab_multiple=1), ["parallel.tp=2", "cluster.workers=2"])
    odd = info.__class__(**{**info.__dict__, "vocab_size": 511})
    with pytest.raises(ConfigError, match="auto resolved to 511.*parallel.tp=2 does not divide the padded vocabulary"):
        resolve_vocab(cfg, family_of(cfg.model), odd)


def test_a_default_corpus_not_built_yet_counts_as_its_tokenizer(capsys, tmp_path: Path) -> None:
    from data_shards import DEFAULT_CORPUS_VOCAB

    raw = _raw(tmp_path / "stdlib", "bert")
    raw["data"]["sources"][0]["default_corpus"] = True
    code, out, err = _plan(capsys, tmp_path, raw)
    assert code == 0, err
    assert f"auto = {DEFAULT_CORPUS_VOCAB + 4}: the default corpus {tmp_path / 'stdlib'} is built at launch" in out
    from launcher.steps import _vocab_arg  # what the launch's corpus step is given for auto

    assert _vocab_arg("auto") == "auto" and _vocab_arg("4100") == "4100"


def test_unreadable_or_mixed_vocabularies_are_clear_errors(capsys, tmp_path: Path, corpus: Path) -> None:
    code, _, err = _plan(capsys, tmp_path, _raw(tmp_path / "nowhere"))
    assert code == 2 and "model.vocab_size: auto reads the vocabulary from the data sources' index.json" in err
    assert str(tmp_path / "nowhere") in err and "or set model.vocab_size to a number" in err

    broken = tmp_path / "broken"
    shutil.copytree(corpus, broken)
    index = json.loads((broken / "index.json").read_text())
    (broken / "index.json").write_text(json.dumps({**index, "vocab_size": "lots"}))
    code, _, err = _plan(capsys, tmp_path, _raw(broken))
    assert code == 2 and "vocab_size" in err and str(broken / "index.json") in err, err

    other = tmp_path / "other"
    shutil.copytree(corpus, other)
    (other / "index.json").write_text(json.dumps({**index, "tokenizer_hash": "0" * 64}))
    raw = _raw(corpus)
    raw["data"]["sources"].append({"path": str(other)})
    code, _, err = _plan(capsys, tmp_path, raw)
    assert code == 2 and f"{other} was built with a different tokenizer than {corpus}" in err, err


def test_init_from_gives_auto_its_checkpoint_s_vocabulary(tmp_path: Path) -> None:
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "config.json").write_text(json.dumps({
        "model_type": "llama", "num_hidden_layers": 2, "hidden_size": 64, "num_attention_heads": 4,
        "num_key_value_heads": 2, "intermediate_size": 128, "vocab_size": 777, "max_position_embeddings": 64,
        "rms_norm_eps": 1e-5, "tie_word_embeddings": True, "rope_theta": 10000.0}))
    cfg = build_config({"model": {"vocab_size": "auto", "init_from": str(tmp_path / "hf")}, "data": {"seq_len": 32}})
    assert cfg.model.vocab_size == 777
