"""Mixture weights that change over training: constant phases and linear ramps, in closed form.

A schedule is a list of phases over global sample positions (the caller turns steps into positions
with the global batch). A constant phase interleaves its sources with the static mixture's smooth
weighted round-robin (:class:`~data_shards.order.Mixer`, zero-weight sources left out); a ramp goes
linearly from the previous phase's weights to its own, one constant segment per training step (the
weights at the step's end, apportioned to the step's positions by largest remainder and spread evenly
within it). After the last phase its final weights hold for ever.

Position ``p`` lies in segment ``i`` (a phase, or one step of a ramp); its source and in-segment rank
come from that segment's pattern, and its index ``k`` within the source's stream adds the samples
earlier segments took from the source (a cumulative sum built once, O(segments)). So any position
maps to ``(source, k)`` without replaying the stream, whatever the number of readers.

Resume: the samples before a position depend only on the segments that start before it
(:meth:`ScheduledMixer.signature`); a resumed run may change anything after its position (extend a
phase, add an annealing phase), never what was already consumed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Optional

import numpy as np

from .errors import DataError
from .order import Mixer

_RESOLUTION = 10_000  # ramp weights are kept to 1/10000, as the static mixer's
MAX_RAMP_STEPS = 1 << 20  # a segment per ramp step, each a few dozen bytes: bounds a (saved) schedule's cost


@dataclass(frozen=True)
class Phase:
    """One phase over global positions ``[start, end)`` (``end`` None: to the end of training).

    ``ramp_step`` 0: constant ``weights``. Otherwise a linear ramp from the previous phase's weights to
    ``weights``, one segment of ``ramp_step`` positions (a training step's global batch) at a time.
    """

    start: int
    weights: tuple[float, ...]
    end: Optional[int] = None
    ramp_step: int = 0

    def to_json(self) -> dict[str, Any]:
        """A plain dict, as kept in the data state."""
        return {"start": self.start, "end": self.end, "weights": list(self.weights), "ramp_step": self.ramp_step}

    @staticmethod
    def from_json(d: dict[str, Any]) -> "Phase":
        """The phase :meth:`to_json` wrote."""
        return Phase(int(d["start"]), tuple(float(w) for w in d["weights"]),
                     None if d.get("end") is None else int(d["end"]), int(d.get("ramp_step", 0)))


class _ConstMix:
    """A constant phase: the static mixer over the sources of positive weight."""

    def __init__(self, weights: tuple[float, ...]) -> None:
        self.active = np.array([s for s, w in enumerate(weights) if w > 0], dtype=np.int64)
        self.n = len(weights)
        self.mixer = Mixer([weights[s] for s in self.active.tolist()])

    def split(self, t: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        j, k = self.mixer.split(t)
        return self.active[j], k

    def consumed(self, t: int) -> np.ndarray:
        out = np.zeros(self.n, dtype=np.int64)
        out[self.active] = self.mixer.consumed(t)
        return out

    def key(self) -> tuple:
        return ("constant", tuple(self.active.tolist()), tuple(self.mixer.weights))


def apportion(shares: np.ndarray, total: int) -> np.ndarray:
    """Integer counts per row of ``shares`` (non-negative ints, each row with a positive sum) that add up
    to ``total``: floors of the exact quotas, the rest to the largest remainders (lower index first)."""
    shares = np.asarray(shares, dtype=np.int64)
    quota = shares * total
    sums = shares.sum(axis=1, keepdims=True)
    counts, rem = quota // sums, quota % sums
    deficit = total - counts.sum(axis=1)
    order = np.argsort(-rem, axis=1, kind="stable")
    rank = np.empty_like(order)
    np.put_along_axis(rank, order, np.arange(shares.shape[1])[None, :].repeat(len(shares), 0), axis=1)
    return counts + (rank < deficit[:, None])


def spread(counts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Source and rank within that source of each slot of a segment holding ``counts[s]`` samples of
    source ``s``: the ``j``-th sample of ``s`` sits at virtual time ``(2j + 1) / counts[s]`` (evenly
    spread, no bursts), ties to the lower source. Exact: distinct such fractions differ far above
    float64 rounding for any segment below 2**20 samples."""
    counts = np.asarray(counts, dtype=np.int64)
    src = np.repeat(np.arange(len(counts)), counts)
    j = np.arange(int(counts.sum())) - np.repeat(np.cumsum(counts) - counts, counts)
    order = np.lexsort((src, (2 * j + 1) / counts[src]))
    return src[order], j[order]


def ramp_counts(start: np.ndarray, end: np.ndarray, steps: int, step: int) -> np.ndarray:
    """Samples per source in each of ``steps`` steps of ``step`` positions ramping linearly from weights
    ``start`` to ``end``: step ``m`` has the weights reached at its end, ``start + (end - start) (m+1)/steps``."""
    frac = (np.arange(1, steps + 1, dtype=np.float64) / steps)[:, None]
    w = start[None, :] / start.sum() * (1 - frac) + end[None, :] / end.sum() * frac
    shares = np.rint(w / w.sum(axis=1, keepdims=True) * _RESOLUTION).astype(np.int64)
    return apportion(shares, step)


class ScheduledMixer:
    """Position -> (source, index within the source's stream) under a schedule of phases (module docstring).

    The same interface as :class:`~data_shards.order.Mixer` (``split``, ``consumed``), so a
    :class:`~data_shards.order.StreamOrder` takes either.
    """

    def __init__(self, phases: list[Phase], n_sources: int) -> None:
        check_phases(phases, n_sources)
        starts: list[int] = []
        consts: dict[int, _ConstMix] = {}  # segment -> its constant mix
        full: list[np.ndarray] = []  # samples per source of each whole segment (the last one: unused)
        ramps: dict[int, np.ndarray] = {}
        previous = np.asarray(phases[0].weights, dtype=np.float64)
        for i, ph in enumerate(phases):
            w = np.asarray(ph.weights, dtype=np.float64)
            end = ph.end if ph.end is not None else (phases[i + 1].start if i + 1 < len(phases) else None)
            if ph.ramp_step:
                assert end is not None  # check_phases
                n = (end - ph.start) // ph.ramp_step
                counts = ramp_counts(previous, w, n, ph.ramp_step)
                for m in range(n):
                    ramps[len(starts)] = counts[m]
                    starts.append(ph.start + m * ph.ramp_step)
                    full.append(counts[m])
            else:
                mix = _ConstMix(ph.weights)
                consts[len(starts)] = mix
                starts.append(ph.start)
                full.append(mix.consumed(end - ph.start) if end is not None else np.zeros(n_sources, np.int64))
            previous = w
        last_end = phases[-1].end
        if last_end is not None:  # after the last phase its final weights hold
            consts[len(starts)] = _ConstMix(tuple(previous.tolist()))
            starts.append(last_end)
            full.append(np.zeros(n_sources, np.int64))
        self.n_sources = n_sources
        self.starts = np.asarray(starts, dtype=np.int64)
        self._consts, self._ramps = consts, ramps
        self.bases = np.concatenate([np.zeros((1, n_sources), np.int64), np.cumsum(np.stack(full), axis=0)])[:-1]
        self._pattern = lru_cache(maxsize=16)(self._ramp_pattern)

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)  # DataLoader workers get the mixer by pickling; the cache is rebuilt there
        del state["_pattern"]
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._pattern = lru_cache(maxsize=16)(self._ramp_pattern)

    def _ramp_pattern(self, segment: int) -> tuple[np.ndarray, np.ndarray]:
        return spread(self._ramps[segment])

    def _segment_split(self, segment: int, t: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        if segment in self._consts:
            return self._consts[segment].split(t)
        src, rank = self._pattern(segment)
        return src[t], rank[t]

    def split(self, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Source of each global position and its index within that source's stream."""
        positions = np.asarray(positions, dtype=np.int64)
        seg = np.searchsorted(self.starts, positions, side="right") - 1
        source = np.empty_like(positions)
        k = np.empty_like(positions)
        for s in np.unique(seg).tolist():  # a batch spans one or two segments
            sel = seg == s
            src, rank = self._segment_split(s, positions[sel] - self.starts[s])
            source[sel], k[sel] = src, self.bases[s, src] + rank
        return source, k

    def consumed(self, position: int) -> list[int]:
        """Samples taken from each source by the positions before ``position``."""
        s = int(np.searchsorted(self.starts, position, side="right")) - 1
        t = position - int(self.starts[s])
        if s in self._consts:
            inside = self._consts[s].consumed(t)
        else:
            inside = np.bincount(self._pattern(s)[0][:t], minlength=self.n_sources)
        return (self.bases[s] + inside).tolist()

    def signature(self, position: int) -> list[tuple]:
        """What the order of the positions before ``position`` depends on: the segments starting before it."""
        out = []
        for s in range(int(np.searchsorted(self.starts, position, side="left"))):
            what = self._consts[s].key() if s in self._consts else ("ramp", tuple(self._ramps[s].tolist()))
            out.append((int(self.starts[s]), *what))
        return out


def static_signature(mixer: Mixer, position: int) -> list[tuple]:
    """:meth:`ScheduledMixer.signature` of a static mixture (one constant phase from position 0)."""
    if position <= 0:
        return []
    return [(0, "constant", tuple(range(len(mixer.weights))), tuple(mixer.weights))]


def check_phases(phases: list[Phase], n_sources: int) -> None:
    """DataError unless ``phases`` tile the positions from 0 on, each with valid weights."""
    if not phases:
        raise DataError("a data schedule needs at least one phase")
    for i, ph in enumerate(phases):
        where = f"data schedule phase {i}"
        if len(ph.weights) != n_sources:
            raise DataError(f"{where} has {len(ph.weights)} weights for {n_sources} sources")
        if any(not (math.isfinite(w) and w >= 0) for w in ph.weights) or sum(ph.weights) <= 0:
            raise DataError(f"{where}: weights must be non-negative and not all zero, got {list(ph.weights)}")
        expected = 0 if i == 0 else phases[i - 1].end
        if ph.start != expected:
            raise DataError(f"{where} starts at position {ph.start}, expected {expected} (phases must follow"
                            " each other without gap or overlap)")
        if ph.end is not None and ph.end <= ph.start:
            raise DataError(f"{where} ends at position {ph.end}, not after its start {ph.start}")
        if ph.end is None and i + 1 < len(phases):
            raise DataError(f"{where} is open-ended but is not the last phase")
        if ph.ramp_step:
            if i == 0:
                raise DataError(f"{where} is a ramp, but the first phase has no earlier weights to ramp from")
            if ph.end is None or (ph.end - ph.start) % ph.ramp_step:
                raise DataError(f"{where}: a ramp needs an end a whole number of steps ({ph.ramp_step} positions)"
                                " after its start")
            if (ph.end - ph.start) // ph.ramp_step > MAX_RAMP_STEPS:  # one segment each: bound what a state may ask
                raise DataError(f"{where}: a ramp of {(ph.end - ph.start) // ph.ramp_step} steps exceeds the"
                                f" {MAX_RAMP_STEPS:,} a ramp may have; ramp over fewer steps")
