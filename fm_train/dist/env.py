"""The one place that reads the rank environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT).

Launchers (Ray, torchrun, srun) set these variables; everything else receives a :class:`RankEnv`.
"""

from __future__ import annotations

import hashlib
import os
import sys
from dataclasses import dataclass
from pathlib import Path

#: Epoch seconds at which the launch began, the same for all its attempts (goodput counts from there).
LAUNCH_START_ENV = "FM_TRAIN_LAUNCH_START_S"

EXTENSIONS_ROOT = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "fm-train" / "torch_extensions"
# One cache per Python environment: the build command holds the environment's absolute include paths,
# so two virtualenvs sharing one directory saw each other's command as changed and rebuilt the op
# (30-60 s) on every alternation.
EXTENSIONS_DIR = EXTENSIONS_ROOT / (f"py{sys.version_info[0]}{sys.version_info[1]}-"
                                    f"{hashlib.sha256(sys.prefix.encode()).hexdigest()[:10]}")


def ensure_extension_cache() -> str:
    """Point DeepSpeed's JIT op builds at one per-machine cache, so ops compile once, not once per run.

    The first ``deepspeed.init_distributed`` on CPU compiles its shared-memory comm op (25-30 s).
    """
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(EXTENSIONS_DIR))
    return os.environ["TORCH_EXTENSIONS_DIR"]


@dataclass(frozen=True)
class RankEnv:
    """This process's place in the job, as the launcher described it."""

    rank: int
    world_size: int
    local_rank: int
    master_addr: str
    master_port: int

    @classmethod
    def from_environ(cls, environ: "os._Environ[str] | dict[str, str] | None" = None) -> "RankEnv":
        """Read the torchrun-style variables; a missing one means a single-process run (rank 0 of 1)."""
        env = os.environ if environ is None else environ
        try:
            return cls(
                rank=int(env.get("RANK", 0)),
                world_size=int(env.get("WORLD_SIZE", 1)),
                local_rank=int(env.get("LOCAL_RANK", env.get("RANK", 0))),
                master_addr=env.get("MASTER_ADDR", "127.0.0.1"),
                master_port=int(env.get("MASTER_PORT", 29500)),
            )
        except ValueError as exc:
            raise ValueError(f"rank environment is malformed ({exc}); RANK, WORLD_SIZE, LOCAL_RANK and MASTER_PORT must be integers") from None

    def export(self) -> None:
        """Write the variables back to ``os.environ`` (what torch.distributed and DeepSpeed read)."""
        os.environ.update(RANK=str(self.rank), WORLD_SIZE=str(self.world_size), LOCAL_RANK=str(self.local_rank),
                          MASTER_ADDR=self.master_addr, MASTER_PORT=str(self.master_port))
