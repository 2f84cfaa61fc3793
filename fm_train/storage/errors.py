"""The error of a checkpoint that cannot be written, found or used.

Defined here, the lowest layer that raises it (storage, and the DeepSpeed file readers of
:mod:`fm_train.deepspeed_adapter`), so that every layer raises the one type the worker and the
converter report; :mod:`fm_train.checkpoint` re-exports it.
"""


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be written, found or used; the message names the path and the fix."""
