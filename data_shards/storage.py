"""Where shard directories live: a local (or shared) path, or an object-store URI that fsspec reads.

``s3://bucket/prefix`` (and ``gs://``, ``az://``, ... whatever fsspec has a backend for) becomes a
``UPath`` (universal-pathlib: the ``pathlib`` API over fsspec), so index, tokenizer and checks read
the same way from both; a plain path or ``file://`` URI stays a ``pathlib.Path`` and keeps the
``preadv`` fast path of :mod:`data_shards.sample_reader`. Credentials and endpoints are the backends'
own business (``AWS_ENDPOINT_URL``, ``AWS_ACCESS_KEY_ID`` / ``AWS_SECRET_ACCESS_KEY``, profiles,
instance roles): nothing here reads, stores or prints them.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Union

from .errors import DataError

_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")
#: The package a backend needs, named in the error when it is missing (fsspec's own names). The config's
#: load-time check (fm_train/config/storage_uri.py) has its own table: this package never imports fm_train.
_BACKEND_PACKAGES = {"s3": "s3fs", "s3a": "s3fs", "gs": "gcsfs", "gcs": "gcsfs", "az": "adlfs", "abfs": "adlfs",
                     "abfss": "adlfs"}

Location = Union[Path, Any]  # a pathlib.Path, or a upath.UPath for an object-store URI


def scheme_of(location: str | os.PathLike) -> str | None:
    """The URI scheme of ``location`` (``"s3"``), or None for a plain path."""
    m = _SCHEME.match(str(location))
    return m.group(1).lower() if m else None


def as_location(location: str | os.PathLike, *, what: str = "path") -> Location:
    """``location`` as a ``pathlib.Path`` (plain path or ``file://``) or a ``UPath`` (object store).

    A scheme fsspec does not know, or one whose backend package is not installed, is a
    :class:`DataError` naming ``what`` (e.g. ``data.sources[0].path``), the URI and the fix.
    """
    if isinstance(location, Path):
        return location
    text = str(location)
    scheme = scheme_of(text)
    if scheme is None:
        return Path(text)
    if scheme == "file":
        return Path(text[len("file://"):])
    import fsspec
    from upath import UPath

    try:
        fsspec.get_filesystem_class(scheme)
    except ValueError:
        raise DataError(f"{what} {text!r}: unknown storage scheme {scheme!r}:// (a typo?); use a local path or a "
                        f"URI fsspec knows, such as s3://bucket/prefix") from None
    except ImportError:
        package = _BACKEND_PACKAGES.get(scheme, f"the fsspec backend for {scheme}://")
        extra = " (pip install 'fm-train[s3]')" if package == "s3fs" else ""
        raise DataError(f"{what} {text!r}: {scheme}:// needs {package}, which is not installed; install it{extra}") \
            from None
    return UPath(text)


def remote_error(location: object, exc: BaseException) -> DataError:
    """A :class:`DataError` for an object-store call that failed (no such bucket, no permission, no
    credentials, the endpoint unreachable), naming the location and what the backend said."""
    hint = ""
    text = f"{type(exc).__name__}: {exc}"
    if "credential" in text.lower():
        hint = "; set AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY (or a profile or instance role)"
    elif isinstance(exc, FileNotFoundError) or "NoSuchBucket" in text:
        hint = "; check the bucket and prefix"
    elif isinstance(exc, PermissionError) or "AccessDenied" in text:
        hint = "; the credentials in use may not read or write there"
    return DataError(f"object storage at {location}: {text}{hint}")


def read_range(location: Location, start: int, end: int) -> bytes:
    """Bytes ``[start, end)`` of a file (fewer at its end): a seek and a read, or one ranged GET."""
    if isinstance(location, Path):
        with open(location, "rb") as f:
            f.seek(start)
            return f.read(end - start)
    return location.fs.cat_file(location.path, start=start, end=end)
