"""What software a node runs, so that a mismatch stops the launch before step 1, naming the node.

Ray refuses a node with another Ray version, but not one with another fm-train or torch: such a run
fails later and obscurely (a pickled config field the other side does not know, a different kernel,
a different checkpoint format). The fingerprint of fm-train's own sources catches a node whose checkout
is behind even when the package version string is the same.
"""

from __future__ import annotations

import hashlib
from importlib import metadata
from pathlib import Path
from typing import Mapping

_PACKAGES = ("fm_train", "launcher", "data_shards")
# Ray checks its own version (and Python's) when a node joins; these it does not.
_DISTRIBUTIONS = ("fm-train", "torch", "deepspeed")


def _dist_version(name: str) -> str:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return "not installed"


def source_fingerprint(root: Path | None = None) -> str:
    """A short hash over the ``.py`` files of fm-train's packages (paths and contents)."""
    root = Path(__file__).resolve().parents[1] if root is None else root
    digest = hashlib.sha256()
    for package in _PACKAGES:
        for path in sorted((root / package).rglob("*.py")):
            digest.update(str(path.relative_to(root)).encode())
            digest.update(b"\0")
            digest.update(path.read_bytes())
    return digest.hexdigest()[:12]


def software() -> dict[str, str]:
    """This process's view: the distributions that matter and fm-train's source fingerprint."""
    out: dict[str, str] = {}
    out.update({name: _dist_version(name) for name in _DISTRIBUTIONS})
    out["fm-train source"] = source_fingerprint()
    return out


def mismatches(driver: Mapping[str, str], node: Mapping[str, str]) -> list[str]:
    """``name: node X, driver Y`` for every entry that differs (pure; unit-tested)."""
    return [f"{name} {node.get(name, 'unknown')} (driver: {want})" for name, want in driver.items()
            if node.get(name) != want]
