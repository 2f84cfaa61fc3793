"""Checks that what fm-train overrides or reaches into on a DeepSpeed object still exists.

Overriding a method DeepSpeed no longer calls (it was renamed) is a silent no-op: the override is
never run and the behaviour it changed comes back unnoticed. Each adapter module therefore names, at
import, the class attributes it overrides or calls below the public API (:func:`check_overrides`);
attributes DeepSpeed sets per instance in ``__init__`` (no class attribute to check) are checked on
the object right before use (:func:`require_instance_attributes`).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any


class MissingOverrideError(ImportError):
    """A DeepSpeed attribute fm-train overrides or relies on is gone (renamed by an upgrade)."""


def check_overrides(owner: type, names: Iterable[str]) -> None:
    """Raise :class:`MissingOverrideError` naming ``owner.name`` for each of ``names`` the class lacks."""
    missing = [name for name in names if not hasattr(owner, name)]
    if missing:
        where = f"{owner.__module__}.{owner.__qualname__}"
        raise MissingOverrideError(
            f"fm-train's DeepSpeed adapter overrides or uses {', '.join(f'{where}.{m}' for m in missing)}, which "
            "the installed DeepSpeed lacks (renamed or removed by an upgrade); the override would silently do "
            "nothing: port fm_train/deepspeed_adapter to this release")


def require_instance_attributes(obj: Any, names: Iterable[str]) -> None:
    """Raise :class:`MissingOverrideError` unless ``obj`` itself (its ``__dict__``, not a wrapped module
    reached through ``__getattr__``) has each of ``names``."""
    own = vars(obj)
    missing = [name for name in names if name not in own]
    if missing:
        raise MissingOverrideError(
            f"fm-train's DeepSpeed adapter sets or reads {', '.join(missing)} on {type(obj).__qualname__}, which "
            "this DeepSpeed no longer sets (renamed by an upgrade); port fm_train/deepspeed_adapter to this release")
