"""The distributed layer's own error type: every error :mod:`fm_train.dist` defines derives from it.

:class:`DistError` derives from ``Exception`` only, so that each error keeps the kind it has always
had besides: :class:`~fm_train.dist.rendezvous.RendezvousError` is a ``RuntimeError`` (the worker's
rendezvous exit code), :class:`~fm_train.dist.device.DeviceError` a ``ConfigError`` (a config that
does not fit the hardware: exit 2, not retried).
"""


class DistError(Exception):
    """A rank's distributed setup failed: its device, its rendezvous with its peers."""
