"""Shard bytes against index.json: each shard's sha256 when it is first read, and every declared field
for ``fm-train shard --verify``.

On read (``data.verify_sha256``, on by default). The reader reads samples at random offsets, so a
shard cannot be hashed from the samples it reads; instead the first time a process opens a shard the
file behind that same descriptor is hashed in one streaming pass, before any of its samples is
returned. A process-wide memo keyed by the file's identity (device, inode, size, mtime, ctime) makes
that once per process; with a marker directory the node's ranks and loader workers share the work: a
per-shard lock file lets one of them hash while the others wait, and its content then says "verified"
to every later process of the node. ctime is in the key because no user can set it: a file replaced
or rewritten in place gets a new key and is hashed again.

On ``--verify``: :func:`~data_shards.index.read_index` has made sure the index's own fields agree
(counts, byte sizes, first sample numbers, dtype against the vocabulary); here every member of every
shard must have the declared name, a size field of ``seq_len + 1`` tokens of the declared dtype, a
valid checksum, token ids below the vocabulary, and the end-of-archive blocks must follow the last
one; each shard is streamed once for all of it and its sha256.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from .errors import DataError
from .index import (
    HEADER_BYTES,
    KEY_DIGITS,
    ShardEntry,
    ShardIndex,
    member_data_bytes,
    member_ext,
    read_index,
)
from .sources import shard_problem
from .storage import Location, as_location

_CHUNK = 1 << 22  # bytes per read of a streaming pass: large enough that hashing dominates
_VERIFIED_MARK = b"sha256 verified\n"
_verified: set[tuple] = set()  # this process's shard files whose bytes matched index.json


# --- on read ---------------------------------------------------------------------------------------


def sha256_of_fd(fd: int) -> str:
    """sha256 of a whole open file, read with ``pread`` (the descriptor's offset is left alone)."""
    digest = hashlib.sha256()
    buf = bytearray(_CHUNK)
    view = memoryview(buf)
    offset = 0
    while n := os.preadv(fd, [view], offset):
        digest.update(view[:n])  # hashlib releases the GIL for large buffers: loader threads keep going
        offset += n
    return digest.hexdigest()


def marker_dir(cache_directory: Path | None = None) -> Path:
    """Where this node keeps its "verified" markers: ``verified/`` in the shard cache, else a directory
    in the node's temp dir named for this user (made when first needed)."""
    if cache_directory is not None:
        return Path(cache_directory) / "verified"
    return Path(tempfile.gettempdir()) / f"fm-train-{os.getuid()}" / "verified-shards"


def _private(path: Path) -> bool:
    """Make ``path`` if needed; True if it is a directory only this user may write (a marker planted
    by someone else would skip a check)."""
    try:
        path.mkdir(mode=0o700, parents=True, exist_ok=True)
        st = os.lstat(path)
    except OSError:
        return False
    return st.st_uid == os.getuid() and not st.st_mode & 0o022 and stat.S_ISDIR(st.st_mode)


class ShardVerifier:
    """Checks a shard file's sha256 against index.json the first time this process (or, through markers
    in ``marker_dir``, this node) opens it; afterwards from the memo."""

    def __init__(self, marker_dir: Path | None) -> None:
        self.marker_dir = marker_dir
        self._checked_dir = False

    def mismatch(self, fd: int, expected: str) -> str | None:
        """None if the file behind ``fd`` holds bytes with sha256 ``expected``; else the digest it has."""
        st = os.fstat(fd)
        key = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns, expected)
        if key in _verified:
            return None
        got = self._node_digest(fd, key) if self._markers() else sha256_of_fd(fd)
        if got != expected:
            return got
        _verified.add(key)
        return None

    def _markers(self) -> bool:
        """Whether the node-wide markers can be used (their directory checked once per process)."""
        if not self._checked_dir and self.marker_dir is not None:
            self._checked_dir = True
            if not _private(self.marker_dir):
                self.marker_dir = None
        return self.marker_dir is not None

    def _node_digest(self, fd: int, key: tuple) -> str:
        """The file's digest, computed by at most one process of the node (the others wait for its marker)."""
        assert self.marker_dir is not None
        name = hashlib.sha256(repr(key).encode("ascii")).hexdigest()
        try:
            marker = os.open(self.marker_dir / name, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o600)
        except OSError:  # the directory went away meanwhile: hash in this process
            return sha256_of_fd(fd)
        try:
            fcntl.flock(marker, fcntl.LOCK_EX)
            if os.pread(marker, len(_VERIFIED_MARK) + 1, 0) == _VERIFIED_MARK:
                return key[-1]  # another process of this node hashed the same file and it matched
            got = sha256_of_fd(fd)
            if got == key[-1]:
                os.pwrite(marker, _VERIFIED_MARK, 0)
            return got
        finally:
            os.close(marker)  # releases the lock


def sha256_problem(expected: str, got: str) -> str:
    """The bad-shard problem text of a shard whose bytes are not the ones index.json describes."""
    return (f"corrupted: its sha256 is {got} but index.json says {expected} (replaced or rewritten after the "
            "build)")


def check_download(path: Path, remote_path: str, expected: str) -> None:
    """DataError unless a shard just downloaded to ``path`` has sha256 ``expected`` (checked before the
    shard cache renames it into place under that name)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        got = sha256_of_fd(fd)
    finally:
        os.close(fd)
    if got != expected:
        raise DataError(f"shard {remote_path} as downloaded is {sha256_problem(expected, got)}")


# --- fm-train shard --verify -----------------------------------------------------------------------


def verify_shards(directory: str | Path) -> list[tuple[str, str]]:
    """(shard name, problem) for every shard whose bytes contradict index.json; empty when all match.
    Each shard is read once."""
    location = as_location(directory, what="--out")
    index = read_index(location)  # refuses fields that contradict each other (counts, sizes, dtype)
    problems = []
    for entry in index.shards:
        problem = shard_problem(location, index, entry) or shard_bytes_problem(location, index, entry)
        if problem is not None:
            problems.append((entry.name, problem))
    return problems


def shard_bytes_problem(directory: Location, index: ShardIndex, entry: ShardEntry) -> str | None:
    """What the bytes of one shard contradict in index.json (member names, sizes, checksums, token ids,
    the archive's end, sha256), or None. The shard is streamed once."""
    stride = index.stride_bytes
    digest = hashlib.sha256()
    members = _MemberCheck(index, entry)
    seen = 0
    tail = b""
    for chunk in _chunks(directory / entry.name, (_CHUNK // stride or 1) * stride):
        digest.update(chunk)
        whole = min(len(chunk), max(0, entry.samples * stride - seen)) // stride
        if whole:
            problem = members.check(np.frombuffer(chunk, np.uint8, whole * stride).reshape(whole, stride))
            if problem is not None:
                return problem
        tail = chunk[whole * stride:]
        seen += len(chunk)
    if seen != entry.bytes or members.count != entry.samples:
        return f"{members.count} whole samples in {seen} bytes, index.json says {entry.samples} in {entry.bytes}"
    if tail.count(0) != len(tail):
        return "corrupted: bytes after the last sample are not the end-of-archive blocks"
    if digest.hexdigest() != entry.sha256:
        return sha256_problem(entry.sha256, digest.hexdigest())
    return None


def _chunks(path: Location, size: int) -> Iterator[bytes]:
    with path.open("rb") as f:
        while chunk := f.read(size):
            yield chunk


class _MemberCheck:
    """Checks consecutive tar members of one shard, a block of rows (one member per row) at a time."""

    def __init__(self, index: ShardIndex, entry: ShardEntry) -> None:
        self.index, self.entry, self.count = index, entry, 0
        self.data_bytes = member_data_bytes(index.sample_tokens, index.dtype)
        self.dtype = np.dtype("<u2" if index.dtype == "uint16" else "<u4")
        self.suffix = np.frombuffer(("." + member_ext(index.dtype)).encode("ascii") + b"\0", np.uint8)
        self.size_field = np.frombuffer(f"{self.data_bytes:011o}\0".encode("ascii"), np.uint8)

    def check(self, rows: np.ndarray) -> str | None:
        """None if every row is the next member as index.json declares it, else the first problem."""
        numbers = self.entry.first_sample + self.count + np.arange(len(rows), dtype=np.int64)
        powers = 10 ** np.arange(KEY_DIGITS - 1, -1, -1, dtype=np.int64)
        header = rows[:, :HEADER_BYTES].astype(np.int64)
        stored = ((header[:, 148:154] - ord("0")) * 8 ** np.arange(5, -1, -1)).sum(axis=1)
        checks = [
            ("its member name is not the declared one",
             (header[:, :KEY_DIGITS] == (numbers[:, None] // powers) % 10 + ord("0")).all(axis=1)
             & (header[:, KEY_DIGITS:KEY_DIGITS + len(self.suffix)] == self.suffix).all(axis=1)),
            (f"its size field is not {self.index.sample_tokens} tokens of {self.index.dtype} (seq_len + 1)",
             (header[:, 124:136] == self.size_field).all(axis=1)),
            ("its header checksum is wrong",
             stored == header.sum(axis=1) - header[:, 148:156].sum(axis=1) + 8 * ord(" ")),
            ("it is not a USTAR member", (header[:, 257:262] == np.frombuffer(b"ustar", np.uint8)).all(axis=1)),
        ]
        tokens = rows[:, HEADER_BYTES:HEADER_BYTES + self.data_bytes].copy().view(self.dtype)
        checks.append((f"a token id is not below vocab_size {self.index.vocab_size}",
                       tokens.max(axis=1) < self.index.vocab_size))
        for what, ok in checks:
            if not ok.all():
                return f"corrupted at sample {self.count + int(np.flatnonzero(~ok)[0])}: {what}"
        self.count += len(rows)
        return None

