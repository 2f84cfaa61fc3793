"""With ``run.storage``, the run's results end in storage: the converted model too (issue 25, finding 10).

A 2-rank worker run on the real default-corpus shards commits its checkpoint to a real S3 server on
loopback; then the launcher's own end-of-run steps (convert from storage, verified; sample; publish)
run as the driver runs them, in child processes. The bucket ends with every file of ``RUN/hf`` under
``run/hf/`` and the marker naming them (size and sha256), and the summary prints that URI. An upload
that stops halfway (a plain directory as storage, one name blocked) leaves no marker, so it cannot
be mistaken for a complete model, and the summary says nothing of storage.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from distributed import run_distributed
from s3_server import make_bucket, s3_server
from test_engine_worker import _worker_real_data

BUCKET = "fm-results"


@pytest.fixture(scope="module")
def s3():
    with s3_server() as endpoint:
        make_bucket(BUCKET)
        yield endpoint


def _raw(tiny_config_dict: dict, run: Path, corpus: Path, storage: str) -> dict:
    return {**tiny_config_dict,
            "run": {**tiny_config_dict["run"], "dir": str(run), "storage": storage},
            "data": {**tiny_config_dict["data"], "num_workers": 0, "sources": [{"path": str(corpus)}]},
            "train": {**tiny_config_dict["train"], "steps": 2, "log_every": 1, "eval_every": 0},
            "checkpoint": {"every": 2, "keep": 2},
            "convert": {"at_end": True, "dtype": "fp32"},
            "logging": {"tensorboard": False}}


@pytest.mark.multiproc
@pytest.mark.timeout(600)
def test_the_converted_model_reaches_run_storage_with_its_marker_last(s3, tiny_config_dict, corpus, tmp_path):
    import fsspec

    from fm_train.config import build_config
    from launcher.job import _summary, convert_and_sample, publish_results

    run, storage = tmp_path / "run", f"s3://{BUCKET}/run"
    raw = _raw(tiny_config_dict, run, corpus, storage)
    assert run_distributed(_worker_real_data, world_size=2, args=(raw,), init_process_group=False) == [0, 0]
    cfg, lines = build_config(raw), []
    hf_dir = convert_and_sample(run, cfg, lines.append)
    assert hf_dir == run / "hf", "\n".join(lines)
    uri = publish_results(hf_dir, storage, retries=2, say=lines.append)
    _summary(run, hf_dir, lines.append, uri)
    assert uri == f"{storage}/hf", "\n".join(lines)
    assert f"  model in storage    {storage}/hf" in lines, "\n".join(lines)

    fs = fsspec.filesystem("s3")
    fs.invalidate_cache()
    local = {p.relative_to(hf_dir).as_posix(): p.read_bytes() for p in hf_dir.rglob("*") if p.is_file()}
    assert "config.json" in local and any(name.endswith(".safetensors") for name in local)
    for rel, data in local.items():
        assert fs.cat_file(f"{BUCKET}/run/hf/{rel}") == data, rel
    marker = json.loads(fs.cat_file(f"{BUCKET}/run/hf/.uploaded.json"))
    assert marker["files"] == {rel: {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
                               for rel, data in local.items()}
    # The logs went there too, as before this change.
    assert fs.exists(f"{BUCKET}/run/metrics.jsonl")


@pytest.mark.e2e
def test_an_upload_stopped_halfway_leaves_no_marker(tmp_path):
    from launcher.job import _summary, publish_results

    hf_dir = tmp_path / "hf"
    hf_dir.mkdir()
    (hf_dir / "config.json").write_text('{"model_type": "llama"}\n')
    (hf_dir / "model.safetensors").write_bytes(b"\0" * 4096)
    storage = tmp_path / "storage"  # a mounted directory as run.storage
    (storage / "hf" / "model.safetensors" / "user-file").parent.mkdir(parents=True)
    (storage / "hf" / "model.safetensors" / "user-file").write_text("keep me")  # the name is taken: the put fails
    (storage / "hf" / ".uploaded.json").write_text('{"files": {}}')  # an earlier, complete upload
    lines: list[str] = []
    uri = publish_results(hf_dir, str(storage), retries=0, say=lines.append)
    _summary(tmp_path, hf_dir, lines.append, uri)
    assert uri is None, "\n".join(lines)
    assert any("failed" in line and "no complete copy" in line for line in lines), "\n".join(lines)
    assert not any("model in storage" in line for line in lines)
    assert (storage / "hf" / "config.json").read_text() == '{"model_type": "llama"}\n'  # files first
    assert not (storage / "hf" / ".uploaded.json").exists()  # ... the marker never: recognisably incomplete
    assert (storage / "hf" / "model.safetensors" / "user-file").read_text() == "keep me"
