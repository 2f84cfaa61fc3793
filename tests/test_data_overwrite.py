"""`fm-train shard` output safety: --overwrite deletes only what a valid old index lists, an interrupted
build leaves nothing a later run accepts (and the next run removes its staging folder), tokenizer
processes die with their parent, --out may not overlap an input, and a full disk or a hostile input
line is a one-line error. Real builds, real processes, a real tmpfs."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

import pytest

from data_shards import BuildOptions, DataError, build_shards
from data_shards.cli import main as shard_main
from data_shards.index import read_index
from data_shards.staging import LOCAL_PREFIX, TEMP_PREFIX, make_staging, process_start_time

pytestmark = pytest.mark.unit
STDLIB = Path(sysconfig.get_paths()["stdlib"])


@pytest.fixture(scope="module")
def text(tmp_path_factory) -> Path:
    """A .jsonl of 12 real documents (stdlib modules, about 150 KB)."""
    path = tmp_path_factory.mktemp("inputs") / "docs.jsonl"
    docs = [f.read_text(encoding="utf-8") for f in sorted((STDLIB / "json").glob("*.py"))[:6]]
    docs += [f.read_text(encoding="utf-8") for f in sorted((STDLIB / "email").glob("*.py"))[:6]]
    path.write_text("\n".join(json.dumps({"text": d}) for d in docs), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def tokenizer(text, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("tok") / "ds"
    build_shards(BuildOptions(inputs=[str(text)], out=out, seq_len=31, vocab_size=300, workers=0, progress=False))
    return out / "tokenizer"


def _build(text: Path, tokenizer: Path, out: Path, **kw) -> None:
    args = {"inputs": [str(text)], "out": out, "seq_len": 31, "tokenizer_dir": tokenizer, "shard_size": 20_000,
            "workers": 0, "progress": False}
    build_shards(BuildOptions(**{**args, **kw}))


def _snapshot(directory: Path) -> dict[str, bytes]:
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


def _edit_index(out: Path, position: int, name: str) -> None:
    obj = json.loads((out / "index.json").read_text())
    obj["shards"][position]["name"] = name
    (out / "index.json").write_text(json.dumps(obj))


@pytest.mark.parametrize("hostile", ["notes.md", "..", "tokenizer", "index.json"])
def test_hostile_old_index_is_refused_and_nothing_is_deleted(text, tokenizer, tmp_path, hostile):
    """An old index.json naming a user's file (or `..`) is not a record of fm-train's own files: the
    overwrite is refused before it starts, the old build and the user's file stay byte for byte."""
    out = tmp_path / "ds"
    _build(text, tokenizer, out)
    (out / "notes.md").write_text("mine")
    _edit_index(out, 1, hostile)
    before = _snapshot(out)
    with pytest.raises(DataError, match=r"holds an index\.json fm-train cannot take as the record.*shards\[1\]"
                                        r"\.name.*move .*index\.json away"):
        _build(text, tokenizer, out, shard_size=50_000, overwrite=True)
    assert _snapshot(out) == before and not list(out.glob(LOCAL_PREFIX + "*"))
    (out / "index.json").unlink()  # what the message says to do: then the overwrite completes
    _build(text, tokenizer, out, shard_size=50_000, overwrite=True)
    assert (out / "notes.md").read_text() == "mine" and read_index(out).shards[0].bytes <= 50_000


def test_commit_moves_only_recorded_files(text, tokenizer, tmp_path):
    """A valid old index: its shards and tokenizer/ go, but an old shard or tokenizer/ that is a symlink
    loses only the link (the old commit's rmtree refused a symlinked tokenizer/ half-way, after deleting
    index.json and the shards), and the user's files (one named like a shard but not recorded) stay."""
    out = tmp_path / "ds"
    _build(text, tokenizer, out)
    old = [s.name for s in read_index(out).shards]
    target = tmp_path / "precious.tar"
    target.write_text("user data")
    (out / old[-1]).unlink()
    (out / old[-1]).symlink_to(target)
    (out / "tokenizer").rename(tmp_path / "my_tokenizer")
    (out / "tokenizer").symlink_to(tmp_path / "my_tokenizer", target_is_directory=True)
    mine = _snapshot(tmp_path / "my_tokenizer")
    stray = f"shard-{len(old) + 5:06d}.tar"
    (out / stray).write_text("not recorded")
    _build(text, tokenizer, out, shard_size=50_000, overwrite=True)
    new = [s.name for s in read_index(out).shards]
    assert len(new) < len(old) and target.read_text() == "user data" and (out / stray).read_text() == "not recorded"
    assert _snapshot(tmp_path / "my_tokenizer") == mine and not (out / "tokenizer").is_symlink()
    assert {p.name for p in out.iterdir()} == {"index.json", "tokenizer", stray, *new}


def _children(pid: int) -> list[int]:
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            found.append(int(stat.parent.name))
    return found


def _running(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state not in ("Z", "X")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc to find the tokenizer processes")
def test_sigkill_leaves_no_accepted_output_no_live_child_and_next_run_cleans(text, tokenizer, tmp_path, capsys):
    big = tmp_path / "big.jsonl"
    lines = text.read_text(encoding="utf-8").splitlines()
    big.write_text("\n".join(lines * 30), encoding="utf-8")  # about 5 MB: far from done when killed
    out = tmp_path / "ds"
    cmd = [sys.executable, "-m", "data_shards", "--out", str(out), "--tokenizer", str(tokenizer), "--seq-len", "31",
           "--shard-size", "50KB", "--no-progress"]
    proc = subprocess.Popen([*cmd, str(big), "--workers", "2"], cwd=tmp_path, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while not list(out.glob(f"{LOCAL_PREFIX}*/shard-*.tar")):
        assert proc.poll() is None, proc.stderr.read().decode()
        assert time.monotonic() < deadline, "the build wrote no shard in 120 s"
        time.sleep(0.05)
    children = _children(proc.pid)
    assert children, "the build runs no tokenizer process"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    deadline = time.monotonic() + 15
    while any(_running(c) for c in children) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not [c for c in children if _running(c)], "tokenizer processes outlived their killed parent"
    staging = list(out.glob(f"{LOCAL_PREFIX}*"))
    assert len(staging) == 1
    with pytest.raises(DataError, match="no index.json"):
        read_index(out)
    live = make_staging(out, LOCAL_PREFIX)  # its owner, this test's parent process, runs: kept
    owner = json.loads((live / ".owner").read_text())
    (live / ".owner").write_text(json.dumps({**owner, "pid": os.getppid(), "start": process_start_time(os.getppid())}))
    assert shard_main([*cmd[3:], str(text), "--workers", "0"]) == 0
    err = capsys.readouterr().err
    assert f"removed the staging folder {staging[0]} of an interrupted build (pid {proc.pid} is gone)" in err
    assert list(out.glob(f"{LOCAL_PREFIX}*")) == [live] and read_index(out).num_samples > 0


def test_out_overlapping_an_input_is_refused_naming_both(text, tokenizer, tmp_path, capsys):
    import datasets

    saved = tmp_path / "saved"
    datasets.Dataset.from_dict({"text": ["a document " * 50] * 20}).save_to_disk(str(saved))
    common = ["--tokenizer", str(tokenizer), "--seq-len", "31", "--workers", "0", "--no-progress"]
    cases = [([str(text)], text.parent, "contains the input"),
             ([str(saved)], saved / "shards", "lies inside the input"),
             ([str(text)], text, "is the input"), ([str(text)], tokenizer, "is the --tokenizer directory")]
    for inputs, out, relation in cases:
        before = _snapshot(out.parent)
        assert shard_main([*inputs, "--out", str(out), *common]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and f"--out {out} {relation}" in err[0], err
        assert _snapshot(out.parent) == before


def test_deeply_nested_jsonl_line_is_one_line_error(tokenizer, tmp_path, capsys):
    bad = tmp_path / "deep.jsonl"
    bad.write_text('{"text": "fine"}\n' + '{"text": ' + "[" * 100_000 + "]" * 100_000 + "}\n")
    code = shard_main([str(bad), "--out", str(tmp_path / "o"), "--tokenizer", str(tokenizer), "--workers", "1",
                       "--no-progress"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "deep.jsonl:2: JSON nested too deep" in err[0], err
    assert not (tmp_path / "o").exists()


@pytest.fixture
def tiny_disk(tmp_path):
    """A 256 KiB tmpfs: a real filesystem that fills up (needs root and mount rights)."""
    mount = tmp_path / "disk"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mount)], capture_output=True,
                          check=False)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=True)


def test_full_disk_is_one_line_error_naming_out(text, tokenizer, tiny_disk, capsys):
    (tiny_disk / "keep.txt").write_text("mine")
    out = tiny_disk / "ds"
    code = shard_main([str(text), "--out", str(out), "--tokenizer", str(tokenizer), "--seq-len", "31", "--workers",
                       "0", "--no-progress"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1, err
    assert f"--out {out}: No space left on device" in err[0] and "free space" in err[0]
    assert [p.name for p in tiny_disk.iterdir()] == ["keep.txt"]


def test_staging_folders_follow_the_umask(tmp_path):
    """tempfile.mkdtemp makes 0700 whatever the umask; staging folders (also the temp ones of uploads)
    get what the user's umask says, like every other file fm-train writes."""
    old = os.umask(0o022)
    try:
        for prefix in (LOCAL_PREFIX, TEMP_PREFIX):
            assert make_staging(tmp_path, prefix).stat().st_mode & 0o777 == 0o755
    finally:
        os.umask(old)


def test_hostile_old_index_in_a_bucket_deletes_no_object(text, tokenizer, tmp_path, capsys):
    """An object-store --out whose index.json names a user's object: --overwrite is refused before
    anything is uploaded or removed (the old upload deleted every name the old index listed)."""
    import fsspec
    from s3_server import clear_clients, make_bucket, s3_server

    local = tmp_path / "ds"
    _build(text, tokenizer, local)
    with s3_server():
        try:
            make_bucket("fm-data")
            fs = fsspec.filesystem("s3")
            fs.put(str(local) + "/", "fm-data/ds/", recursive=True)
            fs.pipe_file("fm-data/ds/notes.md", b"mine")
            obj = json.loads((local / "index.json").read_text())
            obj["shards"][1]["name"] = "notes.md"
            fs.pipe_file("fm-data/ds/index.json", json.dumps(obj).encode())
            before = {key: fs.cat_file(key) for key in fs.find("fm-data/ds")}
            code = shard_main([str(text), "--out", "s3://fm-data/ds", "--tokenizer", str(tokenizer), "--seq-len",
                               "31", "--workers", "0", "--overwrite", "--no-progress"])
            err = capsys.readouterr().err.strip().splitlines()
            assert code == 2 and len(err) == 1 and r"shards[1].name" in err[0], err
            assert {key: fs.cat_file(key) for key in fs.find("fm-data/ds")} == before
        finally:
            clear_clients()
