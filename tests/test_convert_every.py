"""``convert.every``: verified Hugging Face exports during training, by a background process (issue 30).

One real 2-rank run on real shards (checkpoint.every=2, convert.every=2, convert.keep=2, 8 steps,
``run.storage`` on a loopback S3 server) with a hostile folder already at ``RUN/hf_steps/step_00000002``:
that export fails, training goes on, and steps 4, 6 and 8 are exported. The save hook
(``FM_TRAIN_TEST_HOLD_SAVE``) holds each save until the previous export is seen, so every export is
checked while it exists: loaded with transformers and its logits compared with the probe the training
engine saved with the checkpoint of its own step (and refused against another step's). An
``fm-train eval RUN/hf_steps --watch`` started before the run evaluates each export as it appears.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from distributed import run_distributed
from s3_server import make_bucket, s3_server
from test_engine_worker import _worker_real_data

BUCKET = "fm-hf-steps"
ROOT = Path(__file__).resolve().parents[1]


def _verify(export: Path, step_dir: Path) -> None:
    """The export loads with transformers and gives the training engine's logits of ``step_dir``'s probe."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from fm_train.checkpoint import read_manifest
    from fm_train.convert.probe import read_probe
    from fm_train.convert.verify_probe import verify_against_probe
    from fm_train.families import family_of

    manifest = read_manifest(step_dir)
    fields = manifest["config"]["model"]
    verify_against_probe(family_of(fields), export, fields, read_probe(step_dir, manifest),
                         precision=str(manifest["config"]["precision"]), export_dtype="fp32")
    AutoModelForCausalLM.from_pretrained(str(export), local_files_only=True)
    AutoTokenizer.from_pretrained(str(export), local_files_only=True)


def _wait(what: str, ready, timeout_s: float = 300.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not ready():
        if time.monotonic() > deadline:
            raise TimeoutError(f"waited {timeout_s:g} s for {what}")
        time.sleep(0.2)


def _failures(run: Path) -> list[dict]:
    path = run / "failures.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []


@pytest.mark.multiproc
@pytest.mark.timeout(900)
def test_exports_during_training_verify_load_prune_upload_and_survive_a_failure(tiny_config_dict, corpus, tmp_path,
                                                                                monkeypatch):
    import fsspec

    from fm_train.convert.errors import ConvertError

    run, hold = tmp_path / "run", tmp_path / "hold"
    hold.mkdir()
    for step in (4, 6, 8):
        (hold / f"step_{step:08d}").touch()
    (run / "hf_steps" / "step_00000002").mkdir(parents=True)  # not an export: step 2's export must fail
    (run / "hf_steps" / "step_00000002" / "user-notes.txt").write_text("mine")
    monkeypatch.setenv("FM_TRAIN_TEST_HOLD_SAVE", str(hold))
    with s3_server():
        make_bucket(BUCKET)
        storage = f"s3://{BUCKET}/run"
        raw = {**tiny_config_dict,
               "run": {**tiny_config_dict["run"], "dir": str(run), "storage": storage},
               "data": {**tiny_config_dict["data"], "num_workers": 0, "sources": [{"path": str(corpus)}]},
               "train": {**tiny_config_dict["train"], "steps": 8, "log_every": 1, "eval_every": 0},
               "checkpoint": {"every": 2, "keep": 4},
               "convert": {"at_end": False, "dtype": "fp32", "every": 2, "keep": 2},
               "logging": {"tensorboard": False}}
        env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
        watch = subprocess.Popen([sys.executable, "-m", "fm_train.cli", "eval", str(run / "hf_steps"), "--data",
                                  str(corpus), "--watch", "--poll-s", "0.5", "--batches", "2", "--micro-batch", "2"],
                                 stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env)
        evaluated: list[dict] = []
        threading.Thread(target=lambda: evaluated.extend(json.loads(line) for line in watch.stdout), daemon=True).start()
        checked, problems = [], []

        def export(step: int) -> Path:
            return run / "hf_steps" / f"step_{step:08d}"

        def step_dir(step: int) -> Path:
            return run / "checkpoints" / f"step_{step:08d}"

        def conduct() -> None:
            try:
                _wait("step 2's failure record", lambda: any(r["kind"] == "hf_export_failed" for r in _failures(run)))
                (hold / "step_00000004").unlink()
                for step, following in ((4, 6), (6, 8)):
                    _wait(f"the export of step {step}", lambda: (export(step) / "config.json").is_file())
                    _verify(export(step), step_dir(step))
                    checked.append(step)
                    if step == 6:  # the watcher is done with step 4, so convert.keep may delete it
                        _wait("fm-train eval of step 6", lambda: any(r["step"] == 6 for r in evaluated))
                    (hold / f"step_{following:08d}").unlink()
            except Exception as exc:  # noqa: BLE001 - reported by the test below
                problems.append(exc)
                for left in hold.glob("step_*"):
                    left.unlink()

        conductor = threading.Thread(target=conduct, daemon=True)
        conductor.start()
        assert run_distributed(_worker_real_data, world_size=2, args=(raw,), init_process_group=False) == [0, 0]
        conductor.join(timeout=60)
        assert not problems, problems
        assert checked == [4, 6]

        # The last one, written before the worker ended (it waits for the export in progress).
        _verify(export(8), step_dir(8))
        assert f"exported from `{step_dir(8)}`" in (export(8) / "README.md").read_text()  # not the hidden snapshot
        with pytest.raises(ConvertError, match="do not match the training engine"):  # ... and it is step 8's model, not step 6's
            _verify(export(8), step_dir(6))
        assert sorted(p.name for p in (run / "hf_steps").iterdir() if not p.name.startswith(".")) == \
            ["latest", "step_00000002", "step_00000006", "step_00000008"]  # 4 pruned (keep 2); the user's folder stays
        assert (run / "hf_steps" / "step_00000002" / "user-notes.txt").read_text() == "mine"
        assert (run / "hf_steps" / "latest").read_text().strip() == "step_00000008"
        assert not list((run / "hf_steps").glob(".*")), "no staging or snapshot folder left behind"
        failure = [r for r in _failures(run) if r["kind"] == "hf_export_failed"]
        assert [r["step"] for r in failure] == [2] and "not an export fm-train wrote" in failure[0]["summary"]
        steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
        assert steps == list(range(1, 9))  # training never stopped

        fs = fsspec.filesystem("s3")
        fs.invalidate_cache()
        remote = f"{BUCKET}/run/hf_steps"
        assert sorted(p.rsplit("/", 1)[-1] for p in fs.ls(remote)) == ["latest", "step_00000006", "step_00000008"]
        assert fs.cat_file(f"{remote}/latest").decode().strip() == "step_00000008"
        for name in ("step_00000006", "step_00000008"):
            marker = json.loads(fs.cat_file(f"{remote}/{name}/.uploaded.json"))
            local = run / "hf_steps" / name
            assert sorted(marker["files"]) == sorted(p.relative_to(local).as_posix() for p in local.rglob("*")
                                                      if p.is_file())
            assert fs.cat_file(f"{remote}/{name}/model.safetensors") == (local / "model.safetensors").read_bytes()

        _rank0_disk_only_converts_from_storage(run, tmp_path / "node0", storage)
        _wait("fm-train eval of step 8", lambda: any(r["step"] == 8 for r in evaluated), timeout_s=120)
        watch.send_signal(signal.SIGINT)
        assert watch.wait(timeout=60) == 0
    assert [r["step"] for r in evaluated] == [4, 6, 8]
    assert all(r["hf_dir"].endswith(f"step_{r['step']:08d}") and r["loss"] > 0 for r in evaluated)
    _stopped_midway_leaves_nothing(run, tmp_path / "again")


def _stopped_midway_leaves_nothing(run: Path, again: Path) -> None:
    """The end of training stops an export caught halfway (its staging folder written, frozen there by
    SIGSTOP so that the stop lands inside it): nothing is published and nothing is left behind."""
    import shutil

    from fm_train.convert.background import BackgroundExports

    shutil.copytree(run / "checkpoints", again / "checkpoints")
    exports = BackgroundExports(again, dtype="fp32", keep=2, storage=None, retries=0, end_wait_s=0, say=print)
    exports.submit(8, again / "checkpoints" / "step_00000008")
    _wait("the export's staging folder", lambda: any((again / "hf_steps").glob(".step_00000008.tmp-*")), 120)
    os.kill(exports.pid, signal.SIGSTOP)
    threading.Timer(1.0, os.kill, args=(exports.pid, signal.SIGCONT)).start()  # SIGTERM is pending by then
    lines = exports.close()
    assert any("unfinished" in line and "nothing published" in line for line in lines), lines
    assert sorted(p.name for p in (again / "hf_steps").iterdir()) == []


def test_prune_keeps_the_newest_and_any_export_being_read(tmp_path):
    from fm_train.convert.exports_dir import list_exports, prune, reading, write_latest
    from fm_train.convert.out_dir import RECORD

    for step in (2, 4, 6, 8):
        (tmp_path / f"step_{step:08d}").mkdir()
        (tmp_path / f"step_{step:08d}" / RECORD).write_text("{}")
    (tmp_path / ".step_00000010.tmp-x").mkdir()  # staging: not an export
    write_latest(tmp_path, "step_00000008")
    with reading(tmp_path / "step_00000002"):
        assert prune(tmp_path, keep=2) == (["step_00000004"], ["step_00000002"])
    assert prune(tmp_path, keep=2) == (["step_00000002"], [])
    assert [s for s, _ in list_exports(tmp_path)] == [6, 8]


@pytest.mark.parametrize(("convert", "checkpoint", "message"), [
    ({"every": 3}, {"every": 2}, "convert.every=3 is not a multiple of checkpoint.every=2"),
    ({"every": 4}, {"every": 0}, "convert.every=4 exports checkpoints during training, but checkpoint.every=0"),
    ({"every": -2}, {"every": 2}, "convert.every"),
    ({"every": 2, "keep": 0}, {"every": 2}, "convert.keep"),
    ({"every": 2, "end_wait_s": 4000}, {"every": 2}, "convert.end_wait_s=4000 is not below cluster.save_timeout_s=3600"),
])
def test_convert_every_config_errors_name_the_field(tiny_config_dict, convert, checkpoint, message):
    from fm_train.config import ConfigError, build_config

    with pytest.raises(ConfigError, match=message.replace(".", r"\.")):
        build_config({**tiny_config_dict, "convert": convert, "checkpoint": checkpoint})


def test_eval_of_a_folder_without_exports_or_watch_on_a_model_dir_says_what_to_do(tmp_path, capsys):
    from fm_train.cli import main

    (tmp_path / "run" / "hf_steps").mkdir(parents=True)
    assert main(["eval", str(tmp_path / "run" / "hf_steps"), "--data", str(tmp_path)]) == 2
    assert "holds no exports yet (convert.every writes them during training); pass --watch" in capsys.readouterr().err
    assert main(["eval", str(tmp_path), "--data", str(tmp_path), "--watch"]) == 2
    assert "--watch needs a folder of exports (RUN/hf_steps, written by convert.every)" in capsys.readouterr().err
    (tmp_path / "run" / "hf_steps" / "latest").write_text("step_00000004\n")  # names nothing published
    assert main(["eval", str(tmp_path / "run" / "hf_steps" / "latest"), "--data", str(tmp_path)]) == 2
    assert "latest names no published export" in capsys.readouterr().err


def _rank0_disk_only_converts_from_storage(run: Path, node0: Path, storage: str) -> None:
    """Without a shared run.dir, rank 0's copy of a step lacks rank 1's files: the export reads the step
    committed in run.storage instead, and it is still step 8's model."""
    import shutil

    from fm_train.convert.export_step import export_step

    local = node0 / "checkpoints" / "step_00000008"
    shutil.copytree(run / "checkpoints" / "step_00000008", local)
    rank1 = sorted(local.glob("*rank_1*"))
    assert rank1
    for path in rank1:
        path.unlink()
    out, notes = export_step({"step": 8, "step_dir": str(local), "run_dir": str(node0), "dtype": "fp32", "keep": 2,
                              "storage": storage, "retries": 1, "commit_wait_s": 30}, progress=print)
    assert any(note.startswith(f"converted from {storage}") for note in notes), notes
    _verify(out, run / "checkpoints" / "step_00000008")
