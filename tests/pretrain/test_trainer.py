"""The training loop in this process, with small fakes for the engine, the data and the checkpoint manager:
when it steps, logs, evaluates, saves and stops."""

import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
import torch

from pretrain.config import BatchPlan, OptimConfig, TrainConfig
from pretrain.data import DataError, SampleError, Skips
from pretrain.distributed import World
from pretrain.engine import StepStats, lr_at
from pretrain.errors import LauncherGone, NonFinite, Stopped
from pretrain.job import StopRequest
from pretrain.metrics import Metrics
from pretrain.trainer import Stop, Trainer


@dataclass
class FakeEngine:
    """Loss 10 - step; the steps listed in `bad` are non-finite (skipped)."""

    bad: set = field(default_factory=set)
    calls: list = field(default_factory=list)  # (batch, lr) of every train_step
    evals: int = 0
    losses: dict = field(default_factory=dict)  # step -> loss, instead of 10 - step

    def train_step(self, batch, lr):
        step = batch[0]
        self.calls.append((batch, lr))
        if step in self.bad:
            return StepStats(loss=torch.tensor(float("nan")), grad_norm=float("inf"), applied=False)
        return StepStats(loss=torch.tensor(self.losses.get(step, 10.0 - step)), grad_norm=1.0, applied=True)

    def logits(self, tokens):  # uniform over 8 ids: an eval loss of ln 8
        self.evals += 1
        return torch.zeros(*tokens.shape, 8)

    def mean_across_ranks(self, value):
        return value.detach().float()

    def state_bytes(self):
        return {"weights": 400, "gradients": 0, "optimizer": 800}


@dataclass
class FakeData:
    bad_at: set = field(default_factory=set)  # steps whose batch holds a token outside the vocab
    skips: Skips = field(default_factory=Skips)

    def batch(self, step, plan, rank):
        if step in self.bad_at:
            raise SampleError(f"sample {step * plan.global_batch}: token 3 is 9999, outside the vocab")
        return [step, rank]  # what the engine is handed: which step's micro-batches


class FakeValData:
    def batch(self, step, plan, rank):
        return [np.zeros((plan.micro_batch, plan.seq_len + 1), dtype=np.int64)]  # one micro-batch of windows


@dataclass
class FakeCheckpoints:
    dir: Path = Path("ckpt")
    saved: list = field(default_factory=list)

    def save(self, step):
        self.saved.append(step)
        return f"step_{step:08d}", []

    def latest(self):
        return self.dir / f"step_{self.saved[-1]:08d}" if self.saved else None


class NoExitStop(StopRequest):
    """A StopRequest whose deadline is recorded, not armed: a real one would end this test process later."""

    def __init__(self):
        super().__init__([], grace=60)
        self.armed = []

    def arm_deadline(self, seconds: float, status: int) -> None:
        self.armed.append((seconds, status))


def make(tmp_path, *, steps=10, start=0, save_every=4, log_every=2, eval_every=5, bad=(), **train):
    train = TrainConfig(max_steps=steps, eval_every=eval_every, global_batch_seqs=4, **train)
    trainer = Trainer(
        engine=FakeEngine(bad=set(bad)),
        data=FakeData(),
        plan=BatchPlan(global_batch=4, micro_batch=2, world_size=1, seq_len=8),
        world=World(),
        checkpoints=FakeCheckpoints(),
        metrics=Metrics(tmp_path, rank=0, tensorboard=False, start_step=start),
        stop=NoExitStop(),
        optim=OptimConfig(lr=1e-3, min_lr=1e-4, warmup_steps=2),
        train=train,
        save_every=save_every,
        log_every=log_every,
        flops_per_token=1000,
        peak_flops=1e9,
        start_step=start,
        val_data=FakeValData() if eval_every else None,
        eval_batches=3,
    )
    trainer.resources.callback(trainer.metrics.close)
    return trainer


def logged(tmp_path) -> dict[int, dict]:
    """metrics.jsonl, the lines of each step merged."""
    out = {}
    for m in map(json.loads, (tmp_path / "metrics.jsonl").read_text().splitlines()):
        out.setdefault(m["step"], {}).update(m)
    return out


def test_fit_steps_logs_evaluates_and_saves_on_schedule(tmp_path):
    with make(tmp_path) as t:
        last = t.fit()
    assert [b[0] for b, _ in t.engine.calls] == list(range(10))  # each step's own batch, in order
    assert [lr for _, lr in t.engine.calls] == [lr_at(s, t.optim, 10) for s in range(10)]
    assert t.checkpoints.saved == [4, 8, 10]  # every save_every, and the last step
    m = logged(tmp_path)
    assert sorted(s for s in m if "train/loss" in m[s]) == [2, 4, 6, 8, 10]
    assert sorted(s for s in m if "eval/loss" in m[s]) == [5, 10] and t.engine.evals == 2 * 3
    assert m[4]["train/loss"] == 7.0 and m[10]["train/tokens_seen"] == 10 * 4 * 8
    assert last["train/loss"] == 1.0 and last["eval/loss"] == pytest.approx(math.log(8))


def test_fit_continues_from_the_resumed_step(tmp_path):
    with make(tmp_path, start=6) as t:
        t.fit()
    assert [b[0] for b, _ in t.engine.calls] == [6, 7, 8, 9] and t.checkpoints.saved == [8, 10]


def test_max_tokens_ends_the_run_early(tmp_path):
    with make(tmp_path, max_tokens=5 * 4 * 8) as t:
        t.fit()
    assert t.total_steps == 5 and len(t.engine.calls) == 5 and t.checkpoints.saved == [4, 5]


def test_stop_at_step_saves_then_stops(tmp_path):
    with make(tmp_path, stop_at_step=3) as t, pytest.raises(Stopped, match="train.stop_at_step 3"):
        t.fit()
    assert len(t.engine.calls) == 3 and t.checkpoints.saved == [3]


def test_a_stop_signal_saves_the_current_step_and_stops(tmp_path):
    t = make(tmp_path)
    t.stop.signal_name = "SIGTERM"  # as the handler sets it
    with t, pytest.raises(Stopped, match="SIGTERM received"):
        t.fit()
    assert t.checkpoints.saved == [1]


def test_launcher_gone_saves_when_there_is_time_else_exits_at_once(tmp_path):
    t = make(tmp_path / "a")
    t.stop.launcher, t.stop.launcher_since = "torchrun, pid 1", time.monotonic()
    with t, pytest.raises(Stopped, match=r"the launcher \(torchrun, pid 1\) is gone"):
        t.fit()
    assert t.checkpoints.saved == [1]
    t = make(tmp_path / "b", orphan_grace_seconds=5)
    t.start_step, t.save_seconds = 0, 30.0  # the last save took longer than the grace allows
    t.stop.launcher, t.stop.launcher_since = "torchrun, pid 1", time.monotonic()
    with t, pytest.raises(LauncherGone, match="exiting at step 1"):
        t.fit()
    assert t.checkpoints.saved == [] and t.stop.armed == [(5.0, 1)]


def test_non_finite_steps_are_counted_and_stop_the_run(tmp_path):
    with make(tmp_path, bad={4, 5, 6}, max_bad_steps=3) as t, pytest.raises(NonFinite) as e:
        t.fit()
    assert "3 consecutive steps with non-finite loss or gradients (train.max_bad_steps), the last at step 7" in str(
        e.value
    )
    assert "the last good checkpoint is ckpt/step_00000004" in str(e.value)
    assert t.checkpoints.saved == [4]  # none during the bad steps


def test_a_good_step_resets_the_count_and_periodic_saves_wait(tmp_path):
    with make(tmp_path, bad={3, 6}, max_bad_steps=2, save_every=4) as t:
        t.fit()
    assert t.bad_steps == 0 and len(t.engine.calls) == 10
    assert t.checkpoints.saved == [8, 10]  # step 4 was skipped: no periodic save; step 7 was, but 8 was not


def test_max_wall_time_leaves_room_for_a_step_and_a_save(tmp_path):
    with make(tmp_path, max_wall_time=100.0) as t:
        t.save_seconds = 100.0  # the time left is less than a save
        with pytest.raises(Stopped, match="train.max_wall_time of 100 s is near"):
            t.fit()
    assert t.checkpoints.saved == [1]


@dataclass(frozen=True)
class OtherRank(World):
    """This rank, with another rank beside it whose stop reason is `theirs`."""

    theirs: int = 0

    def max(self, value: int) -> int:
        return max(value, self.theirs)


def test_a_stop_seen_by_another_rank_stops_this_one_at_the_same_step(tmp_path):
    t = make(tmp_path, stop_at_step=50)
    t.world = OtherRank(rank=0, size=2, theirs=1)  # the other rank got SIGTERM
    with t, pytest.raises(Stopped, match="a stop signal received"):
        t.fit()
    assert t.checkpoints.saved == [1]
    t = make(tmp_path / "b")
    t.world = OtherRank(rank=0, size=2, theirs=4)  # the other rank's launcher is gone: save, then exit
    with t, pytest.raises(Stopped, match=r"the launcher \(of a rank\) is gone"):
        t.fit()
    assert t.checkpoints.saved == [1] and t.stop.armed == [(30.0, 1)]  # this rank must exit by the same deadline


@dataclass(frozen=True)
class BadLater(World):
    """The other rank's batch of step 3 holds a bad sample (its third collective: first batch, steps 1 and 2)."""

    calls: list = field(default_factory=list)

    def max(self, value: int) -> int:
        self.calls.append(value)
        return max(value, int(Stop.BAD_SAMPLE) if len(self.calls) == 3 else 0)


def test_a_bad_sample_saves_then_stops_every_rank(tmp_path):
    """A sample that cannot be trained on, found while reading the next step's batch: the finding rank raises its
    own error after every rank saved the step before it; the others are told (no rank waits in a collective)."""
    t = make(tmp_path / "a")
    t.data = FakeData(bad_at={6})
    with t, pytest.raises(SampleError, match="token 3 is 9999"):
        t.fit()
    assert t.checkpoints.saved == [4, 6] and len(t.engine.calls) == 6  # the bad batch was never trained on
    t = make(tmp_path / "b")
    t.world = BadLater(rank=0, size=2)
    with t, pytest.raises(DataError, match=r"another rank read a sample .* of step 3 \(.*\); step 2 was saved"):
        t.fit()
    assert t.checkpoints.saved == [2]
    t = make(tmp_path / "c", start=3)
    t.data = FakeData(bad_at={3})  # the very first batch: stop before any step, nothing to save
    with t, pytest.raises(SampleError):
        t.fit()
    assert t.checkpoints.saved == [] and t.engine.calls == []


def test_a_loss_spike_is_logged_with_its_samples(tmp_path, caplog):
    from pretrain.metrics import LossWatch

    with make(tmp_path, steps=40, log_every=10, eval_every=0, spike_window=20, spike_threshold=6.0) as t:
        t.engine.losses = {s: 5.0 + 0.01 * math.sin(s) for s in range(40)}
        t.engine.losses[30] = 5.5  # step 31 as logged; samples [120, 124)
        t.data.skips = Skips([[121, 122]])  # one of them left out: the step took 125 instead
        t.fit()
    spikes = [r.getMessage() for r in caplog.records if "loss spike" in r.getMessage()]
    assert len(spikes) == 1 and spikes[0].startswith("step 31: loss spike: 5.5000 is ")
    assert "global samples [120, 121), [122, 125) (launch/inspect_step.py RUN_DIR 31 shows them" in spikes[0]
    m = logged(tmp_path)
    assert [s for s in m if "train/loss_spike" in m[s]] == [31] and m[31]["train/loss_spike"] > 6
    assert m[40]["train/loss"] == pytest.approx(5.0 + 0.01 * math.sin(39))  # the loss computed once, logged
    watch = LossWatch(window=20, threshold=6.0)
    assert not any(watch.update(5.0 + 0.01 * math.sin(s)) for s in range(30))
    mean = watch.mean
    assert watch.update(5.5) and watch.mean == mean  # a spike does not move the statistic
    assert not watch.update(float("nan")) and not watch.update(5.0)


def test_the_profiler_writes_a_chrome_trace_of_its_window(tmp_path):
    from pretrain.profiler import PROFILE_DIR, StepProfiler

    with make(tmp_path, steps=6, eval_every=0) as t:
        t.profiler = StepProfiler(tmp_path, 2, 3, rank=0)
        t.fit()
    traces = list((tmp_path / PROFILE_DIR).glob("rank0.*.pt.trace.json"))
    assert len(traces) == 1
    trace = json.loads(traces[0].read_text())
    names = {e.get("name") for e in trace["traceEvents"]}
    assert {"train step 2", "train step 3"} <= names and "train step 4" not in names  # the window's steps, marked
    assert all({"ph", "name"} <= e.keys() for e in trace["traceEvents"])
    with make(tmp_path / "off", steps=3, eval_every=0) as t:
        t.fit()
    assert not (tmp_path / "off" / PROFILE_DIR).exists()
