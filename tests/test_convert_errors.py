"""Bad input to the converter: one clear error line, exit 2, nothing left at --out."""

from __future__ import annotations

import argparse
import logging
import re
import shutil
from pathlib import Path

import pytest

import test_checkpoint_support as S
from distributed import run_distributed

pytestmark = pytest.mark.multiproc


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """One ZeRO-2 dp2 run with checkpoints at steps 2 and 3 (shared by this module's tests)."""
    root = tmp_path_factory.mktemp("conv")
    S.write_tokenizer(root / "data")
    raw = S.tiny_raw(2, 2, tokenizer_root=str(root / "data"))
    run_distributed(_two_saves, 2, args=(raw, str(root / "run")))
    return root


def _two_saves(raw: dict, run_dir: str) -> None:
    import torch.distributed as dist

    from fm_train.checkpoint import save_checkpoint
    from fm_train.config import build_config

    cfg = build_config(raw)
    engine = S.build_engine(cfg)
    for step in (2, 3):
        S.train_steps(engine, step if step > 2 else 1, step)
        save_checkpoint(engine, Path(run_dir), step, manifest=S.make_manifest(cfg, step), keep=5,
                        is_rank0=dist.get_rank() == 0)


def _cli(argv: list[str]) -> argparse.Namespace:
    from fm_train.cli.convert import add_convert_arguments

    parser = argparse.ArgumentParser()
    add_convert_arguments(parser)
    return parser.parse_args(argv)


def _run(argv: list[str], capsys) -> tuple[int, str]:
    from fm_train.cli.convert import run_convert

    code = run_convert(_cli(argv))
    return code, capsys.readouterr().err


def test_cli_converts_and_refuses_existing_out(trained: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "hf"
    code, err = _run([str(trained / "run"), "--out", str(out), "--dtype", "fp32"], capsys)
    assert code == 0, err
    assert "verified against the engine's probe: max abs diff" in err and (out / "model.safetensors").is_file()
    code, err = _run([str(trained / "run"), "--out", str(out)], capsys)
    assert code == 2
    assert err.strip().splitlines()[-1].startswith("fm-train convert: error: ") and "--overwrite" in err
    code, err = _run([str(trained / "run"), "--out", str(out), "--overwrite"], capsys)
    assert code == 0, err
    assert [p.name for p in tmp_path.iterdir()] == ["hf"]  # the replaced dir and temp dirs are gone


def _rewrite_manifest(step_dir: Path, edit) -> None:
    import json

    path = step_dir / "manifest.json"
    manifest = json.loads(path.read_text())
    edit(manifest)
    path.write_text(json.dumps(manifest, indent=2))


def test_cli_fails_when_the_export_differs_from_the_engine_probe(trained: Path, tmp_path: Path, capsys) -> None:
    """A probe the export does not reproduce (here: the engine's logits shifted at one position, the
    file's digest recomputed) fails with exit 2, the field and the difference named, nothing written."""
    from safetensors.torch import load_file, save_file

    from fm_train.checkpoint.integrity import file_digest

    run = tmp_path / "run"
    shutil.copytree(trained / "run", run)
    step_dir = run / "checkpoints/step_00000003"
    probe = step_dir / "probe.safetensors"
    record = load_file(str(probe))
    record["logsumexp"][1, 5] += 0.5
    save_file(record, str(probe))

    def fix_digest(manifest: dict) -> None:
        manifest["checksums"]["files"]["probe.safetensors"] = file_digest(probe)
        manifest["files"]["probe.safetensors"] = probe.stat().st_size

    _rewrite_manifest(step_dir, fix_digest)
    out = tmp_path / "hf"
    code, err = _run([str(run), "--out", str(out), "--dtype", "fp32"], capsys)
    assert code == 2, err
    last = err.strip().splitlines()[-1]
    assert last.startswith("fm-train convert: error: verification failed") and "logsumexp[1, 5]" in last, last
    assert "max abs diff 0.5" in last, last
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]  # no output, no temp dir


def test_checkpoint_without_probe_falls_back_to_the_self_comparison(trained: Path, tmp_path: Path, capsys) -> None:
    run = tmp_path / "run"
    shutil.copytree(trained / "run", run)
    step_dir = run / "checkpoints/step_00000003"
    _rewrite_manifest(step_dir, lambda m: m.pop("probe"))  # as fm-train wrote manifests before the probe
    code, err = _run([str(run), "--out", str(tmp_path / "hf"), "--dtype", "bf16"], capsys)
    assert code == 0, err
    assert "has no probe" in err and "cannot catch a wrong tp/pp/ZeRO merge" in err
    assert "verified: max abs logit diff" in err
    assert "fm_train's model" in (tmp_path / "hf/README.md").read_text()


def test_cli_default_out_is_the_run_hf_dir(trained: Path, tmp_path: Path, capsys) -> None:
    run = tmp_path / "run"
    shutil.copytree(trained / "run", run)
    code, err = _run([str(run / "checkpoints/step_00000002"), "--no-verify"], capsys)
    assert code == 0, err
    assert (run / "hf/config.json").is_file() and "| steps | 2 |" in (run / "hf/README.md").read_text()


def test_dir_without_manifest_is_refused_by_name(trained: Path, tmp_path: Path, capsys) -> None:
    partial = tmp_path / "step_00000009"
    shutil.copytree(trained / "run/checkpoints/step_00000003", partial)
    (partial / "manifest.json").unlink()
    code, err = _run([str(partial), "--out", str(tmp_path / "hf")], capsys)
    assert code == 2 and str(partial) in err and "no manifest.json" in err
    assert len(err.strip().splitlines()) == 1
    assert not (tmp_path / "hf").exists()


def test_missing_shard_file_is_named(trained: Path, tmp_path: Path, capsys) -> None:
    step = tmp_path / "step_00000003"
    shutil.copytree(trained / "run/checkpoints/step_00000003", step)
    (step / "zero_pp_rank_1_mp_rank_00_optim_states.pt").unlink()
    code, err = _run([str(step), "--out", str(tmp_path / "hf")], capsys)
    assert code == 2 and "zero_pp_rank_1_mp_rank_00_optim_states.pt (missing)" in err
    assert not (tmp_path / "hf").exists()


def test_missing_tokenizer_needs_a_choice(trained: Path, tmp_path: Path, capsys) -> None:
    step = tmp_path / "run/checkpoints/step_00000003"
    shutil.copytree(trained / "run/checkpoints/step_00000003", step)
    import json

    manifest = json.loads((step / "manifest.json").read_text())
    manifest["config"]["data"]["sources"][0]["path"] = str(tmp_path / "nowhere")
    (step / "manifest.json").write_text(json.dumps(manifest))
    code, err = _run([str(step), "--out", str(tmp_path / "hf")], capsys)
    assert code == 2 and "no tokenizer found" in err and "--no-tokenizer" in err
    code, err = _run([str(step), "--out", str(tmp_path / "hf"), "--no-tokenizer"], capsys)
    assert code == 0, err
    assert not (tmp_path / "hf/tokenizer.json").exists()


def test_swapped_same_shape_tensors_fail_verification(trained: Path, tmp_path: Path, monkeypatch) -> None:
    """q_proj and o_proj of block 0 are both 64x64: names and shapes pass, the logits must not."""
    from fm_train.convert import ConvertError, convert_checkpoint
    from fm_train.convert import export as export_mod

    real = export_mod.hf_layout

    def swapped(family, model_fields):
        layout = dict(real(family, model_fields))
        q, o = "model.layers.0.self_attn.q_proj.weight", "model.layers.0.self_attn.o_proj.weight"
        layout[q], layout[o] = layout[o], layout[q]
        return layout

    monkeypatch.setattr(export_mod, "hf_layout", swapped)
    with pytest.raises(ConvertError, match="verification failed: the exported model's logits do not match the training engine's"):
        convert_checkpoint(trained / "run", tmp_path / "hf", dtype="bf16")
    assert list(tmp_path.iterdir()) == []  # nothing at out, no temp dir


def test_partial_step_dir_is_skipped_after_a_kill(trained: Path, tmp_path: Path, caplog) -> None:
    """A save killed before its manifest: resume and convert use the previous step, and say so."""
    from fm_train.checkpoint import find_resume_point
    from fm_train.convert import convert_checkpoint

    run = tmp_path / "run"
    shutil.copytree(trained / "run", run)
    killed = run / "checkpoints/step_00000004"
    shutil.copytree(run / "checkpoints/step_00000003", killed)
    (killed / "manifest.json").unlink()
    (killed / "mp_rank_00_model_states.pt").write_bytes(b"torn")
    assert (run / "checkpoints/latest").read_text().strip() == "step_00000003"
    with caplog.at_level(logging.WARNING, logger="fm_train.checkpoint"):
        assert find_resume_point(run, "auto") == run / "checkpoints/step_00000003"
    assert any("step_00000004" in r.getMessage() and "incomplete" in r.getMessage() for r in caplog.records)
    out = convert_checkpoint(run, tmp_path / "hf", dtype="fp32", verify=False)
    assert "| steps | 3 |" in (out / "README.md").read_text()


def _listing(root: Path) -> list[str]:
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*"))


@pytest.mark.parametrize("where", ["run", "checkpoints", "step", "holder"])
def test_an_output_overlapping_its_input_is_refused_and_nothing_is_lost(trained: Path, tmp_path: Path, capsys,
                                                                        where: str) -> None:
    """Issue 25, finding 2: ``--out RUN --overwrite`` deleted the run (also RUN/checkpoints, a step, the
    directory holding the run). Each is refused naming both paths; the run is byte for byte as before."""
    holder = tmp_path / "holder"
    run = holder / "run"
    shutil.copytree(trained / "run", run)
    (run / "metrics.jsonl").write_text('{"step": 1}\n')
    before = _listing(holder)
    out = {"run": run, "checkpoints": run / "checkpoints", "step": run / "checkpoints/step_00000003",
           "holder": holder}[where]
    code, err = _run([str(run), "--out", str(out), "--overwrite", "--dtype", "fp32"], capsys)
    assert code == 2 and f"--out {out}" in err, err
    assert "overlaps" in err or "holds the run directory" in err, err
    assert _listing(holder) == before


def test_overwrite_deletes_only_what_the_old_export_wrote(trained: Path, tmp_path: Path, capsys) -> None:
    """The old export is swapped out by rename; only the files its record lists go (names checked: a
    hostile ``../`` entry deletes nothing outside), a user's file is kept and named; a directory fm-train
    did not write is refused by --overwrite."""
    import json

    out, victim = tmp_path / "hf", tmp_path / "victim.txt"
    victim.write_text("keep me")
    code, err = _run([str(trained / "run"), "--out", str(out), "--dtype", "fp32"], capsys)
    assert code == 0, err
    (out / "notes.txt").write_text("mine")
    (out / "README.md").write_text((out / "README.md").read_text() + "\nmy notes on this model\n")
    record = json.loads((out / ".fm-train-export.json").read_text())
    assert "model.safetensors" in record["files"] and "config.json" in record["files"]
    record["files"]["../victim.txt"] = {"size": 7, "sha256": "0" * 64}
    (out / ".fm-train-export.json").write_text(json.dumps(record))
    code, err = _run([str(trained / "run"), "--out", str(out), "--overwrite", "--dtype", "fp32"], capsys)
    assert code == 0, err
    assert victim.read_text() == "keep me" and (out / "model.safetensors").is_file()
    kept = [p for p in tmp_path.iterdir() if p.name.startswith("hf.kept-")]
    assert len(kept) == 1 and _listing(kept[0]) == ["README.md", "notes.txt"] and str(kept[0]) in err, err
    assert "my notes" in (kept[0] / "README.md").read_text()  # changed since the export wrote it: the user's
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "thesis.tex").write_text("years of work")
    code, err = _run([str(trained / "run"), "--out", str(mine), "--overwrite"], capsys)
    assert code == 2 and "was not written by fm-train convert" in err, err
    assert _listing(mine) == ["thesis.tex"]


def test_the_export_honours_the_umask(trained: Path, tmp_path: Path, capsys) -> None:
    import os

    old = os.umask(0o022)
    try:
        code, err = _run([str(trained / "run"), "--out", str(tmp_path / "hf"), "--no-verify"], capsys)
    finally:
        os.umask(old)
    assert code == 0, err
    assert (tmp_path / "hf").stat().st_mode & 0o777 == 0o755
    assert (tmp_path / "hf/config.json").stat().st_mode & 0o777 == 0o644


def test_a_tokenizer_other_than_the_runs_is_refused_naming_both_hashes(trained: Path, tmp_path: Path, capsys) -> None:
    """Issue 25, finding 4: after the data directory was rebuilt from other text, the export shipped the
    wrong tokenizer. The manifest's tokenizer hash now decides: a rebuilt data dir or a wrong --tokenizer is
    refused naming both hashes; the run's own tokenizer, given explicitly, converts."""
    import json

    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    run = tmp_path / "run"
    shutil.copytree(trained / "run", run)
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.train_from_iterator(["other text entirely, rebuilt"] * 20,
                            trainers.BpeTrainer(vocab_size=280, special_tokens=["<unk>", "<s>", "</s>"]))
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="</s>").save_pretrained(
        str(tmp_path / "rebuilt/tokenizer"))
    for step in ("step_00000002", "step_00000003"):
        _rewrite_manifest(run / "checkpoints" / step,
                          lambda m: m["config"]["data"]["sources"][0].update(path=str(tmp_path / "rebuilt")))
    want = json_manifest(run)["data"]["tokenizer_hash"]
    code, err = _run([str(run), "--out", str(tmp_path / "hf"), "--no-verify"], capsys)
    assert code == 2 and want[:12] in err and str(tmp_path / "rebuilt/tokenizer") in err, err
    assert not (tmp_path / "hf").exists()
    code, err = _run([str(run), "--out", str(tmp_path / "hf"), "--no-verify", "--tokenizer",
                      str(tmp_path / "rebuilt/tokenizer")], capsys)
    assert code == 2 and "tokenizer hash" in err, err
    code, err = _run([str(run), "--out", str(tmp_path / "hf"), "--no-verify", "--tokenizer",
                      str(trained / "data/tokenizer")], capsys)
    assert code == 0, err
    assert "equals the one the checkpoint's manifest records" in (tmp_path / "hf/README.md").read_text()
    # The same tokenizer written as hub files often are (merges as "a b" strings, other layout) is the same.
    hub = tmp_path / "hub"
    shutil.copytree(trained / "data/tokenizer", hub)
    spec = json.loads((hub / "tokenizer.json").read_text())
    spec["model"]["merges"] = [" ".join(m) if isinstance(m, list) else m for m in spec["model"]["merges"]]
    (hub / "tokenizer.json").write_text(json.dumps(spec, indent=4))
    code, err = _run([str(run), "--out", str(tmp_path / "hf2"), "--no-verify", "--tokenizer", str(hub)], capsys)
    assert code == 0, err


def json_manifest(run: Path) -> dict:
    import json

    return json.loads((run / "checkpoints/step_00000003/manifest.json").read_text())


@pytest.mark.parametrize("damage", ["missing_tensor", "wrong_vocabulary", "not_safetensors"])
def test_a_damaged_probe_is_named_as_such(trained: Path, tmp_path: Path, capsys, damage: str) -> None:
    """Issue 25, finding 12: a probe missing a tensor ended in a KeyError, one of another shape was reported
    as tensor-parallel shards out of order. Each is now one line naming the probe (digests rewritten, as
    an attacker or a bad copy would leave them)."""
    from safetensors.torch import load_file, save_file

    from fm_train.checkpoint.integrity import file_digest

    run = tmp_path / "run"
    shutil.copytree(trained / "run", run)
    step_dir = run / "checkpoints/step_00000003"
    probe = step_dir / "probe.safetensors"
    record = load_file(str(probe))
    if damage == "missing_tensor":
        del record["logsumexp"]
        save_file(record, str(probe))
    elif damage == "wrong_vocabulary":
        record["logits"] = record["logits"][..., :7].contiguous()
        save_file(record, str(probe))
    else:
        probe.write_bytes(b"\x00" * 64)

    def fix_digest(manifest: dict) -> None:
        manifest["checksums"]["files"]["probe.safetensors"] = file_digest(probe)
        manifest["files"]["probe.safetensors"] = probe.stat().st_size

    _rewrite_manifest(step_dir, fix_digest)
    code, err = _run([str(run), "--out", str(tmp_path / "hf"), "--dtype", "fp32"], capsys)
    last = err.strip().splitlines()[-1]
    assert code == 2 and last.startswith("fm-train convert: error:"), err
    assert "probe" in last and "out of order" not in last, last
    want = {"missing_tensor": "no tensor logsumexp", "wrong_vocabulary": "does not belong to its model",
            "not_safetensors": "cannot read the probe"}[damage]
    assert want in last, last


@pytest.mark.parametrize("plant", ["held_record", "unrecorded_file", "symlinked_file", "symlinked_step"])
def test_a_step_that_fm_train_did_not_write_is_refused_by_name(trained: Path, tmp_path: Path, capsys,
                                                               plant: str) -> None:
    """What would exempt files from the checks or put unchecked bytes in DeepSpeed's way: a planted
    ``.held.json`` listing no files (with a tampered weight), a file the manifest does not record (DeepSpeed
    globs ``mp_rank_*``), a symlinked file, a symlinked step directory."""
    run = tmp_path / "run"
    shutil.copytree(trained / "run", run)
    step = run / "checkpoints/step_00000003"
    weights = step / "mp_rank_00_model_states.pt"
    if plant == "held_record":
        (step / ".held.json").write_text('{"ranks": [0], "files": []}')
        data = bytearray(weights.read_bytes())
        data[len(data) // 2] ^= 0xFF
        weights.write_bytes(bytes(data))
        want = ".held.json (it does not list the files"
    elif plant == "unrecorded_file":
        shutil.copy(weights, step / "mp_rank_01_model_states.pt")
        want = "mp_rank_01_model_states.pt (not recorded in the manifest"
    elif plant == "symlinked_file":
        (tmp_path / "elsewhere").mkdir()
        weights.rename(tmp_path / "elsewhere" / weights.name)
        weights.symlink_to(tmp_path / "elsewhere" / weights.name)
        want = "mp_rank_00_model_states.pt (a symlink"
    else:
        step.rename(tmp_path / "real_step")
        step.symlink_to(tmp_path / "real_step", target_is_directory=True)
        want = "step_00000003 itself (a symlink"
    code, err = _run([str(step), "--out", str(tmp_path / "hf"), "--no-verify"], capsys)
    assert code == 2 and (want in err or plant == "held_record"), err  # convert refuses any held step
    assert not (tmp_path / "hf").exists()
    from fm_train.checkpoint import CheckpointError, find_resume_point

    with pytest.raises(CheckpointError, match=re.escape(want)):  # the resume's check, one process
        find_resume_point(run, str(step))


def test_a_step_outside_a_run_converts_beside_itself(trained: Path, tmp_path: Path, capsys) -> None:
    """A step directory copied on its own (no RUN/checkpoints around it): its parent is no checkpoints
    directory, nothing is refused for overlapping it, and the default --out is STEP-hf beside it."""
    shutil.copytree(trained / "run/checkpoints/step_00000003", tmp_path / "step_00000003")
    code, err = _run([str(tmp_path / "step_00000003"), "--no-verify", "--tokenizer", str(trained / "data/tokenizer")],
                     capsys)
    assert code == 0, err
    assert (tmp_path / "step_00000003-hf/config.json").is_file()
