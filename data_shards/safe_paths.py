"""The path boundary: every name that comes from data becomes a local path here, or is refused.

A name read from a file fm-train did not write itself (a manifest entry, an ``index.json`` field, an
object key listed in a bucket, the text of ``latest``) decides where bytes are read from or written
to, so it is checked as hostile: a relative POSIX path of plain segments, no ``..`` or ``.``, no
absolute path, no empty segment, no backslash, NUL or control character, resolved under its root
without leaving it through a symlink. This is the rule of Python's ``tarfile`` ``"data"`` extraction
filter, applied to every reader (resume, fetch, convert, the shard cache, eval) through one function.
Names fm-train writes itself (shards, step directories, DeepSpeed's files) also match
:data:`OWN_SEGMENT`, a stricter pattern a reader may demand on top.

Lives in ``data_shards`` (the lowest package: it imports nothing of fm-train), so that both sides of
the data/training line use the same boundary.
"""

from __future__ import annotations

import os
import re
from pathlib import Path, PurePosixPath

# One segment of a name fm-train writes: letters, digits, ``_ . -``, not starting with a dot.
OWN_SEGMENT = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.\-]{0,254}")
_MAX_NAME = 4096
_FORBIDDEN = re.compile(r"[\x00-\x1f\x7f\\]")


class UnsafePathError(ValueError):
    """A name from data that would leave its root, or that is not a plain relative path."""


def _show(name: object) -> str:
    text = repr(name)
    return text if len(text) <= 120 else text[:117] + "..."


def relative_name(name: object, *, what: str, strict: bool = False) -> PurePosixPath:
    """``name`` as a relative POSIX path of plain segments, or :class:`UnsafePathError` naming ``what``.

    ``strict``: every segment must also match :data:`OWN_SEGMENT` (names fm-train writes itself).
    """
    if not isinstance(name, str) or not name:
        raise UnsafePathError(f"{what}: {_show(name)} is not a file name (expected a non-empty string)")
    if len(name) > _MAX_NAME:
        raise UnsafePathError(f"{what}: a name of {len(name)} characters is not a file name")
    if _FORBIDDEN.search(name):
        raise UnsafePathError(f"{what}: {_show(name)} holds a backslash or a control character")
    if name.startswith("/") or re.match(r"[A-Za-z]:", name):
        raise UnsafePathError(f"{what}: {_show(name)} is an absolute path; only names relative to its directory "
                              "are accepted")
    segments = name.split("/")
    for seg in segments:
        if seg in ("", ".", ".."):
            raise UnsafePathError(f"{what}: {_show(name)} has an empty, '.' or '..' segment; only plain names "
                                  "inside its directory are accepted")
        if strict and not OWN_SEGMENT.fullmatch(seg):
            raise UnsafePathError(f"{what}: {_show(name)} is not a name fm-train writes (segment {_show(seg)})")
    return PurePosixPath(*segments)


def resolve_under(root: str | os.PathLike[str], name: object, *, what: str, strict: bool = False) -> Path:
    """``root / name`` for a ``name`` from data, after :func:`relative_name`; refused when an existing
    part of the path is a symlink that leads outside ``root`` (the path need not exist yet)."""
    rel = relative_name(name, what=what, strict=strict)
    root_path = Path(root)
    path = root_path.joinpath(*rel.parts)
    real_root = os.path.realpath(root_path)
    real = os.path.realpath(path)
    if real != real_root and not real.startswith(real_root.rstrip(os.sep) + os.sep):
        raise UnsafePathError(f"{what}: {_show(name)} leads outside {root_path} through a symlink "
                              f"(to {_show(real)})")
    return path


def key_under(prefix: str, key: str, *, what: str) -> PurePosixPath:
    """The part of object key ``key`` below ``prefix`` (both without a scheme), checked as a relative name:
    a key with ``//``, ``..`` or that is not under ``prefix`` is refused."""
    base = prefix.rstrip("/") + "/"
    if not key.startswith(base):
        raise UnsafePathError(f"{what}: object {_show(key)} is not under {_show(prefix)}")
    return relative_name(key[len(base):], what=f"{what}: object {_show(key)}")


def symlinks_in(root: str | os.PathLike[str]) -> list[str]:
    """Every symlink under ``root`` (files and directories, not followed), relative and sorted."""
    found: list[str] = []
    for current, dirs, files in os.walk(root, followlinks=False):
        for entry in [*dirs, *files]:
            path = os.path.join(current, entry)
            if os.path.islink(path):
                found.append(os.path.relpath(path, root).replace(os.sep, "/"))
    return sorted(found)
