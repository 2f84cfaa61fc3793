"""Resume state and data receipt of a stream.

State (version 1) is a small JSON-serializable dict. The one number that matters is ``position``:
global samples consumed by all dp ranks together. Because the order is a pure function of the
position (:mod:`data_shards.order`), the state does not depend on dp size, micro batch or loader
workers; the rest (``config``) lets a resume refuse data settings that would change the order.

Receipt: ``sum(mix(position, sample_id)) mod 2**64`` over every global position consumed. It is a
running hash: cheap (vectorized), identical on every rank (each rank knows the global order), the same
for any grouping into batches (the sum commutes), yet it changes if any sample is repeated, skipped
or moved (the position is mixed in). It detects accidents, not adversaries: it is not cryptographic.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import numpy as np

from .errors import DataError

STATE_VERSION = 1
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)


def mix64(x: np.ndarray) -> np.ndarray:
    """splitmix64's finalizer: a fast bijective scrambling of 64-bit words."""
    x = x ^ (x >> np.uint64(30))
    x = x * np.uint64(0xBF58476D1CE4E5B9)
    x = x ^ (x >> np.uint64(27))
    x = x * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def receipt_update(receipt: int, positions: np.ndarray, sample_ids: np.ndarray) -> int:
    """Add the samples at ``positions`` to a receipt (see module docstring)."""
    with np.errstate(over="ignore"):  # wrapping uint64 arithmetic is the point
        terms = mix64(mix64(positions.astype(np.uint64) * _GOLDEN) ^ sample_ids.astype(np.uint64))
        return (receipt + int(terms.sum(dtype=np.uint64))) % (1 << 64)


def make_state(kind: str, position: int, receipt: int, consumed: list[int], epochs: list[int],
               skipped: list[str], config: dict[str, Any]) -> dict[str, Any]:
    """The state dict attached to a batch: resuming from it yields the batch after."""
    return {"version": STATE_VERSION, "kind": kind, "position": position, "receipt": f"{receipt:016x}",
            "consumed": consumed, "epoch": epochs, "skipped_shards": skipped, "config": config}


def parse_state(state: dict[str, Any], kind: str, config: dict[str, Any],
                mixture: Optional[Callable[[dict[str, Any], int], Optional[str]]] = None) -> tuple[int, int, list[str]]:
    """(position, receipt, skipped shards) of a saved state; DataError if it belongs to other data settings.

    ``mixture``: compares the saved config's mixture (``weights`` / ``schedule``) up to the saved position
    and says what differs (None: they agree); without it they must be equal.
    """
    if not isinstance(state, dict) or state.get("version") != STATE_VERSION or state.get("kind") != kind:
        raise DataError(f"data state {str(state)[:200]} is not a version-{STATE_VERSION} {kind} state of "
                        "data_shards; resume from a checkpoint written by this version or start without state")
    saved = state.get("config", {})
    mixing = ("weights", "schedule") if mixture is not None else ()
    changed = [f"{k}: {saved.get(k)!r} -> {v!r}" for k, v in config.items() if k not in mixing and saved.get(k) != v]
    if mixture is not None and isinstance(state.get("position"), int):
        problem = mixture(saved, state["position"])
        if problem is not None:
            changed.append(problem)
    if changed:
        raise DataError("the data settings changed since the checkpoint (" + "; ".join(changed) + "), so the "
                        "saved position would point at other samples; restore them or start the data stream "
                        "from scratch (no data state)")
    try:
        return int(state["position"]), int(state["receipt"], 16), list(state.get("skipped_shards", []))
    except (KeyError, TypeError, ValueError) as exc:
        raise DataError(f"data state has a bad position or receipt: {exc}") from exc
