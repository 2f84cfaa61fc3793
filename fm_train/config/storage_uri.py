"""Object-store URIs in a config (``s3://bucket/prefix``): the scheme is known and its backend installed.

Checked at load time, before any process starts, without importing the backend or touching the
network (the data and checkpoint code reach the store through fsspec; the preflight and the first
read report a missing bucket or refused credentials). Torch- and fsspec-free, like the rest of the
config package.
"""

from __future__ import annotations

import importlib.util
import re

#: Scheme -> the package that serves it through fsspec (pip name, then import name).
BACKENDS: dict[str, tuple[str, str]] = {
    "s3": ("s3fs", "s3fs"), "s3a": ("s3fs", "s3fs"),
    "gs": ("gcsfs", "gcsfs"), "gcs": ("gcsfs", "gcsfs"),
    "az": ("adlfs", "adlfs"), "abfs": ("adlfs", "adlfs"), "abfss": ("adlfs", "adlfs"),
    "memory": ("fsspec", "fsspec"),
}
_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")


def uri_scheme(value: str) -> str | None:
    """The scheme of an object-store URI (``"s3"``); None for a local path or a ``file://`` URI."""
    m = _SCHEME.match(value)
    scheme = m.group(1).lower() if m else None
    return None if scheme == "file" else scheme


def uri_errors(field: str, value: str) -> list[str]:
    """Why ``value`` (set as ``field``) cannot be used: an unknown scheme or a backend not installed."""
    scheme = uri_scheme(value)
    if scheme is None:
        return []
    if scheme not in BACKENDS:
        known = ", ".join(f"{s}://" for s in sorted(BACKENDS))
        return [f"{field}={value!r}: unknown storage scheme {scheme}:// (a typo?); use a local path or one of {known}"]
    package, module = BACKENDS[scheme]
    if importlib.util.find_spec(module) is None:
        extra = " (pip install 'fm-train[s3]')" if package == "s3fs" else ""
        return [f"{field}={value!r}: {scheme}:// needs the {package} package, which is not installed;"
                f" install it{extra}"]
    return []
