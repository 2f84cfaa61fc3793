"""Fixtures of the chaos suite: one uninterrupted reference run per seed, on the session's ``corpus``.

Built once per session: every scenario compares its damaged run with the reference of the same
seed, and a launch costs about half a minute on 2 CPU cores (Ray start, DeepSpeed import).
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import pytest

from chaos_runs import RunResult, run_launch, tiny_config, write_config

@pytest.fixture(scope="session")
def reference(tmp_path_factory: pytest.TempPathFactory, corpus: Path) -> Callable[[int], RunResult]:
    """``reference(seed)``: the uninterrupted run of the scenario config with that seed (cached)."""
    done: dict[int, RunResult] = {}

    def get(seed: int) -> RunResult:
        if seed not in done:
            root = tmp_path_factory.mktemp(f"chaos-reference-{seed}")
            run = root / "run"
            config = write_config(root / "config.yaml", tiny_config(run, corpus, seed=seed))
            result = run_launch(config, run)
            assert result.code == 0, f"the reference run failed; see {run / 'logs'}"
            done[seed] = result
        return done[seed]

    return get
