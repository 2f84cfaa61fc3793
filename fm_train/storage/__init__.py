"""Object storage for runs (``run.storage``): where a run's files go and come back from.

Checkpoint uploads and their commit in storage (:mod:`.upload`, copies made by the low-priority child
process of :mod:`.upload_process`), files fetched back (:mod:`.fetch`), DeepSpeed files read in place by
ranged reads (:mod:`.ranged_reads`), the run's logs and final model copied out (:mod:`.log_copies`).
Below ``fm_train.checkpoint``: nothing here imports it. This ``__init__`` imports nothing.
"""
