"""Hugging Face datasets as shard-building inputs: a directory written by ``save_to_disk``, and a
dataset in the local Hugging Face cache named ``hf:NAME`` or ``hf:NAME:CONFIG``.

Both are read through ``datasets`` as memory-mapped Arrow tables, in batches of rows, so a large
dataset is streamed from disk rather than loaded whole. Cache lookups are offline: shard building
never contacts the Hub (a dataset must have been downloaded before, e.g. by ``load_dataset`` on a
machine with access, and the cache copied here); ``HF_DATASETS_CACHE`` / ``HF_HOME`` say where the
cache is, as for ``datasets`` itself.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Any, Iterator

from .errors import DataError

CACHE_PREFIX = "hf:"
_SAVED_DATASET = "state.json"  # Dataset.save_to_disk
_SAVED_DATASET_DICT = "dataset_dict.json"  # DatasetDict.save_to_disk


def is_saved_dataset(path: str) -> bool:
    """A directory written by ``Dataset.save_to_disk`` or ``DatasetDict.save_to_disk``."""
    return os.path.isfile(os.path.join(path, _SAVED_DATASET)) or os.path.isfile(os.path.join(path, _SAVED_DATASET_DICT))


def parse_cache_name(spec: str) -> tuple[str, str | None]:
    """``hf:NAME`` / ``hf:NAME:CONFIG`` -> (name, config); a DataError when the name is empty."""
    name, _, config = spec[len(CACHE_PREFIX):].partition(":")
    if not name:
        raise DataError(f"input {spec!r}: name a dataset, e.g. hf:user/dataset or hf:user/dataset:config")
    return name, config or None


@contextlib.contextmanager
def _offline(datasets: Any) -> Iterator[None]:
    """datasets reads HF_HUB_OFFLINE when it is imported; set its flag for the call, so a cache miss
    is an immediate error instead of network timeouts (shard builds never download)."""
    before = datasets.config.HF_HUB_OFFLINE
    datasets.config.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        datasets.config.HF_HUB_OFFLINE = before


def open_dataset(path: str, kind: str, split: str, text_field: str | None) -> Any:
    """The ``datasets.Dataset`` of one input (``kind`` ``hf_disk`` or ``hf_cache``), reduced to
    ``text_field``, checked to be a string column (None: all columns, unchecked); a DataError naming
    the input otherwise."""
    import datasets

    datasets.disable_progress_bars()
    if kind == "hf_disk":
        try:
            loaded = datasets.load_from_disk(path)
        except Exception as exc:  # datasets raises several types for a damaged directory
            raise DataError(f"{path} is not a readable saved dataset (save_to_disk): "
                            f"{type(exc).__name__}: {exc}") from exc
        where = path
    else:
        name, config = parse_cache_name(path)
        try:
            with _offline(datasets):
                loaded = datasets.load_dataset(name, config, split=split)
        except Exception as exc:
            what = f"{name!r} (config {config!r})" if config else repr(name)
            cache = datasets.config.HF_DATASETS_CACHE
            raise DataError(f"input {path}: no split {split!r} of {what} in the local Hugging Face cache ({cache}): "
                            f"{type(exc).__name__}: {exc}. Download it first with datasets.load_dataset where the "
                            "Hub is reachable, or pass --split") from exc
        where = f"{path} (split {split})"
    if isinstance(loaded, datasets.DatasetDict):
        if split not in loaded:
            raise DataError(f"{path} holds splits {', '.join(loaded)}, not {split!r}; pass --split NAME")
        loaded, where = loaded[split], f"{path} (split {split})"
    if text_field is None:
        return loaded
    if text_field not in loaded.column_names:
        raise DataError(f"{where} has no column {text_field!r} (columns: {', '.join(loaded.column_names)}); "
                        "pass --text-field NAME")
    feature = loaded.features[text_field]
    if getattr(feature, "dtype", None) not in ("string", "large_string"):
        raise DataError(f"{where}: column {text_field!r} has type {feature}, not string")
    return loaded.select_columns([text_field])


def dataset_bytes(dataset: Any) -> int:
    """Bytes of the Arrow files behind ``dataset`` (what the tokenizer-training sample is sized against)."""
    return sum(Path(f["filename"]).stat().st_size for f in dataset.cache_files) or int(dataset.data.nbytes)
