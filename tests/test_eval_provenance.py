"""``fm-train eval`` refuses shards built with another tokenizer than the model's: before, it printed a
loss (of ids that mean other tokens to the model) and exited 0.

Real shard builds (the session corpus's tokenizer, and a BPE trained here on other text), real Hugging
Face directories written by the converter's writer (with the tokenizer it ships: an encoder's gets
[CLS]/[SEP]/[MASK] appended, which must still count as the shards' tokenizer), the real CLI.
"""

from __future__ import annotations

import json
import math
import sysconfig
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.unit
STDLIB = Path(sysconfig.get_paths()["stdlib"])
SEQ = 32
MODELS = {"llama": {"n_layers": 1, "hidden": 32, "n_heads": 2, "n_kv_heads": 2, "ffn_hidden": 64, "vocab_size": 512,
                    "max_seq_len": SEQ, "tie_embeddings": True},
          "bert": {"family": "bert", "n_layers": 1, "hidden": 32, "n_heads": 2, "n_kv_heads": 2, "ffn_hidden": 64,
                   "vocab_size": 512 + 3, "max_seq_len": SEQ, "tie_embeddings": True, "type_vocab_size": 2}}


@pytest.fixture(scope="module")
def shards(tmp_path_factory: pytest.TempPathFactory, corpus: Path) -> dict[str, Path]:
    """'same': built with the corpus tokenizer (the models'); 'other': with a BPE of 512 tokens trained
    on other text (fits the models' vocabulary, so only the tokenizer check can tell)."""
    from data_shards import BuildOptions, build_shards
    from data_shards.index import read_index

    root = tmp_path_factory.mktemp("eval-provenance")
    text = root / "text.txt"
    text.write_text((STDLIB / "json" / "decoder.py").read_text() * 4)
    common = {"inputs": [str(text)], "seq_len": SEQ, "shard_size": 1_000_000, "workers": 0, "progress": False}
    build_shards(BuildOptions(out=root / "same", tokenizer_dir=corpus / "tokenizer", **common))
    other_text = root / "other.txt"
    other_text.write_text((STDLIB / "email" / "message.py").read_text())
    build_shards(BuildOptions(**{**common, "inputs": [str(other_text)]}, out=root / "other", vocab_size=512))
    same, other = read_index(root / "same"), read_index(root / "other")
    assert same.tokenizer_hash != other.tokenizer_hash and other.vocab_size <= 512
    return {"same": root / "same", "other": root / "other"}


@pytest.fixture(scope="module", params=sorted(MODELS))
def hf_dir(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, corpus: Path) -> Path:
    """A freshly initialised tiny model of the family, written by the converter with the corpus tokenizer."""
    from fm_train.config import ModelConfig
    from fm_train.convert import write_hf_dir
    from fm_train.families import family_of

    cfg = ModelConfig(**MODELS[request.param])
    family = family_of(cfg)
    gen = torch.Generator().manual_seed(0)  # small random weights: a finite loss, whatever the init code
    state = {k: torch.randn(v.shape, generator=gen) * 0.02
             for k, v in family.modules().args(cfg).build().state_dict().items()}
    out = tmp_path_factory.mktemp(f"hf-{request.param}") / "hf"
    return write_hf_dir(out, family, cfg.model_dump(), state.__getitem__, dtype="fp32", verify=False,
                        tokenizer=corpus / "tokenizer")


def _eval(hf_dir: Path, data: Path, capsys) -> tuple[int, str, str]:
    from fm_train.cli import main

    code = main(["eval", str(hf_dir), "--data", str(data), "--val-fraction", "0.1", "--batches", "1",
                 "--micro-batch", "2"])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_eval_runs_on_shards_of_the_model_s_tokenizer(hf_dir: Path, shards, capsys) -> None:
    code, out, err = _eval(hf_dir, shards["same"], capsys)
    assert code == 0, err
    result = json.loads(out.strip().splitlines()[-1])
    assert result["family"] == hf_dir.parent.name.split("-")[1].rstrip("0123456789") and math.isfinite(result["loss"])
    assert result["tokenizer"].startswith("matches the shards'")


def test_eval_refuses_shards_of_another_tokenizer_naming_both(hf_dir: Path, shards, capsys) -> None:
    from data_shards.index import read_index

    code, out, err = _eval(hf_dir, shards["other"], capsys)
    assert code == 2 and out == "", out
    [line] = [line for line in err.splitlines() if "error" in line]
    assert line.startswith(f"fm-train eval: error: {hf_dir} was trained with another tokenizer than the shards in "
                           f"{shards['other']}: {hf_dir / 'tokenizer.json'} has token-id hash "), line
    assert f"(index.json tokenizer_hash {read_index(shards['other']).tokenizer_hash[:12]})" in line
    assert f"--tokenizer {hf_dir}" in line  # the fix


def test_eval_refuses_shards_whose_tokenizer_dir_is_not_the_one_their_index_names(hf_dir: Path, shards, tmp_path: Path,
                                                                                   capsys) -> None:
    """tokenizer/ of 'same' swapped for the model's own: the ids were still made by another tokenizer."""
    import shutil

    data = Path(shutil.copytree(shards["other"], tmp_path / "data"))
    shutil.copyfile(shards["same"] / "tokenizer" / "tokenizer.json", data / "tokenizer" / "tokenizer.json")
    code, _, err = _eval(hf_dir, data, capsys)
    assert code == 2 and f"{data / 'tokenizer' / 'tokenizer.json'} is not the tokenizer index.json names" in err, err
