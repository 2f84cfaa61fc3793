"""Worker-process side of shard building: validate rows into documents and tokenize them.

Runs in ``spawn``-ed processes (safe beside threads, unlike fork), so this module imports only
numpy and tokenizers. Each task is a list of :class:`~data_shards.inputs.Segment`; results come back
in task order, so the shards are identical for any ``--workers``.
"""

from __future__ import annotations

import ctypes
import json
import multiprocessing
import os
import signal
import sys
import threading
import time
from dataclasses import dataclass
from itertools import chain
from typing import Optional

import numpy as np

from .errors import DataError
from .inputs import BAD_BYTE, TABLE_KINDS, Segment


@dataclass
class WorkerConfig:
    """Everything a worker needs, sent once at start."""

    tokenizer_json: Optional[str]  # None in the tokenizer-training pass (decode only)
    eos_id: int
    files: list[tuple[str, str]]  # (path, kind) by input index
    text_field: str
    txt_unit: str
    on_bad_utf8: str  # "skip" | "fail"


@dataclass
class Decoded:
    """Clean documents of one task and what was left out."""

    docs: list[str]
    skipped_lines: int = 0  # non-UTF-8 lines dropped under --on-bad-utf8 skip
    empty: int = 0  # blank documents (nothing to learn from)


@dataclass
class Encoded:
    """Tokens of one task: every document's ids followed by EOS, concatenated."""

    tokens: np.ndarray
    documents: int
    skipped_lines: int
    empty: int


_config: Optional[WorkerConfig] = None
_tokenizer = None


def init_worker(config: WorkerConfig, own_process: bool = True) -> None:
    """Process initializer: keep the config and build the tokenizer once."""
    global _config, _tokenizer
    if own_process:  # one worker = one core: tokenizers' own thread pool would oversubscribe the machine
        os.environ["TOKENIZERS_PARALLELISM"] = "false"
        end_with_parent()
    _config = config
    if config.tokenizer_json is not None:
        from tokenizers import Tokenizer

        _tokenizer = Tokenizer.from_str(config.tokenizer_json)


_PR_SET_PDEATHSIG = 1  # linux/prctl.h


def end_with_parent() -> None:
    """Make this worker die when the process that started it dies, even by SIGKILL.

    A pool worker otherwise waits on its task queue forever (it holds both ends of the queue's pipe,
    so it never sees EOF). On Linux the kernel sends SIGKILL (``prctl(PR_SET_PDEATHSIG)``); elsewhere
    a daemon thread polls the parent pid once a second.
    """
    parent = multiprocessing.parent_process()
    parent_pid = parent.pid if parent is not None else os.getppid()
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) == 0:
            if os.getppid() != parent_pid:  # the parent died before the request took effect
                os._exit(1)
            return
    threading.Thread(target=_watch_parent, args=(parent_pid,), daemon=True, name="watch-parent").start()


def _watch_parent(parent_pid: int) -> None:
    while os.getppid() == parent_pid:
        time.sleep(1.0)
    os._exit(1)


def decode_task(task: list[Segment]) -> Decoded:
    """Turn raw rows into documents; DataError naming file and line for rows that cannot be used."""
    assert _config is not None, "init_worker was not called"
    out = Decoded(docs=[])
    for seg in task:
        path, kind = _config.files[seg.file]
        if kind == "txt" and _config.txt_unit == "document":
            for text in seg.rows:
                _add_document(out, _clean_document(text, path, out))
        else:
            for i, row in enumerate(seg.rows):
                _add_document(out, _row_text(row, kind, path, seg.first_line + i, out))
    return out


def encode_task(task: list[Segment]) -> Encoded:
    """Decode a task, tokenize its documents and append EOS to each."""
    decoded = decode_task(task)
    eos = _config.eos_id
    encodings = _tokenizer.encode_batch_fast(decoded.docs, add_special_tokens=False) if decoded.docs else []
    total = sum(len(e.ids) for e in encodings) + len(encodings)
    tokens = np.fromiter(chain.from_iterable(chain(e.ids, (eos,)) for e in encodings), dtype=np.uint32, count=total)
    return Encoded(tokens=tokens, documents=len(encodings), skipped_lines=decoded.skipped_lines, empty=decoded.empty)


def _add_document(out: Decoded, text: Optional[str]) -> None:
    if text is None:
        return
    if text.strip():
        out.docs.append(text)
    else:
        out.empty += 1


def _valid(text: str) -> bool:
    """False if ``text`` held bytes that were not UTF-8 (or JSON escapes of lone surrogates)."""
    if text.isascii():
        return True
    if BAD_BYTE in text:
        return False
    try:
        text.encode("utf-8")
        return True
    except UnicodeEncodeError:
        return False


def _bad_utf8(path: str, line: int, out: Decoded) -> None:
    if _config.on_bad_utf8 == "fail":
        raise DataError(f"{path}:{line}: not valid UTF-8; fix the file or pass --on-bad-utf8 skip")
    out.skipped_lines += 1


def _clean_document(text: str, path: str, out: Decoded) -> str:
    """A whole-file document with its non-UTF-8 lines handled (skipped and counted, or an error)."""
    if _valid(text):
        return text
    kept = []
    for number, line in enumerate(text.splitlines(keepends=True), start=1):
        if _valid(line):
            kept.append(line)
        else:
            _bad_utf8(path, number, out)
    return "".join(kept)


def _row_text(row: Optional[str], kind: str, path: str, line: int, out: Decoded) -> Optional[str]:
    """The document in one line (txt line mode, jsonl) or table row; None when it is skipped."""
    if kind in TABLE_KINDS:
        if row is None:
            raise DataError(f"{path}: row {line}: column {_config.text_field!r} is null")
        return row
    if kind == "jsonl" and row.strip():
        try:
            obj = json.loads(row)
        except RecursionError:  # the decoder recurses per level: a hostile line must not crash the build
            raise DataError(f"{path}:{line}: JSON nested too deep (over {sys.getrecursionlimit()} levels); fix or "
                            "remove the line") from None
        except ValueError as exc:
            if not _valid(row):
                _bad_utf8(path, line, out)
                return None
            raise DataError(f"{path}:{line}: not valid JSON ({exc}); fix or remove the line") from None
        if not isinstance(obj, dict) or _config.text_field not in obj:
            fields = ", ".join(map(str, obj)) if isinstance(obj, dict) else type(obj).__name__
            raise DataError(f"{path}:{line}: no field {_config.text_field!r} (has: {fields}); pass --text-field NAME")
        row = obj[_config.text_field]
        if not isinstance(row, str):
            raise DataError(f"{path}:{line}: field {_config.text_field!r} is {type(row).__name__}, not a string")
    if not _valid(row):
        _bad_utf8(path, line, out)
        return None
    return row
