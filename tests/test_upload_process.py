"""Copies to object storage run in a child process at low priority (``fm_train.storage.upload_process``),
against the loopback S3 server: the child is not the training process and is niced, a child that
died is replaced and the step still commits, a failed copy names the file and the store's error,
and the child ends when its parent is SIGKILLed."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from s3_server import make_bucket, s3_server

pytestmark = pytest.mark.multiproc


@pytest.fixture(scope="module")
def s3():
    with s3_server() as endpoint:
        make_bucket("fm-up")
        yield endpoint


def _step(root: Path, step: int) -> Path:
    path = root / "checkpoints" / f"step_{step:08d}"
    path.mkdir(parents=True)
    (path / "a.pt").write_bytes(os.urandom(1 << 16))
    (path / "manifest.json").write_text("{}")
    return path


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_copies_run_in_a_niced_child_that_is_replaced_when_it_dies(s3, tmp_path: Path) -> None:
    import fsspec

    from fm_train.storage.upload import CheckpointUploader, save_id
    from fm_train.storage.upload_process import NICENESS

    uploader = CheckpointUploader("s3://fm-up/run", rank=0, keep=2, backoff_s=0.01)
    first = _step(tmp_path, 2)
    uploader.submit(first, ["a.pt"], own={"a.pt": "d"}, expected=[{"a.pt": "d"}])
    uploader.wait()
    child = uploader._process.pid
    assert child is not None and child != os.getpid()
    assert os.getpriority(os.PRIO_PROCESS, child) == NICENESS
    os.kill(child, signal.SIGKILL)  # the next copy finds its pipe closed, says so, and is retried

    second = _step(tmp_path, 4)
    uploader.submit(second, ["a.pt"], own={"a.pt": "e"}, expected=[{"a.pt": "e"}])
    uploader.close()
    assert uploader.failed == [] and uploader.committed == ["step_00000002", "step_00000004"]
    fs = fsspec.filesystem("s3")
    assert fs.cat_file("fm-up/run/checkpoints/step_00000004/a.pt") == (second / "a.pt").read_bytes()
    assert fs.cat_file("fm-up/run/checkpoints/step_00000004/.uploaded/rank_00000").decode() == save_id({"a.pt": "e"})
    assert fs.cat_file("fm-up/run/checkpoints/latest").decode().strip() == "step_00000004"
    assert uploader._process.pid is None  # closed with the uploader


def test_a_failed_copy_names_the_file_and_the_store_s_error(s3, tmp_path: Path) -> None:
    from upath import UPath

    from fm_train.storage.upload_process import UploadProcess

    local = tmp_path / "a.pt"
    local.write_bytes(b"x")
    process = UploadProcess()
    try:
        with pytest.raises(OSError, match=r"copying .*a\.pt to s3://no-such-bucket-fm/a\.pt: .*(NoSuchBucket|not exist)"):
            process.put(local, UPath("s3://no-such-bucket-fm/a.pt"))
    finally:
        process.close()


def test_the_child_ends_with_its_parent(s3, tmp_path: Path) -> None:
    local = tmp_path / "a.pt"
    local.write_bytes(b"x")
    parent = subprocess.Popen(
        [sys.executable, "-c",
         "import sys, time\nfrom pathlib import Path\nfrom upath import UPath\n"
         "from fm_train.storage.upload_process import UploadProcess\n"
         "p = UploadProcess()\np.put(Path(sys.argv[1]), UPath('s3://fm-up/parent/a.pt'))\n"
         "print(p.pid, flush=True)\ntime.sleep(600)\n", str(local)],
        stdout=subprocess.PIPE, text=True)
    try:
        child = int(parent.stdout.readline())
        assert _alive(child)
    finally:
        parent.kill()
        parent.wait()
    deadline = time.monotonic() + 30
    while _alive(child) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _alive(child), f"upload process {child} outlived its SIGKILLed parent"
