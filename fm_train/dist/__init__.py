"""Distributed layout: pure topology math and (later) process-group creation from the rank environment."""

from fm_train.dist.errors import DistError
from fm_train.dist.topology import RankCoord, Topology, node_slot

__all__ = ["DistError", "RankCoord", "Topology", "node_slot"]
