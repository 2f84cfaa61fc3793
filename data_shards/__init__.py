"""data_shards: token shards for pretraining, and the deterministic, resumable reader the workers use.

Building (``fm-train shard``, or ``python -m data_shards``): text/jsonl/parquet -> a directory of
standard webdataset ``.tar`` shards of packed ``seq_len + 1``-token samples, ``index.json`` and
``tokenizer/`` (a Hugging Face tokenizer directory). See :mod:`data_shards.build`.

Public API (what the training engine calls)::

    check_sources(paths: list[str], model_vocab_size: int | None = None) -> SourcesInfo
        Paths are local directories or object-store URIs (s3://bucket/prefix; :mod:`data_shards.storage`).
        Open each index.json; DataError on mixed tokenizers, seq_len mismatch, or a vocabulary larger
        than the model's embedding. SourcesInfo: vocab_size, eos_id, seq_len (training tokens per
        sample), tokenizer_dir, tokenizer_hash, dtype, paths, indexes.

    make_train_loader(sources: list[tuple[str, float]], *, seq_len: int, micro_batch: int, dp_rank: int,
                      dp_size: int, seed: int, num_workers: int = 0, on_bad_shard: str = "fail",
                      verify_sha256: bool = True, val_fraction: float = 0.0, shuffle: str = "global",
                      shuffle_window: int = 1024, state: dict | None = None,
                      skip_shards: Iterable[str] = (), cache: ShardCache | None = None,
                      objective: MaskedLM | None = None) -> DataStream
        Infinite stream of batches {"input_ids", "labels": torch.long [micro_batch, seq_len],
        "state": dict, "receipt": str}. Passing a batch's "state" back resumes right after that batch,
        also on another dp_size / micro_batch. "receipt" is a running hash of the global sample ids
        consumed by all ranks: the same on every rank, for any dp_size. ``skip_shards`` leaves out
        shards by key ("<source index>:<shard name>"), e.g. ones a previous attempt found bad mid-read.
        ``cache`` keeps whole shards of object-store sources on local disk, bounded in bytes.
        ``objective``: None (labels = the sample shifted by one, for a decoder) or a MaskedLM (an
        encoder's [CLS] ... [SEP] windows with BERT's masking, decided by sample id and seed).

    make_val_loader(sources, *, seq_len, micro_batch, dp_rank, dp_size, seed, val_fraction,
                    max_batches: int, on_bad_shard: str = "fail", skip_shards: Iterable[str] = (),
                    cache: ShardCache | None = None, objective: MaskedLM | None = None,
                    verify_sha256: bool = True) -> DataStream
        Finite stream of the same batch dicts over the held-out split, identical on every call; give
        it the training stream's on_bad_shard and skip_shards so both leave out the same shards.

    build_default_corpus(out_dir, *, vocab_size: int, seq_len: int, workers: int = 1,
                         max_bytes: int | None = None) -> Path
        Shards of this interpreter's standard library source (offline demo data), built once.
        DEFAULT_CORPUS_VOCAB: its tokenizer's size when the model's vocabulary is ``auto``.

    cli.add_shard_arguments(parser) / cli.run_shard(args) -> int: the ``fm-train shard`` command.

    DataError(ValueError): every bad-input error; its message names the file and what to do.
    BadShardError(DataError): a shard found bad while reading; ``.key`` is its skip_shards key.

Design: the order of samples is a pure function of (seed, position) -- see :mod:`data_shards.order`
-- so every dp rank, loader worker and resumed run can compute its share without talking to the
others, and state is a position (:mod:`data_shards.state`). This package never imports fm_train or
the launcher. Names are imported lazily so that ``import data_shards`` (e.g. by the CLI or the
tokenizer processes) does not pay for torch and datasets until they are used.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from .errors import BadShardError, DataError

_EXPORTS = {
    "check_sources": "sources", "SourcesInfo": "sources", "verify_directory": "sources",
    "make_train_loader": "loader", "make_val_loader": "loader", "DataStream": "loader",
    "build_default_corpus": "corpus", "DEFAULT_CORPUS_VOCAB": "corpus", "build_shards": "build", "BuildOptions": "build", "BuildSummary": "build",
    "ShardCache": "shard_cache", "MaskedLM": "masking",
}
__all__ = ["BadShardError", "DataError", *_EXPORTS, "MaskedLM"]

if TYPE_CHECKING:
    from .build import BuildOptions, BuildSummary, build_shards
    from .corpus import DEFAULT_CORPUS_VOCAB, build_default_corpus
    from .loader import DataStream, make_train_loader, make_val_loader
    from .masking import MaskedLM
    from .shard_cache import ShardCache
    from .sources import SourcesInfo, check_sources, verify_directory


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'data_shards' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    globals()[name] = value
    return value
