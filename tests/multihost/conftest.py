"""Fixtures of the multi-host suite: one namespaced two-host Ray cluster (plus a laptop host) per session.

Starting Ray on two hosts costs about 15 s and a launch about half a minute, so the hosts, the
cluster and the uninterrupted reference run are shared by every test of the package (and torn down
when it ends, not at the end of the session). A test that takes a host down brings it back
(:func:`hosts.revive`) before it ends.

Skipped with the reason where namespaces cannot be made (not root, no ``ip``), except under
``CI=true``, where a missing capability fails the suite instead of hiding it.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Iterator

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "chaos"))  # chaos_runs, chaos_faults
sys.path.insert(0, str(Path(__file__).resolve().parent))

from hosts import Network, RayCluster, capability_problem, host, start_s3  # noqa: E402


@pytest.fixture(scope="package")
def network() -> Iterator[Network]:
    """The private switch with three hosts: ``a`` (Ray head, driver), ``b`` (Ray worker), ``laptop``."""
    problem = capability_problem()
    if problem:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"multi-host tests cannot run in CI: {problem}")
        pytest.skip(problem)
    net = Network()
    try:
        net.create()
        for name in ("a", "b", "laptop"):
            net.add_host(name)
        yield net
    finally:
        net.destroy()


@pytest.fixture(scope="package")
def s3_env(network: Network, tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """An S3 server on host a (moto's), reachable from every host: the AWS environment that reaches it."""
    _, env = start_s3(host(network, "a"), tmp_path_factory.mktemp("s3") / "moto.log")
    return env  # the server dies with host a's namespace (network.destroy kills its processes)


@pytest.fixture(scope="package")
def cluster(network: Network, s3_env: dict[str, str]) -> RayCluster:
    """Ray head on host a and a worker node on host b, 2 CPUs each, token authentication on; every
    host's Ray (so every worker) has the object store's endpoint and credentials."""
    ray = RayCluster(head=host(network, "a"), extra_env=s3_env)
    ray.start_head()
    ray.join(host(network, "b"))
    ray.wait_for_nodes(2)
    return ray
