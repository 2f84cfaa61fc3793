"""The embedded default corpus: the running interpreter's standard library source.

It is present on every machine, so the demo trains offline on real text. The files are taken in
sorted order up to ``max_bytes`` so that every machine with the same Python builds the same shards.
"""

from __future__ import annotations

import fcntl
import os
import sysconfig
from pathlib import Path

from .build import BuildOptions, build_shards
from .index import INDEX_NAME
from .inputs import InputFile

DEFAULT_MAX_BYTES = 3_000_000  # about 1 M tokens: builds in well under a minute on 2 cores
#: The tokenizer vocabulary of a default corpus built for a model whose vocabulary is ``auto`` (a BPE of
#: this size suits the ~1 M tokens; the model then takes this plus its family's special tokens).
DEFAULT_CORPUS_VOCAB = 4096
_SKIP_DIRS = {"site-packages", "dist-packages", "__pycache__", "test", "tests", "idle_test"}


def stdlib_files(max_bytes: int = DEFAULT_MAX_BYTES) -> list[InputFile]:
    """The interpreter's stdlib ``.py`` files (tests and installed packages left out), sorted, capped."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files, total = [], 0
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in _SKIP_DIRS)
        for name in sorted(filenames):
            if not name.endswith(".py"):
                continue
            path = os.path.join(dirpath, name)
            size = os.path.getsize(path)
            if size == 0 or total + size > max_bytes:
                continue
            files.append(InputFile(path=path, kind="txt", bytes=size))
            total += size
    return files


def build_default_corpus(out_dir: str | Path, *, vocab_size: int, seq_len: int, workers: int = 1,
                         max_bytes: int | None = None, progress: bool = False) -> Path:
    """Build shards of the stdlib source into ``out_dir`` unless it already has an index.json.

    Safe to call from several processes at once: they take a lock, and all but the first find the
    directory built. Non-UTF-8 lines (a few stdlib files have them on purpose) are skipped.
    """
    out = Path(out_dir)
    if (out / INDEX_NAME).is_file():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out.parent / f".{out.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (out / INDEX_NAME).is_file():
            files = stdlib_files(max_bytes or DEFAULT_MAX_BYTES)
            opts = BuildOptions(inputs=[f.path for f in files], out=out, seq_len=seq_len, vocab_size=vocab_size,
                                workers=workers, on_bad_utf8="skip", progress=progress,
                                created_by="data_shards.build_default_corpus (Python standard library)")
            build_shards(opts, files)
    return out
