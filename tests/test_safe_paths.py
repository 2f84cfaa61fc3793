"""The path boundary (data_shards/safe_paths.py): generated hostile names never leave their root."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from hypothesis import given, settings, strategies as st

from data_shards.safe_paths import UnsafePathError, key_under, relative_name, resolve_under, symlinks_in

pytestmark = pytest.mark.unit

_SEGMENTS = st.sampled_from(["..", ".", "", "a", "step_00000001", "x.pt", "/", "\\", "C:", "\x00", "..\\..", " "])
_NAMES = st.lists(st.one_of(_SEGMENTS, st.text(max_size=6)), min_size=1, max_size=6).map("/".join)


@settings(max_examples=200, deadline=None)
@given(name=st.one_of(_NAMES, st.text(max_size=40)))
def test_a_generated_name_is_refused_or_stays_under_its_root(tmp_path_factory, name):
    root = tmp_path_factory.getbasetemp() / "root"
    root.mkdir(exist_ok=True)
    try:
        path = resolve_under(root, name, what="manifest.json: files")
    except UnsafePathError as exc:
        assert "manifest.json: files" in str(exc) and "\n" not in str(exc)
        return
    real = os.path.realpath(path)
    assert real.startswith(os.path.realpath(root) + os.sep)
    assert ".." not in Path(name).parts and not name.startswith("/")


@pytest.mark.parametrize("name", ["../x", "a/../../x", "/etc/passwd", "a//b", "a/./b", "", "a/", "..", "C:/x",
                                  "a\\..\\b", "a\x00b", 7, None])
def test_the_known_escapes_are_refused_by_name(tmp_path, name):
    with pytest.raises(UnsafePathError, match="index.json: shards"):
        resolve_under(tmp_path, name, what="index.json: shards")


def test_a_symlink_leaving_the_root_is_refused_and_listed(tmp_path):
    root, outside = tmp_path / "root", tmp_path / "outside"
    root.mkdir(), outside.mkdir()
    (root / "inside").mkdir()
    (root / "escape").symlink_to(outside, target_is_directory=True)
    (root / "inside" / "ok").symlink_to(root / "inside")
    assert resolve_under(root, "inside/f.pt", what="w") == root / "inside" / "f.pt"
    with pytest.raises(UnsafePathError, match="leads outside"):
        resolve_under(root, "escape/fp32.pt", what="w")
    assert symlinks_in(root) == ["escape", "inside/ok"]


def test_strict_names_and_object_keys():
    assert relative_name("shard-000001.tar", what="w", strict=True).as_posix() == "shard-000001.tar"
    with pytest.raises(UnsafePathError, match="not a name fm-train writes"):
        relative_name(".hidden", what="w", strict=True)
    assert key_under("bucket/runs/a/step_00000002", "bucket/runs/a/step_00000002/rng/0.pt", what="w").as_posix() \
        == "rng/0.pt"
    for key in ["bucket/runs/a/step_00000002//etc/passwd", "bucket/runs/a/step_00000002/../x", "bucket/other/x"]:
        with pytest.raises(UnsafePathError):
            key_under("bucket/runs/a/step_00000002", key, what="w")
