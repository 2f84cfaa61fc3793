"""``fm-train runs``: runs listed from their run directories (finished, stopped, running under a live lease),
one shown in detail with how to resume it, and untrusted run directories (a ``latest`` pointing outside,
symlinked files, damaged records, a directory that holds no run) read without harm and with clear errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]


def fm_train(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "fm_train.cli", "runs", *args], capture_output=True, text=True,
                          cwd=ROOT, env={**os.environ, **(env or {})})


def make_run(root: Path, name: str, *, steps: int, logged: int, latest: int | None, storage: str | None = None) -> Path:
    run = root / name
    (run / "checkpoints").mkdir(parents=True)
    config = {"run": {"name": name, "dir": str(run), "storage": storage}, "train": {"steps": steps},
              "model": {"family": "llama", "preset": "tiny"}, "parallel": {"tp": 1, "pp": 1, "sp": 2, "zero_stage": 2},
              "cluster": {"workers": 2}}
    (run / "config.resolved.yaml").write_text(yaml.safe_dump(config))
    lines = [json.dumps({"step": s, "loss": 6.0 - s / 100, "lr": 1e-3}) for s in range(1, logged + 1)]
    (run / "metrics.jsonl").write_text("\n".join(lines + [json.dumps({"step": logged, "val_loss": 5.5})]) + "\n")
    if latest is not None:
        (run / "checkpoints" / f"step_{latest:08d}").mkdir()
        (run / "checkpoints" / "latest").write_text(f"step_{latest:08d}")
    (run / "placement.json").write_text(json.dumps({"ranks": [{"rank": 0, "node_ip": "10.0.0.7"}]}))
    return run


def test_runs_lists_each_run_with_its_state(tmp_path: Path) -> None:
    make_run(tmp_path, "done", steps=300, logged=300, latest=300)
    make_run(tmp_path, "cut", steps=300, logged=137, latest=100, storage="s3://bucket/cut")
    live = make_run(tmp_path, "live", steps=300, logged=12, latest=None)
    now = time.time()
    from launcher.lease import Holder

    holder = Holder.me(now)  # this test process holds it: alive, renewed now
    (live / ".fm-train-lease.json").write_bytes(holder.encode())
    (tmp_path / "not-a-run").mkdir()
    out = fm_train(str(tmp_path))
    assert out.returncode == 0, out.stderr
    rows = {line.split()[0]: line.split() for line in out.stdout.splitlines()[1:]}
    assert out.stdout.splitlines()[0].split() == ["NAME", "STATE", "STEP", "LOSS", "CHECKPOINT", "STORAGE", "STARTED",
                                                  "HOST"]
    assert set(rows) == {"done", "cut", "live"}
    assert rows["done"][1:5] == ["finished", "300/300", "3.0000", "300"]
    assert rows["cut"][1:6] == ["stopped", "137/300", "4.6300", "100", "s3://bucket/cut"] and rows["cut"][-1] == "10.0.0.7"
    assert rows["live"][1:5] == ["running", "12/300", "5.8800", "-"] and rows["live"][-1] == holder.host
    assert fm_train(str(tmp_path / "cut")).stdout.splitlines()[1].split()[0] == "cut"  # a run directory itself


def test_runs_show_gives_the_detail_and_how_to_resume(tmp_path: Path) -> None:
    run = make_run(tmp_path, "cut", steps=300, logged=137, latest=100)
    (run / "checkpoints" / "step_00000050").mkdir()
    out = fm_train("show", "cut", "--dir", str(tmp_path))
    assert out.returncode == 0, out.stderr
    text = out.stdout
    assert "state      stopped" in text and "step       137 of 300, loss 4.6300" in text
    assert "layout     tp=1 pp=1 sp=2 zero_stage=2, workers=2" in text
    assert "saved      step_00000050, step_00000100" in text and "latest     step 100" in text
    assert f"fm-train launch {run / 'config.resolved.yaml'} --resume latest" in text
    env_default = fm_train("show", "cut", env={"FM_TRAIN_RUNS": str(tmp_path)})
    assert env_default.returncode == 0 and "step 100" in env_default.stdout


def test_untrusted_run_directories_are_read_without_harm(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    (outside / "step_00000999").mkdir(parents=True)
    runs = tmp_path / "runs"
    run = make_run(runs, "hostile", steps=10, logged=3, latest=None)
    (run / "checkpoints" / "latest").write_text("../../outside/step_00000999")  # leads outside: not a checkpoint
    (run / "metrics.jsonl").unlink()
    (run / "metrics.jsonl").symlink_to(outside / "secret.jsonl")  # a symlink is not read
    (outside / "secret.jsonl").write_text(json.dumps({"step": 9, "loss": 1.0}) + "\n")
    (run / "config.resolved.yaml").write_text("a: &a [*a, *a]\n" * 3 + "{{{")  # damaged YAML
    (run / "placement.json").write_bytes(b"\xff" * 64)
    out = fm_train(str(runs))
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines()[1].split()[:5] == ["hostile", "stopped", "-/-", "-", "-"]
    assert sorted(p.name for p in outside.iterdir()) == ["secret.jsonl", "step_00000999"]  # nothing written


def test_hostile_records_leave_their_columns_empty(tmp_path: Path) -> None:
    run = make_run(tmp_path, "odd", steps=10, logged=2, latest=None, storage="s3://b/\x1b[31mred")
    with (run / "metrics.jsonl").open("a") as fh:
        fh.write(json.dumps({"step": 3, "loss": 10 ** 400}) + "\n")  # a float cannot hold it
        fh.write(json.dumps({"step": True, "loss": True}) + "\n")  # booleans are not numbers here
        fh.write("[" * 20_000 + "\n")  # nesting bomb
    (run / ".fm-train-lease.json").write_text(json.dumps({"host": "h\x1b]0;x\x07", "pid": "1", "pid_started": 0,
                                                         "started": "y", "renewed": "y", "token": "t"}))
    (run / "placement.json").write_text(json.dumps({"ranks": [{"node_ip": "10.0.0.1\x1b[2J"}]}))
    out = fm_train(str(tmp_path))
    assert out.returncode == 0, out.stderr
    row = out.stdout.splitlines()[1]
    assert row.split()[:4] == ["odd", "stopped", "3/10", "5.9800"]  # the last loss that is a number
    assert "\x1b" not in out.stdout and "s3://b/?[31mred" in row and "10.0.0.1?[2J" in row
    shown = fm_train("show", "odd", "--dir", str(tmp_path))
    assert shown.returncode == 0 and "\x1b" not in shown.stdout, shown.stderr


@pytest.mark.parametrize(("args", "message"), [
    (["{empty}"], "holds no run: a run directory has config.resolved.yaml"),
    (["{empty}/nope"], "is not a directory"),
    (["show", "ghost", "--dir", "{runs}"], "no run 'ghost' in"),
    (["show", "../x", "--dir", "{runs}"], "no run '../x' in"),
    (["s3://bucket/runs"], "object storage is not supported yet"),
    (["show"], "usage: fm-train runs show NAME"),
])
def test_runs_refuses_what_is_not_a_run_by_name(tmp_path: Path, args: list[str], message: str) -> None:
    (tmp_path / "empty").mkdir()
    make_run(tmp_path / "runs", "one", steps=5, logged=5, latest=5)
    out = fm_train(*(a.format(empty=tmp_path / "empty", runs=tmp_path / "runs") for a in args))
    assert out.returncode == 2 and message in out.stderr and "Traceback" not in out.stderr, out.stderr
