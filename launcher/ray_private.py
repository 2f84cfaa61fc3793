"""Every use of Ray's private modules (``ray._private``), in one place.

Ray offers no public API for either need below; each function says why it is needed, and a Ray
upgrade that moves these names breaks here and nowhere else.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence


def set_cluster_mode(enabled: bool) -> None:
    """Set Ray's switch that makes a node advertise (and bind to) its routable IP instead of 127.0.0.1.

    The switch is the environment variable ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER`` (the one Ray's own
    messages name), but Ray reads it once, into ``ray._private.ray_constants.ENABLE_RAY_CLUSTER``, when
    Ray is first imported; a process that imported Ray before must set the constant too.
    """
    from ray._private import ray_constants

    ray_constants.ENABLE_RAY_CLUSTER = enabled


def zip_like_ray(working_dir: Path, dest: Path, excludes: Sequence[str]) -> None:
    """Zip ``working_dir`` into ``dest`` with Ray's runtime-env packaging: Ray's default excludes, then
    ``excludes``, and every ``.gitignore``/``.rayignore`` on the way (``.gitignore`` always honoured).

    Ray's packaging has no public API. Raises ImportError when this Ray lacks it: the caller must fail
    loudly then, never upload the directory some other way.
    """
    from ray._private.ray_constants import get_runtime_env_default_excludes
    from ray._private.runtime_env.packaging import create_package

    create_package(str(working_dir), dest, include_gitignore=True,
                   excludes=[*get_runtime_env_default_excludes(), *excludes])
