"""The driver's echo of worker output: fm-train's own lines reach the console, known third-party noise only
the rank's log file, which keeps every line."""

from __future__ import annotations

import io
import os
import subprocess
import sys
from pathlib import Path

import pytest

from launcher.logsink import LogSink, known_noise
from launcher.placement import Placement, RankPlacement
from fm_train.dist.topology import Topology

ROOT = Path(__file__).resolve().parents[1]

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


START_RAY = """
import os, sys
os.environ.pop("RAY_AUTH_MODE", None)
if sys.argv[1] == "fm-train":
    from launcher.cluster import connect
    connect(None).close()  # the launcher's own private local Ray
else:
    import ray
    ray.init(address="local", include_dashboard=False, log_to_driver=False, configure_logging=False)
    ray.shutdown()
"""


@pytest.mark.ray
@pytest.mark.timeout(180)
def test_the_drivers_ray_start_notice_stays_off_the_console(tmp_path: Path) -> None:
    """A real private Ray started by the launcher prints no token-authentication notice; the same ``ray.init``
    without the filter does (so the pattern still matches what this Ray version says)."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_AUTH_MODE"}
    env.update(PYTHONPATH=str(ROOT), RAY_USAGE_STATS_ENABLED="0")
    out = {who: subprocess.run([sys.executable, "-c", START_RAY, who], capture_output=True, text=True, cwd=tmp_path,
                               env=env, timeout=150) for who in ("fm-train", "plain")}
    assert all(o.returncode == 0 for o in out.values()), {w: o.stderr[-2000:] for w, o in out.items()}
    notice = "Token authentication is enabled for this Ray cluster"
    assert notice in out["plain"].stderr and notice not in out["fm-train"].stdout + out["fm-train"].stderr
