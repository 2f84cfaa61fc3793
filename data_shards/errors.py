"""The exception types of data_shards: bad input or bad shards, with a message that says what to do."""

from __future__ import annotations


class DataError(ValueError):
    """Bad input, a bad or inconsistent shard directory, or a resume state that does not fit.

    The message names the file or directory at fault and the command or setting that fixes it.
    """


class BadShardError(DataError):
    """A shard found bad while its samples were read (truncated, overwritten, unreadable).

    ``key`` names it the way ``skip_shards`` and the data state's ``skipped_shards`` do:
    ``"<source index>:<shard file name>"``. A rank cannot leave the shard out on its own in the
    middle of a step (its peers read other samples and would wait for it), so the trainer records the
    key and restarts, and every rank leaves the shard out from the start.
    """

    def __init__(self, message: str, key: str) -> None:
        super().__init__(message)
        self.key = key
