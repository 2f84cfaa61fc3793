"""index.json is untrusted input: read_index validates every field once, and nothing built from a hostile
value (the shard cache's file names) leaves its directory. Each case edits a real index.json the writer made."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from data_shards import BuildOptions, DataError, ShardCache, build_shards
from data_shards.cli import main as shard_main
from data_shards.index import MAX_INDEX_BYTES, read_index

pytestmark = pytest.mark.unit


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real build of about 60 KB of the standard library in shards of about 20 KB (four or more)."""
    from data_shards.corpus import stdlib_files

    out = tmp_path_factory.mktemp("hostile") / "ds"
    build_shards(BuildOptions(inputs=[], out=out, seq_len=31, vocab_size=300, shard_size=20_000, workers=0,
                              on_bad_utf8="skip", progress=False), stdlib_files(60_000))
    assert len(read_index(out).shards) >= 3
    return out


def _copy_with(corpus: Path, tmp_path: Path, edit: Callable[[dict[str, Any]], None]) -> Path:
    """A directory holding the corpus's index.json after ``edit`` (the shards are not needed to read it)."""
    obj = json.loads((corpus / "index.json").read_text())
    edit(obj)
    out = tmp_path / "hostile"
    out.mkdir()
    (out / "index.json").write_text(json.dumps(obj))
    return out


def _set(path: str, value: Any) -> Callable[[dict[str, Any]], None]:
    """An edit setting ``a.b[2].c``-style ``path`` of the JSON object to ``value``."""
    def edit(obj: dict[str, Any]) -> None:
        *parents, last = path.replace("[", ".").replace("]", "").split(".")
        for key in parents:
            obj = obj[int(key)] if key.isdigit() else obj[key]
        obj[int(last) if last.isdigit() else last] = value
    return edit


HOSTILE = [
    ("shards.0.sha256", "/../../../tmp/evil", r"shards\[0\]\.sha256 is '/\.\./.*64 lowercase hex"),
    ("shards.0.sha256", "A" * 64, r"shards\[0\]\.sha256"),
    ("shards.1.name", "..", r"shards\[1\]\.name is refused"),
    ("shards.1.name", "notes.md", r"shards\[1\]\.name .*shard-NNNNNN\.tar"),
    ("shards.1.name", "shard-000000.tar", r"shards\[1\]\.name .*'shard-000001\.tar'"),
    ("shards.0.samples", 0, r"shards\[0\]\.samples is 0, outside 1\.\."),
    ("shards.0.samples", 1e15, r"shards\[0\]\.samples is 1000000000000000\.0, not an integer"),
    ("shards.0.samples", True, r"shards\[0\]\.samples is True, not an integer"),
    ("shards.0.samples", 10**15, r"shards\[0\]\.samples is 1000000000000000, outside"),
    ("shards.0.bytes", 4096, r"shards\[0\]\.bytes is 4096, but samples, seq_len and dtype"),
    ("shards.1.first_sample", 0, r"shards\[1\]\.first_sample is 0, but the samples of the shards before it"),
    ("shards.0.extra", 1, r"shards\[0\]\.extra is not a field"),
    ("dtype", "float64", r"dtype is 'float64'.*'uint16'"),
    ("vocab_size", True, r"vocab_size is True, not an integer"),
    ("vocab_size", "512", r"vocab_size is '512', not an integer"),
    ("eos_id", 300, r"eos_id is 300, outside 0\.\.299"),
    ("seq_len", -1, r"seq_len is -1, outside 1\.\."),
    ("format_version", True, r"has format 'fm-train-shards' version True"),
    ("tokenizer_hash", "x", r"tokenizer_hash"),
    ("created_by", "fm-train shard\nERROR forged line", r"created_by is .*single-line"),
    ("sources.0.path", {"deep": [1]}, r"sources\[0\]\.path"),
    ("member.stride_bytes", 1, r"member is .*seq_len and dtype give"),
    ("shards", [], r"shards is \[\], not a non-empty list"),
]


@pytest.mark.parametrize("field,value,message", HOSTILE, ids=[f"{f}={v!r:.20}" for f, v, _ in HOSTILE])
def test_hostile_field_is_one_line_naming_file_field_and_fix(corpus, tmp_path, field, value, message):
    directory = _copy_with(corpus, tmp_path, _set(field, value))
    with pytest.raises(DataError, match=message) as caught:
        read_index(directory)
    text = str(caught.value)
    assert text.startswith(str(directory / "index.json")) and "\n" not in text
    assert f"fm-train shard ... --out {directory} --overwrite" in text


def test_the_writers_index_reads_back_unchanged(corpus):
    """The validator accepts everything the writer produces, and the entries are the written ones."""
    obj = json.loads((corpus / "index.json").read_text())
    index = read_index(corpus)
    assert index.to_json() == obj


def test_oversized_and_deeply_nested_files_are_refused_before_use(corpus, tmp_path):
    big = tmp_path / "big"
    big.mkdir()
    with open(big / "index.json", "wb") as f:  # sparse: refused after reading the bound, not the whole file
        f.truncate(MAX_INDEX_BYTES + 1)
    with pytest.raises(DataError, match=r"index\.json is larger than 64 MiB"):
        read_index(big)
    deep = tmp_path / "deep"
    deep.mkdir()
    (deep / "index.json").write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(DataError, match=r"index\.json is nested too deep"):
        read_index(deep)
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "index.json").write_bytes(b'{"format": "fm-train-shards", "seq_len": 1' + b"9" * 5000 + b"}")
    with pytest.raises(DataError, match=r"index\.json is not valid JSON"):
        read_index(broken)


def test_verify_of_a_hostile_index_exits_2_with_one_line(corpus, tmp_path, capsys):
    directory = _copy_with(corpus, tmp_path, _set("shards.0.samples", 0))
    assert shard_main(["--out", str(directory), "--verify"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("fm-train shard: error: ") and "shards[0].samples" in err[0]


def test_shard_cache_never_names_a_file_outside_its_directory(corpus, tmp_path):
    """The cache names files by the index's sha256: a hostile value is refused, and so is a symlink in the
    cache that leads out, before any byte is written."""
    import fsspec

    fs = fsspec.filesystem("file")
    shard = corpus / read_index(corpus).shards[0].name
    cache = ShardCache(tmp_path / "cache", max_bytes=1 << 30)
    victim = tmp_path / "victim.tar"
    victim.write_text("user data")
    hostile = "../" + victim.name[: -len(".tar")]
    with pytest.raises(DataError, match="is not a sha256"):
        cache.local_copy(fs, str(shard), hostile, shard.stat().st_size)
    assert victim.read_text() == "user data"
    good = read_index(corpus).shards[0].sha256
    (tmp_path / "cache").mkdir(exist_ok=True)
    os.symlink(victim, tmp_path / "cache" / f"{good}.tar")
    with pytest.raises(DataError, match="leads outside .* through a symlink"):
        cache.local_copy(fs, str(shard), good, shard.stat().st_size)
    assert victim.read_text() == "user data"
    (tmp_path / "cache" / f"{good}.tar").unlink()
    assert cache.local_copy(fs, str(shard), good, shard.stat().st_size).read_bytes() == shard.read_bytes()
