"""On a live 2-node Slurm cluster (the `slurm` fixture: Debian's Slurm, two slurmd on this machine): the batch
script trains across both nodes, a stop signal saves and requeues the job, which resumes exactly; failures are
retried up to the limit; `srun` tasks join one world. Real processes throughout."""

import json
import sys
import time

import pytest
import torch

from ..helpers import DIST_ENV, REPO, cluster_args, final_weights, last_attempt, losses, pretrain, wait_for_step

STEPS = 200
SCRIPT = "launch/slurm/pretrain.sbatch"


@pytest.fixture(scope="module")
def reference(tmp_path_factory, tokenizer_path, tiny_dataset):
    """The same run as 2 ranks of torchrun on one node, uninterrupted."""
    run = tmp_path_factory.mktemp("ref") / "run"
    r = pretrain("torchrun", 2, cluster_args(tokenizer_path, tiny_dataset, run, STEPS))
    assert r.returncode == 0, r.stderr[-3000:]
    return run


def job_env(slurm) -> dict:
    env = {k: v for k, v in slurm.env.items() if k not in DIST_ENV}
    return {**env, "PYTHON": sys.executable}


def submit(slurm, tmp_path, args, *script_options, nodes=2) -> int:
    return slurm.sbatch(
        [f"-N{nodes}", "--ntasks-per-node=1", f"--output={tmp_path}/slurm-%j.out", SCRIPT,
         "--logs", tmp_path / "logs", *script_options, *args],
        cwd=REPO, env=job_env(slurm),
    )  # fmt: skip


def decisions(run) -> list[str]:
    return [json.loads(line)["action"] for line in (run / "attempts.jsonl").read_text().splitlines()]


def job_log(tmp_path, job) -> str:
    return (tmp_path / "logs" / f"pretrain-{job}" / "job.log").read_text()


class JobPoll:
    """A Slurm job seen as a process by helpers.wait_for_step: running while it is pending or running."""

    def __init__(self, slurm, job):
        self.slurm, self.job = slurm, job

    def poll(self):
        return None if self.slurm.job_state(self.job) in ("PENDING", "RUNNING", "CONFIGURING") else 0


def test_a_two_node_job_trains_like_torchrun_on_one_node(slurm, reference, tmp_path, tokenizer_path, tiny_dataset):
    run = tmp_path / "run"
    job = submit(slurm, tmp_path, cluster_args(tokenizer_path, tiny_dataset, run, STEPS))
    info = slurm.wait_job(job, timeout=300)
    assert (info["JobState"], info["Restarts"]) == ("COMPLETED", "0"), job_log(tmp_path, job)
    assert losses(run) == losses(reference)
    assert decisions(run) == ["done"]
    log = job_log(tmp_path, job)
    assert f"attempt 0 of job {job} on n[1-2] (srun route)" in log and "done: the run finished (step 200)" in log
    attempt_log = (tmp_path / "logs" / f"pretrain-{job}" / "attempt-0.log").read_text()
    assert "2 rank(s) on cpu" in attempt_log and "launched by srun" in attempt_log


@pytest.mark.parametrize("route", ["srun", "torchrun"])
def test_a_stop_signal_saves_requeues_once_and_resumes_exactly(
    slurm, reference, tmp_path, tokenizer_path, tiny_dataset, route
):
    """USR1 to the batch shell (what `#SBATCH --signal=B:USR1@300` sends before the time limit): the ranks save,
    the job requeues itself, the next attempt resumes; losses and weights equal the uninterrupted run's."""
    run = tmp_path / "run"
    job = submit(slurm, tmp_path, cluster_args(tokenizer_path, tiny_dataset, run, STEPS), "--route", route)
    assert wait_for_step(run, 5, JobPoll(slurm, job), timeout=180), slurm.job_info(job)
    assert slurm.run(["scancel", "--batch", "--signal=USR1", job]).returncode == 0
    info = slurm.wait_job(job, timeout=300)
    log = job_log(tmp_path, job)
    assert (info["JobState"], info["Restarts"]) == ("COMPLETED", "1"), log
    assert decisions(run) == ["requeue", "done"], log
    first = json.loads((run / "attempts.jsonl").read_text().splitlines()[0])
    assert first["outcome"] == "stopped" and first["attempt"] == f"slurm-{job}-0"
    stopped_at = int(first["message"].split("after saving step ")[1].split()[0])
    assert 5 <= stopped_at < STEPS
    assert "USR1: the time limit is near" in log and "requeued" in log
    assert losses(run) == losses(reference)
    a, b = final_weights(run), final_weights(reference)
    assert all(torch.equal(a[k], b[k]) for k in a)
    attempt0 = (tmp_path / "logs" / f"pretrain-{job}" / "attempt-0.log").read_text()
    assert attempt0.count("received: finishing the step") == 2  # once per rank (a second copy is not a second stop)


def test_a_job_that_fails_every_time_ends_after_the_restart_limit(slurm, tmp_path, tokenizer_path, tiny_dataset):
    run = tmp_path / "run"
    run.mkdir()
    (run / "checkpoints").write_text("not a directory")  # every attempt fails on it (an I/O error: exit 1)
    job = submit(slurm, tmp_path, cluster_args(tokenizer_path, tiny_dataset, run, 6), "--max-restarts", "1")
    info = slurm.wait_job(job, timeout=300)
    log = job_log(tmp_path, job)
    assert (info["JobState"], info["Restarts"]) == ("FAILED", "1"), log
    assert decisions(run) == ["retry", "fatal"]
    assert "retry: failed with exit status 1: FileExistsError" in log
    assert "2 attempts in a row have failed without progress; the restart limit is 1" in log
    assert "File exists" in slurm.output(job)  # in the job's own output as well


def test_srun_tasks_form_one_world(slurm, reference, tmp_path, tokenizer_path, tiny_dataset):
    """`srun -N2 python launch/pretrain.py` (no launcher, no RANK): one run of 2 ranks, not 2 runs."""
    run = tmp_path / "run"
    args = cluster_args(tokenizer_path, tiny_dataset, run, STEPS)
    r = slurm.run(["srun", "-N2", "--ntasks-per-node=1", sys.executable, "launch/pretrain.py", *args],
                  cwd=REPO, env=job_env(slurm), timeout=300)  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    assert "2 rank(s) on cpu" in r.stderr + r.stdout
    assert losses(run) == losses(reference)


def test_a_launcher_world_smaller_than_the_step_is_refused(slurm, tmp_path, tokenizer_path, tiny_dataset):
    """`srun -N2 torchrun --standalone`: two worlds of one on one run directory; refused, nothing written."""
    run = tmp_path / "run"
    args = cluster_args(tokenizer_path, tiny_dataset, run, 6)
    cmd = ["srun", "-N2", "--ntasks-per-node=1", sys.executable, "-m", "torch.distributed.run", "--standalone",
           "--nproc-per-node=1", "launch/pretrain.py", *args]  # fmt: skip
    r = slurm.run(cmd, cwd=REPO, env=job_env(slurm), timeout=300)
    assert r.returncode != 0
    assert "this Slurm step runs 2 tasks, but the launcher made a world of 1 process(es)" in r.stderr
    assert not (run / "metrics.jsonl").exists()


def test_a_cancelled_job_saves_and_is_not_requeued(slurm, tmp_path, tokenizer_path, tiny_dataset):
    """A plain `scancel` (TERM to the ranks and the batch shell, KILL after KillWait): the ranks save, and the
    script does not undo the cancel by requeueing."""
    run = tmp_path / "run"
    job = submit(slurm, tmp_path, cluster_args(tokenizer_path, tiny_dataset, run, STEPS))
    assert wait_for_step(run, 5, JobPoll(slurm, job), timeout=180), slurm.job_info(job)
    assert slurm.run(["scancel", job]).returncode == 0
    info = slurm.wait_job(job, timeout=120)
    assert (info["JobState"], info["Restarts"]) == ("CANCELLED", "0")
    record = last_attempt(run)
    assert record["state"] == "stopped" and "SIGTERM received" in record["message"] and record["saved_step"] >= 5
    assert decisions(run) in ([], ["done"])  # the batch shell may be killed (KillWait) before it decides
    time.sleep(15)  # a requeue would have started the job again by now (about 11 s here)
    assert slurm.job_info(job)["JobState"] == "CANCELLED" and slurm.job_info(job)["Restarts"] == "0"
