"""The driver's echo of worker output: fm-train's own lines reach the console, known third-party noise only
the rank's log file, which keeps every line."""

from __future__ import annotations

import io
from pathlib import Path

from launcher.logsink import LogSink, known_noise
from launcher.placement import Placement, RankPlacement
from fm_train.dist.topology import Topology

NOISE = [
    "[2026-12-07 01:15:41,036] [WARNING] [real_accelerator.py:213:get_accelerator] Setting accelerator to CPU. If you"
    " have GPU or other accelerator, we were unable to detect it.",
    "DeepSpeed deepspeed.ops.comm.deepspeed_shm_comm_op built successfully",
    "/x/torch/distributed/c10d_logger.py:83: FutureWarning: `torch.distributed.all_gather_into_tensor` is deprecated."
    " Please use `torch.distributed.all_gather_single` instead.",
    "  return func(*args, **kwargs)",
]
OWN = [
    "fm-train worker: world 2 = dp 2 x tp 1 x pp 1 (gloo), ZeRO-2, fp32, llama, 1.25M params",
    "step 10 | loss 8.1756 | lr 1.00e-03 | gnorm 4.772",
    "[WARNING] [engine.py:1] something DeepSpeed says that is not known to be harmless",
    "Traceback (most recent call last):",
]


def test_known_noise_stays_in_the_file_and_off_the_console(tmp_path: Path) -> None:
    assert all(known_noise(line) for line in NOISE) and not any(known_noise(line) for line in OWN)
    console = io.StringIO()
    sink = LogSink(tmp_path, echo_all=False, out=console)
    rank = RankPlacement(rank=0, bundle_index=0, node_id="n" * 16, node_ip="127.0.0.1", node_rank=0, local_rank=0,
                         local_world_size=1, gpu_ids=(), node_gpu_ids=(), dp=0, pp=0, tp=0)
    sink.begin_attempt(Placement(ranks=(rank,), topology=Topology(1)), attempt=1)
    for line in NOISE[:2] + OWN:
        sink.write(0, "out", line)
    for line in NOISE[2:]:
        sink.write(0, "err", line)
    sink.close()
    echoed = console.getvalue().splitlines()
    assert echoed == [f"[rank 0 node 127.0.0.1] {line}" for line in OWN]
    kept = (tmp_path / "logs/rank_000.log").read_text()
    assert all(line in kept for line in NOISE + OWN)
    assert sink.last_lines(0)[-1] == NOISE[-1]  # failure reports still see everything
