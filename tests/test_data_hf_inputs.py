"""Hugging Face datasets into ``fm-train shard``: a ``save_to_disk`` directory (Dataset and
DatasetDict), an Arrow file, and a dataset in the local Hugging Face cache read offline give the same
tokens as the same text from .jsonl; bad names, splits and columns are refused naming them."""

from __future__ import annotations

import json
import shutil
import sysconfig
from pathlib import Path

import numpy as np
import pytest

from data_shards import BuildOptions, DataError, build_shards
from data_shards.index import read_index

pytestmark = pytest.mark.unit
STDLIB = Path(sysconfig.get_paths()["stdlib"])
CACHED_NAME = "fmtest/tiny-corpus"


def _docs() -> list[str]:
    return [f.read_text(encoding="utf-8") for f in sorted((STDLIB / "json").glob("*.py"))[:6]]


def _tokens(out: Path) -> np.ndarray:
    import webdataset as wds

    index = read_index(out)
    urls = [str(out / s.name) for s in index.shards]
    return np.stack([np.frombuffer(s["tokens.u16"], dtype="<u2") for s in wds.WebDataset(urls, shardshuffle=False)])


def _cache_dataset(cache: Path, source_jsonl: Path) -> None:
    """Lay ``source_jsonl`` out in ``cache`` as ``load_dataset(CACHED_NAME)`` leaves a Hub dataset:
    ``<namespace>___<name>/<config>/<version>/<revision>/`` with ``dataset_info.json`` and Arrow files."""
    from datasets.packaged_modules.json.json import Json

    builder = Json(cache_dir=str(cache / "build"), dataset_name="tiny-corpus", config_name="default",
                   data_files={"train": str(source_jsonl)})
    builder.download_and_prepare()
    built = Path(builder.cache_dir)
    namespace, name = CACHED_NAME.split("/")
    target = cache / f"{namespace}___{name}" / "default" / "0.0.0" / ("0" * 40)
    target.mkdir(parents=True)
    info = json.loads((built / "dataset_info.json").read_text())
    (target / "dataset_info.json").write_text(json.dumps({**info, "config_name": "default"}))
    for arrow in built.glob("*.arrow"):
        shutil.copy(arrow, target / arrow.name)
    shutil.rmtree(cache / "build")


@pytest.fixture(scope="module")
def sources(tmp_path_factory) -> dict:
    import datasets

    d = tmp_path_factory.mktemp("hf-inputs")
    docs = _docs()
    with open(d / "docs.jsonl", "w", encoding="utf-8") as f:
        for doc in docs:
            f.write(json.dumps({"id": 7, "body": doc}) + "\n")
    table = datasets.Dataset.from_dict({"id": list(range(len(docs))), "body": docs})
    table.save_to_disk(str(d / "saved"))
    datasets.DatasetDict({"train": table.select([0]), "validation": table}).save_to_disk(str(d / "saved-dict"))
    (d / "arrow").mkdir()
    shutil.copy(next((d / "saved").glob("*.arrow")), d / "arrow" / "docs.arrow")
    _cache_dataset(d / "cache", d / "docs.jsonl")
    reference = d / "from-jsonl"
    build_shards(BuildOptions(inputs=[str(d / "docs.jsonl")], out=reference, seq_len=31, vocab_size=400,
                              shard_size=20_000, workers=0, text_field="body", progress=False))
    return {"dir": d, "reference": reference}


def _build(sources: dict, inputs: list[str], name: str, **kw) -> Path:
    out = sources["dir"] / name
    build_shards(BuildOptions(inputs=inputs, out=out, seq_len=31, tokenizer_dir=sources["reference"] / "tokenizer",
                              shard_size=20_000, workers=0, text_field="body", progress=False, **kw))
    return out


@pytest.fixture
def offline_cache(sources, monkeypatch):
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", sources["dir"] / "cache")
    return sources["dir"] / "cache"


def test_saved_dataset_arrow_file_and_cached_dataset_give_the_jsonl_tokens(sources, offline_cache):
    want = _tokens(sources["reference"])
    d = sources["dir"]
    cases = {
        "saved": ([str(d / "saved")], {}, "hf_disk"),
        "saved-dict": ([str(d / "saved-dict")], {"split": "validation"}, "hf_disk"),
        "arrow": ([str(d / "arrow" / "docs.arrow")], {}, "arrow"),
        "cached": ([f"hf:{CACHED_NAME}"], {}, "hf_cache"),
    }
    for name, (inputs, kw, kind) in cases.items():
        out = _build(sources, inputs, f"out-{name}", **kw)
        np.testing.assert_array_equal(_tokens(out), want, err_msg=name)
        index = read_index(out)
        assert index.totals["documents"] == len(_docs()), name
        assert [s["kind"] for s in index.sources] == [kind], name
        if kind in ("hf_disk", "hf_cache"):
            assert index.sources[0]["split"] == kw.get("split", "train")


def test_bad_names_splits_and_columns_are_refused_naming_them(sources, offline_cache):
    d = sources["dir"]
    with pytest.raises(DataError, match=r"holds splits train, validation, not 'test'; pass --split"):
        _build(sources, [str(d / "saved-dict")], "bad-split", split="test")
    with pytest.raises(DataError, match=r"saved has no column 'text' \(columns: id, body\); pass --text-field"):
        build_shards(BuildOptions(inputs=[str(d / "saved")], out=d / "bad-column", seq_len=31,
                                  tokenizer_dir=sources["reference"] / "tokenizer", workers=0, progress=False))
    with pytest.raises(DataError, match=r"input hf:fmtest/absent: no split 'train' of 'fmtest/absent' in the local "
                                        r"Hugging Face cache"):
        _build(sources, ["hf:fmtest/absent"], "absent")
    with pytest.raises(DataError, match=r"column 'id' has type"):
        build_shards(BuildOptions(inputs=[str(d / "arrow" / "docs.arrow")], out=d / "bad-type", seq_len=31,
                                  tokenizer_dir=sources["reference"] / "tokenizer", workers=0, text_field="id",
                                  progress=False))
    (d / "plain-dir").mkdir()
    with pytest.raises(DataError, match=r"plain-dir is a directory but not a saved dataset"):
        _build(sources, [str(d / "plain-dir")], "plain")
    for name in ("bad-split", "bad-column", "absent", "bad-type", "plain"):
        assert not (d / name).exists()  # nothing half-written
