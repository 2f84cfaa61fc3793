"""Per-rank RNG state (python, numpy, torch) saved next to DeepSpeed's files.

Each rank writes ``rng/rank_XXXXX.pt`` holding only tensors, ints and strings, so it loads with
``torch.load(weights_only=True)``: numpy's key array travels as a tensor. Per rank rather than rank 0
only, because ranks may draw different numbers (dropout, data-order tie breaks) once seeded.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fm_train.deepspeed_adapter.ckpt_files import RESUME_HINT, safe_torch_load

RNG_DIR = "rng"


def rng_file(step_dir: Path, rank: int) -> Path:
    """Where ``rank`` keeps its RNG state inside a step directory."""
    return Path(step_dir) / RNG_DIR / f"rank_{rank:05d}.pt"


def capture_rng() -> dict[str, Any]:
    """The current python, numpy and torch (CPU, and CUDA when present) generator states."""
    py_version, py_state, py_gauss = random.getstate()
    np_state = np.random.get_state(legacy=False)
    state: dict[str, Any] = {
        "python": {"version": py_version, "state": torch.tensor(py_state, dtype=torch.int64), "gauss": py_gauss},
        "numpy": {"bit_generator": np_state["bit_generator"],
                  "key": torch.from_numpy(np_state["state"]["key"].astype(np.int64)),
                  "pos": int(np_state["state"]["pos"]), "has_gauss": int(np_state["has_gauss"]),
                  "gauss": float(np_state["gauss"])},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict[str, Any]) -> None:
    """Set the generators back to a state from :func:`capture_rng`."""
    py = state["python"]
    random.setstate((py["version"], tuple(int(x) for x in py["state"].tolist()), py["gauss"]))
    npst = state["numpy"]
    np.random.set_state({"bit_generator": npst["bit_generator"],
                         "state": {"key": npst["key"].numpy().astype(np.uint32), "pos": npst["pos"]},
                         "has_gauss": npst["has_gauss"], "gauss": npst["gauss"]})
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_rng(step_dir: Path, rank: int) -> Path:
    """Write this rank's RNG state into ``step_dir``; returns the file."""
    path = rng_file(step_dir, rank)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(capture_rng(), path)
    return path


def load_rng(step_dir: Path, rank: int) -> dict[str, Any] | None:
    """This rank's saved RNG state, or None when the checkpoint has no file for it (layout changed)."""
    path = rng_file(step_dir, rank)
    if not path.is_file():
        return None
    return safe_torch_load(path, trust=False, hint=RESUME_HINT)  # tensors and plain values only, always
