"""The one exception type of data_shards: bad input or bad shards, with a message that says what to do."""

from __future__ import annotations


class DataError(ValueError):
    """Bad input, a bad or inconsistent shard directory, or a resume state that does not fit.

    The message names the file or directory at fault and the command or setting that fixes it.
    """
