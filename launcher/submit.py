"""Ray Jobs: submit ``fm-train launch`` to a cluster's head, and query, follow and stop the job.

The job's driver runs on the head node inside a copy of the project (the runtime_env working_dir),
so the config must live inside the project. That copy is a zip built here with Ray's own packaging
code and then uploaded as it is: it leaves out secrets and credentials, git history, caches, runs
and shards (:data:`WORKING_DIR_EXCLUDES`, Ray's defaults) and whatever the project's ``.gitignore``
and ``.rayignore`` files name, and the line printed before the upload counts exactly what goes.
Ray's own token authentication is used as configured on this machine (~/.ray/auth_token,
RAY_AUTH_TOKEN); nothing here turns it off.
"""

from __future__ import annotations

import asyncio
import os
import shlex
import sys
import tempfile
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

DEFAULT_DASHBOARD = "http://127.0.0.1:8265"
# Secrets and credentials, wherever they sit in the project (gitignore syntax). SSH keys are named
# one by one: a bare ``id_*`` would also drop a module such as ``id_map.py`` and break the job.
SECRET_EXCLUDES = (".env*", ".aws/", ".ssh/", ".gnupg/", ".netrc", "_netrc", ".pypirc", ".git-credentials",
                   ".docker/", ".kube/", "*.pem", "*.key", "*.p12", "*.pfx", "id_rsa*", "id_dsa*",
                   "id_ecdsa*", "id_ed25519*")
# Anchored at the project root where a nested name must survive (fm_train/engine/data.py).
BULK_EXCLUDES = ("/.venv", "/venv", "/runs", "/data", "/shards", "*.tar", "/.git", ".git/", "__pycache__",
                 "*.egg-info", ".pytest_cache", ".mypy_cache", ".ruff_cache", ".hypothesis", ".ipynb_checkpoints",
                 "/.cache", ".tox")
WORKING_DIR_EXCLUDES = SECRET_EXCLUDES + BULK_EXCLUDES
"""What ``fm-train submit`` never uploads, on top of Ray's defaults and the project's ignore files."""
TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")


class SubmitError(RuntimeError):
    """The job server cannot be reached or refused the request."""


def dashboard_address(address: str | None, environ: Mapping[str, str] | None = None) -> str:
    """``--address`` > RAY_API_SERVER_ADDRESS > RAY_ADDRESS > http://127.0.0.1:8265."""
    env = os.environ if environ is None else environ
    return address or env.get("RAY_API_SERVER_ADDRESS") or env.get("RAY_ADDRESS") or DEFAULT_DASHBOARD


def client(address: str | None) -> Any:
    """A connected JobSubmissionClient, or a :class:`SubmitError` that names the address."""
    from ray.job_submission import JobSubmissionClient

    url = dashboard_address(address)
    try:
        return JobSubmissionClient(url)
    except ConnectionError as exc:
        raise SubmitError(f"cannot reach the Ray job server at {url}: {exc}. Is the dashboard running"
                          " (`ray start --head --dashboard-host=...`) and is --address its http address?") from None


def launch_entrypoint(config: str | None, overrides: Sequence[str], extra_args: Sequence[str] = (),
                      module: str = "fm_train.cli") -> str:
    """The shell command the job runs: ``python -m fm_train.cli launch CONFIG --set ...``.

    ``python -m`` rather than the ``fm-train`` script: the working_dir copy of the project is first on
    the job's import path, so the code that runs is the code that was submitted.
    """
    argv = ["python", "-m", module, "launch"]
    if config is not None:
        argv.append(config)
    for item in overrides:
        argv += ["--set", item]
    return shlex.join([*argv, *extra_args])


def relative_config(config: str | None, working_dir: Path) -> str | None:
    """The config path as the job sees it (relative to the uploaded working_dir)."""
    if config is None:
        return None
    path = Path(config).resolve()
    try:
        return str(path.relative_to(working_dir.resolve()))
    except ValueError:
        raise SubmitError(f"config {config} is outside the project directory {working_dir}, which is what the job"
                          " uploads; move it under the project or pass --working-dir") from None


@dataclass(frozen=True)
class Package:
    """The zip that goes to the cluster as the job's working_dir, and what it holds."""

    path: Path
    files: int
    size: int
    """Uncompressed bytes of the files."""

    def summary(self, working_dir: Path) -> str:
        """One line for the console before the upload."""
        return (f"uploading {working_dir} as the job's working dir: {self.files} files, {_size(self.size)}"
                " (secrets, credentials, .git, caches, runs and shards left out; .gitignore honoured)")


def _size(n: int) -> str:
    return f"{n / 2**20:.1f} MiB" if n >= 2**20 else f"{n / 2**10:.1f} KiB" if n >= 2**10 else f"{n} B"


def package_working_dir(working_dir: Path, dest: Path) -> Package:
    """Zip ``working_dir`` into ``dest`` with Ray's own packaging code and rules; count what it holds.

    Ray's walker applies its default excludes, ours, and every ``.gitignore``/``.rayignore`` on the
    way; the zip is then uploaded as it is, so the count and the upload cannot disagree. ``.gitignore``
    is honoured whatever RAY_RUNTIME_ENV_IGNORE_GITIGNORE says.
    """
    from launcher.ray_private import zip_like_ray

    try:  # Ray's packaging has no public API; a Ray without it must fail here, loudly, not upload everything
        zip_like_ray(working_dir, dest, WORKING_DIR_EXCLUDES)
    except ImportError as exc:
        import ray

        raise SubmitError(f"this Ray ({ray.__version__}) lacks the packaging code fm-train submit builds the"
                          f" working dir with ({exc}); install the Ray version fm-train lists") from None
    with zipfile.ZipFile(dest) as zf:
        files = [info for info in zf.infolist() if not info.is_dir()]
    return Package(path=dest, files=len(files), size=sum(info.file_size for info in files))


def _stderr(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def submit(address: str | None, entrypoint: str, working_dir: Path, *, submission_id: str | None = None,
           env_vars: Mapping[str, str] | None = None, say: Callable[[str], None] = _stderr) -> str:
    """Submit ``entrypoint`` with ``working_dir`` (packaged by :func:`package_working_dir`, its summary
    said first) as the job's runtime_env; returns the job id."""
    job_client = client(address)  # an unreachable server fails before any packaging
    with tempfile.TemporaryDirectory(prefix="fm-train-submit-") as tmp:
        package = package_working_dir(working_dir, Path(tmp) / f"{working_dir.name or 'project'}.zip")
        say(package.summary(working_dir))
        runtime_env: dict[str, Any] = {"working_dir": str(package.path)}
        if env_vars:
            runtime_env["env_vars"] = dict(env_vars)
        return str(job_client.submit_job(entrypoint=entrypoint, runtime_env=runtime_env, submission_id=submission_id))


def status(address: str | None, job_id: str) -> tuple[str, str]:
    """``(status, message)`` of a job (status as Ray names it: PENDING, RUNNING, SUCCEEDED, ...)."""
    info = client(address).get_job_info(job_id)
    return str(getattr(info.status, "value", info.status)), info.message or ""


def wait(address: str | None, job_id: str, timeout_s: float, poll_s: float = 1.0) -> str:
    """Block until the job reaches a terminal status or ``timeout_s`` passes; returns the last status."""
    deadline = time.monotonic() + timeout_s
    current = status(address, job_id)[0]
    while current not in TERMINAL and time.monotonic() < deadline:
        time.sleep(poll_s)
        current = status(address, job_id)[0]
    return current


def logs(address: str | None, job_id: str, *, follow: bool, write: Callable[[str], None]) -> None:
    """Write the job's logs so far; with ``follow``, keep writing until the job ends."""
    c = client(address)
    if not follow:
        write(c.get_job_logs(job_id))
        return

    async def _tail() -> None:
        async for chunk in c.tail_job_logs(job_id):
            write(chunk)

    asyncio.run(_tail())


def stop(address: str | None, job_id: str) -> bool:
    """Ask Ray to stop the job (its driver gets SIGTERM, which the launcher forwards to the workers)."""
    return bool(client(address).stop_job(job_id))
