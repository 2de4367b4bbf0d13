"""The attempt records and the decision a batch script takes from them."""

import json

import pytest

from pretrain import attempt
from pretrain.attempt import Attempt, decide, judge, read_record, record_path, records
from pretrain.checkpoint import CheckpointError, tag_of
from pretrain.config import ConfigError
from pretrain.errors import NonFinite, RunDirBusy, Stopped
from pretrain.slurm import LaunchError

from ..helpers import fake_checkpoint


def slurm(restart=None, job="7"):
    env = {"SLURM_JOB_ID": job}
    if restart is not None:  # unset on a job's first run
        env["SLURM_RESTART_COUNT"] = str(restart)
    return env


def start(tmp_path, env, start_step=0) -> Attempt:
    a = Attempt(tmp_path, tmp_path / "checkpoints", env=env)
    if start_step is not None:
        a.start_step = start_step
    return a


def save(tmp_path, step):
    d = tmp_path / "checkpoints"
    fake_checkpoint(d, step)
    (d / "latest").write_text(tag_of(step))


def test_attempt_ids():
    assert attempt.attempt_id({}) is None
    assert attempt.attempt_id(slurm()) == "slurm-7-0"
    assert attempt.attempt_id(slurm(2)) == "slurm-7-2"
    array = {"SLURM_JOB_ID": "9", "SLURM_ARRAY_JOB_ID": "8", "SLURM_ARRAY_TASK_ID": "1"}
    assert attempt.attempt_id(array) == "slurm-8_1-0"
    assert attempt.attempt_id({**array, "PRETRAIN_ATTEMPT_ID": "mine"}) == "mine"


def test_each_attempt_has_its_record_running_then_how_it_ended(tmp_path):
    a = start(tmp_path, slurm(), start_step=20)
    r = read_record(record_path(tmp_path, "slurm-7-0"))
    assert (r.state, r.attempt, r.job, r.exit_status) == ("running", "slurm-7-0", "7", None)
    save(tmp_path, 40)
    a.end(Stopped("SIGUSR1 received", why="signal"))
    a.end(None)  # the first end wins
    r = read_record(record_path(tmp_path, "slurm-7-0"))
    assert (r.state, r.exit_status, r.stop, r.start_step, r.saved_step) == ("stopped", 3, "signal", 20, 40)
    assert r.message == "SIGUSR1 received" and r.ended and r.progressed
    start(tmp_path, slurm(1))  # another attempt: another file
    assert [x.attempt for x in records(tmp_path)] == ["slurm-7-0", "slurm-7-1"]
    alone = start(tmp_path, {})  # no id in the environment: one is made
    assert alone.record.attempt.startswith(alone.record.host) and alone.path.exists()


@pytest.mark.parametrize(
    "error, state, status",
    [
        (None, "finished", 0),
        (ConfigError("model.x: bad"), "failed", 2),
        (LaunchError("started by mpirun"), "failed", 2),
        (NonFinite("3 steps"), "failed", 4),
        (RunDirBusy("held"), "failed", 5),
        (OSError(28, "No space left on device"), "failed", 1),
        (RuntimeError("boom"), "failed", 1),
    ],
)
def test_each_ending_is_recorded_with_its_exit_status(tmp_path, error, state, status):
    start(tmp_path, slurm()).end(error)
    r = records(tmp_path)[-1]
    assert (r.state, r.exit_status) == (state, status)
    if error is not None:
        assert r.message == f"{type(error).__name__}: {error}"


def decided(tmp_path, restart, max_restarts=2, job="7", **kw):
    return decide(tmp_path, max_restarts=max_restarts, env=slurm(restart, job), **kw)


def test_stopped_with_progress_requeues_finished_is_done(tmp_path):
    a = start(tmp_path, slurm())
    save(tmp_path, 10)
    a.end(Stopped("SIGUSR1 received"))
    d = decided(tmp_path, None)
    assert (d.action, d.outcome) == ("requeue", "stopped") and "after saving step 10" in d.message

    a = start(tmp_path, slurm(1), start_step=10)
    save(tmp_path, 20)
    a.end(None)
    d = decided(tmp_path, 1)
    assert (d.action, d.outcome) == ("done", "finished")
    lines = [json.loads(x) for x in (tmp_path / "attempts.jsonl").read_text().splitlines()]
    assert [(x["attempt"], x["job"], x["action"]) for x in lines] == [("slurm-7-0", "7", "requeue"),
                                                                      ("slurm-7-1", "7", "done")]  # fmt: skip


def test_a_stop_that_saved_no_progress_counts_as_a_failure(tmp_path):
    a = start(tmp_path, slurm(), start_step=10)
    save(tmp_path, 10)
    a.end(Stopped("train.max_wall_time of 60 s is near", why="wall_time"))
    assert decided(tmp_path, 0).action == "retry"


def test_stop_at_step_is_done(tmp_path):
    a = start(tmp_path, slurm())
    save(tmp_path, 5)
    a.end(Stopped("train.stop_at_step 5", why="at_step"))
    assert decided(tmp_path, 0).action == "done"


@pytest.mark.parametrize(
    "error", [ConfigError("x"), CheckpointError("y"), NonFinite("z"), RunDirBusy("w"), LaunchError("v")]
)
def test_failures_another_attempt_would_repeat_are_fatal(tmp_path, error):
    start(tmp_path, slurm(), start_step=None).end(error)
    d = decided(tmp_path, 0)
    assert (d.action, d.outcome) == ("fatal", "failed")


def test_failures_are_retried_up_to_the_restart_limit_in_a_row(tmp_path):
    # attempt 0 fails (crash), 1 is killed outright (its record says "running"), 2 records nothing: limit 2
    start(tmp_path, slurm()).end(RuntimeError("NCCL timeout"))
    d = decided(tmp_path, None)
    assert d.action == "retry" and d.failures_in_a_row == 1 and "exit status 1: RuntimeError: NCCL timeout" in d.message
    start(tmp_path, slurm(1))
    d = decided(tmp_path, 1)
    assert d.action == "retry" and d.failures_in_a_row == 2 and "ended without recording how" in d.message
    d = decided(tmp_path, 2)
    assert d.action == "fatal" and d.failures_in_a_row == 3 and "recorded nothing" in d.message
    assert "3 attempts in a row have failed without progress; the restart limit is 2" in d.message


def test_progress_or_a_requeue_between_failures_resets_the_count(tmp_path):
    start(tmp_path, slurm()).end(RuntimeError("a"))
    assert decided(tmp_path, 0, max_restarts=1).action == "retry"
    a = start(tmp_path, slurm(1))
    save(tmp_path, 10)
    a.end(Stopped("SIGTERM received"))
    assert decided(tmp_path, 1, max_restarts=1).action == "requeue"
    start(tmp_path, slurm(2), start_step=10).end(RuntimeError("b"))
    assert decided(tmp_path, 2, max_restarts=1).failures_in_a_row == 1
    a = start(tmp_path, slurm(3), start_step=10)  # crashes, but after saving step 20: a run that moves on
    save(tmp_path, 20)
    a.end(RuntimeError("c"))
    d = decided(tmp_path, 3, max_restarts=1)
    assert d.action == "retry" and d.progressed and d.failures_in_a_row == 1


def test_another_jobs_failures_do_not_count(tmp_path):
    """A second job submitted on the same run directory fails (busy: fatal for it); the first job's count is its
    own."""
    start(tmp_path, slurm(job="8")).end(RuntimeError("a"))
    assert decided(tmp_path, None, job="8", max_restarts=1).failures_in_a_row == 1
    start(tmp_path, slurm(job="9"), start_step=None).end(RunDirBusy("held by job 8"))
    assert decided(tmp_path, None, job="9", max_restarts=1).action == "fatal"
    start(tmp_path, slurm(1, job="8")).end(RuntimeError("b"))
    d = decided(tmp_path, 1, job="8", max_restarts=1)
    assert d.action == "fatal" and d.failures_in_a_row == 2


def test_a_cancelled_job_is_not_run_again(tmp_path):
    a = start(tmp_path, slurm())
    save(tmp_path, 10)
    a.end(Stopped("SIGTERM received"))
    d = decided(tmp_path, None, cancelled=True)
    assert d.action == "done" and d.message.endswith("not run again: the job was cancelled")


def test_without_an_attempt_id_the_newest_record_is_judged(tmp_path):
    start(tmp_path, {}).end(None)
    assert decide(tmp_path, max_restarts=1, env={}).action == "done"
    assert judge(None)[0] == "retry"


def test_a_history_line_cut_by_a_crash_is_skipped(tmp_path):
    (tmp_path / "attempts.jsonl").write_text(
        '{"attempt": "slurm-7-0", "job": "7", "action": "retry", "failures_in_a_row": 1}\n{"attem'
    )
    start(tmp_path, slurm(1)).end(RuntimeError("x"))
    assert decided(tmp_path, 1).failures_in_a_row == 2
