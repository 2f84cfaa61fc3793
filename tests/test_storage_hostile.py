"""Names read from object storage never become paths outside their place (issue 25, finding 3), against
the real S3 server on loopback: a manifest entry with ``../`` in the step ``run.storage`` commits, an
object key with ``//`` under a step that ``fm-train convert s3://...`` reads, a ``latest`` naming a path,
and an object changed after its checksum was recorded."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import test_checkpoint_support as S
from s3_server import make_bucket, s3_server

pytestmark = pytest.mark.unit


@pytest.fixture(scope="module")
def s3():
    with s3_server() as endpoint:
        make_bucket("fm-hostile")
        yield endpoint


def _step(prefix: str, files: dict[str, bytes], *, manifest_files: dict[str, int] | None = None,
          digests: dict[str, str] | None = None) -> None:
    """A step committed in storage as fm-train commits one (files, manifest, then ``latest``), with
    whatever names a hostile writer chose."""
    import fsspec

    from fm_train.checkpoint.manifest import build_manifest, complete_manifest
    from fm_train.config import build_config
    from fm_train.dist import Topology

    fs = fsspec.filesystem("s3")
    for key, data in files.items():
        fs.pipe_file(f"{prefix}/checkpoints/step_00000002/{key}", data)
    part = build_manifest(build_config(S.tiny_raw(2, 2)), Topology(world=2), data_state={"i": 2}, tokens_seen=2,
                          tokenizer_hash="h")
    manifest = complete_manifest(part, step=2, tag="step_00000002", files={}, rng_files=[])
    manifest["files"] = manifest_files or {k: len(v) for k, v in files.items()}  # past the writer's own checks
    if digests is not None:
        manifest["checksums"] = {"algorithm": "sha256", "files": digests}
    fs.pipe_file(f"{prefix}/checkpoints/step_00000002/manifest.json", json.dumps(manifest).encode())
    fs.pipe_file(f"{prefix}/checkpoints/latest", b"step_00000002\n")


def _everything(root: Path) -> list[str]:
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*"))


def test_a_manifest_entry_leaving_the_step_is_refused_by_the_fetch(s3, tmp_path: Path) -> None:
    from fm_train.checkpoint import CheckpointError
    from fm_train.checkpoint.fetch import fetch_latest

    _step("fm-hostile/dotdot", {"mp_rank_00_model_states.pt": b"x" * 8},
          manifest_files={"mp_rank_00_model_states.pt": 8, "../../../escaped.txt": 3})
    with pytest.raises(CheckpointError, match=r"files: '\.\./\.\./\.\./escaped\.txt' has an empty, '\.' or '\.\.' segment"):
        fetch_latest("s3://fm-hostile/dotdot", tmp_path / "node" / "run", say=lambda _m: None)
    assert _everything(tmp_path) == []


def test_a_latest_naming_a_path_is_refused(s3, tmp_path: Path) -> None:
    import fsspec

    from fm_train.checkpoint import CheckpointError
    from fm_train.checkpoint.fetch import fetch_latest

    _step("fm-hostile/latest", {"mp_rank_00_model_states.pt": b"x" * 8})
    fsspec.filesystem("s3").pipe_file("fm-hostile/latest/checkpoints/latest", b"../../x/step_00000002\n")
    with pytest.raises(CheckpointError, match="not a committed checkpoint"):
        fetch_latest("s3://fm-hostile/latest", tmp_path / "run", say=lambda _m: None)
    assert not (tmp_path / "run").exists() or _everything(tmp_path / "run") == []


def test_an_object_changed_after_the_save_never_lands(s3, tmp_path: Path) -> None:
    """Downloads are checked by checksum, not only by size: a same-size object with other bytes is refused
    before it takes its name."""
    import hashlib

    from fm_train.checkpoint import CheckpointError
    from fm_train.checkpoint.fetch import fetch_latest

    _step("fm-hostile/changed", {"mp_rank_00_model_states.pt": b"y" * 8},
          digests={"mp_rank_00_model_states.pt": hashlib.sha256(b"x" * 8).hexdigest()})
    with pytest.raises(CheckpointError, match="does not match the sha256 its manifest records"):
        fetch_latest("s3://fm-hostile/changed", tmp_path / "run", say=lambda _m: None)
    assert [p for p in _everything(tmp_path / "run") if p.endswith(".pt")] == []


def test_convert_refuses_an_object_key_with_an_empty_segment(s3, tmp_path: Path, capsys) -> None:
    """``step_00000002//<absolute path>`` was written to that absolute path by convert from storage."""
    from fm_train.cli import main

    target = tmp_path / "outside" / "planted.txt"
    _step("fm-hostile/slashes", {"mp_rank_00_model_states.pt": b"x" * 8, "/" + str(target).lstrip("/"): b"pwned"})
    assert main(["convert", "s3://fm-hostile/slashes", "--out", str(tmp_path / "hf"), "--no-tokenizer"]) == 2
    err = capsys.readouterr().err
    assert "fm-train convert: error:" in err and "absolute path" in err, err
    assert not target.exists() and not (tmp_path / "hf").exists()
