"""The attempt record and the decision a batch script takes from it."""

import json

import pytest

from pretrain import attempt
from pretrain.attempt import Attempt, decide, judge, read_record
from pretrain.checkpoint import CheckpointError, tag_of
from pretrain.config import ConfigError
from pretrain.errors import NonFinite, RunDirBusy, Stopped

from ..helpers import fake_checkpoint

SLURM = {"SLURM_JOB_ID": "7", "SLURM_RESTART_COUNT": "0"}


def start(tmp_path, monkeypatch, env=SLURM, start_step=0) -> Attempt:
    for k in (
        "SLURM_JOB_ID",
        "SLURM_RESTART_COUNT",
        "SLURM_ARRAY_JOB_ID",
        "SLURM_ARRAY_TASK_ID",
        "PRETRAIN_ATTEMPT_ID",
    ):
        monkeypatch.delenv(k, raising=False)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    a = Attempt(tmp_path, tmp_path / "checkpoints")
    a.start_step = start_step
    return a


def save(tmp_path, step):
    d = tmp_path / "checkpoints"
    fake_checkpoint(d, step)
    (d / "latest").write_text(tag_of(step))


def test_attempt_ids():
    assert attempt.attempt_id({}) is None
    assert attempt.attempt_id({"SLURM_JOB_ID": "7"}) == "slurm-7-0"
    assert attempt.attempt_id({"SLURM_JOB_ID": "7", "SLURM_RESTART_COUNT": "2"}) == "slurm-7-2"
    array = {"SLURM_JOB_ID": "9", "SLURM_ARRAY_JOB_ID": "8", "SLURM_ARRAY_TASK_ID": "1"}
    assert attempt.attempt_id(array) == "slurm-8_1-0"
    assert attempt.attempt_id({**array, "PRETRAIN_ATTEMPT_ID": "mine"}) == "mine"


def test_the_record_says_running_then_how_the_attempt_ended(tmp_path, monkeypatch):
    a = start(tmp_path, monkeypatch, start_step=20)
    r = read_record(tmp_path)
    assert (r.state, r.attempt, r.exit_status) == ("running", "slurm-7-0", None)
    save(tmp_path, 40)
    a.end(Stopped("SIGUSR1 received", why="signal"))
    a.end(None)  # the first end wins
    r = read_record(tmp_path)
    assert (r.state, r.exit_status, r.stop, r.start_step, r.saved_step) == ("stopped", 3, "signal", 20, 40)
    assert r.message == "SIGUSR1 received" and r.ended


@pytest.mark.parametrize(
    "error, state, status",
    [
        (None, "finished", 0),
        (ConfigError("model.x: bad"), "failed", 2),
        (NonFinite("3 steps"), "failed", 4),
        (RunDirBusy("held"), "failed", 5),
        (OSError(28, "No space left on device"), "failed", 1),
        (RuntimeError("boom"), "failed", 1),
    ],
)
def test_each_ending_is_recorded_with_its_exit_status(tmp_path, monkeypatch, error, state, status):
    start(tmp_path, monkeypatch).end(error)
    r = read_record(tmp_path)
    assert (r.state, r.exit_status) == (state, status)
    if error is not None:
        assert r.message == f"{type(error).__name__}: {error}"


def decided(tmp_path, monkeypatch, restart, max_restarts=2, env=SLURM):
    monkeypatch.setenv("SLURM_RESTART_COUNT", str(restart))
    return decide(tmp_path, max_restarts=max_restarts, env={**env, "SLURM_RESTART_COUNT": str(restart)})


def test_stopped_with_progress_requeues_finished_is_done(tmp_path, monkeypatch):
    a = start(tmp_path, monkeypatch, start_step=0)
    save(tmp_path, 10)
    a.end(Stopped("SIGUSR1 received"))
    d = decided(tmp_path, monkeypatch, 0)
    assert (d.action, d.outcome) == ("requeue", "stopped") and "after saving step 10" in d.message

    a = start(tmp_path, monkeypatch, env={**SLURM, "SLURM_RESTART_COUNT": "1"}, start_step=10)
    save(tmp_path, 20)
    a.end(None)
    d = decided(tmp_path, monkeypatch, 1)
    assert (d.action, d.outcome) == ("done", "finished")
    lines = [json.loads(x) for x in (tmp_path / "attempts.jsonl").read_text().splitlines()]
    assert [(x["attempt"], x["action"]) for x in lines] == [("slurm-7-0", "requeue"), ("slurm-7-1", "done")]


def test_a_stop_that_saved_no_progress_counts_as_a_failure(tmp_path, monkeypatch):
    a = start(tmp_path, monkeypatch, start_step=10)
    save(tmp_path, 10)
    a.end(Stopped("train.max_wall_time of 60 s is near", why="wall_time"))
    assert decided(tmp_path, monkeypatch, 0).action == "retry"


def test_stop_at_step_is_done(tmp_path, monkeypatch):
    a = start(tmp_path, monkeypatch)
    save(tmp_path, 5)
    a.end(Stopped("train.stop_at_step 5", why="at_step"))
    assert decided(tmp_path, monkeypatch, 0).action == "done"


@pytest.mark.parametrize("error", [ConfigError("x"), CheckpointError("y"), NonFinite("z"), RunDirBusy("w")])
def test_failures_another_attempt_would_repeat_are_fatal(tmp_path, monkeypatch, error):
    start(tmp_path, monkeypatch).end(error)
    d = decided(tmp_path, monkeypatch, 0)
    assert (d.action, d.outcome) == ("fatal", "failed")


def test_failures_are_retried_up_to_the_restart_limit_in_a_row(tmp_path, monkeypatch):
    # attempt 0 fails (crash), 1 is killed outright (record left "running"), 2 records nothing, 3 fails: limit 2
    start(tmp_path, monkeypatch).end(RuntimeError("NCCL timeout"))
    d = decided(tmp_path, monkeypatch, 0)
    assert d.action == "retry" and d.failures_in_a_row == 1 and "exit status 1: RuntimeError: NCCL timeout" in d.message
    start(tmp_path, monkeypatch, env={**SLURM, "SLURM_RESTART_COUNT": "1"})
    d = decided(tmp_path, monkeypatch, 1)
    assert d.action == "retry" and d.failures_in_a_row == 2 and "ended without recording how" in d.message
    d = decided(tmp_path, monkeypatch, 2)  # the record is attempt 1's
    assert d.action == "fatal" and d.failures_in_a_row == 3 and "recorded nothing" in d.message
    assert "3 attempts in a row have failed; the restart limit is 2" in d.message


def test_a_success_between_failures_resets_the_count(tmp_path, monkeypatch):
    start(tmp_path, monkeypatch).end(RuntimeError("a"))
    assert decided(tmp_path, monkeypatch, 0, max_restarts=1).action == "retry"
    a = start(tmp_path, monkeypatch, env={**SLURM, "SLURM_RESTART_COUNT": "1"})
    save(tmp_path, 10)
    a.end(Stopped("SIGTERM received"))
    assert decided(tmp_path, monkeypatch, 1, max_restarts=1).action == "requeue"
    start(tmp_path, monkeypatch, env={**SLURM, "SLURM_RESTART_COUNT": "2"}, start_step=10).end(RuntimeError("b"))
    d = decided(tmp_path, monkeypatch, 2, max_restarts=1)
    assert d.action == "retry" and d.failures_in_a_row == 1


def test_judging_without_an_attempt_id_takes_the_last_record(tmp_path, monkeypatch):
    start(tmp_path, monkeypatch, env={}).end(None)
    assert judge(read_record(tmp_path), None)[0] == "done"
    assert judge(read_record(tmp_path), "slurm-1-0")[0] == "retry"  # another attempt's record
    assert judge(None, None)[0] == "retry"


def test_a_history_line_cut_by_a_crash_is_skipped(tmp_path, monkeypatch):
    (tmp_path / "attempts.jsonl").write_text('{"attempt": "slurm-7-0", "action": "retry"}\n{"attem')
    start(tmp_path, monkeypatch, env={**SLURM, "SLURM_RESTART_COUNT": "1"}).end(RuntimeError("x"))
    assert decided(tmp_path, monkeypatch, 1).failures_in_a_row == 2


def test_a_cancelled_job_is_not_run_again(tmp_path, monkeypatch):
    a = start(tmp_path, monkeypatch)
    save(tmp_path, 10)
    a.end(Stopped("SIGTERM received"))
    d = decide(tmp_path, max_restarts=2, cancelled=True, env=SLURM)
    assert d.action == "done" and d.message.endswith("not run again: the job was cancelled")
