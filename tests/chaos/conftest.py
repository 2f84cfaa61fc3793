"""Fixtures of the chaos suite: one small corpus and one uninterrupted reference run per seed.

Both are built once per session: every scenario compares its damaged run with the reference of the
same seed, and a launch costs about half a minute on 2 CPU cores (Ray start, DeepSpeed import).
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import pytest

from chaos_runs import RunResult, run_launch, tiny_config, write_config

CORPUS_BYTES = 300_000
"""About 4,300 samples of 33 tokens: enough for every scenario's 24 steps x 4 samples, built in seconds."""


@pytest.fixture(scope="session")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Default-corpus shards (vocab 512, seq_len 32) of a slice of the standard library."""
    from data_shards import build_default_corpus

    return build_default_corpus(tmp_path_factory.mktemp("chaos-data") / "stdlib", vocab_size=512, seq_len=32,
                                max_bytes=CORPUS_BYTES)


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
