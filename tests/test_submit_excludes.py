"""What ``fm-train submit`` ships: Ray's own packaging of a real project directory, secrets left out.

The zip is the one the job server receives (it is uploaded as it is), so listing it is listing the upload.
"""

from __future__ import annotations

import zipfile
from pathlib import Path

import pytest

from launcher.submit import package_working_dir

pytestmark = pytest.mark.unit

SHIPPED = {
    "pyproject.toml": "[project]\nname = 'p'\n",
    "pkg/__init__.py": "",
    "pkg/id_map.py": "IDS = {}\n",  # looks like id_* but is code the job imports
    "pkg/engine/data.py": "x = 1\n",  # a nested data.py survives the /data exclude
    "cluster_configs/run.yaml": "train:\n  steps: 3\n",
    ".gitignore": "notes/\n*.log\n",
    "sub/.gitignore": "local.txt\n",
    "sub/kept.txt": "kept\n",
}
LEFT_OUT = {
    ".env": "AWS_SECRET_ACCESS_KEY=x\n",
    ".env.production": "TOKEN=y\n",
    ".aws/credentials": "[default]\naws_secret_access_key = z\n",
    ".aws/config": "[default]\n",
    "pkg/.netrc": "machine h login u password p\n",
    "certs/server.pem": "-----BEGIN CERTIFICATE-----\n",
    "tls.key": "-----BEGIN PRIVATE KEY-----\n",
    "deploy/id_ed25519": "-----BEGIN OPENSSH PRIVATE KEY-----\n",
    "id_rsa.pub": "ssh-rsa AAAA\n",
    ".ssh/config": "Host *\n",
    ".git/config": "[core]\n",
    ".git/objects/ab/cdef": "blob",
    "pkg/__pycache__/mod.cpython-311.pyc": "pyc",
    ".pytest_cache/v/cache": "{}",
    ".venv/bin/python": "elf",
    "runs/r1/checkpoints/latest": "step_00000001",
    "data/corpus/shard-000000.tar": "tar",
    "extra/shard-000001.tar": "tar",
    "notes/todo.md": "gitignored directory\n",
    "train.log": "gitignored file\n",
    "sub/local.txt": "ignored by a nested .gitignore\n",
}


def _project(root: Path) -> Path:
    for rel, text in {**SHIPPED, **LEFT_OUT}.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return root


def test_secrets_caches_runs_shards_and_gitignored_files_stay_home(tmp_path: Path, monkeypatch):
    # The user asked Ray to ignore .gitignore files: ours are honoured anyway.
    monkeypatch.setenv("RAY_RUNTIME_ENV_IGNORE_GITIGNORE", "1")
    project = _project(tmp_path / "project")
    package = package_working_dir(project, tmp_path / "upload.zip")
    with zipfile.ZipFile(package.path) as zf:
        names = {info.filename for info in zf.infolist() if not info.is_dir()}
    assert names == set(SHIPPED)
    assert package.files == len(SHIPPED)
    assert package.size == sum(len(text.encode()) for text in SHIPPED.values())
    line = package.summary(project)
    assert f"{len(SHIPPED)} files, {package.size} B" in line and str(project) in line
    assert "\n" not in line
