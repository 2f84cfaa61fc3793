"""The worker's view of ``data_shards``: sources prepared once per job, loaders for one dp rank.

``data_shards`` is imported lazily so that the engine (and its tests with in-memory batches) do not
depend on the reader being importable.

Shards found bad in the middle of a run under ``data.on_bad_shard: skip`` are recorded in
``RUN/bad_shards/`` (one JSON file per shard, written atomically, so ranks that find different
shards at once never race) and left out by every rank of every later attempt.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import torch.distributed as dist

from fm_train.config import FmConfig
from fm_train.families.spec import FamilySpec

Sources = list[tuple[str, float]]


def prepare_sources(cfg: FmConfig, family: FamilySpec, *, is_rank0: bool) -> Sources:
    """``(path, weight)`` of every source; builds a missing ``default_corpus`` on rank 0 only.

    The other ranks wait at a barrier (a collective, so nobody polls the file system and nobody
    starts reading a half-written directory).
    """
    import data_shards

    from data_shards.storage import as_location

    from fm_train.families.vocab import corpus_vocab

    vocab = corpus_vocab(cfg, family)  # the family's own special tokens come after the tokenizer's
    for src in cfg.data.sources:
        if is_rank0 and src.default_corpus and not (as_location(src.path) / "index.json").exists():
            print(f"building the default corpus in {src.path} (vocab {vocab}, seq_len {cfg.data.seq_len})", flush=True)
            data_shards.build_default_corpus(src.path, vocab_size=vocab, seq_len=cfg.data.seq_len, workers=1)
    if dist.is_initialized():
        dist.barrier()
    return [(s.path, s.weight) for s in cfg.data.sources]


def check_sources(cfg: FmConfig, sources: Sources) -> Any:
    """``data_shards.check_sources``: one tokenizer, vocab within the model's (a number; ``auto`` is
    resolved from what this returns); returns its ``SourcesInfo``."""
    import data_shards

    vocab = cfg.model.vocab_size
    return data_shards.check_sources([p for p, _ in sources], None if vocab == "auto" else int(vocab))


def data_objective(cfg: FmConfig, family: FamilySpec, info: Any) -> Any:
    """What ``family``'s objective needs the data path to produce from these sources (None for
    next-token batches); ``info`` is their ``SourcesInfo``."""
    if info is None:  # no sources checked (tests that feed their own batches)
        return None
    return family.objective.data(info, cfg.model.vocab_size, cfg.run.seed)


def train_batches(cfg: FmConfig, sources: Sources, *, dp_rank: int, dp_size: int,
                  state: dict[str, Any] | None, skip_shards: Iterable[str] = (),
                  objective: Any = None) -> Iterator[dict[str, Any]]:
    """This data rank's training micro-batches (``dp_rank`` / ``dp_size``: the data split, which sequence-parallel
    ranks share), with the document ids when ``data.document_masking``, resuming right after the batch that left ``state``;
    ``skip_shards`` (keys ``"<source index>:<shard name>"``) are left out; ``objective``: what
    :func:`data_objective` returned."""
    import data_shards
    from data_shards.schedule import Phase

    from fm_train.config.mixture import resolve_schedule

    d = cfg.data
    phases = resolve_schedule(cfg)  # data.schedule's steps as global sample positions
    return iter(data_shards.make_train_loader(
        sources, seq_len=d.seq_len, micro_batch=cfg.train.micro_batch, dp_rank=dp_rank, dp_size=dp_size,
        seed=cfg.run.seed, num_workers=d.num_workers, on_bad_shard=d.on_bad_shard, verify_sha256=d.verify_sha256,
        val_fraction=d.val_fraction, shuffle=d.shuffle, shuffle_window=d.shuffle_window, state=state,
        skip_shards=skip_shards, cache=shard_cache(cfg), objective=objective, documents=d.document_masking,
        schedule=None if phases is None else [Phase.from_json(p) for p in phases],
    ))


def shard_cache(cfg: FmConfig) -> Any:
    """The node-local cache of object-store shards (``data.cache_dir``), or None."""
    import data_shards

    d = cfg.data
    if d.cache_dir is None:
        return None
    return data_shards.ShardCache(Path(d.cache_dir).expanduser(), int(d.cache_gb * 1e9))


def bad_shards_dir(run_dir: Path) -> Path:
    """Where shards found bad mid-run are recorded: ``RUN/bad_shards/``."""
    return Path(run_dir) / "bad_shards"


def recorded_bad_shards(run_dir: Path) -> list[str]:
    """Keys of the shards earlier attempts of this run found bad mid-read, sorted (the same on every rank)."""
    directory = bad_shards_dir(run_dir)
    if not directory.is_dir():
        return []
    return sorted(json.loads(p.read_text())["key"] for p in directory.glob("*.json"))


def record_bad_shard(run_dir: Path, key: str, message: str, *, rank: int, step: int) -> Path:
    """Record shard ``key`` as bad (what was wrong, which rank found it at which step); returns the file.

    Written to a temporary name and renamed, so a reader never sees half a record.
    """
    directory = bad_shards_dir(run_dir)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / (key.replace(":", "-", 1) + ".json")
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps({"key": key, "message": message, "rank": rank, "step": step}, indent=1) + "\n")
    os.replace(tmp, path)
    return path


def shards_left_out(recorded: Iterable[str], data_state: dict[str, Any] | None) -> list[str]:
    """Keys of every shard this attempt leaves out besides those its own start-up check finds bad:
    ``recorded`` (what earlier attempts found, :func:`recorded_bad_shards`) and the ones the resumed
    data state lists."""
    in_state = (data_state or {}).get("skipped_shards", [])
    return sorted(set(recorded) | set(in_state))


def val_batches(cfg: FmConfig, sources: Sources, *, dp_rank: int, dp_size: int,
                skip_shards: Iterable[str] = (), objective: Any = None) -> Callable[[], Iterable[dict[str, Any]]] | None:
    """A factory of the fixed validation batches (the same ones every time), or None when eval is off.

    The loader follows ``data.on_bad_shard`` and leaves out ``skip_shards`` (pass what training leaves
    out: :func:`shards_left_out`). It is planned here, at start-up, next to the training loader, so
    both check the shard files at the same moment and leave out the same ones; a shard that goes bad
    later is found when evaluation reads it and raises ``BadShardError``, which the worker records
    and restarts on exactly as when training reads it.
    """
    if cfg.train.eval_every == 0 or cfg.data.val_fraction == 0:
        return None
    import data_shards

    d = cfg.data
    stream = data_shards.make_val_loader(
        sources, seq_len=d.seq_len, micro_batch=cfg.train.micro_batch, dp_rank=dp_rank, dp_size=dp_size,
        seed=cfg.run.seed, val_fraction=d.val_fraction, max_batches=cfg.train.eval_batches,
        on_bad_shard=d.on_bad_shard, skip_shards=skip_shards, cache=shard_cache(cfg), objective=objective,
        verify_sha256=d.verify_sha256, documents=d.document_masking,
    )
    return lambda: stream  # every iter() of a DataStream starts again from its first batch
