"""A run directory belongs to one job, and no rank outlives its launcher: real 2-rank runs under torchrun and the
deepspeed command."""

import json
import os
import signal
import subprocess
import time

import psutil
import pytest
import torch

from ..helpers import (
    REPO,
    final_weights,
    last_attempt,
    launcher,
    losses,
    pretrain,
    run_env,
    start_pretrain,
    tiny_overrides,
    wait_for_step,
)

STEPS = 400


def args_for(tokenizer_path, dataset, run_dir):
    return tiny_overrides(tokenizer_path, dataset, run_dir) + [
        "train.ds_config=ds_configs/zero1.json",
        "train.global_batch_seqs=4",
        "train.micro_batch_seqs=2",
        f"train.max_steps={STEPS}",
        "train.eval_every=0",
        "logging.log_every=5",
        "checkpoint.save_every=100",
    ]


def ranks_of(launcher: psutil.Process, script: str = "launch/pretrain.py") -> list[psutil.Process]:
    """The training processes under a launcher (not the launcher's own processes)."""
    out = []
    for p in launcher.children(recursive=True):
        cmd = " ".join(p.cmdline())
        if script in cmd and "deepspeed.launcher" not in cmd and "torchrun" not in cmd:
            out.append(p)
    return out


def running(procs: list[psutil.Process]) -> list[psutil.Process]:
    alive = []
    for p in procs:
        try:
            if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
                alive.append(p)
        except psutil.NoSuchProcess:
            pass
    return alive


@pytest.mark.parametrize("kind", ["torchrun", "deepspeed"])
def test_one_job_per_run_dir_and_no_rank_outlives_its_launcher(tmp_path, tokenizer_path, tiny_dataset, kind):
    ref, run = tmp_path / "ref", tmp_path / "run"
    r = pretrain(kind, 2, args_for(tokenizer_path, tiny_dataset, ref))
    assert r.returncode == 0, r.stderr[-3000:]

    log = open(tmp_path / "first.log", "w")
    first = start_pretrain(kind, 2, args_for(tokenizer_path, tiny_dataset, run), stdout=log, stderr=log)
    assert wait_for_step(run, 5, first), (tmp_path / "first.log").read_text()[-3000:]
    ranks = ranks_of(psutil.Process(first.pid))
    assert len(ranks) == 2

    # a second job on the same directory is refused, naming the first
    holder = json.loads((run / "job.lock").read_text())
    assert holder["pid"] in [p.pid for p in ranks]
    second = pretrain("python", 1, args_for(tokenizer_path, tiny_dataset, run))
    assert second.returncode == 5, second.stderr[-3000:]
    assert f"is in use by another job (host {holder['host']}, pid {holder['pid']}, started" in second.stderr
    assert first.poll() is None, "the first job ended before the second one was refused: make STEPS larger"

    # the launcher is killed: every rank notices, saves and exits within a few seconds
    os.kill(first.pid, signal.SIGKILL)
    killed = time.monotonic()
    while running(ranks) and time.monotonic() - killed < 30:
        time.sleep(0.05)
    took = time.monotonic() - killed
    first.wait()
    log.close()
    out = (tmp_path / "first.log").read_text()
    assert not running(ranks), f"ranks still running {took:.0f} s after their launcher was killed"
    assert took < 10, took
    assert f"the launcher ({kind}, pid" in out and "is gone" in out and "saved " in out, out[-3000:]
    assert not (run / "job.lock").exists()  # released on the way out

    # the next run resumes where the ranks saved and ends as if nothing had happened
    r = pretrain(kind, 2, args_for(tokenizer_path, tiny_dataset, run))
    assert r.returncode == 0 and "resumed from" in r.stderr, r.stderr[-3000:]
    assert losses(run) == losses(ref) and len(losses(ref)) == STEPS // 5
    a, b = final_weights(run), final_weights(ref)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize(
    "kind, name, launcher_status",
    [("torchrun", "SIGTERM", 1), ("torchrun", "SIGUSR1", -signal.SIGUSR1), ("deepspeed", "SIGTERM", -signal.SIGTERM),
     ("deepspeed", "SIGUSR1", -signal.SIGUSR1)],
)  # fmt: skip
def test_a_stop_signal_to_the_launcher_alone_leaves_no_rank_running(
    tmp_path, tokenizer_path, tiny_dataset, kind, name, launcher_status
):
    """What a supervisor or `kill PID` does: the signal reaches the launcher's process only. torchrun passes
    SIGTERM on but dies of SIGUSR1; the deepspeed command dies of both at once. Either way every rank saves and
    exits, and the run directory records the attempt as stopped (launchers' statuses differ: torchrun 1 or 138,
    deepspeed 143 or 138)."""
    run = tmp_path / "run"
    log = open(tmp_path / "job.log", "w")
    proc = start_pretrain(kind, 2, args_for(tokenizer_path, tiny_dataset, run), stdout=log, stderr=log)
    assert wait_for_step(run, 5, proc), (tmp_path / "job.log").read_text()[-3000:]
    ranks = ranks_of(psutil.Process(proc.pid))
    assert len(ranks) == 2
    os.kill(proc.pid, getattr(signal, name))
    sent = time.monotonic()
    while running(ranks) and time.monotonic() - sent < 60:
        time.sleep(0.05)
    proc.wait(timeout=60)
    log.close()
    out = (tmp_path / "job.log").read_text()
    assert not running(ranks), out[-3000:]
    assert proc.returncode == launcher_status  # what the launcher itself reports (negative: killed by that signal)
    record = last_attempt(run)
    assert record["state"] == "stopped" and record["exit_status"] == 3, (record, out[-3000:])
    assert record["saved_step"] >= 5 and (run / "checkpoints" / "latest").exists()


def test_a_launcher_ending_rank_0_after_the_others_cannot_spoil_a_saved_stop(tmp_path, tokenizer_path, tiny_dataset):
    """What `scancel --signal=USR1` does under torchrun: every rank gets the signal and saves; rank 0 then has
    retention work left (slowed to 10 s here, as on a parallel file system). Had rank 1 exited first, torchrun would
    have sent rank 0 a TERM in the middle of it. No rank exits before rank 0 has recorded the stop, and a later
    signal does not cut it short: the attempt is recorded as stopped after saving, status 3."""
    run = tmp_path / "run"
    args = args_for(tokenizer_path, tiny_dataset, run)
    cmd = [*launcher("torchrun", 2), str(REPO / "tests/slow_prune.py"), *args]
    log = open(tmp_path / "job.log", "w")
    proc = subprocess.Popen(cmd, cwd=REPO, env={**run_env(), "SLOW_PRUNE_SECONDS": "10"}, stdout=log, stderr=log)
    assert wait_for_step(run, 5, proc), (tmp_path / "job.log").read_text()[-3000:]
    ranks = ranks_of(psutil.Process(proc.pid), "tests/slow_prune.py")
    assert len(ranks) == 2
    for rank in ranks:
        rank.send_signal(signal.SIGUSR1)
    time.sleep(6)  # in the middle of rank 0's retention: a launcher's TERM, or the time limit's after its warning
    for rank in running(ranks):
        rank.send_signal(signal.SIGTERM)
    proc.wait(timeout=120)
    log.close()
    out = (tmp_path / "job.log").read_text()
    record = last_attempt(run)
    assert record["state"] == "stopped" and record["exit_status"] == 3, (record, out[-3000:])
    assert "SIGTERM received as well: already saving and stopping (SIGUSR1)" in out
