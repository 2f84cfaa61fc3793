"""Shard building: real files in, real tar shards and a real tokenizer out; bad input refused cleanly."""

from __future__ import annotations

import argparse
import json
import sysconfig
from pathlib import Path

import numpy as np
import pytest

from data_shards import BuildOptions, DataError, build_shards, check_sources
from data_shards.cli import add_shard_arguments, parse_size, run_shard
from data_shards.index import read_index

pytestmark = pytest.mark.unit
STDLIB = Path(sysconfig.get_paths()["stdlib"])


def _docs(n: int, start: int = 0) -> list[str]:
    """Real text: consecutive stdlib modules (about 10-40 KB each)."""
    files = sorted((STDLIB / "json").glob("*.py")) + sorted((STDLIB / "email").glob("*.py"))
    return [f.read_text(encoding="utf-8") for f in files[start:start + n]]


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> dict:
    """One .txt, one .jsonl and one .parquet file, about 150 KB of text together."""
    import datasets

    d = tmp_path_factory.mktemp("inputs")
    docs = _docs(9)
    (d / "a.txt").write_text(docs[0], encoding="utf-8")
    with open(d / "b.jsonl", "w", encoding="utf-8") as f:
        for doc in docs[1:5]:
            f.write(json.dumps({"id": 1, "body": doc}) + "\n")
    datasets.Dataset.from_dict({"body": docs[5:9]}).to_parquet(str(d / "c.parquet"))
    return {"dir": d, "files": [str(d / "a.txt"), str(d / "b.jsonl"), str(d / "c.parquet")], "docs": docs}


def _opts(inp: dict, out: Path, **kw) -> BuildOptions:
    args = dict(inputs=inp["files"], out=out, seq_len=31, vocab_size=400, shard_size=20_000, workers=0,
                text_field="body", progress=False)
    return BuildOptions(**{**args, **kw})


@pytest.fixture(scope="module")
def built(inputs, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("shards") / "ds"
    build_shards(_opts(inputs, out, workers=2))
    return out


def _read_webdataset(out: Path) -> np.ndarray:
    import webdataset as wds

    index = read_index(out)
    urls = [str(out / s.name) for s in index.shards]
    rows = [np.frombuffer(s["tokens.u16"], dtype="<u2") for s in wds.WebDataset(urls, shardshuffle=False)]
    return np.stack(rows)


def test_shards_hold_exactly_the_tokenized_documents(inputs, built):
    """webdataset reads the shards back; their rows are the documents' tokens + EOS, packed in order."""
    from tokenizers import Tokenizer

    index = read_index(built)
    tok = Tokenizer.from_file(str(built / "tokenizer" / "tokenizer.json"))
    stream = np.concatenate([tok.encode(d, add_special_tokens=False).ids + [index.eos_id] for d in inputs["docs"]])
    rows = _read_webdataset(built)
    assert rows.shape == (index.num_samples, 32)
    assert len(index.shards) > 3 and all(s.bytes <= 20_000 for s in index.shards)
    n = len(stream) // 32
    np.testing.assert_array_equal(rows, stream[: n * 32].reshape(n, 32))
    assert index.totals["documents"] == 9 and index.totals["dropped_tail_tokens"] == len(stream) - n * 32
    assert index.dtype == "uint16" and index.vocab_size <= 400 and index.seq_len == 31
    assert [s["kind"] for s in index.sources] == ["txt", "jsonl", "parquet"]


def test_tokenizer_dir_loads_with_transformers_offline(built):
    from transformers import AutoTokenizer

    info = check_sources([str(built)])
    hf = AutoTokenizer.from_pretrained(str(info.tokenizer_dir), local_files_only=True)
    assert hf.eos_token == "<|endoftext|>" and hf.eos_token_id == info.eos_id
    assert hf.bos_token == "<|endoftext|>"
    text = "def f(x):\n    return x + 1\n"
    assert hf.decode(hf(text, add_special_tokens=False)["input_ids"]) == text


def test_existing_tokenizer_and_worker_count_give_identical_shards(inputs, built, tmp_path):
    """--tokenizer reuses the directory's tokenizer; 0 workers and 2 workers write byte-identical shards."""
    out = tmp_path / "again"
    build_shards(_opts(inputs, out, vocab_size=None, tokenizer_dir=built / "tokenizer", workers=0))
    a, b = read_index(built), read_index(out)
    assert a.tokenizer_hash == b.tokenizer_hash
    assert [s.sha256 for s in a.shards] == [s.sha256 for s in b.shards]


def test_refuses_output_that_holds_shards_and_overwrite_keeps_other_files(inputs, tmp_path):
    out = tmp_path / "o"
    opts = _opts(inputs, out, inputs=inputs["files"][:1], shard_size=4000)
    build_shards(opts)
    (out / "notes.md").write_text("mine")
    first = {s.name for s in read_index(out).shards}
    with pytest.raises(DataError, match="already holds shards.*--overwrite"):
        build_shards(opts)
    build_shards(_opts(inputs, out, inputs=inputs["files"][:1], shard_size=50_000, overwrite=True))
    names = {p.name for p in out.iterdir()}
    assert (out / "notes.md").read_text() == "mine"
    assert names == {"notes.md", "index.json", "tokenizer"} | {s.name for s in read_index(out).shards}
    assert len(first) > len(read_index(out).shards)  # the old, smaller shards are gone


def test_failed_build_leaves_nothing_behind(inputs, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"body": "fine"}\n{"body": "broken\n')
    out = tmp_path / "never"
    with pytest.raises(DataError, match=r"bad\.jsonl:2: not valid JSON"):
        build_shards(_opts(inputs, out, inputs=inputs["files"][:1] + [str(bad)]))
    assert not out.exists()
    existing = tmp_path / "existing"
    existing.mkdir()
    (existing / "keep.txt").write_text("x")
    with pytest.raises(DataError):
        build_shards(_opts(inputs, existing, inputs=[str(bad)]))
    assert [p.name for p in existing.iterdir()] == ["keep.txt"]


def test_jsonl_line_without_the_field_is_named(inputs, tmp_path):
    path = tmp_path / "x.jsonl"
    path.write_text('{"body": "a"}\n\n{"text": "b"}\n')
    with pytest.raises(DataError, match=r"x\.jsonl:3: no field 'body' \(has: text\).*--text-field"):
        build_shards(_opts(inputs, tmp_path / "o", inputs=[str(path)]))


def test_non_utf8_lines_fail_or_are_skipped_and_counted(inputs, tmp_path):
    path = tmp_path / "latin.txt"
    good = inputs["docs"][0]
    path.write_bytes(good.encode() + b"caf\xe9 au lait\n" + good.encode())
    with pytest.raises(DataError, match=r"latin\.txt:\d+: not valid UTF-8.*--on-bad-utf8 skip"):
        build_shards(_opts(inputs, tmp_path / "o", inputs=[str(path)]))
    summary = build_shards(_opts(inputs, tmp_path / "o", inputs=[str(path)], on_bad_utf8="skip"))
    assert summary.skipped_lines == 1
    assert read_index(tmp_path / "o").totals["skipped_lines"] == 1


def test_missing_empty_and_unsupported_inputs(inputs, tmp_path):
    with pytest.raises(DataError, match="matches no files"):
        build_shards(_opts(inputs, tmp_path / "o", inputs=[str(tmp_path / "*.txt")]))
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(DataError, match="no text"):
        build_shards(_opts(inputs, tmp_path / "o", inputs=[str(tmp_path / "empty.txt")]))
    (tmp_path / "a.csv").write_text("x")
    with pytest.raises(DataError, match="unsupported file type"):
        build_shards(_opts(inputs, tmp_path / "o", inputs=[str(tmp_path / "a.csv")]))
    with pytest.raises(DataError, match=r"c\.parquet has no column 'text' \(columns: body\)"):
        build_shards(_opts(inputs, tmp_path / "o", inputs=inputs["files"][2:], text_field="text"))
    assert not (tmp_path / "o").exists()


def test_large_vocab_is_stored_as_uint32(inputs, built, tmp_path):
    """A tokenizer with more than 65536 ids writes uint32 samples that still read back exactly."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(built / "tokenizer" / "tokenizer.json"))
    tok.add_tokens([f"<extra_{i}>" for i in range(66_000)])
    tdir = tmp_path / "big_tok"
    tdir.mkdir()
    tok.save(str(tdir / "tokenizer.json"))
    (tdir / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|endoftext|>"}))
    out = tmp_path / "u32"
    build_shards(_opts(inputs, out, inputs=inputs["files"][:1], vocab_size=None, tokenizer_dir=tdir))
    index = read_index(out)
    assert index.dtype == "uint32" and index.vocab_size > 65536
    from data_shards import make_train_loader

    batch = next(iter(make_train_loader([(str(out), 1.0)], seq_len=31, micro_batch=2, dp_rank=0, dp_size=1, seed=0)))
    assert batch["input_ids"].shape == (2, 31) and int(batch["input_ids"].max()) < index.vocab_size
    with pytest.raises(DataError, match="model.vocab_size is 1000"):
        check_sources([str(out)], model_vocab_size=1000)


def test_cli_builds_and_reports_errors_in_one_line(inputs, tmp_path, capsys):
    parser = argparse.ArgumentParser()
    add_shard_arguments(parser)
    assert all(a.help for a in parser._actions if a.dest != "help")
    out = tmp_path / "cli"
    args = parser.parse_args([inputs["files"][0], "--out", str(out), "--vocab-size", "300", "--seq-len", "15",
                              "--shard-size", "8KB", "--workers", "0", "--no-progress"])
    assert run_shard(args) == 0
    assert "wrote" in capsys.readouterr().out and read_index(out).seq_len == 15
    assert "--vocab-size 300" in read_index(out).created_by
    assert run_shard(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("fm-train shard: error: ") and "--overwrite" in err[0]
    assert run_shard(parser.parse_args(["--out", str(out), "--verify"])) == 0
    assert parse_size("64MB") == 64_000_000 and parse_size("1GiB") == 1 << 30 and parse_size("500k") == 500_000
