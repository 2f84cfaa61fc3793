"""Launcher logic without Ray: rank ordering, tp checks, shortfall messages, outcomes, progress, run state."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fm_train.dist.topology import Topology
from launcher.cluster import ClusterError, Demand, _host_port, resolve_address, shortfall
from launcher.options import LaunchOptions, parse_worker_command, render_command
from launcher.outcomes import Failed, Hung, Preempted, Stopped, Succeeded, append_failure, exit_code
from launcher.placement import PlacementError, Slot, assign_ranks
from launcher.progress import Progress, format_duration
from launcher.runstate import MetricsTail, latest_checkpoint, run_state

pytestmark = pytest.mark.unit


def slots(*spec: tuple[int, str, tuple[str, ...]]) -> list[Slot]:
    return [Slot(bundle_index=b, node_id=n * 8, node_ip=f"10.0.0.{ord(n[0]) - 96}", gpu_ids=g) for b, n, g in spec]


def test_ranks_are_contiguous_per_node_in_bundle_order_and_tp_pairs_share_a_node():
    # Ray may interleave bundles across nodes; ranks must not.
    placed = slots((0, "a", ()), (1, "b", ()), (2, "a", ()), (3, "b", ()))
    p = assign_ranks(placed, Topology(4, tp=2))
    assert [(r.rank, r.node_id[0], r.bundle_index, r.local_rank) for r in p.ranks] == \
        [(0, "a", 0, 0), (1, "a", 2, 1), (2, "b", 1, 0), (3, "b", 3, 1)]
    assert [r.node_rank for r in p.ranks] == [0, 0, 1, 1] and not p.warnings
    assert [(r.dp, r.tp) for r in p.ranks] == [(0, 0), (0, 1), (1, 0), (1, 1)]


def test_gpus_order_local_ranks_and_every_local_rank_sees_its_nodes_gpus():
    placed = slots((0, "a", ("3",)), (1, "a", ("1",)), (2, "a", ("2",)), (3, "a", ("0",)))
    p = assign_ranks(placed, Topology(4, tp=4))
    assert [r.gpu_ids for r in p.ranks] == [("0",), ("1",), ("2",), ("3",)]
    assert {r.node_gpu_ids for r in p.ranks} == {("0", "1", "2", "3")}  # cuda:LOCAL_RANK is the own GPU
    assert [r.local_rank for r in p.ranks] == [0, 1, 2, 3]


def test_a_tp_group_split_across_nodes_is_refused_when_a_node_could_hold_it():
    placed = slots((0, "a", ()), (1, "a", ()), (2, "a", ()), (3, "b", ()))
    with pytest.raises(PlacementError, match=r"ranks \[2, 3\] would span nodes aaaaaaaa \(3 slots\) and bbbbbbbb \(1 slots\)"):
        assign_ranks(placed, Topology(4, tp=2))


def test_tp_larger_than_every_node_only_warns():
    placed = slots((0, "a", ()), (1, "a", ()), (2, "b", ()), (3, "b", ()))
    p = assign_ranks(placed, Topology(4, tp=4))
    assert len(p.warnings) == 1 and "cross the network" in p.warnings[0]


def test_placement_table_and_json():
    p = assign_ranks(slots((0, "a", ()), (1, "a", ())), Topology(2))
    lines = p.table().splitlines()
    assert lines[0].split() == ["rank", "node", "ip", "interface", "node", "id", "node", "local", "dp", "pp", "tp",
                                "gpus"]
    assert lines[2].split()[:6] == ["1", "10.0.0.1", "-", "aaaaaaaa", "0", "1/2"]
    record = p.to_json(master_addr="10.0.0.1", master_port=1234, attempt=2)
    assert json.loads(json.dumps(record))["ranks"][1]["local_rank"] == 1 and record["dp"] == 2


def test_shortfall_names_what_is_missing():
    demand = Demand(workers=4, cpus_per_worker=1, gpus_per_worker=0)
    assert shortfall(demand, {"CPU": 2.0}, [{"CPU": 2.0}]) == "needs 4 workers x 1 CPU, cluster has 2 CPUs free (short by 2)"
    assert shortfall(demand, {"CPU": 4.0}, [{"CPU": 2.0}, {"CPU": 2.0}]) is None
    gpu = Demand(workers=2, cpus_per_worker=4, gpus_per_worker=1)
    assert "needs 2 workers x 1 GPU, cluster has 0 GPUs free" in shortfall(gpu, {"CPU": 64.0}, [{"CPU": 64.0}])
    # Enough CPUs in total, but no single node holds a 3-CPU slot twice.
    frag = shortfall(Demand(2, 3, 0), {"CPU": 8.0}, [{"CPU": 4.0}, {"CPU": 2.0}, {"CPU": 2.0}])
    assert frag is not None and "allow only 1 such slots" in frag
    assert Demand(1, 2, 0).bundle() == {"CPU": 2.0} and Demand(1, 2, 1).bundle() == {"CPU": 2.0, "GPU": 1.0}


def test_address_precedence_and_parsing():
    assert resolve_address(None, None, {}) is None
    assert resolve_address(None, "local", {}) is None
    assert resolve_address(None, None, {"RAY_ADDRESS": "h:6379"}) == "h:6379"
    assert resolve_address(None, "c:1", {"RAY_ADDRESS": "h:6379"}) == "c:1"
    assert resolve_address("x:2", "c:1", {"RAY_ADDRESS": "h:6379"}) == "x:2"
    assert _host_port("10.0.0.1:6379") == ("10.0.0.1", 6379)
    assert _host_port("ray://head:10001") == ("head", 10001)
    assert _host_port("auto") is None
    with pytest.raises(ClusterError, match="not host:port"):
        _host_port("justahost")


def test_worker_command_is_argv_with_placeholders():
    argv = parse_worker_command("{python} my train.py --cfg {config} 'two words'")
    assert argv == ("{python}", "my", "train.py", "--cfg", "{config}", "two words")
    assert render_command(argv, python="/py", config=Path("/r/c.yaml"))[:5] == ["/py", "my", "train.py", "--cfg", "/r/c.yaml"]
    with pytest.raises(ValueError, match="does not mention"):
        parse_worker_command("python train.py")
    with pytest.raises(ValueError, match="stop_grace_s"):
        LaunchOptions(stop_grace_s=0)


def test_outcomes_exit_codes_and_failure_records(tmp_path):
    failed = Failed(rank=1, node_ip="10.0.0.2", node_id="b" * 40, exit_code=-9, cause="killed by SIGKILL",
                    last_lines=("step 3",))
    assert exit_code(Succeeded(10)) == 0 and exit_code(failed) == 1 and exit_code(Stopped("SIGINT")) == 130
    assert exit_code(Stopped("SIGTERM")) == 143 and exit_code(Preempted((0,), "x")) == 1
    assert "rank 1 on node 10.0.0.2 (bbbbbbbb), exit code -9" in failed.summary()
    hung = Hung(rank=0, node_ip="h", node_id="n", silent_s=5, cause="c", states={0: "stopped"})
    path = append_failure(tmp_path, failed, attempt=1, master_port=29500)
    append_failure(tmp_path, hung, attempt=2, master_port=29501)
    lines = [json.loads(x) for x in path.read_text().splitlines()]
    assert lines[0]["kind"] == "failed" and lines[0]["last_lines"] == ["step 3"] and lines[0]["master_port"] == 29500
    assert lines[1]["kind"] == "hung" and lines[1]["states"] == {"0": "stopped"}


def test_progress_line_with_eta_and_throttling():
    now = [100.0]
    prog = Progress(100, interval_s=10, clock=lambda: now[0])
    assert prog.update([{"step": 10, "loss": 3.0, "tokens_per_s": 12345.0}]) == \
        ["progress: step 10/100 (10%) | loss 3.0000 | 12.3k tok/s"]
    now[0] = 105.0
    assert prog.update([{"step": 20, "loss": 2.5}]) == []  # throttled
    now[0] = 110.0
    assert prog.update([{"step": 30, "loss": 2.0}]) == ["progress: step 30/100 (30%) | loss 2.0000 | ETA 35s"]
    assert prog.update([{"step": 30, "val_loss": 2.1}]) == ["eval: step 30 val_loss 2.1000"]
    assert format_duration(3725) == "1h02m" and format_duration(65) == "1m05s"


def test_run_state_reads_latest_and_metrics(tmp_path):
    assert run_state(tmp_path) == {"latest_step": None, "metrics_step": None}
    ckpt = tmp_path / "checkpoints"
    (ckpt / "step_00000040").mkdir(parents=True)
    (ckpt / "latest").write_text("step_00000040\n")
    tail = MetricsTail(tmp_path / "metrics.jsonl")
    (tmp_path / "metrics.jsonl").write_text('{"step": 41}\n{"step": 42}\n{"ste')
    assert [r["step"] for r in tail.read()] == [41, 42]
    with (tmp_path / "metrics.jsonl").open("a") as fh:
        fh.write('p": 43}\n')
    assert [r["step"] for r in tail.read()] == [43]
    assert latest_checkpoint(tmp_path) == ckpt / "step_00000040"
    assert run_state(tmp_path) == {"latest_step": 40, "metrics_step": 43}
    # latest is data: a path, a symlink or a name of another form leads the launcher's convert nowhere.
    elsewhere = tmp_path / "elsewhere" / "step_00000099"
    elsewhere.mkdir(parents=True)
    for text in (str(elsewhere), "../elsewhere/step_00000099", "step_00000040/.."):
        (ckpt / "latest").write_text(text + "\n")
        assert latest_checkpoint(tmp_path) is None, text
    (ckpt / "latest").unlink()
    (ckpt / "latest").symlink_to(elsewhere)
    assert latest_checkpoint(tmp_path) is None


def test_resume_flag_wins_over_set_and_a_restart_continues_from_what_the_run_saved(tmp_path):
    import argparse

    from fm_train.config import build_config
    from launcher.cli import add_launch_arguments, launch_overrides
    from launcher.runner import _resume_for_restart

    parser = add_launch_arguments(argparse.ArgumentParser())
    args = parser.parse_args(["cfg.yaml", "--set", "checkpoint.resume=none", "--resume", "1200"])
    assert launch_overrides(args) == ["checkpoint.resume=none", "checkpoint.resume=1200"]
    assert launch_overrides(parser.parse_args(["cfg.yaml"])) == []

    said: list[str] = []
    cfg = build_config({"checkpoint": {"resume": "1200"}, "run": {"dir": str(tmp_path)}})
    ckpt = tmp_path / "checkpoints"
    (ckpt / "step_00001200").mkdir(parents=True)
    (ckpt / "latest").write_text("step_00001200\n")
    at_launch = latest_checkpoint(tmp_path)
    assert _resume_for_restart(cfg, tmp_path, at_launch, said.append).checkpoint.resume == "1200"  # nothing new
    (ckpt / "step_00001300").mkdir()
    (ckpt / "latest").write_text("step_00001300\n")  # the run saved after it started from step 1200
    assert _resume_for_restart(cfg, tmp_path, at_launch, said.append).checkpoint.resume == "auto"
    assert said and "resumes from its newest (auto)" in said[0]
    assert cfg.checkpoint.resume == "1200"  # the configured run is left as it was
