"""Shard directories on object storage, against a real S3 server on loopback (moto's standalone server).

``fm-train shard --out s3://...`` builds locally and uploads, index.json last; the reader streams the
same samples from the bucket as from a local copy (ranged GETs, also from forked loader workers),
resumes from the same state, and names the object of a damaged shard. Bad locations (no bucket, a
scheme typo, missing credentials, a backend that is not installed) are errors that say what to do.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from s3_server import clear_clients, make_bucket, s3_server

pytestmark = pytest.mark.unit
SEQ = 32


@pytest.fixture(scope="module")
def s3():
    with s3_server() as endpoint:
        make_bucket("fm-data")
        yield endpoint


@pytest.fixture(scope="module")
def uploaded(s3, corpus: Path, tmp_path_factory) -> tuple[str, Path]:
    """The session corpus's inputs sharded straight to ``s3://fm-data/stdlib`` by the CLI, and the
    same build written locally (same inputs, tokenizer and settings)."""
    from data_shards.cli import main

    root = tmp_path_factory.mktemp("s3src")
    text = root / "docs.jsonl"
    rows = [{"text": Path(__file__).read_text() + str(i)} for i in range(12)]
    text.write_text("\n".join(json.dumps(r) for r in rows))
    common = [str(text), "--tokenizer", str(corpus / "tokenizer"), "--seq-len", str(SEQ), "--shard-size", "100000",
              "--workers", "0", "--no-progress"]
    assert main([*common, "--out", str(root / "local")]) == 0
    assert main([*common, "--out", "s3://fm-data/stdlib"]) == 0
    return "s3://fm-data/stdlib", root / "local"


def _tokens(loader, steps: int) -> tuple[np.ndarray, dict]:
    it = iter(loader)
    batches = [next(it) for _ in range(steps)]
    return np.stack([b["input_ids"].numpy() for b in batches]), batches[-1]["state"]


def test_shard_to_s3_writes_what_a_local_build_writes(uploaded) -> None:
    import fsspec

    from data_shards import check_sources

    uri, local = uploaded
    fs = fsspec.filesystem("s3")
    remote_files = sorted(p.rsplit("/", 1)[-1] for p in fs.find("fm-data/stdlib"))
    local_files = sorted(p.name for p in local.rglob("*") if p.is_file())
    assert remote_files == local_files and len([f for f in remote_files if f.endswith(".tar")]) >= 3
    assert fs.cat_file("fm-data/stdlib/shard-000000.tar") == (local / "shard-000000.tar").read_bytes()
    remote_index = json.loads(fs.cat_file("fm-data/stdlib/index.json"))
    local_index = json.loads((local / "index.json").read_text())
    assert "--out s3://fm-data/stdlib" in remote_index.pop("created_by")  # the command that rebuilds it
    local_index.pop("created_by")
    assert remote_index == local_index
    remote, here = check_sources([uri]), check_sources([str(local)])
    assert [ix.shards for ix in remote.indexes] == [ix.shards for ix in here.indexes]
    assert remote.tokenizer_hash == here.tokenizer_hash
    assert str(remote.paths[0]) == uri


@pytest.mark.parametrize("shuffle", ["global", "window"])
@pytest.mark.parametrize("workers", [0, 2])
def test_the_reader_streams_the_local_samples_from_s3_and_resumes(uploaded, shuffle: str, workers: int) -> None:
    from data_shards import make_train_loader

    uri, local = uploaded
    kw = dict(seq_len=SEQ, micro_batch=4, dp_rank=1, dp_size=2, seed=3, shuffle=shuffle, shuffle_window=16)
    want, want_state = _tokens(make_train_loader([(str(local), 1.0)], **kw), 12)
    got, state = _tokens(make_train_loader([(uri, 1.0)], num_workers=workers, **kw), 12)
    assert np.array_equal(got, want)
    assert json.dumps(state, sort_keys=True) == json.dumps(want_state, sort_keys=True)
    # Resumed from the bucket after step 6: the next six batches are the uninterrupted run's.
    _, mid = _tokens(make_train_loader([(uri, 1.0)], **kw), 6)
    rest, _ = _tokens(make_train_loader([(uri, 1.0)], state=mid, num_workers=workers, **kw), 6)
    assert np.array_equal(rest, want[6:])


def test_the_shard_cache_serves_the_same_samples_within_its_bound(uploaded, tmp_path: Path) -> None:
    from data_shards import ShardCache, make_train_loader

    uri, local = uploaded
    kw = dict(seq_len=SEQ, micro_batch=4, dp_rank=0, dp_size=1, seed=5, shuffle="window", shuffle_window=16)
    want, _ = _tokens(make_train_loader([(str(local), 1.0)], **kw), 80)  # 320 samples: 4 shards or more
    shard = (local / "shard-000000.tar").stat().st_size
    cache = ShardCache(tmp_path / "cache", max_bytes=2 * shard)  # 2 of the 18 shards fit: evictions
    for workers in (0, 2):
        got, _ = _tokens(make_train_loader([(uri, 1.0)], num_workers=workers, cache=cache, **kw), 80)
        assert np.array_equal(got, want)
        held = list((tmp_path / "cache").glob("*.tar"))
        assert 1 <= len(held) <= 2 and sum(p.stat().st_size for p in held) <= 2 * shard
        assert not list((tmp_path / "cache").glob(".*.part"))  # no download left half-written
    # Content-addressed by the index's sha256: a cached copy is exactly the shard it stands for.
    index = {s["sha256"]: s["name"] for s in json.loads((local / "index.json").read_text())["shards"]}
    for p in held:
        assert p.read_bytes() == (local / index[p.stem]).read_bytes()
    # A cache too small for one shard: ranged GETs, the same samples.
    tiny = ShardCache(tmp_path / "tiny", max_bytes=shard - 1)
    got, _ = _tokens(make_train_loader([(uri, 1.0)], cache=tiny, **kw), 10)
    assert np.array_equal(got, want[:10]) and not (tmp_path / "tiny").exists()


def test_overwrite_verify_and_a_damaged_object(uploaded, s3, tmp_path: Path) -> None:
    import fsspec

    from data_shards import DataError, make_train_loader
    from data_shards.cli import main

    uri, local = uploaded
    fs = fsspec.filesystem("s3")
    copy = "fm-data/damaged"
    fs.put(str(local) + "/", copy + "/", recursive=True)
    assert main(["--verify", "--out", f"s3://{copy}"]) == 0
    # Without --overwrite an existing build is refused before anything is tokenized.
    assert main([str(local / "index.json"), "--out", f"s3://{copy}", "--vocab-size", "300", "--no-progress"]) == 2
    data = (local / "shard-000001.tar").read_bytes()
    fs.pipe_file(f"{copy}/shard-000001.tar", data[: len(data) // 2])  # an upload cut short
    assert main(["--verify", "--out", f"s3://{copy}"]) == 1
    with pytest.raises(DataError, match=r"shard s3://fm-data/damaged/shard-000001.tar is truncated"):
        make_train_loader([(f"s3://{copy}", 1.0)], seq_len=SEQ, micro_batch=4, dp_rank=0, dp_size=1, seed=3)
    with pytest.warns(UserWarning, match="skipped"):
        stream = make_train_loader([(f"s3://{copy}", 1.0)], seq_len=SEQ, micro_batch=4, dp_rank=0, dp_size=1,
                                   seed=3, on_bad_shard="skip")
    assert stream.skipped_shards == ["0:shard-000001.tar"]
    assert len(next(iter(stream))["input_ids"]) == 4


def test_bad_locations_say_what_to_do(s3, tiny_config_dict: dict, monkeypatch) -> None:
    from data_shards import DataError, check_sources
    from fm_train.config import ConfigError, build_config

    with pytest.raises(DataError, match=r"shard directory s3://no-such-bucket/x does not exist"):
        check_sources(["s3://no-such-bucket/x"])
    with pytest.raises(DataError, match=r"unknown storage scheme 's4'://"):
        check_sources(["s4://fm-data/stdlib"])
    tiny_config_dict["data"]["sources"] = [{"path": "s4://fm-data/stdlib", "weight": 1.0}]
    with pytest.raises(ConfigError, match=r"sources\[0\].path='s4://fm-data/stdlib': unknown storage scheme s4://"):
        build_config(tiny_config_dict)
    tiny_config_dict["data"]["sources"] = [{"path": "gs://fm-data/stdlib", "weight": 1.0}]
    with pytest.raises(ConfigError, match=r"gs:// needs the gcsfs package, which is not installed"):
        build_config(tiny_config_dict)
    tiny_config_dict["data"]["sources"] = [{"path": "s3://fm-data/stdlib", "weight": 1.0, "default_corpus": True}]
    with pytest.raises(ConfigError, match=r"default_corpus.*is built on local disk"):
        build_config(tiny_config_dict)
    tiny_config_dict["data"]["sources"] = [{"path": "s3://fm-data/stdlib", "weight": 1.0}]
    assert build_config(tiny_config_dict, require_paths=True).data.sources[0].path == "s3://fm-data/stdlib"

    # No credentials anywhere (no environment, no profile): the error says where they come from.
    for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.delenv(key)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent")
    monkeypatch.setenv("AWS_CONFIG_FILE", "/nonexistent")
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    clear_clients()
    try:
        with pytest.raises(DataError, match=r"set AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY"):
            check_sources(["s3://fm-data/stdlib"])
    finally:
        clear_clients()


@pytest.mark.multiproc
def test_a_run_trains_from_the_bucket_as_from_local_disk(uploaded, tiny_config_dict: dict, tmp_path: Path) -> None:
    """2 gloo ranks train and evaluate from s3:// with a loader worker, with and without the shard
    cache: every loss and data receipt equals the same run's from the local copy."""
    from distributed import run_distributed
    from test_engine_worker import _worker_real_data

    uri, local = uploaded
    records = {}
    # From the bucket through the node's shard cache (shared by both ranks and their loader workers),
    # from the bucket by ranged GETs only, and from the local copy.
    for name, path, cache in (("s3-cache", uri, str(tmp_path / "cache")), ("s3", uri, None), ("local", str(local), None)):
        raw = {**tiny_config_dict, "run": {**tiny_config_dict["run"], "dir": str(tmp_path / name)},
               "data": {**tiny_config_dict["data"], "num_workers": 1, "val_fraction": 0.05,
                        "sources": [{"path": path, "weight": 1.0}], "cache_dir": cache},
               "train": {**tiny_config_dict["train"], "steps": 6, "log_every": 1, "eval_every": 3, "eval_batches": 2},
               "checkpoint": {"every": 0}, "logging": {"tensorboard": False}}
        assert run_distributed(_worker_real_data, world_size=2, args=(raw,), init_process_group=False) == [0, 0]
        lines = (tmp_path / name / "metrics.jsonl").read_text().splitlines()
        records[name] = [(r.get("loss"), r.get("val_loss"), r.get("data_receipt")) for r in map(json.loads, lines)]
    assert records["s3"] == records["local"] == records["s3-cache"] and len(records["s3"]) >= 6
    assert list((tmp_path / "cache").glob("*.tar"))
