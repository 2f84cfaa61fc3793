"""A many-shard corpus and the two ways a shard goes bad on disk: a torn-off tail and overwritten bytes.

Which shard a given step reads depends on the seed and the shuffled order, so the damage is aimed
with the reader's own order (``DataStream._order``, a private attribute: tests may look inside):
step ``s`` reads global positions ``[(s-1)*G, s*G)`` with ``G = micro_batch * dp_size``.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

MICRO_BATCH, DP = 2, 2
"""The scenario config's split (chaos_runs.tiny_config): 4 samples per step."""


@dataclass(frozen=True)
class Target:
    """One sample of the stream: the shard file that holds it and its byte offset there."""

    shard: Path
    local: int
    offset: int
    stride: int


def build_sharded_corpus(out: Path, *, shard_bytes: int = 200_000, max_bytes: int = 300_000) -> Path:
    """About 20 shards of ~200 samples each (vocab 512, seq_len 32), so one bad shard is a small part."""
    from data_shards.build import BuildOptions, build_shards
    from data_shards.corpus import stdlib_files

    files = stdlib_files(max_bytes)
    build_shards(BuildOptions(inputs=[f.path for f in files], out=out, seq_len=32, vocab_size=512,
                              shard_size=shard_bytes, workers=0, on_bad_utf8="skip", progress=False), files)
    return out


def sample_read_at(corpus: Path, *, seed: int, step: int) -> Target:
    """The first sample rank 0 reads at ``step`` (1-based), found through the reader's own order.

    The loader is made as the worker makes it (fm_train.engine.data.train_batches) with the config's
    data defaults, which shape the order: ``val_fraction`` holds out shard tails.
    """
    from data_shards import make_train_loader
    from fm_train.config.schema import DataConfig

    d = DataConfig(sources=[{"path": str(corpus)}], seq_len=32)
    stream = make_train_loader([(str(corpus), 1.0)], seq_len=32, micro_batch=MICRO_BATCH, dp_rank=0, dp_size=DP,
                               seed=seed, val_fraction=d.val_fraction, shuffle=d.shuffle,
                               shuffle_window=d.shuffle_window)
    position = np.array([(step - 1) * MICRO_BATCH * DP], dtype=np.int64)
    _, shard, local = stream._order.locate(position)
    index = json.loads((corpus / "index.json").read_text())
    entry = index["shards"][int(shard[0])]
    stride = int(index["member"]["stride_bytes"])
    return Target(shard=corpus / entry["name"], local=int(local[0]), offset=int(local[0]) * stride, stride=stride)


def overwrite_sample(target: Target) -> str:
    """Overwrite the sample's tar header and tokens with random bytes (file size unchanged)."""
    with open(target.shard, "r+b") as fh:
        fh.seek(target.offset)
        fh.write(np.random.default_rng(0).integers(0, 256, target.stride, dtype=np.uint8).tobytes())
        fh.flush()
        os.fsync(fh.fileno())
    return f"overwrote sample {target.local} of {target.shard.name}"


def truncate_before(target: Target) -> str:
    """Cut the shard just before the sample: it and every later sample of the shard are gone."""
    os.truncate(target.shard, target.offset)
    return f"truncated {target.shard.name} to {target.offset} bytes (before sample {target.local})"
