"""File digests: sha256 of files read in large blocks, several files hashed on a few threads.

Used for a step directory's checksums (:mod:`fm_train.checkpoint.integrity`, which says why sha256),
for files fetched back from storage, and for the marker of the Hugging Face directory copied out.
"""

from __future__ import annotations

import hashlib
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Iterable

ALGORITHM = "sha256"
_BLOCK = 4 << 20  # large reads: hashing, not syscalls, should be the cost


def file_digest(path: Path, algorithm: str = ALGORITHM) -> str:
    """Hex digest of the file at ``path`` (read in 4 MiB blocks; hashlib releases the GIL on them)."""
    h = hashlib.new(algorithm)
    buf = bytearray(_BLOCK)
    view = memoryview(buf)
    with open(path, "rb", buffering=0) as fh:
        while True:
            n = fh.readinto(buf)
            if not n:
                break
            h.update(view[:n])
    return h.hexdigest()


def hash_threads(count: int) -> int:
    # Files hash in parallel (hashlib drops the GIL); never more threads than cores or files.
    return max(1, min(count, os.cpu_count() or 1, 8))


def digest_files(root: Path, rels: Iterable[str], algorithm: str = ALGORITHM) -> dict[str, str]:
    """``{rel: hex digest}`` of the files ``root/rel``, hashed on a few threads."""
    rels = sorted(set(rels))
    with ThreadPoolExecutor(max_workers=hash_threads(len(rels))) as pool:
        digests = list(pool.map(lambda rel: file_digest(Path(root) / rel, algorithm), rels))
    return dict(zip(rels, digests))
