"""The DeepSpeed release range fm-train supports, checked when the adapter first imports ``deepspeed``.

The adapter overrides and reads DeepSpeed internals (``zero.Init``'s per-parameter hook, optimizer
flat groups, the 0.19 checkpoint layout) that change between minor releases; running on another
release would at best fail deep inside a step and at worst do something else silently. So every
adapter module imports this one before ``deepspeed``'s submodules, and an unsupported release stops
the import with a message naming the installed and the supported versions.
"""

from __future__ import annotations

import re

import deepspeed

#: The range the project pins (pyproject.toml: ``deepspeed>=0.19,<0.20``), as (major, minor) bounds.
SUPPORTED_MIN = (0, 19)
SUPPORTED_BELOW = (0, 20)
SUPPORTED = ">=0.19,<0.20"


class UnsupportedDeepSpeedError(ImportError):
    """The installed DeepSpeed is outside the range fm-train's adapter was written and tested against."""


def _major_minor(version: str) -> tuple[int, int] | None:
    match = re.match(r"^\s*v?(\d+)\.(\d+)", version)
    return (int(match.group(1)), int(match.group(2))) if match else None


def check_version(version: str | None = None) -> str:
    """Raise :class:`UnsupportedDeepSpeedError` unless ``version`` (default: the installed
    ``deepspeed.__version__``) lies in :data:`SUPPORTED`; returns the version checked."""
    installed = str(deepspeed.__version__ if version is None else version)
    parsed = _major_minor(installed)
    if parsed is None or not SUPPORTED_MIN <= parsed < SUPPORTED_BELOW:
        raise UnsupportedDeepSpeedError(
            f"fm-train supports DeepSpeed {SUPPORTED} but deepspeed {installed} is installed: its adapter "
            f"(fm_train/deepspeed_adapter) overrides DeepSpeed internals of that range; install a supported "
            f"release (pip install 'deepspeed{SUPPORTED}') or port the adapter and widen the range")
    return installed


check_version()
