"""Ray launcher: start or join a cluster, place one worker per device slot, run and supervise them.

The launcher knows commands and resources, never training code: each rank runs the worker command
(``python -m fm_train.cli worker CONFIG`` by default) as a subprocess with the torchrun-style rank
environment. Nothing here imports torch or deepspeed; Ray itself is imported only when a command
needs it, so ``fm-train --help`` stays fast.
"""
