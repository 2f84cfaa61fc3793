"""The pure rules behind multi-host runs: interface choice, layout shrinking, per-rank hangs, software
checks, rendezvous messages and the preflight's verdicts (no Ray, no processes)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fm_train.config import build_config
from fm_train.dist.env import RankEnv
from fm_train.dist.heartbeat import Heartbeat, read_heartbeat
from fm_train.dist.rendezvous import RendezvousError, explain, wait_for_master
from launcher.elastic import Layout, choose_layout, placeable, wait_for_room, with_layout
from launcher.monitor import stalled_rank
from launcher.netif import choose_interface, interface_for_ip, socket_env
from launcher.preflight import DRIVER, NodeProbe, _data_problems, _storage_problems, check_node, write_probe
from launcher.versions import mismatches, software

pytestmark = pytest.mark.unit


def test_loopback_is_found_on_its_interface():
    assert interface_for_ip("127.0.0.1") is not None
    assert interface_for_ip("203.0.113.77") is None and interface_for_ip("not an ip") is None


def test_interface_precedence_config_then_node_env_then_detected():
    assert choose_interface("ib0", {"GLOO_SOCKET_IFNAME": "eth9"}, "eth1").ifname == "ib0"
    node = choose_interface(None, {"GLOO_SOCKET_IFNAME": "eth9"}, "eth1")
    assert (node.ifname, node.label()) == ("eth9", "eth9 (node env)")
    assert choose_interface(None, {}, "eth1").label() == "eth1"
    assert choose_interface(None, {}, None).label() == "-"
    # A variable the user exported on the node is left alone; the config overrides both.
    assert socket_env(choose_interface(None, {}, "eth1"), {}) == {"GLOO_SOCKET_IFNAME": "eth1",
                                                                  "NCCL_SOCKET_IFNAME": "eth1"}
    assert socket_env(node, {"GLOO_SOCKET_IFNAME": "eth9"}) == {"NCCL_SOCKET_IFNAME": "eth9"}
    assert socket_env(choose_interface("ib0", {}, "eth1"), {"NCCL_SOCKET_IFNAME": "x"})["NCCL_SOCKET_IFNAME"] == "ib0"


def _cfg(workers: int = 4, tp: int = 1, grad_accum: int = 1, min_workers: int | None = None, micro: int = 2):
    return build_config({"parallel": {"tp": tp, "zero_stage": 1},
                         "model": {"n_layers": 2, "hidden": 64, "n_heads": 4, "n_kv_heads": 2, "ffn_hidden": 172,
                                   "vocab_size": 512, "max_seq_len": 64}, "data": {"seq_len": 32},
                         "train": {"micro_batch": micro, "grad_accum": grad_accum},
                         "cluster": {"workers": workers, "min_workers": min_workers}})


def test_full_layout_when_it_fits_else_smaller_with_the_same_global_batch():
    assert choose_layout(_cfg(4, min_workers=2), [2, 2]) == Layout(4, 1)
    assert choose_layout(_cfg(4, min_workers=2), [2]) == Layout(2, 2)
    assert choose_layout(_cfg(2, min_workers=1), [1]) == Layout(1, 2)
    # dp 3 does not divide a global batch of 4 micro-batches: 3 workers are skipped for 2.
    assert choose_layout(_cfg(4, min_workers=1), [3]) == Layout(2, 2)
    # tp 2 groups stay on one node: 3 + 1 free slots hold one tp pair plus two odd slots, not two pairs.
    assert not placeable(4, 2, [3, 1]) and placeable(2, 2, [3, 1])
    assert choose_layout(_cfg(4, tp=2, min_workers=2), [3, 1]) == Layout(2, 2)
    # No node holds a whole group any more: groups cross nodes (the placement warns), as at launch.
    assert placeable(2, 2, [1, 1])


def test_no_shrinking_without_min_workers_and_reasons_name_the_fix():
    why = choose_layout(_cfg(4), [2])
    assert isinstance(why, str) and "cluster.min_workers" in why and "2 free slot" in why
    why = choose_layout(_cfg(4, tp=2, min_workers=4), [3])
    assert isinstance(why, str) and "cluster.min_workers" in why


def test_a_shrunk_config_is_new_and_valid():
    configured = _cfg(4, min_workers=2)
    smaller = with_layout(configured, Layout(2, 2))
    assert (smaller.cluster.workers, smaller.train.grad_accum, smaller.global_batch) == (2, 2, configured.global_batch)
    assert configured.cluster.workers == 4


def test_wait_for_room_returns_as_soon_as_a_node_joins_or_when_the_wait_is_over():
    said: list[str] = []
    clock = iter(range(1000))
    answers = iter([[2], [2], [2, 2]])
    slots = wait_for_room(build_config({"cluster": {"workers": 4, "node_wait_s": 100}}), lambda: next(answers),
                          stop=lambda: False, say=said.append, clock=lambda: float(next(clock)), sleep=lambda s: None)
    assert slots == [2, 2] and "waiting up to 100s" in said[0] and "room for all 4" in said[-1]
    slots = wait_for_room(build_config({"cluster": {"workers": 4, "node_wait_s": 3}}), lambda: [2], stop=lambda: False,
                          say=said.append, clock=lambda: float(next(clock)), sleep=lambda s: None)
    assert slots == [2]


def test_the_rank_whose_heartbeat_stops_is_the_suspect_however_much_others_print():
    beats = {0: ((7, "step"), 1.0), 1: ((6, "step"), 30.0)}
    rank, why = stalled_rank(beats, set(), step_timeout_s=10, startup_timeout_s=100)
    assert rank == 1 and "after step 6" in why and "cluster.step_timeout_s=10" in why
    assert stalled_rank({0: ((7, "step"), 1.0), 1: ((7, "step"), 2.0)}, set(), step_timeout_s=10,
                        startup_timeout_s=100) is None
    # A rank that never beat while another did: judged by the start-up limit.
    assert stalled_rank({0: ((1, "step"), 1.0), 1: (None, 50.0)}, set(), step_timeout_s=10,
                        startup_timeout_s=100) is None
    assert stalled_rank({0: ((1, "step"), 1.0), 1: (None, 150.0)}, set(), step_timeout_s=10,
                        startup_timeout_s=100)[0] == 1
    # No heartbeats at all (a worker command without them) or exited ranks: not this rule's business.
    assert stalled_rank({0: (None, 500.0), 1: (None, 500.0)}, set(), step_timeout_s=10, startup_timeout_s=100) is None
    assert stalled_rank({0: ((3, "step"), 50.0)}, {0}, step_timeout_s=10, startup_timeout_s=100) is None


def test_heartbeat_round_trip_and_no_op_without_a_path(tmp_path: Path):
    beat = Heartbeat(tmp_path / "rank")
    assert read_heartbeat(tmp_path / "rank") is None
    beat.beat(0, "ready")
    assert read_heartbeat(tmp_path / "rank") == (0, "ready")
    beat.beat(12)
    assert read_heartbeat(tmp_path / "rank") == (12, "step")
    Heartbeat(None).beat(3)  # outside a launcher: nothing to write, nothing raised


def test_software_mismatches_name_both_versions():
    mine = software()
    assert mismatches(mine, dict(mine)) == []
    other = {**mine, "torch": "0.0.1"}
    [line] = mismatches(mine, other)
    assert line.startswith("torch 0.0.1 (driver: ")


def test_rendezvous_messages_name_addresses_ports_and_the_fix(monkeypatch):
    env = RankEnv(rank=1, world_size=2, local_rank=0, master_addr="10.213.0.1", master_port=29555)
    monkeypatch.setenv("FM_TRAIN_NODE_IP", "10.213.0.2")
    loop = explain(RuntimeError("Gloo connectFullMesh failed with [pair.cc:152] timed out connecting: SO_ERROR:"
                                " Connection refused, remote=[127.0.0.1]:40362"), env, "joining the process group")
    assert "rank 1 of 2 on node 10.213.0.2" in loop and "MASTER_ADDR=10.213.0.1 MASTER_PORT=29555" in loop
    assert "loopback address 127.0.0.1:40362" in loop and "cluster.socket_ifname" in loop
    far = explain(RuntimeError("Connection refused, remote=[10.213.0.1]:40362"), env, "joining the process group")
    assert "10.213.0.1:40362 could not be reached" in far and "firewall" in far


def test_an_unreachable_master_fails_within_the_timeout():
    import socket

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = RankEnv(rank=1, world_size=2, local_rank=1, master_addr="127.0.0.1", master_port=port)
    with pytest.raises(RendezvousError, match=f"cannot reach 127.0.0.1:{port} for 1s"):
        wait_for_master(env, timeout_s=1.0, poll_s=0.1)
    wait_for_master(RankEnv(rank=0, world_size=2, local_rank=0, master_addr="127.0.0.1", master_port=port))


def test_preflight_finds_private_copies_of_the_run_directory(tmp_path: Path):
    shared, private = tmp_path / "shared", tmp_path / "private"
    for who, where in ((DRIVER, shared), ("nodeA", shared), ("nodeB", private)):
        assert write_probe(where, "tok", who) is None
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "index.json").write_text(json.dumps({"v": 1}))
    a = check_node(str(tmp_path), str(shared), "tok", [DRIVER, "nodeB"], [str(corpus)])
    b = check_node(str(tmp_path), str(private), "tok", [DRIVER, "nodeA"], [str(corpus), str(tmp_path / "nowhere")])
    assert a["missing"] == ["nodeB"] and b["missing"] == [DRIVER, "nodeA"]
    nodes = [NodeProbe("nodeA", "10.0.0.1", None), NodeProbe("nodeB", "10.0.0.2", None)]
    label = {DRIVER: "the driver", "nodeA": "node 10.0.0.1", "nodeB": "node 10.0.0.2"}
    [problem] = _storage_problems(nodes, [a, b], ["nodeB"], label, shared)
    assert "not shared: there are 2 copies" in problem
    assert f"the driver and node 10.0.0.1 see one at {shared}" in problem and f"node 10.0.0.2 see one at {private}" in problem
    assert _storage_problems(nodes, [{**a, "missing": []}, {**b, "missing": []}], [], label, shared) == []
    a["data"][str(tmp_path / "nowhere")] = a["data"][str(corpus)]
    [missing] = _data_problems(nodes, [a, b], label)
    assert "node 10.0.0.2 cannot read" in missing and "nowhere" in missing


def test_in_a_collective_hang_the_stopped_or_the_quiet_rank_is_the_suspect():
    both = {0: ((3, "step"), 20.0), 1: ((3, "step"), 19.0)}
    assert stalled_rank(both, set(), step_timeout_s=10, startup_timeout_s=100, states={1: "stopped"})[0] == 1
    assert stalled_rank(both, set(), step_timeout_s=10, startup_timeout_s=100, quiet_s={0: 0.1, 1: 18.0})[0] == 1
    assert stalled_rank(both, set(), step_timeout_s=10, startup_timeout_s=100)[0] == 0  # the longest still


def test_a_shrunk_expert_parallel_run_keeps_dp_a_multiple_of_ep():
    cfg = build_config({"model": {"preset": "moe-tiny", "vocab_size": 512}, "data": {"seq_len": 32},
                        "parallel": {"ep": 2, "zero_stage": 1}, "convert": {"at_end": False},
                        "train": {"micro_batch": 1, "grad_accum": 3}, "cluster": {"workers": 4, "min_workers": 2}})
    # 3 workers would hold the global batch of 12 (dp 3 x 4 micro-batches), but an ep of 2 cannot split dp 3.
    assert choose_layout(cfg, [3]) == Layout(2, 6)
    why = choose_layout(cfg, [1])
    assert isinstance(why, str) and "3 workers (dp 3 is not a multiple of parallel.ep=2)" in why


def test_a_saving_rank_is_judged_by_the_save_timeout():
    saving = {0: ((8, "save"), 900.0), 1: ((8, "save"), 900.0)}
    assert stalled_rank(saving, set(), step_timeout_s=600, startup_timeout_s=900, save_timeout_s=3600) is None
    rank, why = stalled_rank({0: ((8, "step"), 1.0), 1: ((8, "save"), 4000.0)}, set(), step_timeout_s=600,
                             startup_timeout_s=900, save_timeout_s=3600)
    assert rank == 1 and "after step 8 (save)" in why and "cluster.save_timeout_s=3600" in why
    # Without a save limit (a caller that has none) the step's applies.
    assert stalled_rank(saving, set(), step_timeout_s=600, startup_timeout_s=900)[1].endswith("step_timeout_s=600)")
    # The group's silence rule too: no rank prints while one saves.
    from launcher.monitor import AttemptWatch

    watch = AttemptWatch(group=None, sink=None, progress=None, step_timeout_s=600, startup_timeout_s=900,  # type: ignore[arg-type]
                         total_steps=10, poll_interval_s=1, stop_grace_s=1, failure_grace_s=1, stop=None,  # type: ignore[arg-type]
                         say=print, trained=True, save_timeout_s=3600)
    watch.beats = {0: ((8, "step"), 5.0), 1: ((8, "save"), 5.0)}
    assert watch.silence_limit() == (3600, "cluster.save_timeout_s=3600, while a rank saves")
    watch.beats = {0: ((8, "step"), 5.0), 1: ((9, "step"), 5.0)}
    assert watch.silence_limit() == (600, "cluster.step_timeout_s=600")
