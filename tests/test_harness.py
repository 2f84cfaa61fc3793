"""The gloo test harness itself: real processes, results by rank, failures surfaced with the rank."""

import pytest
import torch
import torch.distributed as dist

from distributed import run_distributed

pytestmark = pytest.mark.multiproc


def _allreduce_rank() -> float:
    t = torch.tensor([float(dist.get_rank())])
    dist.all_reduce(t)
    return t.item()


def _fail_on_rank_one() -> None:
    if dist.get_rank() == 1:
        raise ValueError("boom on purpose")


def test_collective_runs_on_every_rank():
    assert run_distributed(_allreduce_rank, world_size=3) == [3.0, 3.0, 3.0]


def test_failure_names_the_rank():
    with pytest.raises(RuntimeError, match=r"rank 1 failed:(.|\n)*boom on purpose"):
        run_distributed(_fail_on_rank_one, world_size=2, timeout_s=60)
