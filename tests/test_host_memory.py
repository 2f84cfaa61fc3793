"""The CPU rank's allocator policy (fm_train.dist.host_memory), measured in a fresh process each."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from fm_train.dist.host_memory import HostMemory

pytestmark = pytest.mark.unit

_PROBE = r"""
import json, sys
import psutil, torch
from fm_train.dist.host_memory import HostMemory

memory = HostMemory.configure(sys.argv[1], gpu=False)
rss = lambda: psutil.Process().memory_info().rss / 2**20
def step(mib):  # a step's activations: 1 MiB tensors, freed when it ends
    blocks = [torch.ones(256 * 1024) for _ in range(mib)]
    held = rss()
    del blocks
    return held
for _ in range(3):  # the working set settles: 16 MiB of activations
    step(16)
    memory.trim()
base = rss()
steady = [step(16) for _ in range(3)]
for _ in range(3):
    memory.trim()
after_steady = rss()
blocks = [torch.ones(256 * 1024) for _ in range(96)]  # a heap fragmented by 96 MiB of holes:
pin = torch.ones(64 * 1024)  # a later block stays live above them, so free() cannot give them back
held = rss()
del blocks
freed = rss()
memory.trim()
print(json.dumps({"held": held - base, "freed": freed - base, "trimmed": rss() - base,
                  "steady": after_steady - base, "trims": memory.trims}))
"""


def _probe(policy: str) -> dict[str, float]:
    out = subprocess.run([sys.executable, "-c", _PROBE, policy], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_reuse_keeps_the_working_set_and_trims_only_what_outgrows_it():
    reuse, small = _probe("reuse"), _probe("small")
    # Steps within the working set reuse the heap: nothing returned, nothing trimmed.
    assert abs(reuse["steady"]) < 8 and reuse["trims"] == 1, reuse
    assert reuse["held"] > 80 and small["held"] > 80  # MiB: resident while alive
    # reuse: the holes stay resident until the step ends, then the growth past the working set's mark is
    # given back; small: each block was its own mmap, gone at free() (and faulted in again next time).
    assert reuse["freed"] > 60, reuse
    assert reuse["trimmed"] < 24, reuse
    assert small["freed"] < 16 and small["trims"] == 0, small


def test_policies_are_checked_and_gpu_ranks_left_alone(monkeypatch):
    monkeypatch.setenv("FM_TRAIN_HOST_MALLOC", "jemalloc")
    with pytest.raises(ValueError, match=r"FM_TRAIN_HOST_MALLOC='jemalloc' is not one of reuse, small, glibc"):
        HostMemory.configure(gpu=False)
    gpu = HostMemory.configure("reuse", gpu=True)
    gpu.trim()  # a no-op: no libc handle
    assert gpu._libc is None


def test_the_plan_picks_the_policy_and_the_variable_overrides_it(monkeypatch):
    from fm_train.dist.host_memory import REUSE_HEADROOM, policy_for, requested_policy

    monkeypatch.delenv("FM_TRAIN_HOST_MALLOC", raising=False)
    assert requested_policy() is None
    # Room for what the heap keeps: reuse; a plan near the budget: small (RSS at the plan); unknown: reuse.
    assert policy_for(2.0, 2.0 * REUSE_HEADROOM) == "reuse"
    assert policy_for(9.5, 9.6) == "small"
    assert policy_for(None, 9.6) == policy_for(9.5, None) == "reuse"
    # gpu=True: the choice is made and recorded, and this test process's allocator is left as it is.
    assert HostMemory.configure(gpu=True, plan_gib=9.5, budget_gib=9.6).policy == "small"
    monkeypatch.setenv("FM_TRAIN_HOST_MALLOC", "reuse")
    assert HostMemory.configure(gpu=True, plan_gib=9.5, budget_gib=9.6).policy == "reuse"
    assert HostMemory.configure("glibc", gpu=True, plan_gib=9.5, budget_gib=9.6).policy == "glibc"


def test_the_worker_plans_its_peak_with_what_zero3_gathers_and_what_it_offloads(tiny_config_dict):
    from fm_train.config import build_config
    from fm_train.dist.host_memory import policy_for
    from fm_train.engine.build import memory_budget_gib, planned_peak_gib
    from fm_train.families import family_of
    from fm_train.plan.memory import GIB, estimate_memory, zero3_gathered

    def cfg_with(**parallel):
        return build_config({**tiny_config_dict, "parallel": {**tiny_config_dict.get("parallel", {}), **parallel}})

    cfg = cfg_with(zero_stage=3)
    family = family_of(cfg.model)
    budget = memory_budget_gib(cfg)
    # A tiny model on this host: the budget holds the whole stage (a CPU reduce bucket), and the heap's reuse.
    assert zero3_gathered(cfg, family, device="cpu", budget_gib=budget).reduce_bucket is not None
    peak = planned_peak_gib(cfg, family)
    assert peak > estimate_memory(cfg, family, device="cpu").device_total / GIB  # more than two blocks gathered
    assert policy_for(peak, budget) == "reuse"
    # ZeRO-Offload on a CPU rank: the offloaded states are on the same host, so in the rank's plan.
    offload = cfg_with(zero_stage=2, offload_optimizer=True)
    est = estimate_memory(offload, family, device="cpu")
    assert est.offloaded_optimizer > 0
    assert planned_peak_gib(offload, family) == pytest.approx((est.device_total + est.offloaded_optimizer) / GIB)
