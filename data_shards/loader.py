"""Training and validation loaders over shard directories, split by an explicit (dp_rank, dp_size).

Micro-step ``m`` covers the next ``G = micro_batch * dp_size`` global positions after step ``m - 1``'s
(``[P0 + m*G, P0 + (m+1)*G)`` unless shards are skipped: their positions are passed over, see
:meth:`~data_shards.order.StreamOrder.select`); rank ``r`` reads the ``r``-th ``micro_batch`` of them.
Every rank gets a batch at every step, for ever (the stream loops over epochs), whatever the number of shards, so no rank runs dry
while others wait in a collective. With loader workers, worker ``w`` makes micro-steps
``w, w+W, ...``; DataLoader returns them in round-robin order, so the order, state and receipt stay
exact. State and receipt are computed in the calling process from the position alone.
"""

from __future__ import annotations

import itertools
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Optional

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from .errors import BadShardError, DataError
from .masking import MaskedLM
from .order import Mixer, SourceOrder, StreamOrder, ValOrder, val_counts
from .schedule import Phase, ScheduledMixer, static_signature
from .sample_reader import SampleReader
from .shard_cache import ShardCache
from .sources import SourcesInfo, bad_shard_message, check_sources, shard_problem
from .state import make_state, parse_state, receipt_update
from .verify import ShardVerifier, marker_dir


@dataclass
class _Plan:
    info: SourcesInfo
    train: StreamOrder
    val: Optional[StreamOrder]
    reader: SampleReader
    skipped: list[str]  # "source:shard name" left out under on_bad_shard=skip
    config: dict[str, Any]  # the settings the order depends on, echoed in every state


class _RankBatches(IterableDataset):
    """Micro-batches of one dp rank; inside a DataLoader worker, every W-th one."""

    def __init__(self, order: StreamOrder, reader: SampleReader, start: int, micro_batch: int, dp_rank: int,
                 dp_size: int, num_steps: Optional[int], objective: Optional[MaskedLM] = None,
                 eos_id: Optional[int] = None) -> None:
        self.order, self.reader, self.start, self.objective, self.eos_id = order, reader, start, objective, eos_id
        self.micro_batch, self.dp_rank, self.dp_size, self.num_steps = micro_batch, dp_rank, dp_size, num_steps

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        w, n = (info.id, info.num_workers) if info is not None else (0, 1)
        steps = itertools.count() if self.num_steps is None else range(self.num_steps)
        mine = slice(self.dp_rank * self.micro_batch, (self.dp_rank + 1) * self.micro_batch)
        cursor = self.start
        for m in steps:
            # Every worker walks every step (cheap: positions only) so that skipped positions line up.
            positions = self.order.select(cursor, self.micro_batch * self.dp_size)
            cursor = int(positions[-1]) + 1
            if m % n != w:
                continue
            located = self.order.locate(positions[mine])
            try:
                tokens = self.reader.read(*located)
            except BadShardError as exc:
                # Handed over as data: DataLoader re-raises a worker's exception by type(message), which
                # would lose the key; DataStream raises it again in the calling process.
                yield {"step": m, "bad_shard": (str(exc), exc.key)}
                return
            if self.objective is not None:  # masked tokens, decided by each sample's id in the global order
                inputs, labels = self.objective.apply(tokens, self.order.sample_ids(*located))
            else:  # next-token prediction: the sample shifted by one
                inputs, labels = tokens[:, :-1], tokens[:, 1:]
            item = {"step": m, "input_ids": torch.from_numpy(inputs.astype(np.int64)),
                    "labels": torch.from_numpy(labels.astype(np.int64)),
                    "source_ids": torch.from_numpy(located[0].astype(np.int64))}
            if self.eos_id is not None:
                item["document_ids"] = torch.from_numpy(document_ids(inputs, self.eos_id))
            yield item


def document_ids(tokens: np.ndarray, eos_id: int) -> np.ndarray:
    """Document index (int32) of each token of packed samples ``[batch, seq]``: a document ends at, and
    includes, its EOS token; the first token of a sample is in document 0."""
    ends = (tokens == eos_id).astype(np.int32)
    return (np.cumsum(ends, axis=-1, dtype=np.int32) - ends).astype(np.int32)


class DataStream:
    """Batches of one dp rank: dicts with input_ids, labels (torch.long [micro_batch, seq_len]), source_ids
    (torch.long [micro_batch]: each sample's source index), state, receipt, and with ``documents``
    document_ids (torch.int32, the same shape as input_ids: :func:`document_ids`).

    Each ``iter()`` starts from the state the stream was made with. ``info`` describes the data and
    ``skipped_shards`` lists shards left out under ``on_bad_shard="skip"``.
    """

    def __init__(self, plan: _Plan, order: StreamOrder, *, kind: str, start: int, receipt: int, micro_batch: int,
                 dp_rank: int, dp_size: int, num_workers: int, num_steps: Optional[int],
                 objective: Optional[MaskedLM] = None, documents: bool = False) -> None:
        self.info, self.skipped_shards = plan.info, plan.skipped
        self._plan, self._order, self._kind = plan, order, kind
        self._start, self._receipt, self._num_workers, self._num_steps = start, receipt, num_workers, num_steps
        self._global_batch = micro_batch * dp_size
        self._batches = _RankBatches(order, plan.reader, start, micro_batch, dp_rank, dp_size, num_steps, objective,
                                     eos_id=plan.info.eos_id if documents else None)

    def __len__(self) -> int:
        if self._num_steps is None:
            raise TypeError("the training stream is infinite")
        return self._num_steps

    def __iter__(self) -> Iterator[dict[str, Any]]:
        if self._num_workers == 0:
            inner: Iterator = iter(self._batches)
        else:
            inner = iter(DataLoader(self._batches, batch_size=None, num_workers=self._num_workers))
        position, receipt = self._start, self._receipt
        for expected, item in enumerate(inner):
            if item["step"] != expected:  # DataLoader's round-robin is what keeps state exact
                raise RuntimeError(f"loader workers returned micro-step {item['step']}, expected {expected}")
            if "bad_shard" in item:
                raise BadShardError(*item["bad_shard"])
            positions = self._order.select(position, self._global_batch)
            receipt = receipt_update(receipt, positions, self._order.sample_ids(*self._order.locate(positions)))
            position = int(positions[-1]) + 1
            consumed, epochs = self._order.epochs(position) if self._kind == "train" else ([], [])
            batch = {"input_ids": item["input_ids"], "labels": item["labels"], "source_ids": item["source_ids"],
                     "receipt": f"{receipt:016x}",
                     "state": make_state(self._kind, position, receipt, consumed, epochs, self._plan.skipped,
                                         self._plan.config)}
            if "document_ids" in item:
                batch["document_ids"] = item["document_ids"]
            yield batch


def make_train_loader(sources: list[tuple[str, float]], *, seq_len: int, micro_batch: int, dp_rank: int,
                      dp_size: int, seed: int, num_workers: int = 0, on_bad_shard: str = "fail",
                      verify_sha256: bool = True, val_fraction: float = 0.0, shuffle: str = "global",
                      shuffle_window: int = 1024, state: dict | None = None,
                      skip_shards: Iterable[str] = (), cache: ShardCache | None = None,
                      objective: MaskedLM | None = None, documents: bool = False,
                      schedule: list[Phase] | None = None) -> DataStream:
    """Infinite training stream of one dp rank; pass a batch's ``state`` back to resume right after it.

    The state resumes exactly on any dp size and micro batch (the global order is the same; only
    the split differs). ``seq_len`` must match the shards; ``val_fraction`` must match the validation
    loader's so that no validation sample is trained on. ``skip_shards`` (keys
    ``"<source index>:<shard name>"``, as in ``BadShardError.key``) are left out like bad shards under
    ``on_bad_shard="skip"``; every rank must pass the same ones. ``shuffle``: ``"global"`` (each
    epoch a pseudorandom permutation of all of a source's samples) or ``"window"`` (shards permuted,
    then windows of ``shuffle_window`` consecutive samples; contiguous reads for slow storage).
    ``cache``: where shards of object-store sources are kept on local disk (None: ranged GETs).
    ``objective``: None for next-token batches (``labels`` = the sample shifted by one), or a
    :class:`~data_shards.masking.MaskedLM` for an encoder's masked-token batches. ``documents``: each batch
    also holds ``document_ids`` (which document of the packed sample each token belongs to, from the
    EOS tokens), for attention kept within documents.
    ``verify_sha256``: check each shard's sha256 against index.json when this process (or, through
    markers, another of the node) first reads it (:mod:`data_shards.verify`); a mismatch is a bad shard.
    ``schedule``: the sources' weights over global positions (:mod:`data_shards.schedule`) instead of the
    static ``sources`` weights. A ``state`` resumes under another schedule (or static weights) only when
    both order the positions it consumed the same way (what comes after may change).
    """
    _check_split(micro_batch, dp_rank, dp_size)
    if num_workers < 0:
        raise DataError(f"num_workers must be >= 0, got {num_workers}")
    skip_also = set(state.get("skipped_shards", [])) if isinstance(state, dict) else set()
    skip_also |= set(skip_shards)
    plan = _make_plan(sources, seq_len, seed, on_bad_shard, verify_sha256, val_fraction, shuffle, shuffle_window,
                      skip_also, cache, schedule)
    start, receipt = 0, 0
    if state is not None:
        start, receipt, _ = parse_state(state, "train", plan.config, mixture=_mixture_check(plan, len(sources)))
    return DataStream(plan, plan.train, kind="train", start=start, receipt=receipt, micro_batch=micro_batch,
                      dp_rank=dp_rank, dp_size=dp_size, num_workers=num_workers, num_steps=None, objective=objective,
                      documents=documents)


def make_val_loader(sources: list[tuple[str, float]], *, seq_len: int, micro_batch: int, dp_rank: int,
                    dp_size: int, seed: int, val_fraction: float, max_batches: int, on_bad_shard: str = "fail",
                    skip_shards: Iterable[str] = (), cache: ShardCache | None = None,
                    objective: MaskedLM | None = None, verify_sha256: bool = True,
                    documents: bool = False) -> DataStream:
    """Finite validation stream of one dp rank: the same batches on every call, at most ``max_batches``.

    Validation samples are the held-out tails of the shards (``val_fraction`` of each source), mixed
    by the source weights; every rank gets the same number of batches. ``on_bad_shard`` and
    ``skip_shards`` work as in :func:`make_train_loader`; pass the training stream's, so that a shard
    left out of training is left out of validation too (its tail would otherwise stop the run).
    ``verify_sha256`` and ``documents`` as in :func:`make_train_loader`.
    """
    _check_split(micro_batch, dp_rank, dp_size)
    if val_fraction <= 0:
        raise DataError("validation needs data.val_fraction > 0 (the share of samples held out)")
    plan = _make_plan(sources, seq_len, seed, on_bad_shard, verify_sha256, val_fraction, "window", 1, set(skip_shards),
                      cache)
    total = plan.val.total_samples if plan.val is not None else 0
    steps = min(max_batches, total // (micro_batch * dp_size))
    if steps < 1:
        raise DataError(f"the validation split holds {total} samples, fewer than one global batch of "
                        f"{micro_batch * dp_size}; raise data.val_fraction or lower the batch")
    return DataStream(plan, plan.val, kind="val", start=0, receipt=0, micro_batch=micro_batch, dp_rank=dp_rank,
                      dp_size=dp_size, num_workers=0, num_steps=steps, objective=objective, documents=documents)


def _check_split(micro_batch: int, dp_rank: int, dp_size: int) -> None:
    if micro_batch < 1 or dp_size < 1 or not 0 <= dp_rank < dp_size:
        raise DataError(f"bad data split: micro_batch={micro_batch}, dp_rank={dp_rank}, dp_size={dp_size}")


def _make_plan(sources: list[tuple[str, float]], seq_len: int, seed: int, on_bad_shard: str, verify_sha256: bool,
               val_fraction: float, shuffle: str, shuffle_window: int, skip_also: set[str],
               cache: ShardCache | None, schedule: list[Phase] | None = None) -> _Plan:
    """Check the sources, find bad shards (the same on every rank: it depends only on the files) and orders.

    The start-up check is the cheap one (sizes and two headers per shard) whatever ``verify_sha256``:
    hashing every shard here would make every rank read all the data before its first step; the
    reader hashes each shard as it first opens it instead.
    """
    if on_bad_shard not in ("fail", "skip"):
        raise DataError(f"data.on_bad_shard must be 'fail' or 'skip', got {on_bad_shard!r}")
    if not 0 <= val_fraction < 1:
        raise DataError(f"data.val_fraction must be in [0, 1), got {val_fraction}")
    info = check_sources([p for p, _ in sources])
    if seq_len != info.seq_len:
        raise DataError(f"data.seq_len is {seq_len} but {info.paths[0]} holds samples of seq_len {info.seq_len}; "
                        f"set data.seq_len: {info.seq_len} or rebuild the shards with --seq-len {seq_len}")
    train_orders, val_orders, skipped = [], [], []
    for s, (directory, index) in enumerate(zip(info.paths, info.indexes)):
        samples = np.array([e.samples for e in index.shards], dtype=np.int64)
        val = val_counts(samples, val_fraction)
        train = samples - val
        left_out = np.zeros(len(index.shards), dtype=bool)
        for i, entry in enumerate(index.shards):
            key = f"{s}:{entry.name}"
            problem = shard_problem(directory, index, entry)
            if problem is not None and on_bad_shard == "fail":
                raise DataError(bad_shard_message(directory, index, entry.name, problem))
            if problem is not None or key in skip_also:
                if problem is not None:
                    warnings.warn(bad_shard_message(directory, index, entry.name, problem) + " (skipped)")
                skipped.append(key)
                left_out[i] = True
                val[i] = 0  # the validation set is fixed per plan: it simply lacks the shard
        train_orders.append(SourceOrder(s, seed, train, shuffle_window, shuffle, skipped=left_out))
        val_orders.append(ValOrder(samples - val, val))  # tails start after the shard's train samples
    weights = [float(w) for _, w in sources]
    first = [np.array([e.first_sample for e in ix.shards], dtype=np.int64) for ix in info.indexes]
    mixer: Mixer | ScheduledMixer = Mixer(weights) if schedule is None else ScheduledMixer(schedule, len(sources))
    config = {"seed": seed, "weights": mixer.weights if isinstance(mixer, Mixer) else None, "shuffle": shuffle,
              "shuffle_window": shuffle_window, "val_fraction": val_fraction,
              "samples": [ix.num_samples for ix in info.indexes]}
    if schedule is not None:  # absent without one: a static run's state is what it always was
        config["schedule"] = [ph.to_json() for ph in schedule]
    return _Plan(info=info, train=StreamOrder(train_orders, mixer, first), val=_val_order(val_orders, weights, first),
                 reader=SampleReader(info.paths, info.indexes, cache, _verifier(info, cache) if verify_sha256 else None),
                 skipped=skipped, config=config)


def _verifier(info: SourcesInfo, cache: ShardCache | None) -> ShardVerifier:
    """The reader's sha256 check on first open, its node-wide markers in the shard cache when there is one.

    Object-store shards are checked by the cache as they are downloaded; those read by ranged GETs
    (no cache, or larger than it) are not: a process reads only its share of a shard's samples, and
    hashing means downloading the whole object again in every process, which is the cache's job.
    """
    for directory, index in zip(info.paths, info.indexes):
        ranged = [e.name for e in index.shards if cache is None or not cache.holds(e.bytes)]
        if not isinstance(directory, Path) and ranged:
            warnings.warn(f"data.verify_sha256: {len(ranged)} shards of {directory} are read by ranged GETs, so "
                          "their sha256 is not checked as they are read; set data.cache_dir (and data.cache_gb "
                          f"above the shard size) to check each one as it is downloaded, or run `fm-train shard "
                          f"--verify --out {directory}`")
    return ShardVerifier(marker_dir(cache.directory if cache is not None else None))


def _val_order(orders: list[ValOrder], weights: list[float], first: list[np.ndarray]) -> Optional[StreamOrder]:
    """Validation order over the sources that hold validation samples."""
    keep = [s for s, o in enumerate(orders) if o.epoch_len > 0]
    if not keep:
        return None
    return StreamOrder([orders[s] for s in keep], Mixer([weights[s] for s in keep]), first, sources=keep)


def _signature(mixer: Mixer | ScheduledMixer, position: int) -> list[tuple]:
    if isinstance(mixer, Mixer):
        return static_signature(mixer, position)
    return mixer.signature(position)


def _mixture_check(plan: _Plan, n_sources: int) -> Callable[[dict[str, Any], int], Optional[str]]:
    """How a saved state's mixture (static weights or schedule) is compared with this plan's: only the
    part before the saved position must agree (see :mod:`data_shards.schedule`); returns what differs."""
    def check(saved: dict[str, Any], position: int) -> Optional[str]:
        try:
            if saved.get("schedule") is not None:
                before: Mixer | ScheduledMixer = ScheduledMixer(
                    [Phase.from_json(p) for p in saved["schedule"]], n_sources)
            else:
                before = Mixer([float(w) for w in saved["weights"]])
        except (DataError, KeyError, TypeError, ValueError) as exc:
            return f"the saved mixture cannot be read ({exc})"
        old, new = _signature(before, position), _signature(plan.train.mixer, position)
        if old == new:
            return None
        at = next((i for i, (a, b) in enumerate(zip(old, new)) if a != b), min(len(old), len(new)))
        start = min(seg[0] for seg in (old[at:at + 1] + new[at:at + 1]))
        return (f"the mixture orders the {position} samples already consumed differently (first difference in the"
                f" segment starting at position {start}); change only phases after the resumed step")
    return check
