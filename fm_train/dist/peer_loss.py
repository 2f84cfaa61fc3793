"""A failure caused by a peer or the network going away, told apart from one with a local cause.

When a rank dies or its node is lost, the survivors learn it from their next collective: gloo raises
a plain ``RuntimeError`` (``Connection closed by peer``, ``Connection reset by peer``, ``Timed out
waiting ... for recv``), NCCL a ``DistBackendError``. Whatever the survivor was doing then (a step, a
checkpoint save) did nothing wrong: the run should restart, or shrink when the node is gone. A full
disk, a refused permission or a damaged file is local and fails the same way on every attempt.
:func:`is_peer_failure` is the one place that decides which is which; :class:`PeerLost` carries the
verdict (and a message written for the user) to the worker's exit code.
"""

from __future__ import annotations

import re

# What gloo, NCCL and the socket layer say when the other end went away (checked case-insensitively).
# A local write never says any of these: torch.save reports a full disk as an iostream or
# "file write failed" error, the OS as ENOSPC/EACCES/EROFS.
_PEER_GONE = re.compile(
    r"connection (closed|reset) by peer|broken pipe|timed out|socket closed|connection refused"
    r"|remote process exited|remote worker|communicator was aborted|ncclRemoteError|network error",
    re.IGNORECASE)


class PeerLost(RuntimeError):
    """A collective failed because another rank or the network went away; the message says what this
    rank was doing and what the run still has (e.g. the checkpoint ``latest`` names)."""


def _chain(exc: BaseException) -> list[BaseException]:
    """``exc`` and what it was raised from or while handling (DeepSpeed and our own code re-raise)."""
    seen: list[BaseException] = []
    node: BaseException | None = exc
    while node is not None and node not in seen:
        seen.append(node)
        node = node.__cause__ or node.__context__
    return seen


def _is_dist_error(exc: BaseException) -> bool:
    """torch's own distributed errors (backend, network, store): raised only by collectives and stores."""
    try:
        from torch.distributed import DistError
    except ImportError:  # torch without distributed support: nothing of ours runs a collective then
        return False
    return isinstance(exc, DistError)


def is_peer_failure(exc: BaseException) -> bool:
    """Whether ``exc`` (or what it was raised from) says that a peer or the network went away.

    ``PeerLost`` itself, torch's distributed errors, socket-level connection errors, and runtime errors
    whose text is gloo's or NCCL's for a lost peer. A local ``OSError`` (ENOSPC, EACCES, EROFS, ...) is not.
    """
    for node in _chain(exc):
        if isinstance(node, (PeerLost, ConnectionError)) or _is_dist_error(node):
            return True
        if isinstance(node, RuntimeError) and _PEER_GONE.search(str(node)):
            return True
    return False


def first_line(exc: BaseException) -> str:
    """``Type: first line of the message`` of the innermost peer error in ``exc``'s chain (gloo's text,
    not the wrapper's), for a one-line report."""
    chain = _chain(exc)
    node = next((n for n in reversed(chain) if is_peer_failure(n) and not isinstance(n, PeerLost)), chain[0])
    text = (str(node).strip().splitlines() or [""])[0]
    return f"{type(node).__name__}: {text}"
