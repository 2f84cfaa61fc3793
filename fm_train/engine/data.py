"""The worker's view of ``data_shards``: sources prepared once per job, loaders for one dp rank.

``data_shards`` is imported lazily so that the engine (and its tests with in-memory batches) do not
depend on the reader being importable.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import torch.distributed as dist

from fm_train.config import FmConfig

Sources = list[tuple[str, float]]


def prepare_sources(cfg: FmConfig, *, is_rank0: bool) -> Sources:
    """``(path, weight)`` of every source; builds a missing ``default_corpus`` on rank 0 only.

    The other ranks wait at a barrier (a collective, so nobody polls the file system and nobody
    starts reading a half-written directory).
    """
    import data_shards

    for src in cfg.data.sources:
        if is_rank0 and src.default_corpus and not (Path(src.path) / "index.json").exists():
            print(f"building the default corpus in {src.path} (vocab {cfg.model.vocab_size}, seq_len {cfg.data.seq_len})",
                  flush=True)
            data_shards.build_default_corpus(src.path, vocab_size=cfg.model.vocab_size, seq_len=cfg.data.seq_len,
                                             workers=1)
    if dist.is_initialized():
        dist.barrier()
    return [(s.path, s.weight) for s in cfg.data.sources]


def check_sources(cfg: FmConfig, sources: Sources) -> Any:
    """``data_shards.check_sources``: one tokenizer, vocab within the model's; returns its ``SourcesInfo``."""
    import data_shards

    return data_shards.check_sources([p for p, _ in sources], cfg.model.vocab_size)


def train_batches(cfg: FmConfig, sources: Sources, *, dp_rank: int, dp_size: int,
                  state: dict[str, Any] | None) -> Iterator[dict[str, Any]]:
    """This dp rank's training micro-batches, resuming right after the batch that left ``state``."""
    import data_shards

    d = cfg.data
    return iter(data_shards.make_train_loader(
        sources, seq_len=d.seq_len, micro_batch=cfg.train.micro_batch, dp_rank=dp_rank, dp_size=dp_size,
        seed=cfg.run.seed, num_workers=d.num_workers, on_bad_shard=d.on_bad_shard, verify_sha256=d.verify_sha256,
        val_fraction=d.val_fraction, shuffle_window=d.shuffle_window, state=state,
    ))


def val_batches(cfg: FmConfig, sources: Sources, *, dp_rank: int,
                dp_size: int) -> Callable[[], Iterable[dict[str, Any]]] | None:
    """A factory of the fixed validation batches (the same ones every time), or None when eval is off."""
    if cfg.train.eval_every == 0 or cfg.data.val_fraction == 0:
        return None
    import data_shards

    d = cfg.data

    def make() -> Iterable[dict[str, Any]]:
        return data_shards.make_val_loader(
            sources, seq_len=d.seq_len, micro_batch=cfg.train.micro_batch, dp_rank=dp_rank, dp_size=dp_size,
            seed=cfg.run.seed, val_fraction=d.val_fraction, max_batches=cfg.train.eval_batches,
        )

    return make
