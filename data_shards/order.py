"""The global sample order: which sample sits at each position of the stream, for any position.

Everything here is a pure function of (seed, source layout, weights, position), computed in closed
form and vectorized over positions, so that any rank, loader worker or resumed run can jump to any
position without replaying the stream, and the order never depends on the number of readers.

- One source, epoch ``e``, ``shuffle="global"`` (the default): a keyed pseudorandom permutation of
  all its training samples, a Feistel network over the next power of four with cycle-walking back
  into range (:func:`feistel_permute`), so position ``q`` maps to its sample in O(1) without a table
  and a batch draws from the whole source. ``shuffle="window"``: a seeded permutation of its shards,
  then the concatenation of their training samples cut into windows of ``window`` samples, each
  window permuted with its own seed (contiguous reads, for slow storage).
- Several sources: a smooth weighted round-robin pattern over integer weights, repeated with period
  ``sum(weights)``; position ``p`` belongs to source ``pattern[p % period]``, and is that source's
  ``k``-th sample where ``k`` counts the earlier positions of the same source. Weights that change
  over training (phases and ramps) are :mod:`data_shards.schedule`'s ``ScheduledMixer``, with the
  same interface.
- Validation: the last ``floor(C_{i+1} f) - floor(C_i f)`` samples of shard ``i`` (C = cumulative
  sample counts, f = val_fraction): exactly ``floor(N f)`` samples, spread over all shards, the same
  for every seed; they never appear in training.
"""

from __future__ import annotations

import math
from fractions import Fraction
from functools import lru_cache

import numpy as np

from .errors import DataError
from .state import mix64

_SHARD_TAG, _WINDOW_TAG, _GLOBAL_TAG = 1, 2, 3
SHUFFLES = ("global", "window")
_GLOBAL_BLOCK = 8192  # positions permuted (and cached) together
_FEISTEL_ROUNDS = 6  # 4 rounds make a pseudorandom permutation of a balanced Feistel; 2 more for margin
_SOURCE_SHIFT = 40  # sample id = source << 40 | sample number: 2^40 samples per source is plenty


def val_counts(samples: np.ndarray, val_fraction: float) -> np.ndarray:
    """Validation samples held out at the end of each shard (see module docstring)."""
    f = Fraction(val_fraction).limit_denominator(1_000_000)  # exact integer arithmetic from here on
    cum = np.concatenate([[0], np.cumsum(samples, dtype=np.int64)])
    held = np.array([c * f.numerator // f.denominator for c in cum.tolist()], dtype=np.int64)
    return np.diff(held)


def _rng(*key: int) -> np.random.Generator:
    return np.random.default_rng([k % (1 << 64) for k in key])


@lru_cache(maxsize=64)
def _round_keys(key: tuple[int, ...]) -> list[np.uint64]:
    """One 64-bit key per Feistel round, hashed from ``key`` (seed, source, epoch, ...)."""
    seed = 0
    for part in key:
        seed = int(mix64(np.array([(seed ^ (part % (1 << 64))) & 0xFFFFFFFFFFFFFFFF], dtype=np.uint64))[0])
    words = np.array([(seed + r + 1) & 0xFFFFFFFFFFFFFFFF for r in range(_FEISTEL_ROUNDS)], dtype=np.uint64)
    return list(mix64(words))


def feistel_permute(x: np.ndarray, n: int, key: tuple[int, ...]) -> np.ndarray:
    """A keyed bijection of ``[0, n)`` applied to ``x``: a balanced Feistel network on ``2h`` bits
    (``4**h >= n``) with splitmix64 as round function, cycle-walked until each value is back below
    ``n`` (a permutation restricted by walking stays a permutation; at most 4x the domain, so about
    1.3 passes on average)."""
    x = np.asarray(x, dtype=np.uint64)
    if n <= 1:
        return np.zeros_like(x)
    half = max(1, ((n - 1).bit_length() + 1) // 2)
    mask = np.uint64((1 << half) - 1)
    shift = np.uint64(half)
    round_keys = _round_keys(tuple(int(k) for k in key))

    def rounds(v: np.ndarray) -> np.ndarray:
        left, right = v >> shift, v & mask
        with np.errstate(over="ignore"):
            for k in round_keys:
                left, right = right, left ^ (mix64(right ^ k) & mask)
        return (left << shift) | right

    out = rounds(x)
    outside = np.flatnonzero(out >= np.uint64(n))
    while outside.size:
        out[outside] = rounds(out[outside])
        outside = outside[out[outside] >= np.uint64(n)]
    return out


class SourceOrder:
    """Training order of one source: stream index ``k`` (across epochs) -> (shard, local sample)."""

    def __init__(self, source: int, seed: int, train: np.ndarray, window: int, shuffle: str = "global",
                 skipped: np.ndarray | None = None) -> None:
        """``train[i]``: training samples of shard i (its first ones). ``skipped[i]``: shard i is left
        out; it keeps its place in the order (so leaving it out moves no other sample) and the
        stream passes over its positions (:meth:`StreamOrder.select`)."""
        if shuffle not in SHUFFLES:
            raise DataError(f"data.shuffle must be one of {', '.join(SHUFFLES)}, got {shuffle!r}")
        self.source, self.seed, self.window, self.shuffle = source, seed, max(1, window), shuffle
        self.train = np.asarray(train, dtype=np.int64)
        self.usable = np.ones(len(self.train), dtype=bool) if skipped is None else ~np.asarray(skipped, dtype=bool)
        self.included = np.flatnonzero(self.train)
        self.cum_train = np.concatenate([[0], np.cumsum(self.train)])  # shards in index order
        self.epoch_len = int(self.train.sum())
        if int(self.train[self.usable].sum()) == 0:
            raise DataError(f"source {source} has no training samples left (all shards skipped or held out)")
        self._make_caches()

    def _make_caches(self) -> None:
        self._epoch = lru_cache(maxsize=4)(self._epoch_layout)
        self._window = lru_cache(maxsize=64)(self._window_perm)
        self._block = lru_cache(maxsize=8)(self._global_block)

    def __getstate__(self) -> dict:
        # DataLoader workers receive the order by pickling; the per-instance caches are rebuilt there.
        state = dict(self.__dict__)
        del state["_epoch"], state["_window"], state["_block"]
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._make_caches()

    def _epoch_layout(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        shards = self.included[_rng(_SHARD_TAG, self.seed, self.source, epoch).permutation(len(self.included))]
        return shards, np.concatenate([[0], np.cumsum(self.train[shards])])

    def _window_perm(self, epoch: int, window: int) -> np.ndarray:
        size = min(self.window, self.epoch_len - window * self.window)
        return _rng(_WINDOW_TAG, self.seed, self.source, epoch, window).permutation(size)

    def locate(self, k: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Shard index and local sample index of the source's stream positions ``k``."""
        k = np.asarray(k, dtype=np.int64)
        epoch, q = np.divmod(k, self.epoch_len)
        if self.shuffle == "global":
            return self._locate_global(epoch, q)
        win, offset = np.divmod(q, self.window)
        shard = np.empty_like(k)
        local = np.empty_like(k)
        # Positions come in increasing runs, so a batch is one or two runs of the same (epoch, window).
        cuts = np.flatnonzero((np.diff(epoch) != 0) | (np.diff(win) != 0)) + 1
        for a, b in zip([0, *cuts.tolist()], [*cuts.tolist(), len(k)]):
            e, w = int(epoch[a]), int(win[a])
            shards, cum = self._epoch(e)
            qq = w * self.window + self._window(e, w)[offset[a:b]]
            j = np.searchsorted(cum, qq, side="right") - 1
            shard[a:b] = shards[j]
            local[a:b] = qq - cum[j]
        return shard, local

    def _global_block(self, epoch: int, block: int) -> np.ndarray:
        """Samples at epoch positions ``[block * B, (block + 1) * B)``: permuting a block at once costs
        about as much as permuting one batch (numpy's per-call overhead dominates at batch sizes)."""
        q = np.arange(block * _GLOBAL_BLOCK, min((block + 1) * _GLOBAL_BLOCK, self.epoch_len), dtype=np.int64)
        return feistel_permute(q, self.epoch_len, (_GLOBAL_TAG, self.seed, self.source, epoch)).astype(np.int64)

    def _locate_global(self, epoch: np.ndarray, q: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        sample = np.empty_like(q)
        block, offset = np.divmod(q, _GLOBAL_BLOCK)
        # Positions come in increasing runs, so a batch touches one or two (epoch, block) pairs.
        cuts = np.flatnonzero((np.diff(epoch) != 0) | (np.diff(block) != 0)) + 1
        for a, b in zip([0, *cuts.tolist()], [*cuts.tolist(), len(q)]):
            sample[a:b] = self._block(int(epoch[a]), int(block[a]))[offset[a:b]]
        # Sample number within the source's training samples -> shard (skipped shards hold none).
        shard = np.searchsorted(self.cum_train, sample, side="right") - 1
        return shard, sample - self.cum_train[shard]


class ValOrder:
    """Validation samples of one source in a fixed order: shards in index order, tails in order."""

    def __init__(self, train: np.ndarray, val: np.ndarray) -> None:
        self.start = np.asarray(train, dtype=np.int64)  # val samples of shard i start after its train ones
        self.cum = np.concatenate([[0], np.cumsum(val, dtype=np.int64)])
        self.epoch_len = int(self.cum[-1])

    def locate(self, k: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Shard and local index of validation sample ``k`` (wrapping around)."""
        q = np.asarray(k, dtype=np.int64) % max(1, self.epoch_len)
        shard = np.searchsorted(self.cum, q, side="right") - 1
        return shard, self.start[shard] + q - self.cum[shard]


class Mixer:
    """Deterministic weighted interleaving of sources (smooth weighted round-robin, periodic)."""

    def __init__(self, weights: list[float], resolution: int = 10_000) -> None:
        if not weights or any(not (w > 0 and math.isfinite(w)) for w in weights):
            raise DataError(f"data source weights must be positive numbers, got {weights}")
        total = sum(weights)
        ints = [max(1, round(w / total * resolution)) for w in weights]
        g = math.gcd(*ints)
        self.weights = [w // g for w in ints]  # exact shares to 1/resolution
        self.period = sum(self.weights)
        current = [0] * len(self.weights)
        pattern = np.empty(self.period, dtype=np.int64)
        for t in range(self.period):  # nginx's smooth weighted round-robin: evenly spread, no bursts
            current = [c + w for c, w in zip(current, self.weights)]
            pick = max(range(len(current)), key=lambda s: (current[s], -s))
            current[pick] -= self.period
            pattern[t] = pick
        self.pattern = pattern
        onehot = pattern[None, :] == np.arange(len(self.weights))[:, None]
        self.prefix = np.concatenate([np.zeros((len(self.weights), 1), np.int64), np.cumsum(onehot, axis=1)], axis=1)

    def split(self, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Source of each global position and its index within that source's stream."""
        positions = np.asarray(positions, dtype=np.int64)
        if self.period == 1:  # one source: no mixing to do
            return np.zeros_like(positions), positions
        cycles, r = np.divmod(positions, self.period)
        source = self.pattern[r]
        return source, cycles * np.asarray(self.weights)[source] + self.prefix[source, r]

    def consumed(self, position: int) -> list[int]:
        """Samples taken from each source by the positions before ``position``."""
        cycles, r = divmod(position, self.period)
        return [cycles * w + int(self.prefix[s, r]) for s, w in enumerate(self.weights)]


class StreamOrder:
    """Global position -> (source, shard, local sample) and sample ids, for train or validation."""

    def __init__(self, orders: list, mixer: Mixer, first_sample: list[np.ndarray],
                 sources: list[int] | None = None) -> None:
        """``orders[j]`` and ``mixer`` weight ``j`` belong to source ``sources[j]`` (default: ``j``)."""
        self.orders, self.mixer = orders, mixer
        self.first_sample = first_sample  # per source: global number of each shard's first sample
        self.sources = np.asarray(sources if sources is not None else range(len(orders)), dtype=np.int64)
        # Whether some positions map to samples of skipped shards (validation orders skip none).
        self.skips = any(not o.usable.all() for o in orders if hasattr(o, "usable"))

    @property
    def total_samples(self) -> int:
        """Samples in one epoch of all sources together."""
        return sum(o.epoch_len for o in self.orders)

    def _locate(self, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(order index, shard, local) of each global position."""
        j, k = self.mixer.split(positions)
        if len(self.orders) == 1:
            return j, *self.orders[0].locate(k)
        shard = np.empty_like(k)
        local = np.empty_like(k)
        for s in np.unique(j).tolist():
            sel = j == s
            shard[sel], local[sel] = self.orders[s].locate(k[sel])
        return j, shard, local

    def locate(self, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(source, shard, local) of each global position."""
        j, shard, local = self._locate(positions)
        return self.sources[j], shard, local

    def select(self, start: int, count: int) -> np.ndarray:
        """The first ``count`` positions at or after ``start`` whose samples are not in skipped shards.

        Positions of skipped samples are passed over, not renumbered: every other sample keeps its
        position, so a shard left out at position ``k`` changes nothing before ``k`` and drops only its
        own samples after it (no healthy sample of the epoch is repeated or lost).
        """
        if not self.skips:
            return np.arange(start, start + count, dtype=np.int64)
        chosen: list[np.ndarray] = []
        found, cursor, chunk = 0, start, max(2 * count, 1024)
        while found < count:
            positions = np.arange(cursor, cursor + chunk, dtype=np.int64)
            j, shard, _ = self._locate(positions)
            usable = np.ones(len(positions), dtype=bool)
            for s in np.unique(j).tolist():
                sel = j == s
                usable[sel] = self.orders[s].usable[shard[sel]]
            keep = positions[usable][: count - found]
            chosen.append(keep)
            found += len(keep)
            cursor += chunk
        return np.concatenate(chosen)

    def sample_ids(self, source: np.ndarray, shard: np.ndarray, local: np.ndarray) -> np.ndarray:
        """Stable 64-bit ids: source index and sample number within its directory."""
        number = np.empty_like(local)
        for s in (np.unique(source).tolist() if len(self.first_sample) > 1 else [0]):
            sel = source == s
            number[sel] = self.first_sample[s][shard[sel]] + local[sel]
        return (source.astype(np.uint64) << np.uint64(_SOURCE_SHIFT)) | number.astype(np.uint64)

    def epochs(self, position: int) -> tuple[list[int], list[int]]:
        """Per source: samples consumed before ``position`` and the epoch the next one belongs to."""
        consumed = self.mixer.consumed(position)
        return consumed, [c // o.epoch_len for c, o in zip(consumed, self.orders)]
