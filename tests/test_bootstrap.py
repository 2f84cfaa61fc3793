"""scripts/bootstrap.sh's torch stage on a machine without a GPU: CPU index first, quick fallback, quiet log.

Each test runs the real stage function (``source scripts/bootstrap.sh; install_torch``) in a fresh
temporary venv against two tiny local indexes: a "default index" (a file:// simple index, what
PIP_INDEX_URL names) holding a fake ``torch-2.13.0`` wheel, as PyPI's (CUDA) build, and a "CPU
index" served over HTTP on 127.0.0.1 holding a fake ``torch-2.13.0+cpu``, or a closed port standing
for an unreachable download.pytorch.org. The fake wheels hold only metadata, so pip really installs
them in about a second; which one landed in the venv says which index won. The machine's own pip
configuration (local wheel directories, constraints) is switched off with PIP_CONFIG_FILE=/dev/null.
"""

from __future__ import annotations

import functools
import http.server
import os
import socket
import subprocess
import sys
import threading
import time
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

pytestmark = pytest.mark.e2e
ROOT = Path(__file__).resolve().parents[1]
BOOTSTRAP = ROOT / "scripts" / "bootstrap.sh"


def fake_wheel(directory: Path, version: str) -> Path:
    """A metadata-only ``torch`` wheel of ``version`` (pip installs it like any pure wheel)."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"torch-{version}-py3-none-any.whl"
    info = f"torch-{version}.dist-info"
    files = {
        f"{info}/METADATA": f"Metadata-Version: 2.1\nName: torch\nVersion: {version}\n",
        f"{info}/WHEEL": "Wheel-Version: 1.0\nGenerator: fm-train-tests\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
    }
    files[f"{info}/RECORD"] = "".join(f"{name},,\n" for name in files) + f"{info}/RECORD,,\n"
    with zipfile.ZipFile(path, "w") as zf:
        for name, text in files.items():
            zf.writestr(name, text)
    return path


def simple_index(root: Path, versions: list[str]) -> Path:
    """A PEP 503 index at ``root`` whose ``torch/`` page links fake wheels of ``versions``."""
    page = root / "torch"
    links = "".join(f'<a href="{fake_wheel(page, v).name.replace("+", "%2B")}">{v}</a>\n' for v in versions)
    (page / "index.html").write_text(f"<!DOCTYPE html><html><body>\n{links}</body></html>\n")
    return root


@pytest.fixture
def http_index(tmp_path: Path) -> Iterator[Callable[[Path], str]]:
    """Serve a directory over HTTP on 127.0.0.1; yields ``serve(directory) -> base URL``."""
    servers: list[http.server.ThreadingHTTPServer] = []

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args) -> None:  # noqa: ANN002 - the base class's signature
            pass

    def serve(directory: Path) -> str:
        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Quiet, directory=str(directory)))
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        return f"http://127.0.0.1:{server.server_address[1]}"

    yield serve
    for server in servers:
        server.shutdown()
        server.server_close()


def closed_port_url() -> str:
    """A URL on 127.0.0.1 that refuses connections (a port just bound and released)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}/whl/cpu"


def run_torch_stage(tmp_path: Path, cpu_index: str, default_versions: list[str]) -> tuple[subprocess.CompletedProcess, Path]:
    """Run bootstrap.sh's ``install_torch`` in a fresh venv with no GPU; return the result and the venv."""
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    default = simple_index(tmp_path / "default-index", default_versions)
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIP_")}
    env.update(PIP_CONFIG_FILE=os.devnull, PIP_INDEX_URL=default.as_uri(), PIP_NO_CACHE_DIR="1",
               PIP_DISABLE_PIP_VERSION_CHECK="1", FM_TRAIN_VENV=str(venv), FM_TRAIN_TORCH_CPU_INDEX=cpu_index)
    env.pop("FM_TRAIN_TORCH", None)
    # has_nvidia_gpu is redefined so the CPU path is taken on GPU machines too.
    script = f'source "{BOOTSTRAP}"; has_nvidia_gpu() {{ return 1; }}; : >"$LOG"; install_torch'
    result = subprocess.run(["bash", "-c", script], env=env, capture_output=True, text=True, timeout=300)
    return result, venv


def installed_torch(venv: Path) -> str:
    code = "import importlib.metadata as m; print(m.version('torch'))"
    return subprocess.run([str(venv / "bin" / "python"), "-c", code], check=True, capture_output=True,
                          text=True).stdout.strip()


def test_cpu_index_reachable_gives_the_cpu_build_with_one_quiet_line(tmp_path, http_index):
    cpu_index = http_index(simple_index(tmp_path / "cpu-index", ["2.13.0+cpu"]))
    result, venv = run_torch_stage(tmp_path, cpu_index, ["2.13.0"])
    assert result.returncode == 0, result.stderr
    # The default index offers 2.13.0 too (as PyPI's CUDA build): the CPU index's +cpu must win.
    assert installed_torch(venv) == "2.13.0+cpu"
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("[bootstrap] torch 2.13.0 (CPU index) ... "), result.stderr
    assert lines[0].endswith(" s") and "notice" not in result.stderr
    assert "Successfully installed torch-2.13.0+cpu" in (venv / "install.log").read_text()


def test_unreachable_cpu_index_falls_back_quickly_with_a_one_line_notice(tmp_path):
    start = time.monotonic()
    result, venv = run_torch_stage(tmp_path, closed_port_url(), ["2.13.0"])
    assert result.returncode == 0, result.stderr
    assert installed_torch(venv) == "2.13.0"
    notices = [line for line in result.stderr.splitlines() if "notice" in line]
    assert len(notices) == 1 and "cannot be reached" in notices[0] and "default index" in notices[0], result.stderr
    assert "[bootstrap] torch 2.13.0 (default index) ... " in result.stderr
    assert time.monotonic() - start < 60, "the fallback must not wait on pip's retries"


def test_cpu_index_without_the_version_falls_back_too(tmp_path, http_index):
    cpu_index = http_index(simple_index(tmp_path / "cpu-index", ["2.12.0+cpu"]))  # reachable, no 2.13.0
    result, venv = run_torch_stage(tmp_path, cpu_index, ["2.13.0"])
    assert result.returncode == 0, result.stderr
    assert installed_torch(venv) == "2.13.0"
    assert "torch 2.13.0 (CPU index) ... failed" in result.stderr and "failed (see " in result.stderr


def test_a_failed_install_prints_the_log_tail_and_path_and_exits_non_zero(tmp_path):
    result, venv = run_torch_stage(tmp_path, closed_port_url(), ["2.12.0"])  # no 2.13.0 anywhere
    assert result.returncode != 0
    log = venv / "install.log"
    assert f"full log: {log}" in result.stderr
    assert "No matching distribution found for torch==2.13.0" in result.stderr  # pip's own words, from the tail
    assert "torch 2.13.0 (default index) ... failed" in result.stderr
