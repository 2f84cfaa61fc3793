"""``fm-train runs``: runs listed from their run directories (finished, stopped, running under a live lease),
one shown in detail with how to resume it, and untrusted run directories (a ``latest`` pointing outside,
symlinked files, damaged records, a directory that holds no run) read without harm and with clear errors.
The same from object storage (runs' ``run.storage`` copies on the loopback S3 server): a prefix of runs or
one run, a hostile bucket read within bounds, an unreachable endpoint and a prefix without runs named."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from s3_server import make_bucket, s3_server

ROOT = Path(__file__).resolve().parents[1]
BUCKET = "fm-runs"


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
    (["ftps3://bucket/runs"], "unknown storage scheme ftps3://"),
    (["show"], "usage: fm-train runs show NAME"),
])
def test_runs_refuses_what_is_not_a_run_by_name(tmp_path: Path, args: list[str], message: str) -> None:
    (tmp_path / "empty").mkdir()
    make_run(tmp_path / "runs", "one", steps=5, logged=5, latest=5)
    out = fm_train(*(a.format(empty=tmp_path / "empty", runs=tmp_path / "runs") for a in args))
    assert out.returncode == 2 and message in out.stderr and "Traceback" not in out.stderr, out.stderr


@pytest.fixture(scope="module")
def s3():
    with s3_server() as endpoint:
        make_bucket(BUCKET)
        yield endpoint


def upload_run(local: Path, uri: str) -> None:
    """What a run with ``run.storage: uri`` leaves there: its logs (fm-train's own copier), its step directories
    with ``latest``, its lease while it runs, and ``hf/`` with its marker once converted."""
    import fsspec

    from fm_train.storage.log_copies import RunLogCopies, publish_hf_dir

    assert RunLogCopies(local, uri).copy()
    fs, key = fsspec.filesystem("s3"), uri.removeprefix("s3://")
    for step in sorted((local / "checkpoints").glob("step_*")):
        fs.pipe(f"{key}/checkpoints/{step.name}/manifest.json", b"{}")
    if (local / "checkpoints" / "latest").is_file():
        fs.pipe(f"{key}/checkpoints/latest", (local / "checkpoints" / "latest").read_bytes() + b"\n")
    if (local / ".fm-train-lease.json").is_file():
        fs.pipe(f"{key}/.fm-train-lease.json", (local / ".fm-train-lease.json").read_bytes())
    if (local / "hf").is_dir():
        publish_hf_dir(local / "hf", uri)


def test_runs_lists_and_shows_runs_from_object_storage(s3, tmp_path: Path) -> None:
    from launcher.lease import Holder

    prefix = f"s3://{BUCKET}/team"
    done = make_run(tmp_path, "done", steps=300, logged=300, latest=300, storage=f"{prefix}/done")
    (done / "hf").mkdir()
    (done / "hf" / "config.json").write_text("{}")
    cut = make_run(tmp_path, "cut", steps=300, logged=137, latest=100, storage=f"{prefix}/cut")
    (cut / "checkpoints" / "step_00000050").mkdir()
    live = make_run(tmp_path, "live", steps=300, logged=12, latest=None, storage=f"{prefix}/live")
    holder = Holder.me(time.time())
    (live / ".fm-train-lease.json").write_bytes(holder.encode())
    for run in (done, cut, live):
        upload_run(run, f"{prefix}/{run.name}")

    out = fm_train(prefix)
    assert out.returncode == 0, out.stderr
    rows = {line.split()[0]: line.split() for line in out.stdout.splitlines()[1:]}
    assert set(rows) == {"done", "cut", "live"}
    assert rows["done"][1:6] == ["finished", "300/300", "3.0000", "300", f"{prefix}/done"] and rows["done"][-2:] == ["-", "-"]
    assert rows["cut"][1:6] == ["stopped", "137/300", "4.6300", "100", f"{prefix}/cut"] and rows["cut"][-1] == "-"
    assert rows["live"][1:5] == ["running", "12/300", "5.8800", "-"] and rows["live"][-1] == holder.host  # its lease
    one = fm_train(f"{prefix}/cut")  # one run's run.storage
    assert one.returncode == 0 and [r.split()[0] for r in one.stdout.splitlines()[1:]] == ["cut"], one.stderr

    shown = fm_train("show", "cut", "--dir", prefix)
    assert shown.returncode == 0, shown.stderr
    assert f"run        cut  ({prefix}/cut)" in shown.stdout and "saved      step_00000050, step_00000100" in shown.stdout
    assert f"fm-train launch CONFIG --set run.storage={prefix}/cut --resume auto" in shown.stdout
    assert f"a local copy of {prefix}/cut/config.resolved.yaml" in shown.stdout
    finished = fm_train("show", "done", env={"FM_TRAIN_RUNS": prefix})
    assert finished.returncode == 0 and f"hf export  {prefix}/done/hf" in finished.stdout, finished.stderr


def test_a_hostile_bucket_is_read_within_bounds(s3, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import fsspec
    import s3fs

    from launcher import runs

    fs, prefix = fsspec.filesystem("s3"), f"{BUCKET}/hostile"
    outside = f"{BUCKET}/outside/step_00000999/manifest.json"
    fs.pipe(outside, b"{}")
    big = make_run(tmp_path, "big", steps=10, logged=3, latest=None, storage="s3://b/\x1b[31mred")
    upload_run(big, f"s3://{prefix}/big")
    records = (json.dumps({"step": 1, "loss": 9.0}) + "\n") * 200_000  # 5 MiB
    fs.pipe(f"{prefix}/big/metrics.jsonl", (records + json.dumps({"step": 7, "loss": 2.5, "note": "\x1b]0;x\x07"})
                                            + "\n").encode())
    fs.pipe(f"{prefix}/big/checkpoints/latest", b"step_00000001" + b" " * (2 << 20))  # 2 MiB pointer
    fs.pipe(f"{prefix}/big/checkpoints/step_00000001/manifest.json", b"{}")
    fs.pipe(f"{prefix}/big/.fm-train-lease.json", json.dumps({"host": "h\x1b[2J", "pid": 1, "pid_started": 0.0,
                                                              "started": 0.0, "renewed": 0.0, "token": "t"}).encode())
    fs.pipe(f"{prefix}/away/config.resolved.yaml", b"run: {name: x}\n" + b"#" * (2 << 20))  # over the YAML bound
    fs.pipe(f"{prefix}/away/checkpoints/latest", b"../../outside/step_00000999")  # leads outside

    fetched: list[int] = []
    real_cat = s3fs.S3FileSystem._cat_file

    async def counting_cat(self, path, *args, **kwargs):  # the real GET, its size recorded
        data = await real_cat(self, path, *args, **kwargs)
        fetched.append(len(data))
        return data

    monkeypatch.setattr(s3fs.S3FileSystem, "_cat_file", counting_cat)
    root = runs.open_root(f"s3://{prefix}")
    with runs.reading(root):
        table = runs.format_runs(runs.find_runs(root))
        detail = runs.describe_run(runs.find_run(root, "big"))
    rows = {line.split()[0]: line.split() for line in table.splitlines()[1:]}
    assert rows["big"][1:6] == ["stopped", "7/10", "2.5000", "-", "s3://b/?[31mred"]  # the tail, not the 5 MiB
    assert rows["away"][1:5] == ["stopped", "-/-", "-", "-"]
    assert "\x1b" not in table + detail and "h?[2J" in detail and "note=?]0;x?" in detail
    assert sum(fetched) < 4 * runs.TAIL_BYTES, fetched  # bounded reads, nothing whole that is large
    assert fs.cat(outside) == b"{}"  # nothing written or removed


def test_object_storage_that_holds_no_run_or_cannot_be_reached_is_named(s3) -> None:
    import fsspec

    fsspec.filesystem("s3").pipe(f"{BUCKET}/other/readme.txt", b"not a run")
    for uri in (f"s3://{BUCKET}/nothing-here", f"s3://{BUCKET}/other"):
        out = fm_train(uri)
        assert out.returncode == 2 and f"{uri} holds no run" in out.stderr and "Traceback" not in out.stderr, out.stderr
    with socket.socket() as sock:  # a port nothing listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    out = fm_train(f"s3://{BUCKET}/team", env={"AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}"})  # ~10 s of retries
    assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr
    assert f"s3://{BUCKET}/team cannot be read" in out.stderr and "endpoint is reachable" in out.stderr
    assert "AWS_ENDPOINT_URL" in out.stderr and f"127.0.0.1:{port}" in out.stderr
