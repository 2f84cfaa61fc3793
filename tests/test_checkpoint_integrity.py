"""Checksums end to end: every file of a real step directory is hashed at save time; a flipped byte in
any of them is caught by resume and by convert, naming the file; a damaged ``latest`` resumes from the
previous checkpoint (loudly, with a record in RUN/failures.jsonl); only damaged checkpoints refuse a
fresh start unless ``checkpoint.allow_fresh_start``."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest

import test_checkpoint_support as S
from distributed import run_distributed

pytestmark = pytest.mark.multiproc


def _two_saves(raw: dict, run_dir: str) -> list[float]:
    """Train 1..3 on 2 ranks, saving at 2 and 3 (the second also uploaded to a directory ``storage``
    beside the run); returns the losses of steps 1..3, writes each rank's phase timings of the second
    save to ``timings_rank_R.json`` there."""
    import torch.distributed as dist

    from fm_train.checkpoint import save_checkpoint
    from fm_train.storage.upload import CheckpointUploader
    from fm_train.config import build_config

    cfg = build_config(raw)
    engine = S.build_engine(cfg)
    rank = dist.get_rank()
    uploader = CheckpointUploader(str(Path(run_dir).parent / "storage"), rank=rank, keep=5)
    losses, timings = [], {}
    for first, step in ((1, 2), (3, 3)):
        losses += S.train_steps(engine, first, step)
        save_checkpoint(engine, Path(run_dir), step, manifest=S.make_manifest(cfg, step), keep=5,
                        is_rank0=rank == 0, uploader=uploader if step == 3 else None, timings=timings)
    uploader.close()
    S.dump(Path(run_dir).parent / f"timings_rank_{rank}.json", timings)
    return losses


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> tuple[Path, list[float]]:
    """One ZeRO-2 dp2 fp32 run with checkpoints at steps 2 and 3, and its losses."""
    root = tmp_path_factory.mktemp("integrity")
    S.write_tokenizer(root / "data")
    raw = S.tiny_raw(2, 2, tokenizer_root=str(root / "data"))
    losses = run_distributed(_two_saves, 2, args=(raw, str(root / "run")))[0]
    return root, losses


def _copy_run(trained_root: Path, tmp_path: Path) -> Path:
    run = tmp_path / "run"
    shutil.copytree(trained_root / "run", run)
    return run


def _flip_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size: only the checksum can tell
    path.write_bytes(bytes(data))


def _entries(run: Path) -> list[str]:
    """Step directories and ``latest`` of RUN/checkpoints (DeepSpeed also copies its recovery scripts there)."""
    return sorted(p.name for p in (run / "checkpoints").iterdir() if p.name.startswith(("step_", "latest")))


def _step_files(step_dir: Path) -> list[str]:
    return sorted(str(p.relative_to(step_dir)) for p in step_dir.rglob("*") if p.is_file() and p.name != "manifest.json")


def test_manifest_checksums_every_file_with_sha256(trained) -> None:
    step = trained[0] / "run/checkpoints/step_00000003"
    checksums = json.loads((step / "manifest.json").read_text())["checksums"]
    assert checksums["algorithm"] == "sha256"
    files = _step_files(step)
    assert "rng/rank_00000.pt" in files and "rng/rank_00001.pt" in files
    assert "zero_pp_rank_1_mp_rank_00_optim_states.pt" in files  # written by rank 1, hashed by rank 1
    assert sorted(checksums["files"]) == files
    for rel in files:
        assert checksums["files"][rel] == hashlib.sha256((step / rel).read_bytes()).hexdigest(), rel


def test_a_save_says_where_its_time_went(trained) -> None:
    root, _ = trained
    for rank in (0, 1):
        timings = json.loads((root / f"timings_rank_{rank}.json").read_text())
        # Rank 0 alone fsyncs and commits; every rank runs the probe, writes, hashes and hands over.
        expected = {"waiting for the previous upload", "probe", "files", "checksums", "waiting for the other ranks",
                    "retention", "hand-over to the upload"}
        expected |= {"fsync", "commit"} if rank == 0 else set()
        assert expected <= set(timings), (rank, timings)
        assert timings["files"] > 0 and all(t >= 0 for t in timings.values()), timings
    assert (root / "storage" / "checkpoints" / "step_00000003" / "manifest.json").is_file()


def test_a_flipped_byte_in_any_file_is_caught_by_resume_and_convert(trained, tmp_path: Path) -> None:
    from fm_train.checkpoint import CheckpointError, find_resume_point
    from fm_train.convert import ConvertError, convert_checkpoint

    root = trained[0]
    files = _step_files(root / "run/checkpoints/step_00000003")
    assert len(files) >= 5
    for i, rel in enumerate(files):
        run = _copy_run(root, tmp_path / str(i))
        step = run / "checkpoints/step_00000003"
        _flip_byte(step / rel)
        with pytest.raises(CheckpointError, match=f"is damaged: {rel} \\(sha256 differs"):
            find_resume_point(run, str(step))
        out = tmp_path / str(i) / "hf"
        with pytest.raises(ConvertError, match=f"{step} is damaged: {rel} \\(sha256 differs"):
            convert_checkpoint(step, out, dtype="fp32", verify=False)
        assert not out.exists()
        # checkpoint.resume: auto goes back to the previous, intact checkpoint instead.
        assert find_resume_point(run, "auto") == run / "checkpoints/step_00000002"
        assert (run / "checkpoints/step_00000003.damaged" / rel).is_file()


def test_a_damaged_latest_resumes_from_the_previous_checkpoint(trained, tmp_path: Path, capsys) -> None:
    root, losses = trained
    run = _copy_run(root, tmp_path)
    _flip_byte(run / "checkpoints/step_00000003/zero_pp_rank_1_mp_rank_00_optim_states.pt")
    got = run_distributed(S.resume_auto, 2, args=(S.run_raw(root / "data", run), str(run), 3))
    assert all(r.get("step") == 2 for r in got), got
    assert got[0]["losses"] == losses[2:]  # step 3 again, bit-identical to the uninterrupted run
    records = [json.loads(line) for line in (run / "failures.jsonl").read_text().splitlines()]
    assert len(records) == 1 and records[0]["kind"] == "checkpoint_fallback", records
    assert "zero_pp_rank_1_mp_rank_00_optim_states.pt (sha256 differs" in records[0]["summary"]
    assert records[0]["chosen"].endswith("step_00000002")
    assert (run / "checkpoints/latest").read_text().strip() == "step_00000002"
    assert _entries(run) == ["latest", "step_00000002", "step_00000003.damaged"]


def test_a_torn_latest_file_falls_back_to_the_newest_intact_step(trained, tmp_path: Path, capsys) -> None:
    from fm_train.checkpoint import find_resume_point

    run = _copy_run(trained[0], tmp_path)
    (run / "checkpoints/latest").write_bytes(b"step_000\x00\x17")
    assert find_resume_point(run, "auto") == run / "checkpoints/step_00000003"
    out = capsys.readouterr().out
    assert "resuming from" in out and "latest" in out and "not a step directory name" in out
    record = json.loads((run / "failures.jsonl").read_text())
    assert record["kind"] == "checkpoint_fallback" and record["rejected"] == [] and record["latest_problem"]
    assert (run / "checkpoints/latest").read_text().strip() == "step_00000003"


def test_only_damaged_checkpoints_refuse_a_fresh_start_unless_allowed(trained, tmp_path: Path) -> None:
    from fm_train.checkpoint import CheckpointError, find_resume_point

    root = trained[0]
    run = _copy_run(root, tmp_path)
    _flip_byte(run / "checkpoints/step_00000003/mp_rank_00_model_states.pt")
    (run / "checkpoints/step_00000002/rng/rank_00001.pt").unlink()
    with pytest.raises(CheckpointError) as info:
        find_resume_point(run, "auto")
    message = str(info.value)
    assert "holds checkpoints but none is intact" in message and "checkpoint.allow_fresh_start=true" in message
    assert "step_00000003 (mp_rank_00_model_states.pt (sha256 differs" in message
    assert "step_00000002 (rng/rank_00001.pt (missing)" in message
    assert not (run / "failures.jsonl").exists()  # refused: nothing moved, nothing recorded
    assert (run / "checkpoints/step_00000003").is_dir()
    # The real worker path refuses the same way on every rank (the worker then exits 2).
    got = run_distributed(S.resume_auto, 2, args=(S.run_raw(root / "data", run), str(run), 3))
    assert all("none is intact" in r.get("error", "") for r in got), got

    got = run_distributed(S.resume_auto, 2, args=(S.run_raw(root / "data", run, allow_fresh_start=True), str(run), 3))
    assert all(r == {"fresh": True} for r in got), got
    record = json.loads((run / "failures.jsonl").read_text())
    assert record["kind"] == "checkpoint_fresh_start" and len(record["rejected"]) == 2
    assert _entries(run) == ["step_00000002.damaged", "step_00000003.damaged"]  # latest removed too


def test_a_checkpoint_without_checksums_is_checked_by_size(trained, tmp_path: Path, caplog) -> None:
    """Manifests written before checksums existed still resume and convert (sizes only, and the log says so)."""
    import logging

    from fm_train.checkpoint import find_resume_point

    run = _copy_run(trained[0], tmp_path)
    step = run / "checkpoints/step_00000003"
    manifest = json.loads((step / "manifest.json").read_text())
    del manifest["checksums"]
    (step / "manifest.json").write_text(json.dumps(manifest))
    with caplog.at_level(logging.WARNING, logger="fm_train.checkpoint"):
        assert find_resume_point(run, "auto") == step
    assert "no checksums" in caplog.text


def _resume_point_per_node(run_dirs: list[str]) -> str | None:
    """``find_resume_point`` with each rank's own run dir (a run.dir on each node's own disk)."""
    import torch.distributed as dist

    from fm_train.checkpoint import find_resume_point

    found = find_resume_point(Path(run_dirs[dist.get_rank()]), "auto")
    return found.name if found is not None else None


def test_ranks_with_their_own_run_dirs_agree_on_a_step_every_node_holds(trained, tmp_path: Path) -> None:
    """Node-local run.dirs after a restart: rank 0's node saved step 3 (manifest and all), rank 1's node
    holds its own files of step 3 but no manifest (rank 0 writes it), and step 2 whole (fetched from
    storage). Both ranks resume from step 2; walking different candidates would pair rank 0's check of
    step 3 with rank 1's of step 2 and split the run (or leave one rank waiting in a collective)."""
    node_a = _copy_run(trained[0], tmp_path / "a")
    node_b = _copy_run(trained[0], tmp_path / "b")
    (node_b / "checkpoints/step_00000003/manifest.json").unlink()
    (node_b / "checkpoints/latest").write_text("step_00000002\n")
    got = run_distributed(_resume_point_per_node, 2, args=([str(node_a), str(node_b)],))
    assert got == ["step_00000002", "step_00000002"], got
    assert _entries(node_a) == ["latest", "step_00000002", "step_00000003"]  # nothing renamed: not damaged



def test_a_step_only_one_node_holds_is_not_resumed(trained, tmp_path: Path, capfd) -> None:
    """Before the first commit in storage: rank 0's node saved steps 2 and 3 locally, rank 1's node
    holds none whole. Nothing is a checkpoint yet: both ranks start fresh, and rank 0 says why."""
    node_a = _copy_run(trained[0], tmp_path / "a")
    node_b = _copy_run(trained[0], tmp_path / "b")
    for step in ("step_00000002", "step_00000003"):
        (node_b / "checkpoints" / step / "manifest.json").unlink()
    assert run_distributed(_resume_point_per_node, 2, args=([str(node_a), str(node_b)],)) == [None, None]
    assert "not resuming from step_00000003, step_00000002: not complete in every node's" in capfd.readouterr().out


def test_resume_by_step_number_or_latest_names_what_is_missing(trained, tmp_path: Path) -> None:
    from fm_train.checkpoint import CheckpointError, find_resume_point

    run = _copy_run(trained[0], tmp_path)
    assert find_resume_point(run, "2") == run / "checkpoints/step_00000002"  # fm-train launch --resume 2
    assert find_resume_point(run, "latest") == run / "checkpoints/step_00000003"
    with pytest.raises(CheckpointError, match=r"checkpoint\.resume=7: .*step_00000007 does not exist; the steps saved"
                                              r" in .* are 2, 3"):
        find_resume_point(run, "7")
    _flip_byte(run / "checkpoints/step_00000002/manifest.json")
    with pytest.raises(CheckpointError, match="step_00000002"):
        find_resume_point(run, "2")  # a named step is verified like a named path
    with pytest.raises(CheckpointError, match=r"checkpoint\.resume=latest, but .* holds no checkpoint; use auto"):
        find_resume_point(tmp_path / "empty", "latest")
    assert find_resume_point(tmp_path / "empty", "auto") is None
