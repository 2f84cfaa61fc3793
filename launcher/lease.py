"""A run directory's lease: one launch at a time writes a run's checkpoints and ``latest``.

``fm-train launch`` takes ``RUN/.fm-train-lease.json`` (and ``<run.storage>/.fm-train-lease.json``)
before it starts anything, naming its host, pid and start time; a daemon thread renews it every
quarter of the timeout, and the launch removes it when it ends. A second launch on the same run is
refused with the holder's name. A lease whose holder is gone is taken over, with a line saying so:
on the same host when its pid is no longer that process, elsewhere when it was not renewed for
``FM_TRAIN_LEASE_TIMEOUT_S`` (120 s by default; the hosts' clocks must roughly agree).

A local lease is created exclusively (written aside, then hard-linked into place, so it is never
seen half-written); a takeover first takes ``<lease>.takeover`` the same way, so two launches
cannot both take over one stale lease. An object store (``s3://...``) has no exclusive create
through fsspec: there the lease is checked, written and read back, which catches all but launches
started within the same second.
"""

from __future__ import annotations

import json
import math
import os
import socket
import threading
import time
import uuid
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Protocol

from launcher.cluster import ClusterError
from launcher.preflight import resolve_on_node

LEASE_NAME = ".fm-train-lease.json"
TIMEOUT_ENV = "FM_TRAIN_LEASE_TIMEOUT_S"
DEFAULT_TIMEOUT_S = 120.0

Say = Callable[[str], None]


class LeaseError(ClusterError):
    """Another launch holds the run (the message names its host and pid), or the lease is unreadable."""


def _process_start(pid: int) -> float | None:
    """When process ``pid`` started (None when there is none): tells a reused pid from the holder."""
    import psutil  # a dependency of Ray; imported here so that importing this module stays cheap

    try:
        return psutil.Process(pid).create_time()
    except psutil.NoSuchProcess:
        return None
    except psutil.Error:  # another user's process: alive, its start time unknown
        return -1.0


@dataclass(frozen=True)
class Holder:
    """Who holds a lease, and since when (wall-clock seconds, comparable across hosts)."""

    host: str
    pid: int
    pid_started: float
    started: float
    renewed: float
    token: str

    @classmethod
    def me(cls, now: float) -> "Holder":
        """This process, taking a lease at ``now``."""
        return cls(host=socket.gethostname(), pid=os.getpid(), pid_started=_process_start(os.getpid()) or 0.0,
                   started=now, renewed=now, token=uuid.uuid4().hex)

    @classmethod
    def parse(cls, data: bytes) -> "Holder | None":
        """The holder a lease file names; None when it is not a lease this module wrote (wrong fields or types)."""
        try:
            fields = json.loads(data)
            holder = cls(**fields)
        except (ValueError, TypeError, RecursionError):
            return None
        numbers = (holder.pid_started, holder.started, holder.renewed)
        if not (isinstance(holder.host, str) and isinstance(holder.token, str) and type(holder.pid) is int
                and all(type(x) in (int, float) and math.isfinite(x) for x in numbers) and 0 < holder.pid < 2**32):
            return None
        return holder

    def encode(self) -> bytes:
        """The lease file's content."""
        return (json.dumps(asdict(self), indent=2) + "\n").encode()

    def describe(self, now: float) -> str:
        """``host h1 pid 4242 (started 2025-01-02 10:00:00, renewed 5 s ago)``."""
        since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(self.started))
        return f"host {self.host} pid {self.pid} (started {since}, renewed {now - self.renewed:.0f} s ago)"

    def gone(self, now: float, timeout_s: float) -> str | None:
        """Why this holder no longer runs; None while it may."""
        if self.host == socket.gethostname():
            alive_since = _process_start(self.pid)
            if alive_since is None or (alive_since > 0 and abs(alive_since - self.pid_started) > 1.0):
                return f"its process {self.pid} on this host is gone"
        if now - self.renewed > timeout_s:
            return f"it was not renewed for {now - self.renewed:.0f} s ({TIMEOUT_ENV}={timeout_s:g})"
        return None


class Slot(Protocol):
    """One lease file: local (exclusive create) or in an object store (best effort)."""

    path: Any
    where: str

    def create(self, data: bytes) -> bool:
        """Write ``data`` unless the file exists; False when it does."""

    def read(self) -> bytes | None:
        """The content, None when there is no file."""

    def replace(self, data: bytes) -> None:
        """Overwrite (renewal, takeover)."""

    def remove(self) -> None:
        """Delete; a file already gone is fine."""


class LocalSlot:
    """A lease file on a filesystem (the run directory, or a mounted ``run.storage``)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.where = str(path)

    def _aside(self, data: bytes) -> Path:
        tmp = self.path.with_name(f"{self.path.name}.{uuid.uuid4().hex[:8]}.tmp")
        tmp.write_bytes(data)
        return tmp

    def create(self, data: bytes) -> bool:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self._aside(data)
        try:
            os.link(tmp, self.path)  # atomic and exclusive, and the content is complete when it appears
            return True
        except FileExistsError:
            return False
        finally:
            tmp.unlink()

    def read(self) -> bytes | None:
        try:
            return self.path.read_bytes()
        except FileNotFoundError:
            return None

    def replace(self, data: bytes) -> None:
        os.replace(self._aside(data), self.path)

    def remove(self) -> None:
        self.path.unlink(missing_ok=True)


class StoreSlot:
    """A lease object in an object store, through fsspec (``UPath``)."""

    def __init__(self, path: Any) -> None:
        self.path = path
        self.where = str(path)

    def create(self, data: bytes) -> bool:
        if self.path.exists():
            return False
        self.path.write_bytes(data)
        return self.path.read_bytes() == data  # another launch's write landed after ours: it holds the lease

    def read(self) -> bytes | None:
        try:
            return self.path.read_bytes()
        except FileNotFoundError:
            return None

    def replace(self, data: bytes) -> None:
        self.path.write_bytes(data)

    def remove(self) -> None:
        try:
            self.path.unlink()
        except FileNotFoundError:
            pass


def _slot(location: Any) -> Slot:
    return LocalSlot(location) if isinstance(location, Path) else StoreSlot(location)


class RunLease:
    """The leases of one launch: taken together, renewed by a daemon thread, released together."""

    def __init__(self, slots: list[Slot], *, timeout_s: float, say: Say, clock: Callable[[], float] = time.time) -> None:
        self.slots, self.timeout_s, self.say, self.clock = slots, timeout_s, say, clock
        self.me = Holder.me(clock())
        self._held: list[Slot] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def acquire(self) -> None:
        """Take every slot, or none: a refusal releases what was taken and raises :class:`LeaseError`."""
        try:
            for slot in self.slots:
                self._take(slot)
                self._held.append(slot)
        except BaseException:
            self.release()
            raise

    def _take(self, slot: Slot) -> None:
        for _ in range(3):  # the holder may leave between our create and our read
            if slot.create(self.me.encode()):
                return
            data = slot.read()
            if data is None:
                continue
            holder = Holder.parse(data)
            if holder is None:
                raise LeaseError(f"{slot.where} is not a lease fm-train wrote; if no launch uses this run,"
                                 " delete it and launch again")
            if holder.token == self.me.token:  # run.storage is the run directory itself
                return
            reason = holder.gone(self.clock(), self.timeout_s)
            if reason is None:
                raise LeaseError(f"run {slot.where} is in use by another launch: {holder.describe(self.clock())};"
                                 " wait for it to end or stop it, or give this launch another run.dir")
            self._take_over(slot, holder, reason)
            return
        raise LeaseError(f"{slot.where} keeps appearing and disappearing; is another launch starting? try again")

    def _take_over(self, slot: Slot, stale: Holder, reason: str) -> None:
        guard = _slot_beside(slot, ".takeover")
        if not guard.create(self.me.encode()):
            other = Holder.parse(guard.read() or b"")
            if other is not None and other.gone(self.clock(), self.timeout_s) is None:
                raise LeaseError(f"run {slot.where} is being taken over by another launch: {other.describe(self.clock())}")
            guard.replace(self.me.encode())  # a taker that died mid-takeover
        try:
            current = Holder.parse(slot.read() or b"")
            if current is None or current.token != stale.token:
                raise LeaseError(f"run {slot.where} was taken by another launch while this one took over a stale lease")
            slot.replace(self.me.encode())
        finally:
            guard.remove()
        self.say(f"lease: took over {slot.where} from {stale.describe(self.clock())}: {reason}")

    def renew(self) -> None:
        """Write a fresh renewal time into every held slot; a slot taken over meanwhile is dropped with a line."""
        now = self.clock()
        renewed = Holder(**{**asdict(self.me), "renewed": now}).encode()
        for slot in list(self._held):
            try:
                current = Holder.parse(slot.read() or b"")
                if current is None or current.token != self.me.token:
                    self._held.remove(slot)
                    who = current.describe(now) if current else "nobody"
                    self.say(f"warning: lease {slot.where} is no longer this launch's (now {who}); another launch"
                             " may be writing this run")
                    continue
                slot.replace(renewed)
            except Exception as exc:  # a full disk or a store blip (backends raise their own types): retried next time
                self.say(f"warning: cannot renew lease {slot.where} ({type(exc).__name__}: {exc})")

    def _renew_loop(self) -> None:
        while not self._stop.wait(self.timeout_s / 4):
            self.renew()

    def start_renewing(self) -> None:
        """Renew in a daemon thread until :meth:`release`."""
        self._thread = threading.Thread(target=self._renew_loop, name="fm-train-lease", daemon=True)
        self._thread.start()

    def release(self) -> None:
        """Stop renewing and remove every lease still this launch's."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        for slot in reversed(self._held):
            try:
                current = Holder.parse(slot.read() or b"")
                if current is not None and current.token == self.me.token:
                    slot.remove()
            except Exception as exc:  # the run's own outcome matters more; the lease lapses after the timeout
                self.say(f"warning: cannot remove lease {slot.where} ({type(exc).__name__}: {exc}); it lapses"
                         f" {self.timeout_s:g} s after its last renewal")
        self._held.clear()


def _slot_beside(slot: Slot, suffix: str) -> Slot:
    return _slot(slot.path.with_name(slot.path.name + suffix))


def lease_timeout_s() -> float:
    """``FM_TRAIN_LEASE_TIMEOUT_S`` or the default."""
    try:
        value = float(os.environ.get(TIMEOUT_ENV, DEFAULT_TIMEOUT_S))
    except ValueError:
        raise LeaseError(f"{TIMEOUT_ENV}={os.environ[TIMEOUT_ENV]!r} is not a number of seconds") from None
    if value <= 0:
        raise LeaseError(f"{TIMEOUT_ENV}={value:g} must be positive")
    return value


@contextmanager
def run_lease(run_dir: Path, storage: str | None, say: Say, *, timeout_s: float | None = None) -> Iterator[RunLease]:
    """Hold the leases of ``run_dir`` (and of ``run.storage`` when set) for the duration of the block."""
    slots: list[Slot] = [LocalSlot(run_dir / LEASE_NAME)]
    if storage is not None:
        slots.append(_slot(resolve_on_node(os.getcwd(), storage) / LEASE_NAME))
    lease = RunLease(slots, timeout_s=lease_timeout_s() if timeout_s is None else timeout_s, say=say)
    lease.acquire()
    lease.start_renewing()
    try:
        yield lease
    finally:
        lease.release()
