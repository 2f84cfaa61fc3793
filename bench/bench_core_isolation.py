"""How much a step on one CPU slows down when another CPU of the same machine is busy.

The upload benchmark (``bench_checkpoint_upload.py --pin``) gives the training step CPU 0 and the S3
server and upload process the other CPUs, to stand in for a node whose step runs on an accelerator.
That stands in only if the CPUs are independent. This measures it: a single-threaded step (matrix
products and a streaming update of 64 MiB) pinned to CPU 0, timed while CPU 1 runs nothing, a pure
busy loop (no memory traffic, no system calls), a memory copy of 256 MiB arrays, or loopback socket
traffic; interleaved ``--rounds`` times. On a machine whose CPUs are separate cores the busy loop
costs the step nothing; where they share a physical core (hyperthreads of a VM's host), it does.

Usage: .venv/bin/python bench/bench_core_isolation.py [--rounds 2] [--steps 15]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time

# What the other CPU runs; each is a whole Python program.
LOADS = {
    "nothing": None,
    "busy loop": "while True: pass",
    "memory copy": "import numpy as np\nx = np.ones(256 << 20 >> 3)\ny = np.empty_like(x)\nwhile True: np.copyto(y, x)",
    "socket traffic": ("import socket, threading\na, b = socket.socketpair()\nchunk = b'x' * 65536\n"
                       "threading.Thread(target=lambda: [b.recv(65536) for _ in iter(int, 1)], daemon=True).start()\n"
                       "while True: a.sendall(chunk)"),
}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=2, help="interleaved rounds over the loads (default 2)")
    parser.add_argument("--steps", type=int, default=15, help="steps timed per load and round (default 15)")
    args = parser.parse_args()
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2:
        parser.error(f"needs at least 2 CPUs, this process may use {len(cpus)}")
    os.sched_setaffinity(0, {cpus[0]})  # before torch starts threads: they inherit it
    os.environ["OMP_NUM_THREADS"] = "1"
    import torch

    torch.set_num_threads(1)
    a, b = torch.randn(1024, 1024), torch.randn(1024, 1024)
    stream = torch.randn(64 << 20 >> 2)

    def step() -> float:
        start = time.perf_counter()
        for _ in range(20):
            a @ b
        for _ in range(5):
            stream.mul_(1.0001)
        return time.perf_counter() - start

    step()
    times: dict[str, list[float]] = {name: [] for name in LOADS}
    for _ in range(args.rounds):
        for name, program in LOADS.items():
            load = None
            if program is not None:
                load = subprocess.Popen([sys.executable, "-c", program])
                os.sched_setaffinity(load.pid, {cpus[1]})
                time.sleep(1.0)  # the load is running before the first step
            try:
                times[name] += [step() for _ in range(args.steps)]
            finally:
                if load is not None:
                    load.kill()
                    load.wait()
    base = statistics.median(times["nothing"])
    print(f"step pinned to CPU {cpus[0]}, load on CPU {cpus[1]}; {args.rounds} rounds x {args.steps} steps;"
          f" load avg {os.getloadavg()[0]:.1f}")
    for name, values in times.items():
        median = statistics.median(values)
        print(f"CPU {cpus[1]} running {name:15s} step median {median * 1e3:7.1f} ms ({median / base:.2f} x)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
