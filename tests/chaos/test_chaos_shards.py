"""Shards that go bad under a run: overwritten bytes in the middle of a shard and a shard cut short while
the run reads it. ``data.on_bad_shard`` decides: ``fail`` stops with the shard named, ``skip`` leaves it
out on every rank and records it; never a deadlock. By default (``data.verify_sha256``) overwritten
bytes are found by the shard's sha256 on its first read; the mid-file scenarios run with it off too,
so that the per-sample checks are proven on their own (what guards shards read by ranged GETs without
a cache, and bytes that change after the first read)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from chaos_faults import assert_fault_done, corrupt_at_step
from chaos_runs import (STEPS, failures, figure, last_step, latest_step, metrics, rank_log, run_launch, step_dir,
                        tiny_config, write_config)
from chaos_shards import build_sharded_corpus, overwrite_sample, sample_read_at, truncate_before
from fm_train.worker import RESTART_EXIT_CODE

pytestmark = [pytest.mark.ray, pytest.mark.e2e, pytest.mark.timeout(600)]

SEED = 11
BAD_STEP = 15
"""The step whose first sample is damaged: well after the start-up checks, before the end (24)."""
BOUND_S = 300
"""No scenario may take longer than this: a rank waiting for ever on a failed peer would."""


@pytest.fixture(scope="module")
def pristine(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The many-shard corpus, built once; each test damages its own copy."""
    return build_sharded_corpus(tmp_path_factory.mktemp("chaos-shards") / "pristine")


@pytest.fixture
def corpus_copy(pristine: Path, tmp_path: Path) -> Path:
    """A private copy of the corpus to damage."""
    return Path(shutil.copytree(pristine, tmp_path / "data"))


def _attempt(log: str, n: int) -> str:
    return log.split(f"===== attempt {n}:")[1].split("===== attempt")[0]


@pytest.mark.parametrize("verify_sha256", [False, True], ids=["per-sample-checks", "sha256-on-first-read"])
def test_fail_policy_names_a_shard_corrupted_mid_file(corpus_copy: Path, tmp_path: Path, verify_sha256: bool) -> None:
    target = sample_read_at(corpus_copy, seed=SEED, step=BAD_STEP)
    assert 0 < target.local, "the start-up check reads the first and last headers; aim between them"
    overwrite_sample(target)  # bit rot at rest: passes the start-up check, found when the sample is read
    run = tmp_path / "run"
    config = write_config(tmp_path / "config.yaml", tiny_config(run, corpus_copy, seed=SEED, max_restarts=0,
                                                                verify_sha256=verify_sha256))
    result = run_launch(config, run)
    assert result.code == 1 and result.seconds < BOUND_S
    [record] = failures(run)
    assert record["kind"] == "failed" and record["exit_code"] == 2, record  # a data error, not a crash
    message = next(line for line in record["last_lines"] if "fm-train worker: shard" in line)
    if verify_sha256:  # found when the shard is first opened, before any of its samples is used
        assert str(target.shard) in message and "its sha256 is" in message and "index.json says" in message, message
        assert (latest_step(run) or 0) < BAD_STEP
        return
    assert str(target.shard) in message and f"corrupted at sample {target.local}" in message
    assert "data.on_bad_shard: skip" in message  # the fix is named
    assert 1 <= latest_step(run) < BAD_STEP
    figure(f"on_bad_shard=fail, sample {target.local} of {target.shard.name} overwritten: rank {record['rank']} exits 2"
           f" at step {BAD_STEP} naming the shard; launch returns 1 after {result.seconds:.0f}s")


@pytest.mark.slow
def test_fail_policy_with_a_shard_truncated_mid_run(corpus_copy: Path, tmp_path: Path) -> None:
    target = sample_read_at(corpus_copy, seed=SEED, step=BAD_STEP)
    run = tmp_path / "run"
    config = write_config(tmp_path / "config.yaml", tiny_config(run, corpus_copy, seed=SEED, max_restarts=1,
                                                                verify_sha256=False))
    fault = corrupt_at_step(run, 2, lambda: truncate_before(target))
    result = run_launch(config, run)
    assert_fault_done(fault)
    assert result.code == 1 and result.seconds < BOUND_S
    # A data error is reported, not retried: a restart would meet the same shard.
    [record] = failures(run)
    assert record["exit_code"] == 2 and any(f"{target.shard} is truncated at sample" in l for l in record["last_lines"])
    assert "===== attempt 2:" not in rank_log(run, 0)
    figure(f"on_bad_shard=fail, {target.shard.name} truncated at step {fault.step}: the reading rank exits 2 naming it"
           f" at step {BAD_STEP}, no restart; launch returns 1 after {result.seconds:.0f}s")


def _assert_skipped_after_one_restart(run: Path, target_shard: Path) -> dict:
    """One failed attempt (exit 3: the reading rank recorded the shard), then every rank leaves it out."""
    [record] = failures(run)
    assert record["exit_code"] == RESTART_EXIT_CODE, record
    [recorded] = (run / "bad_shards").glob("*.json")
    assert json.loads(recorded.read_text())["key"] == f"0:{target_shard.name}"
    assert "leaving out 1 shard(s) that earlier attempts found bad" in _attempt(rank_log(run, 0), 2)
    manifest = json.loads((step_dir(run, STEPS) / "manifest.json").read_text())
    assert manifest["data"]["state"]["skipped_shards"] == [f"0:{target_shard.name}"]
    return record


@pytest.mark.slow
def test_skip_policy_with_a_shard_truncated_mid_run(corpus_copy: Path, tmp_path: Path) -> None:
    target = sample_read_at(corpus_copy, seed=SEED, step=BAD_STEP)
    run = tmp_path / "run"
    # Evaluation on: the validation loader must leave out the shard that training leaves out.
    config = write_config(tmp_path / "config.yaml",
                          tiny_config(run, corpus_copy, seed=SEED, max_restarts=1, on_bad_shard="skip", eval_every=2,
                                      verify_sha256=False))
    fault = corrupt_at_step(run, 2, lambda: truncate_before(target))
    result = run_launch(config, run)
    assert_fault_done(fault)
    assert result.code == 0, f"the run did not finish; see {run / 'logs'}"
    _assert_skipped_after_one_restart(run, target.shard)
    for rank in (0, 1):  # the start-up check of attempt 2 sees the short file too, alike on every rank
        attempt2 = _attempt(rank_log(run, rank), 2)
        assert f"shard {target.shard} is truncated (" in attempt2 and "(skipped)" in attempt2, f"rank {rank}"
    evals = [r["step"] for r in metrics(run) if "val_loss" in r]
    assert evals and max(evals) == STEPS, f"evaluations at steps {evals}"
    figure(f"on_bad_shard=skip, {target.shard.name} truncated at step {fault.step}: the reading rank records it and"
           f" exits {RESTART_EXIT_CODE} at step {BAD_STEP}; after one restart both ranks leave it out of training and"
           f" evaluation (val_loss at steps {evals}) and the run finishes; skipped_shards recorded;"
           f" {result.seconds:.0f}s")


def test_skip_policy_with_a_shard_corrupted_mid_file(corpus_copy: Path, tmp_path: Path) -> None:
    target = sample_read_at(corpus_copy, seed=SEED, step=BAD_STEP)
    overwrite_sample(target)  # passes every start-up check: only reading the sample finds it
    run = tmp_path / "run"
    config = write_config(tmp_path / "config.yaml", tiny_config(run, corpus_copy, seed=SEED, max_restarts=1,
                                                                on_bad_shard="skip", verify_sha256=False))
    result = run_launch(config, run)
    assert result.seconds < BOUND_S
    assert result.code == 0, f"skip policy did not skip {target.shard.name}: {[r['summary'] for r in failures(run)]}"
    record = _assert_skipped_after_one_restart(run, target.shard)
    assert last_step(run) == STEPS
    figure(f"on_bad_shard=skip, sample {target.local} of {target.shard.name} overwritten: rank {record['rank']} records"
           f" it at step {BAD_STEP} and exits {RESTART_EXIT_CODE}; after one restart from the last checkpoint every"
           f" rank leaves it out and the run finishes {STEPS} steps; {result.seconds:.0f}s")
