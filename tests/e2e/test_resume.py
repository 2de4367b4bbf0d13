"""Checkpoints in real runs: exact resume for every ZeRO stage (2 ranks, accumulation, blending), stop signals,
and repeated kill -9 at random moments. (The mechanics are tests/pretrain/test_checkpoint.py's.)"""

import os
import random
import signal
import subprocess
import sys
import time

import pytest
import torch

from pretrain import checkpoint
from pretrain.job import RunLock

from ..helpers import (
    REPO,
    blended_args,
    final_weights,
    last_attempt,
    losses,
    pretrain,
    read_metrics,
    start_pretrain,
    tiny_overrides,
    wait_for_step,
)

STEPS = 6


@pytest.fixture(scope="module")
def full_run(tmp_path_factory, tokenizer_path, tiny_dataset, second_dataset):
    """Uninterrupted runs, made once per (ZeRO stage, number of ranks)."""
    made = {}

    def get(stage: int, nproc: int):
        if (stage, nproc) not in made:
            run_dir = tmp_path_factory.mktemp(f"full_zero{stage}_{nproc}ranks")
            kind = "torchrun" if nproc > 1 else "python"
            r = pretrain(kind, nproc, blended_args(tokenizer_path, tiny_dataset, second_dataset, run_dir, stage))
            assert r.returncode == 0, r.stderr[-3000:]
            made[stage, nproc] = run_dir
        return made[stage, nproc]

    return get


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_resume_is_bit_exact(tmp_path, tokenizer_path, tiny_dataset, second_dataset, full_run, stage):
    full, split = full_run(stage, 2), tmp_path / "split"
    args = blended_args(tokenizer_path, tiny_dataset, second_dataset, split, stage)
    r = pretrain("torchrun", 2, [*args, "train.stop_at_step=3"])  # stops as if preempted: saves step 3, exits 3
    assert r.returncode != 0 and "stopping at step 3: train.stop_at_step 3" in r.stderr, r.stderr[-3000:]
    assert (split / "checkpoints" / "latest").read_text() == "step_00000003"
    r = pretrain("torchrun", 2, args)
    assert r.returncode == 0 and "resumed from" in r.stderr, r.stderr[-3000:]
    assert losses(split) == losses(full) and len(losses(full)) == STEPS  # bit for bit, no duplicated steps
    a, b = final_weights(full), final_weights(split)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    kept = sorted(c.tag for c in checkpoint.list_checkpoints(split / "checkpoints"))
    assert kept == ["step_00000003", "step_00000004", "step_00000006"]  # saved 2, 3 (stop), 4, 6; keep_last 3
    if stage in (0, 3):  # the CLI lists them and consolidates one fp32 state dict, without and with ZeRO
        cli = [sys.executable, str(REPO / "launch/checkpoints.py")]
        r = subprocess.run([*cli, "list", str(split)], capture_output=True, text=True)
        assert r.returncode == 0 and "step_00000006            6" in r.stdout and "valid (latest)" in r.stdout
        out = tmp_path / "model.pt"
        r = subprocess.run([*cli, "consolidate", str(split), "--output", str(out)], capture_output=True, text=True)
        assert r.returncode == 0, r.stderr[-2000:]
        state = torch.load(out, weights_only=True)
        assert state.keys() == b.keys() and all(torch.equal(state[k], b[k]) for k in b)
    # tensorboard continues at the right steps, without duplicates
    from tensorboard.backend.event_processing.event_accumulator import SCALARS, EventAccumulator

    acc = EventAccumulator(str(split / "tensorboard"), size_guidance={SCALARS: 0})
    acc.Reload()
    assert [e.step for e in acc.Scalars("train/loss")] == list(range(1, STEPS + 1))


@pytest.mark.parametrize("stage", [1, 2, 3])
@pytest.mark.parametrize("before,after", [(2, 1), (1, 2)])
def test_resume_on_a_different_number_of_ranks(
    tmp_path, tokenizer_path, tiny_dataset, second_dataset, full_run, stage, before, after
):
    """A ZeRO checkpoint from `before` ranks continues on `after` ranks (through DeepSpeed's universal format):
    the same samples in the same order, and the losses of the next steps match the uninterrupted run's."""
    split = tmp_path / "split"
    args = blended_args(tokenizer_path, tiny_dataset, second_dataset, split, stage)
    kind = {1: "python", 2: "torchrun"}
    r = pretrain(kind[before], before, [*args, "train.stop_at_step=3"])
    assert r.returncode != 0 and "stopping at step 3" in r.stderr, r.stderr[-3000:]
    r = pretrain(kind[after], after, args)
    assert r.returncode == 0 and "universal format" in r.stderr, r.stderr[-3000:]
    assert (split / "checkpoints" / "step_00000003.universal").is_dir()
    if stage == 2 and before == 2:  # the CLI converts too (the newest checkpoint here)
        r = subprocess.run(
            [sys.executable, str(REPO / "launch/checkpoints.py"), "universal", str(split)],
            capture_output=True,
            text=True,
        )
        assert r.returncode == 0 and (split / "checkpoints" / "step_00000006.universal" / "zero").is_dir(), r.stderr
    full = dict(losses(full_run(stage, before)))
    got = dict(losses(split))
    assert sorted(got) == list(range(1, STEPS + 1))
    for step in range(1, STEPS + 1):
        # the target is 1e-4; measured: ~7e-8 (summation order differs between rank counts)
        assert got[step] == pytest.approx(full[step], rel=1e-6), step


def test_resume_with_another_zero_stage(tmp_path, tokenizer_path, tiny_dataset, second_dataset, full_run):
    """A ZeRO-1 checkpoint from 2 ranks continues as ZeRO-2 on 1 rank."""
    split = tmp_path / "split"
    args = blended_args(tokenizer_path, tiny_dataset, second_dataset, split, 1)
    r = pretrain("torchrun", 2, [*args, "train.stop_at_step=3"])
    assert r.returncode != 0 and "stopping at step 3" in r.stderr, r.stderr[-3000:]
    r = pretrain("python", 1, [*args, "train.ds_config=ds_configs/zero2.json"])
    assert r.returncode == 0 and "universal format" in r.stderr, r.stderr[-3000:]
    full, got = dict(losses(full_run(1, 2))), dict(losses(split))
    assert sorted(got) == list(range(1, STEPS + 1))
    for step in range(1, STEPS + 1):
        assert got[step] == pytest.approx(full[step], rel=1e-6), step


def test_moving_to_or_from_zero3_is_refused(tmp_path, tokenizer_path, tiny_dataset, second_dataset):
    args = blended_args(tokenizer_path, tiny_dataset, second_dataset, tmp_path / "run", 3)
    assert pretrain("torchrun", 2, [*args, "train.stop_at_step=2"]).returncode != 0
    r = pretrain("python", 1, [*args, "train.ds_config=ds_configs/zero2.json"])
    assert r.returncode == 2 and "saved with ZeRO-3, this run uses ZeRO-2" in r.stderr, r.stderr[-2000:]
    assert not (tmp_path / "run" / "checkpoints" / "step_00000002.universal").exists()


def reference_and_interrupted(tmp_path, tokenizer_path, datasets, stage, extra):
    """Run the uninterrupted reference (1 process) in tmp/ref; return the same run's directory and args in tmp/run."""
    ref, run = tmp_path / "ref", tmp_path / "run"
    args = blended_args(tokenizer_path, *datasets, ref, stage)
    args = [a for a in args if not a.startswith(("train.max_steps", "checkpoint.save_every"))] + extra
    assert pretrain("python", 1, args).returncode == 0
    return run, [a.replace(str(ref), str(run)) for a in args]


def test_sigterm_saves_and_exits_then_resumes_exactly(tmp_path, tokenizer_path, tiny_dataset, second_dataset):
    extra = ["train.max_steps=40", "checkpoint.save_every=0", "train.stop_grace_seconds=60"]
    run, args = reference_and_interrupted(tmp_path, tokenizer_path, (tiny_dataset, second_dataset), 1, extra)
    proc = start_pretrain("python", 1, args)
    assert wait_for_step(run, 3, proc)
    sent = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 3, err[-3000:]  # documented: stopped after saving a checkpoint
    assert time.monotonic() - sent < 60  # within the grace time
    assert "SIGTERM received" in err
    step = checkpoint.step_of((run / "checkpoints" / "latest").read_text())
    assert 3 <= step < 40
    r = pretrain("python", 1, args)
    assert r.returncode == 0, r.stderr[-3000:]
    assert losses(run) == losses(tmp_path / "ref")
    a, b = final_weights(run), final_weights(tmp_path / "ref")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_kill_9_at_random_moments(tmp_path, tokenizer_path, tiny_dataset, second_dataset):
    """Ten kill -9 of the run at random moments (a checkpoint every step, so many land mid-save); every restart
    resumes from a valid checkpoint and the end result equals the uninterrupted run's, bit for bit."""
    extra = ["train.max_steps=150", "checkpoint.save_every=1", "checkpoint.keep_last=2"]
    run, args = reference_and_interrupted(tmp_path, tokenizer_path, (tiny_dataset, second_dataset), 2, extra)
    rng = random.Random(0)
    resumed_from = []
    for _ in range(10):
        logged = max((m["step"] for m in read_metrics(run)), default=0) if (run / "metrics.jsonl").exists() else 0
        proc = start_pretrain("python", 1, args, stdout=subprocess.DEVNULL)
        assert wait_for_step(run, logged + rng.randint(1, 4), proc), "the run ended before it could be killed"
        time.sleep(rng.uniform(0.0, 0.15))  # steps and saves alternate every few tens of ms: land anywhere
        os.kill(proc.pid, signal.SIGKILL)
        err = proc.communicate()[1]
        resumed_from += [line for line in err.splitlines() if "resumed from" in line]
    r = pretrain("python", 1, args)
    assert r.returncode == 0, r.stderr[-3000:]
    assert len(resumed_from) >= 9  # every attempt after the first resumed from a checkpoint
    assert losses(run) == losses(tmp_path / "ref")
    a, b = final_weights(run), final_weights(tmp_path / "ref")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_no_valid_checkpoint_is_refused_and_set_aside_starts_over(tmp_path, tokenizer_path, tiny_dataset):
    """A run directory whose checkpoints are all invalid is refused (exit 2, each one named, nothing touched),
    never silently trained over from step 0; `checkpoints.py set-aside` moves the earlier run aside (refused while
    a job holds the directory), and the same command then starts from step 0."""
    run = tmp_path / "run"
    args = [
        *tiny_overrides(tokenizer_path, tiny_dataset, run),
        *("train.global_batch_seqs=4", "train.max_steps=2", "train.eval_every=0", "logging.log_every=1"),
        "checkpoint.save_every=1",
    ]
    assert pretrain("python", 1, args).returncode == 0
    first = losses(run)
    for d in (run / "checkpoints").glob("step_*"):
        (d / checkpoint.RECORD).unlink()

    def run_files():  # the run's own files (each attempt also leaves its record in attempts/)
        return {p: p.read_bytes() for p in run.rglob("*") if p.is_file() and "attempts" not in p.relative_to(run).parts}

    before = run_files()
    r = pretrain("python", 1, args)
    assert r.returncode == 2 and "holds no valid checkpoint, but a run saved here before" in r.stderr, r.stderr[-3000:]
    assert "step_00000001: " in r.stderr and "step_00000002: " in r.stderr and "no complete.json" in r.stderr
    assert "launch/checkpoints.py set-aside" in r.stderr
    assert run_files() == before
    assert (last_attempt(run)["state"], last_attempt(run)["exit_status"]) == ("failed", 2)

    set_aside = [sys.executable, str(REPO / "launch/checkpoints.py"), "set-aside", str(run)]
    with RunLock(run, stale_after=300):  # a job running there
        busy = subprocess.run(set_aside, capture_output=True, text=True)
    assert busy.returncode == 5 and "is in use by another job" in busy.stderr, busy.stderr
    done = subprocess.run(set_aside, capture_output=True, text=True)
    assert done.returncode == 0 and "the earlier run is now in" in done.stdout, done.stderr
    (aside,) = (run / "previous").iterdir()
    assert {aside / p.relative_to(run): b for p, b in before.items()} == {
        p: p.read_bytes() for p in aside.rglob("*") if p.is_file()
    }  # every file of the earlier run, as it was
    r = pretrain("python", 1, args)
    assert r.returncode == 0 and losses(run) == first  # a new run from step 0
