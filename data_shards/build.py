"""Build a shard directory: read inputs, get a tokenizer, tokenize in parallel, pack, write, index.

Pipeline: the main process reads rows through ``datasets`` and batches them into tasks of about
``task_bytes`` of text; ``workers`` spawned processes validate and tokenize them; results return in
task order (so output does not depend on the worker count) to the main process, which packs them
into samples and writes shards. At most a few tasks are in flight, so memory stays flat however
large the input is.
"""

from __future__ import annotations

import errno
import multiprocessing
import random
import shutil
import sys
import tempfile
import time
from collections import deque
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator, Optional

from .encode import Decoded, Encoded, WorkerConfig, decode_task, encode_task, init_worker
from .errors import DataError
from .index import TOKENIZER_DIRNAME, ShardIndex, dtype_for_vocab, member_stride, write_index
from .inputs import InputFile, Segment, iter_segments, resolve_inputs
from .output_dir import check_disjoint, check_output, check_remote_output, commit, upload
from .staging import LOCAL_PREFIX, TEMP_PREFIX, make_staging, remove_stale_staging
from .storage import Location, as_location
from .tar_writer import ShardWriter
from .tokenizer import TokenizerInfo, load_tokenizer_dir, sample_texts, save_tokenizer_dir, tokenizer_hash, train_bpe


@dataclass
class BuildOptions:
    """What ``fm-train shard`` was asked to do."""

    inputs: list[str]
    out: str | Path  # a local directory or an object-store URI (data_shards.storage)
    seq_len: int
    tokenizer_dir: Optional[Path] = None  # an existing Hugging Face tokenizer, or None to train one
    vocab_size: Optional[int] = None  # vocabulary to train (when tokenizer_dir is None)
    shard_size: int = 64_000_000  # bytes per .tar, about
    workers: int = 1  # tokenizer processes; 0 tokenizes in this process
    text_field: str = "text"
    txt_unit: str = "document"
    split: str = "train"  # of saved DatasetDict directories and hf: cached datasets
    on_bad_utf8: str = "fail"
    overwrite: bool = False
    eos_token: Optional[str] = None
    tokenizer_train_bytes: int = 200_000_000
    seed: int = 0
    progress: bool = True
    created_by: str = ""
    task_bytes: int = 1 << 19


@dataclass
class BuildSummary:
    """What a build wrote; ``format()`` is the end-of-run summary."""

    out: Location
    files: int
    documents: int = 0
    tokens: int = 0  # tokenized, EOS included
    samples: int = 0
    shards: int = 0
    bytes: int = 0
    dropped_tokens: int = 0
    skipped_lines: int = 0
    empty_documents: int = 0
    vocab_size: int = 0
    dtype: str = ""
    seconds: float = 0.0
    tokenize_seconds: float = 0.0
    notes: list[str] = field(default_factory=list)

    @property
    def tokens_per_s(self) -> float:
        """Tokens per second of the tokenize-pack-write pass."""
        return self.tokens / max(self.tokenize_seconds, 1e-9)

    def format(self) -> str:
        """Human-readable multi-line summary."""
        lines = [f"wrote {self.shards} shards ({self.bytes / 1e6:.1f} MB) to {self.out}",
                 f"  {self.files} files, {self.documents} documents, {self.tokens} tokens -> {self.samples} samples "
                 f"({self.dtype}, vocab {self.vocab_size})",
                 f"  {self.tokens_per_s / 1e6:.2f} M tokens/s, {self.seconds:.1f} s in all",
                 f"  dropped: {self.dropped_tokens} tail tokens, {self.skipped_lines} non-UTF-8 lines, "
                 f"{self.empty_documents} empty documents"]
        return "\n".join(lines + [f"  note: {n}" for n in self.notes])


def build_shards(opts: BuildOptions, files: Optional[list[InputFile]] = None) -> BuildSummary:
    """Build ``opts.out`` from ``opts.inputs`` (or from ``files``, already resolved); DataError on bad input.

    Nothing is half-written: the build happens in a staging folder beside the old build (inside
    ``opts.out``) whose files are renamed into place at the end, index.json last
    (:func:`~data_shards.output_dir.commit`); staging folders of killed builds are removed first.
    """
    if (opts.tokenizer_dir is None) == (opts.vocab_size is None):
        raise DataError("give exactly one of --tokenizer DIR (use an existing tokenizer) or --vocab-size N (train one)")
    if opts.seq_len < 1 or opts.workers < 0:
        raise DataError("--seq-len must be at least 1 and --workers at least 0")
    start = time.perf_counter()
    files = files if files is not None else resolve_inputs(opts.inputs, split=opts.split)
    out = as_location(opts.out, what="--out")
    remote = not isinstance(out, Path)
    if remote:  # built in a local temp dir, then uploaded (index.json last)
        check_remote_output(out, opts.overwrite)
        created, parent, prefix = False, Path(tempfile.gettempdir()), TEMP_PREFIX
    else:
        check_disjoint(out, [f.path for f in files if f.kind != "hf_cache"], opts.tokenizer_dir)
        check_output(out, opts.overwrite)
        created, parent, prefix = not out.exists(), out, LOCAL_PREFIX
    for line in remove_stale_staging(parent, prefix):
        print(f"fm-train shard: {line}", file=sys.stderr)
    staging = make_staging(parent, prefix)
    summary = BuildSummary(out=out, files=len(files))
    try:
        index = _build_into(opts, files, staging, summary)
        if remote:
            upload(staging, out, index, progress=opts.progress)
            shutil.rmtree(staging, ignore_errors=True)
        else:
            commit(staging, out, index)
    except BaseException as exc:
        shutil.rmtree(staging, ignore_errors=True)
        if created and not any(out.iterdir()):
            out.rmdir()  # leave no trace of a failed build in a directory we made
        if isinstance(exc, OSError) and exc.errno in _NO_SPACE:
            raise DataError(f"--out {out}: {exc.strerror} while writing {exc.filename or staging}; free space on "
                            "that filesystem (or choose another --out) and rerun") from None
        raise
    summary.seconds = time.perf_counter() - start
    return summary


_NO_SPACE = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)  # disk full, quota, file size limit


def _build_into(opts: BuildOptions, files: list[InputFile], staging: Path, summary: BuildSummary) -> ShardIndex:
    """Tokenizer, shards and index.json of the whole build, written into ``staging``."""
    tok = _get_tokenizer(opts, files)
    save_tokenizer_dir(tok, staging / TOKENIZER_DIRNAME, source_dir=opts.tokenizer_dir,
                       model_max_length=opts.seq_len)
    summary.vocab_size, summary.dtype = tok.vocab_size, dtype_for_vocab(tok.vocab_size)
    index = _write_shards(opts, files, tok, staging, summary)
    write_index(staging, index)
    return index


def _get_tokenizer(opts: BuildOptions, files: list[InputFile]) -> TokenizerInfo:
    if opts.tokenizer_dir is not None:
        return load_tokenizer_dir(opts.tokenizer_dir, opts.eos_token)
    # Train on a seeded sample of tasks when the input is larger than the training budget, so the
    # vocabulary reflects the whole corpus rather than its first files.
    keep = min(1.0, opts.tokenizer_train_bytes / max(1, sum(f.bytes for f in files)))
    rng = random.Random(opts.seed)
    tasks = (t for t in _tasks(opts, files) if keep >= 1.0 or rng.random() < keep)
    config = _worker_config(opts, files, None, 0)
    with _pool(opts.workers, config) as pool:
        decoded: Iterator[Decoded] = _ordered_map(pool, decode_task, tasks, 2 * opts.workers + 2)
        texts = (doc for d in decoded for doc in d.docs)
        tok = train_bpe(sample_texts(texts, opts.tokenizer_train_bytes), opts.vocab_size)
    if tok.vocab_size <= 257:
        raise DataError("the inputs hold no text to train a tokenizer on (all files are empty)")
    return tok


def _write_shards(opts: BuildOptions, files: list[InputFile], tok: TokenizerInfo, staging: Path,
                  summary: BuildSummary) -> ShardIndex:
    from tqdm import tqdm

    dtype = dtype_for_vocab(tok.vocab_size)
    per_shard = max(1, (opts.shard_size - 1024) // member_stride(opts.seq_len + 1, dtype))
    writer = ShardWriter(staging, sample_tokens=opts.seq_len + 1, dtype=dtype, samples_per_shard=per_shard)
    config = _worker_config(opts, files, tok.to_str(), tok.eos_id)
    t0 = time.perf_counter()
    with _pool(opts.workers, config) as pool, tqdm(unit="tok", unit_scale=True, desc="fm-train shard",
                                                    disable=not opts.progress, smoothing=0.1) as bar:
        for enc in _ordered_map(pool, encode_task, _tasks(opts, files), 2 * opts.workers + 2):
            writer.add(enc.tokens)
            _count(summary, enc)
            bar.update(len(enc.tokens))
            bar.set_postfix(docs=summary.documents, shards=len(writer.shards), refresh=False)
        shards = writer.close()
    summary.tokenize_seconds = time.perf_counter() - t0
    if summary.documents == 0:
        raise DataError(f"the inputs ({len(files)} files) hold no text: every document is empty or skipped")
    if not shards:
        raise DataError(f"the inputs hold {summary.tokens} tokens, fewer than one sample of --seq-len "
                        f"{opts.seq_len} + 1; add text or lower --seq-len")
    summary.samples, summary.shards = writer.samples_written, len(shards)
    summary.bytes, summary.dropped_tokens = sum(s.bytes for s in shards), writer.dropped_tokens
    if summary.skipped_lines:
        summary.notes.append(f"{summary.skipped_lines} lines were not valid UTF-8 and were skipped")
    return ShardIndex(seq_len=opts.seq_len, dtype=dtype, vocab_size=tok.vocab_size, eos_id=tok.eos_id,
                      tokenizer_hash=tokenizer_hash(tok.to_str()), shards=shards,
                      sources=[_source_entry(f) for f in files],
                      totals={"documents": summary.documents, "tokens": summary.tokens, "samples": summary.samples,
                              "dropped_tail_tokens": summary.dropped_tokens,
                              "skipped_lines": summary.skipped_lines, "empty_documents": summary.empty_documents},
                      created_by=opts.created_by)


def _source_entry(f: InputFile) -> dict:
    """An input as index.json records it (the split only for Hugging Face datasets)."""
    entry = {"path": f.path, "kind": f.kind, "bytes": f.bytes}
    return {**entry, "split": f.split} if f.split else entry


def _count(summary: BuildSummary, enc: Encoded) -> None:
    summary.documents += enc.documents
    summary.tokens += len(enc.tokens)
    summary.skipped_lines += enc.skipped_lines
    summary.empty_documents += enc.empty


def _tasks(opts: BuildOptions, files: list[InputFile]) -> Iterator[list[Segment]]:
    """Segments grouped into tasks of about ``opts.task_bytes`` characters (many small files per task)."""
    task: list[Segment] = []
    size = 0
    for seg in iter_segments(files, text_field=opts.text_field, txt_unit=opts.txt_unit):
        task.append(seg)
        size += sum(len(r) for r in seg.rows if r is not None)
        if size >= opts.task_bytes:
            yield task
            task, size = [], 0
    if task:
        yield task


def _worker_config(opts: BuildOptions, files: list[InputFile], tokenizer_json: Optional[str],
                   eos_id: int) -> WorkerConfig:
    return WorkerConfig(tokenizer_json=tokenizer_json, eos_id=eos_id, files=[(f.path, f.kind) for f in files],
                        text_field=opts.text_field, txt_unit=opts.txt_unit, on_bad_utf8=opts.on_bad_utf8)


class _InlinePool:
    """``workers=0``: run the tasks in this process (tiny inputs, tests); the pool's interface."""

    def __init__(self, config: WorkerConfig) -> None:
        init_worker(config, own_process=False)

    def submit(self, fn: Callable, task: object) -> Future:
        fut: Future = Future()
        try:
            fut.set_result(fn(task))
        except Exception as exc:
            fut.set_exception(exc)
        return fut

    def __enter__(self) -> "_InlinePool":
        return self

    def __exit__(self, *exc: object) -> None:
        return None


def _pool(workers: int, config: WorkerConfig) -> ProcessPoolExecutor | _InlinePool:
    if workers == 0:
        return _InlinePool(config)
    # spawn, not fork: the caller may be a training process with live threads (torch, gloo, Ray).
    return ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("spawn"),
                               initializer=init_worker, initargs=(config,))


def _ordered_map(pool: ProcessPoolExecutor, fn: Callable, tasks: Iterable, max_inflight: int) -> Iterator:
    """``pool.map`` in order, but with at most ``max_inflight`` tasks submitted (Executor.map reads all input)."""
    pending: deque = deque()
    try:
        for task in tasks:
            pending.append(pool.submit(fn, task))
            if len(pending) >= max_inflight:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()
    finally:
        for fut in pending:
            fut.cancel()
