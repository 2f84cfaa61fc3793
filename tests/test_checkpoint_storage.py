"""Checkpoints copied to ``run.storage`` in the background, against a real S3 server on loopback.

A 2-rank worker run saves every 2 steps with ``run.storage: s3://...``: storage ends with every file
of the newest steps, ``checkpoint.keep`` of them, committed by manifest and ``latest``. A fresh
``run.dir`` (another machine) then resumes from storage alone and trains the same losses as an
uninterrupted run. An unreachable bucket loses nothing: the run finishes, says which steps stayed
local, and storage gains no ``latest``. The commit order (every rank's marker before the manifest)
is checked on its own with a plain directory as storage.
"""

from __future__ import annotations

import json
import re
import shutil
import time
from pathlib import Path

import pytest

from distributed import run_distributed
from s3_server import make_bucket, s3_server
from test_engine_worker import _worker_with_fake_data


@pytest.fixture(scope="module")
def s3():
    with s3_server() as endpoint:
        make_bucket("fm-ckpt")
        yield endpoint


def _raw(tiny_config_dict: dict, run_dir: Path, steps: int, storage: str | None, retries: int = 5) -> dict:
    return {**tiny_config_dict,
            "run": {**tiny_config_dict["run"], "dir": str(run_dir), "storage": storage},
            "train": {**tiny_config_dict["train"], "steps": steps, "log_every": 1, "eval_every": 0},
            "checkpoint": {"every": 2, "keep": 2, "upload_retries": retries},
            "logging": {"tensorboard": False}}


def _losses(run_dir: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())
            if "loss" in r}


@pytest.mark.multiproc
def test_a_run_checkpoints_to_s3_and_resumes_from_it_on_a_fresh_machine(s3, tiny_config_dict, tmp_path) -> None:
    import fsspec

    fs = fsspec.filesystem("s3")
    first = _raw(tiny_config_dict, tmp_path / "first", 6, "s3://fm-ckpt/run")
    assert run_distributed(_worker_with_fake_data, world_size=2, args=(first,), init_process_group=False) == [0, 0]
    assert fs.cat_file("fm-ckpt/run/checkpoints/latest").decode().strip() == "step_00000006"
    steps = sorted(p.rsplit("/", 1)[-1] for p in fs.ls("fm-ckpt/run/checkpoints") if "step_" in p)
    assert steps == ["step_00000004", "step_00000006"]  # checkpoint.keep applies in storage too
    local = tmp_path / "first" / "checkpoints" / "step_00000006"
    for path in local.rglob("*"):
        if path.is_file():
            rel = path.relative_to(local).as_posix()
            assert fs.cat_file(f"fm-ckpt/run/checkpoints/step_00000006/{rel}") == path.read_bytes(), rel
    markers = sorted(p.rsplit("/", 1)[-1] for p in fs.ls("fm-ckpt/run/checkpoints/step_00000006/.uploaded"))
    assert markers == ["rank_00000", "rank_00001"]

    # The same machine resuming from its own run.dir: the reference.
    shutil.copytree(tmp_path / "first", tmp_path / "local")
    here = _raw(tiny_config_dict, tmp_path / "local", 8, None)
    assert run_distributed(_worker_with_fake_data, world_size=2, args=(here,), init_process_group=False) == [0, 0]
    # Another machine: an empty run.dir, the same storage. It fetches step 6 and goes on to step 8.
    second = _raw(tiny_config_dict, tmp_path / "second", 8, "s3://fm-ckpt/run")
    assert run_distributed(_worker_with_fake_data, world_size=2, args=(second,), init_process_group=False) == [0, 0]
    resumed, want = _losses(tmp_path / "second"), _losses(tmp_path / "local")
    assert sorted(resumed) == [7, 8]
    assert [resumed[s] for s in (7, 8)] == [want[s] for s in (7, 8)]  # bit-exact, as the local resume
    assert fs.cat_file("fm-ckpt/run/checkpoints/latest").decode().strip() == "step_00000008"
    copied = [json.loads(line) for line in fs.cat_file("fm-ckpt/run/metrics.jsonl").decode().splitlines()]
    assert [r["step"] for r in copied if "loss" in r] == [7, 8]  # the second machine's own metrics.jsonl


@pytest.mark.multiproc
def test_an_unreachable_bucket_loses_nothing_and_says_so(s3, tiny_config_dict, tmp_path, capfd) -> None:
    import fsspec

    raw = _raw(tiny_config_dict, tmp_path / "run", 4, "s3://no-such-bucket/run", retries=0)
    assert run_distributed(_worker_with_fake_data, world_size=2, args=(raw,), init_process_group=False) == [0, 0]
    out = capfd.readouterr()
    assert "uploading step_00000002, step_00000004 to s3://no-such-bucket/run failed" in out.out + out.err
    assert (tmp_path / "run" / "checkpoints" / "latest").read_text().strip() == "step_00000004"  # local copy kept
    assert not fsspec.filesystem("s3").exists("no-such-bucket/run/checkpoints/latest")


@pytest.mark.unit
def test_rank_0_commits_only_after_every_rank_uploaded(tmp_path: Path) -> None:
    from fm_train.storage.upload import CheckpointUploader, save_id

    step = tmp_path / "run" / "checkpoints" / "step_00000002"
    (step / "rng").mkdir(parents=True)
    (step / "a.pt").write_bytes(b"rank 0's shard")
    (step / "rng" / "rank_00000.pt").write_bytes(b"rng")
    (step / "manifest.json").write_text("{}")
    storage = tmp_path / "bucket"
    remote = storage / "checkpoints" / "step_00000002"
    own0, own1 = {"a.pt": "d0", "rng/rank_00000.pt": "d1"}, {"b.pt": "d2"}
    (remote / ".uploaded").mkdir(parents=True)
    (remote / ".uploaded" / "rank_00001").write_text("left by an earlier attempt at this step")
    uploader = CheckpointUploader(str(storage), rank=0, keep=2, backoff_s=0.01)
    uploader.submit(step, ["a.pt", "rng/rank_00000.pt"], own=own0, expected=[own0, own1])
    deadline = time.monotonic() + 10
    while not (remote / ".uploaded" / "rank_00000").exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(0.5)
    assert (remote / "a.pt").read_bytes() == b"rank 0's shard" and uploader.busy
    assert not (remote / "manifest.json").exists() and not (storage / "checkpoints" / "latest").exists()
    (remote / ".uploaded" / "rank_00001").write_text(save_id(own1))  # rank 1 is done with this save
    uploader.wait()
    assert (remote / "manifest.json").read_text() == "{}"
    assert (storage / "checkpoints" / "latest").read_text().strip() == "step_00000002"
    assert uploader.committed == ["step_00000002"] and uploader.failed == []

    # A rank that gave up on this save: rank 0 never commits it, latest keeps naming the previous step.
    step4 = step.with_name("step_00000004")
    step4.mkdir()
    (step4 / "a.pt").write_bytes(b"x")
    (step4 / "manifest.json").write_text("{}")
    failed = storage / "checkpoints" / "step_00000004" / ".failed"
    failed.mkdir(parents=True)
    own1 = {"b.pt": "d4"}
    (failed / "rank_00001").write_text(save_id(own1))
    uploader.submit(step4, ["a.pt"], own={"a.pt": "d3"}, expected=[{"a.pt": "d3"}, own1])
    uploader.wait()
    assert uploader.failed == ["step_00000004"]
    assert not (storage / "checkpoints" / "step_00000004" / "manifest.json").exists()
    assert (storage / "checkpoints" / "latest").read_text().strip() == "step_00000002"


@pytest.mark.multiproc
def test_convert_reads_from_and_writes_to_s3(s3, tiny_config_dict, tmp_path, capsys) -> None:
    import fsspec
    from transformers import AutoModelForCausalLM

    from fm_train.cli import main

    raw = _raw(tiny_config_dict, tmp_path / "run", 2, "s3://fm-ckpt/convert-run")
    assert run_distributed(_worker_with_fake_data, world_size=2, args=(raw,), init_process_group=False) == [0, 0]
    shutil.rmtree(tmp_path / "run")  # nothing local: the conversion reads storage alone
    assert main(["convert", "s3://fm-ckpt/convert-run", "--out", str(tmp_path / "hf"), "--no-tokenizer",
                 "--dtype", "fp32"]) == 0
    err = capsys.readouterr().err
    assert "verified against the engine's probe" in err and "in place" in err
    # The .pt files were read where they are, and only in part: the fp32 weights, not Adam's moments.
    fetched, held = map(float, re.search(r"read ([\d.]+) MiB of tensors from storage, of the ([\d.]+) MiB", err).groups())
    assert 0 < fetched < held / 2, err
    AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf"), local_files_only=True)
    assert main(["convert", "s3://fm-ckpt/convert-run/checkpoints/step_00000002", "--out", "s3://fm-ckpt/hf",
                 "--no-tokenizer", "--dtype", "fp32"]) == 0
    fs = fsspec.filesystem("s3")
    assert sorted(p.rsplit("/", 1)[-1] for p in fs.ls("fm-ckpt/hf")) == sorted(p.name for p in (tmp_path / "hf").iterdir())
    assert main(["convert", "s3://fm-ckpt/convert-run", "--out", "s3://fm-ckpt/hf", "--no-tokenizer"]) == 2
    assert "already holds a model (config.json); pass --overwrite" in capsys.readouterr().err


@pytest.mark.unit
def test_the_preflight_probes_go_through_storage(s3, tmp_path: Path) -> None:
    """With run.storage the nodes share the store, not run.dir: the launcher's preflight writes and reads
    its probes there, which also finds a node that cannot write to it before step 1."""
    import fsspec

    from launcher import preflight

    root = preflight.resolve_on_node(str(tmp_path), "s3://fm-ckpt/pf")
    assert preflight.write_probe(root, "tok", "driver") is None
    assert preflight.write_probe(root, "tok", "node-a") is None
    seen = preflight.check_node(str(tmp_path), "s3://fm-ckpt/pf", "tok", ["driver", "node-a"], [])
    assert seen["missing"] == [] and seen["run_dir"] == "s3://fm-ckpt/pf"
    assert preflight.missing_probes(root, "tok", ["node-a", "node-b"]) == ["node-b"]
    refused = preflight.write_probe(preflight.resolve_on_node(str(tmp_path), "s3://no-such-bucket/pf"), "tok", "x")
    assert refused is not None and refused.startswith("cannot write s3://no-such-bucket/pf/.preflight/tok")
    preflight.remove_probes(root, "tok")
    assert not fsspec.filesystem("s3").exists("fm-ckpt/pf/.preflight/tok/driver.json")


def _worker_killed_during_upload(raw: dict) -> int:
    """Rank 1's uploads are slowed so that step 4's is still in flight when rank 1 is SIGKILLed (while it
    reads the batch of step 5); everything else is the fake-data worker."""
    import os
    import signal

    import test_engine_worker as W
    from fm_train.storage import upload

    rank = int(os.environ["RANK"])
    slow_put = upload._put_file

    def put(local, remote, *process):
        if rank == 1 and "step_00000004" in str(remote):
            time.sleep(2.0)
        slow_put(local, remote, *process)

    upload._put_file = put
    fake = W._fake_batches

    def batches(r, micro, state=None):
        for batch in fake(r, micro, state):
            if rank == 1 and batch["state"]["n"] == 4:
                os.kill(os.getpid(), signal.SIGKILL)
            yield batch

    W._fake_batches = batches
    return W._worker_with_fake_data(raw)


@pytest.mark.multiproc
def test_a_worker_killed_during_an_upload_leaves_the_previous_step_latest(s3, tiny_config_dict, tmp_path) -> None:
    import fsspec

    fs = fsspec.filesystem("s3")
    raw = _raw(tiny_config_dict, tmp_path / "killed", 6, "s3://fm-ckpt/killed")
    with pytest.raises(RuntimeError, match="a rank died"):
        run_distributed(_worker_killed_during_upload, world_size=2, args=(raw,), init_process_group=False)
    assert fs.cat_file("fm-ckpt/killed/checkpoints/latest").decode().strip() == "step_00000002"
    assert not fs.exists("fm-ckpt/killed/checkpoints/step_00000004/manifest.json")  # never committed there
    # A fresh machine resumes from the last committed step and finishes the run.
    fresh = _raw(tiny_config_dict, tmp_path / "fresh", 6, "s3://fm-ckpt/killed")
    assert run_distributed(_worker_with_fake_data, world_size=2, args=(fresh,), init_process_group=False) == [0, 0]
    assert sorted(_losses(tmp_path / "fresh")) == [3, 4, 5, 6]
    assert fs.cat_file("fm-ckpt/killed/checkpoints/latest").decode().strip() == "step_00000006"


@pytest.mark.unit
def test_log_copies_take_complete_lines_and_only_what_changed(tmp_path: Path, monkeypatch) -> None:
    from fm_train.storage import upload
    from fm_train.storage import log_copies
    from fm_train.storage.log_copies import RunLogCopies

    run, store = tmp_path / "run", tmp_path / "store"
    (run / "tensorboard").mkdir(parents=True)
    (run / "metrics.jsonl").write_text('{"step": 1}\n{"step": 2')  # the sink is writing step 2
    (run / "tensorboard" / "events.out.tfevents.1").write_bytes(b"ev")
    copies = RunLogCopies(run, str(store), retries=0)
    assert copies.copy() == ["metrics.jsonl", "tensorboard/events.out.tfevents.1"]
    assert (store / "metrics.jsonl").read_text() == '{"step": 1}\n'
    assert copies.copy() == []  # nothing changed
    with open(run / "metrics.jsonl", "a") as fh:
        fh.write("}\n")
    assert copies.copy() == ["metrics.jsonl"]
    assert (store / "metrics.jsonl").read_text() == '{"step": 1}\n{"step": 2}\n'

    def refused(remote, data):
        raise PermissionError("read-only bucket")

    monkeypatch.setattr(log_copies, "write_bytes", refused)
    (run / "failures.jsonl").write_text('{"kind": "x"}\n')
    assert copies.copy() == []  # logged, not raised: a run never stops for its log copies
    monkeypatch.setattr(log_copies, "write_bytes", upload.write_bytes)
    assert copies.copy() == ["failures.jsonl"]  # tried again at the next call


@pytest.mark.unit
def test_an_upload_that_fails_twice_is_retried_and_committed(tmp_path: Path, monkeypatch) -> None:
    """A network blip mid-upload: the file is retried with backoff and the step is committed after."""
    from fm_train.storage import upload
    from fm_train.storage.upload import CheckpointUploader, save_id

    step = tmp_path / "run" / "checkpoints" / "step_00000002"
    step.mkdir(parents=True)
    (step / "a.pt").write_bytes(b"weights")
    (step / "manifest.json").write_text("{}")
    calls = {"n": 0}
    real = upload._put_file

    def flaky(local, remote, process):
        if local.name == "a.pt" and calls["n"] < 2:
            calls["n"] += 1
            raise ConnectionResetError("connection reset by peer")
        real(local, remote, process)

    monkeypatch.setattr(upload, "_put_file", flaky)
    uploader = CheckpointUploader(str(tmp_path / "bucket"), rank=0, keep=1, retries=2, backoff_s=0.01)
    uploader.submit(step, ["a.pt"], own={"a.pt": "d"}, expected=[{"a.pt": "d"}])
    uploader.wait()
    assert calls["n"] == 2 and uploader.failed == [] and uploader.committed == ["step_00000002"]
    assert (tmp_path / "bucket" / "checkpoints" / "step_00000002" / "a.pt").read_bytes() == b"weights"
    assert save_id({"a.pt": "d"}) == (tmp_path / "bucket" / "checkpoints" / "step_00000002" / ".uploaded"
                                      / "rank_00000").read_text()


def test_before_the_first_commit_node_local_steps_go_and_shared_ones_stay(tmp_path: Path) -> None:
    """Storage holds no committed step: with a run.dir on each node's own disk a local step is only this
    node's part of one (removed, saying so); a shared run.dir's steps are whole (kept, e.g. after
    uploads that failed)."""
    from fm_train.checkpoint.fetch import fetch_latest

    said: list[str] = []
    for node_local in (False, True):
        step = tmp_path / "run" / "checkpoints" / "step_00000004"
        step.mkdir(parents=True, exist_ok=True)
        (step / "manifest.json").write_text("{}")
        assert fetch_latest(str(tmp_path / "bucket"), tmp_path / "run", say=said.append, node_local=node_local) is None
        assert step.is_dir() != node_local
    assert len(said) == 1 and said[0].startswith(f"removing {step}: ") and "no committed step yet" in said[0]
