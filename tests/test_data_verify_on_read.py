"""Shard bytes against index.json: a shard replaced by one of the same size from another build is found
by its sha256 the first time it is read, by default (local files, the shard cache's downloads, loader
workers), once per node; ``fm-train shard --verify`` checks the index's declared shape against the bytes.

Real builds (two of them, from different text, with one tokenizer), the real reader, real subprocesses,
and the loopback S3 server.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import sysconfig
import textwrap
from pathlib import Path

import pytest

from data_shards import BadShardError, BuildOptions, build_shards, make_train_loader
from data_shards.index import read_index

pytestmark = pytest.mark.unit
STDLIB = Path(sysconfig.get_paths()["stdlib"])
SEQ = 32
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def builds(tmp_path_factory: pytest.TempPathFactory, corpus: Path) -> dict[str, Path]:
    """Builds 'a' and 'b' of different stdlib text, same tokenizer and shard size: their shard-000001.tar
    have the same size and the same member names, but other tokens."""
    root = tmp_path_factory.mktemp("verify-on-read")
    out = {}
    for name, source in (("a", STDLIB / "json" / "decoder.py"), ("b", STDLIB / "json" / "encoder.py")):
        text = root / f"{name}.txt"
        text.write_text(source.read_text() * 3)
        build_shards(BuildOptions(inputs=[str(text)], out=root / name, seq_len=SEQ, tokenizer_dir=corpus / "tokenizer",
                                  shard_size=100_000, workers=0, progress=False))
        out[name] = root / name
    a, b = read_index(out["a"]).shards[1], read_index(out["b"]).shards[1]
    assert a.bytes == b.bytes and a.first_sample == b.first_sample and a.sha256 != b.sha256
    return out


def _swapped(builds: dict[str, Path], dst: Path) -> Path:
    """A copy of build 'a' whose shard-000001.tar is build 'b''s."""
    d = Path(shutil.copytree(builds["a"], dst))
    shutil.copyfile(builds["b"] / "shard-000001.tar", d / "shard-000001.tar")
    return d


def _epoch(directory: Path, **kw) -> dict:
    """Read one epoch's worth of batches of ``directory`` (micro batch 4, dp 1); the last batch's state."""
    n = read_index(directory).num_samples
    stream = make_train_loader([(str(directory), 1.0)], seq_len=SEQ, micro_batch=4, dp_rank=0, dp_size=1, seed=0, **kw)
    state: dict = {}
    for _, batch in zip(range(-(-n // 4)), stream):
        state = batch["state"]
    return state


@pytest.mark.parametrize("workers", [0, 2])
def test_a_shard_of_another_build_is_refused_on_first_read_by_default(builds, tmp_path: Path, workers: int) -> None:
    d = _swapped(builds, tmp_path / "swapped")
    want, got = read_index(d).shards[1].sha256, read_index(builds["b"]).shards[1].sha256
    # Before: the start-up check (size, first and last header) and the reader took it as its own.
    with pytest.raises(BadShardError) as caught:
        _epoch(d, num_workers=workers, cache=None)
    message = str(caught.value)
    assert caught.value.key == "0:shard-000001.tar"  # also from loader worker processes
    assert f"shard-000001.tar is corrupted: its sha256 is {got} but index.json says {want}" in message
    assert "fm-train shard --verify" in message and "on_bad_shard: skip" in message  # the fixes
    assert _epoch(d, verify_sha256=False)["skipped_shards"] == []  # the opt-out reads it as before


def test_under_skip_the_replaced_shard_is_left_out_like_any_bad_shard(builds, tmp_path: Path) -> None:
    d = _swapped(builds, tmp_path / "swapped")
    with pytest.raises(BadShardError) as caught:
        _epoch(d, on_bad_shard="skip")
    # What the worker does under skip: record the key, restart, and every rank leaves the shard out.
    assert _epoch(d, on_bad_shard="skip", skip_shards=[caught.value.key])["skipped_shards"] == ["0:shard-000001.tar"]


def test_a_shard_rewritten_in_place_after_it_was_verified_is_hashed_again(builds, tmp_path: Path) -> None:
    d = Path(shutil.copytree(builds["a"], tmp_path / "a"))
    _epoch(d)  # every shard verified and remembered by this process
    with open(d / "shard-000001.tar", "r+b") as fh:  # same inode, same size: only the bytes differ
        fh.write((builds["b"] / "shard-000001.tar").read_bytes())
    with pytest.raises(BadShardError, match="shard-000001.tar is corrupted: its sha256 is"):
        _epoch(d)


_READ_ONE_BATCH = textwrap.dedent("""
    import sys
    from data_shards import ShardCache, make_train_loader

    def rchar():
        return int(next(l for l in open("/proc/self/io") if l.startswith("rchar")).split()[1])

    def first_batch(directory):
        return iter(make_train_loader([(directory, 1.0)], seq_len=32, micro_batch=1, dp_rank=0, dp_size=1, seed=0,
                                      cache=ShardCache(sys.argv[3], 10**9)))

    next(first_batch(sys.argv[1]))  # lazy imports and first-use reads happen here, not below
    it = first_batch(sys.argv[2])
    before = rchar()
    next(it)
    print(rchar() - before)
""")


def test_the_node_hashes_a_shard_once_for_all_its_processes(builds, tmp_path: Path) -> None:
    """Two processes of one node (markers in the shard cache's directory): the second reads its batch
    without reading the shard through, counted by the kernel (``rchar`` of /proc/self/io)."""
    d = Path(shutil.copytree(builds["a"], tmp_path / "a"))
    cache = tmp_path / "cache"

    def bytes_read() -> int:
        run = subprocess.run([sys.executable, "-c", _READ_ONE_BATCH, str(builds["b"]), str(d), str(cache)], cwd=ROOT,
                             capture_output=True, text=True, timeout=120, check=False)
        assert run.returncode == 0, run.stderr
        return int(run.stdout.split()[-1])

    shard = min(e.bytes for e in read_index(d).shards)
    first, second = bytes_read(), bytes_read()
    assert first >= shard and second < shard // 4, (first, second, shard)
    assert len(list((cache / "verified").iterdir())) == 2  # one shard of each directory touched, one marker each


def test_the_shard_cache_checks_a_download_before_it_takes_its_name(builds, tmp_path: Path) -> None:
    import fsspec
    from s3_server import make_bucket, s3_server

    from data_shards import ShardCache

    with s3_server():
        make_bucket("fm-verify")
        fs = fsspec.filesystem("s3")
        fs.put(str(_swapped(builds, tmp_path / "swapped")) + "/", "fm-verify/a/", recursive=True)
        index = read_index(builds["a"])
        cache = ShardCache(tmp_path / "cache", 10**9)
        with pytest.raises(BadShardError, match="shard-000001.tar is not downloadable .*as downloaded is corrupted: "
                                                f"its sha256 is {read_index(builds['b']).shards[1].sha256}"):
            _epoch_uri("s3://fm-verify/a", index.num_samples, cache=cache)
        assert not (tmp_path / "cache" / f"{index.shards[1].sha256}.tar").exists()  # never cached under that name
        with pytest.warns(UserWarning, match=r"\d shards of s3://fm-verify/a are read by ranged GETs.*data.cache_dir"):
            make_train_loader([("s3://fm-verify/a", 1.0)], seq_len=SEQ, micro_batch=4, dp_rank=0, dp_size=1, seed=0)


def _epoch_uri(uri: str, samples: int, **kw) -> None:
    stream = make_train_loader([(uri, 1.0)], seq_len=SEQ, micro_batch=4, dp_rank=0, dp_size=1, seed=0, **kw)
    for _ in zip(range(-(-samples // 4)), stream):
        pass


def _shard_verify(directory: Path, capsys) -> tuple[int, str]:
    from data_shards.cli import main

    code = main(["--verify", "--out", str(directory)])
    captured = capsys.readouterr()
    return code, captured.out + captured.err


def test_verify_accepts_a_build_and_names_a_swapped_shard_s_digests(builds, tmp_path: Path, capsys) -> None:
    assert _shard_verify(builds["a"], capsys) == (0, f"{builds['a']}: all shards match index.json\n")
    code, out = _shard_verify(_swapped(builds, tmp_path / "swapped"), capsys)
    assert code == 1 and f"its sha256 is {read_index(builds['b']).shards[1].sha256}" in out, out


def test_verify_checks_the_declared_seq_len_against_the_member_headers(builds, tmp_path: Path, capsys) -> None:
    """index.json edited to seq_len 33: the stride is the same (a 512-byte block holds 33 or 34 tokens),
    so sizes, names and every sha256 still match; only the members' size field tells."""
    d = Path(shutil.copytree(builds["a"], tmp_path / "a"))
    obj = json.loads((d / "index.json").read_text())
    obj["seq_len"], obj["sample_tokens"] = SEQ + 1, SEQ + 2
    for shard in obj["shards"]:
        shard["tokens"] = shard["samples"] * (SEQ + 2)
    (d / "index.json").write_text(json.dumps(obj))
    assert read_index(d).stride_bytes == read_index(builds["a"]).stride_bytes
    code, out = _shard_verify(d, capsys)
    assert code == 1 and "shard-000000.tar: corrupted at sample 0: its size field is not 34 tokens" in out, out


def test_verify_checks_the_declared_vocabulary_against_the_token_ids(builds, tmp_path: Path, capsys) -> None:
    d = Path(shutil.copytree(builds["a"], tmp_path / "a"))
    obj = json.loads((d / "index.json").read_text())
    obj["vocab_size"] = 100  # the build's tokens reach past it; the sha256 of every shard still matches
    (d / "index.json").write_text(json.dumps(obj))
    code, out = _shard_verify(d, capsys)
    assert code == 1 and "shard-000000.tar: corrupted at sample 0: a token id is not below vocab_size 100" in out, out
