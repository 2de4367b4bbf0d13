"""The training loop over the parts it is handed: step, log, evaluate, save, stop.

    with build_trainer(load_config("launch/configs/demo.yaml")) as trainer:   # pretrain/build.py wires the parts
        trainer.fit()

`Trainer` decides when (log every N steps, evaluate, save periodically and on a stop, stop on a signal, a time
limit, a gone launcher or too many non-finite steps); its parts know how: the engine steps, the data gives each
rank its micro-batches, the checkpoint manager saves, the metrics write. A test can hand it small fakes and run
`fit()` in its own process.
"""

from __future__ import annotations

import contextlib
import enum
import logging
import time
from dataclasses import dataclass, field

from pretrain.checkpoint import CheckpointManager
from pretrain.config import BatchPlan, OptimConfig, TrainConfig
from pretrain.data import BlendedDataset, DataError, SampleError
from pretrain.distributed import World
from pretrain.engine import Engine, lr_at
from pretrain.errors import EXIT_FAILED, LauncherGone, NonFinite, Stopped
from pretrain.evaluate import Evaluator, TokenBytes
from pretrain.job import StopRequest
from pretrain.metrics import LossWatch, Metrics, memory_gib, throughput
from pretrain.profiler import StepProfiler

log = logging.getLogger("pretrain")


class Stop(enum.IntEnum):
    """Why the loop stops early, agreed on by all ranks (the largest value any rank sees wins)."""

    NO = 0
    SIGNAL = 1
    WALL_TIME = 2
    AT_STEP = 3
    LAUNCHER_GONE = 4  # a step and a save fit in train.orphan_grace_seconds: save, then exit
    LAUNCHER_GONE_NO_TIME = 5  # they do not: exit at once
    BAD_SAMPLE = 6  # a rank read a sample it cannot train on (pretrain.data.SampleError): save, then stop (exit 2)


@dataclass
class Trainer:
    engine: Engine
    data: BlendedDataset
    plan: BatchPlan
    world: World
    checkpoints: CheckpointManager
    metrics: Metrics
    stop: StopRequest
    optim: OptimConfig
    train: TrainConfig
    save_every: int  # checkpoint.save_every
    log_every: int  # logging.log_every
    flops_per_token: int
    peak_flops: float  # per device, for MFU
    start_step: int = 0  # the step resumed from
    started: float = field(default_factory=time.monotonic)  # when the job started (train.max_wall_time counts from it)
    val_data: BlendedDataset | None = None
    eval_batches: int = 0
    token_bytes: TokenBytes | None = None  # the bytes each token stands for (eval/bpb); None: no eval/bpb
    profiler: StepProfiler | None = None  # train.profile_steps on this rank
    resources: contextlib.ExitStack = field(default_factory=contextlib.ExitStack)  # what close() releases

    def __post_init__(self):
        self.total_steps = self.plan.total_steps(self.train)
        self.bad_steps = 0  # consecutive steps whose update was skipped (non-finite)
        self.step_seconds = 0.0
        self.save_seconds: float | None = None  # the last save's duration
        self.window_start, self.window_steps = time.perf_counter(), 0  # throughput since the last log line
        self.spikes = (
            LossWatch(self.train.spike_window, self.train.spike_threshold) if self.train.spike_threshold else None
        )

    def fit(self) -> dict:
        """Train until max_steps / max_tokens, saving as configured; returns the last logged scalars.
        Raises Stopped after saving when asked to stop early, NonFinite or LauncherGone without saving."""
        step, last = self.start_step, {}
        batch, bad = self.read_batch(step)
        if self.world.max(int(Stop.BAD_SAMPLE if bad else Stop.NO)) == Stop.BAD_SAMPLE:  # the first batch
            raise self.bad_sample(bad, step)
        while step < self.total_steps:
            t0 = time.perf_counter()
            lr = lr_at(step, self.optim, self.total_steps)
            if self.profiler:
                self.profiler.begin(step + 1)
            stats = self.engine.train_step(batch, lr)
            self.count_bad_steps(step, stats)
            step, self.window_steps = step + 1, self.window_steps + 1
            batch, bad = self.read_batch(step)  # the next step's, so that every rank learns of a bad one in time
            self.step_seconds = time.perf_counter() - t0
            final = step == self.total_steps
            if self.profiler:
                self.profiler.end(step)
            if step == self.start_step + 1:
                self.outside_window(self.log_states, step)
            loss = self.watch_loss(step, stats) if self.spikes else None
            if step % self.log_every == 0 or final:
                last = self.log_step(step, stats, lr, loss)
            if self.val_data is not None and (step % self.train.eval_every == 0 or final):
                last.update(self.outside_window(self.evaluate, step))
            stop = self.stop_reason(step, bad)
            if stop == Stop.LAUNCHER_GONE_NO_TIME:
                raise LauncherGone(
                    f"the launcher is gone and a save would not fit in the time left: exiting at step {step}"
                )
            periodic = (self.save_every and step % self.save_every == 0) or final
            if stop or (periodic and not self.bad_steps):  # no periodic save in a run of skipped steps
                self.outside_window(self.save, step)
            if stop == Stop.BAD_SAMPLE:
                raise self.bad_sample(bad, step)
            if stop and not final:
                reason = self.describe(stop, step)
                self.metrics.console(f"stopping at step {step}: {reason}; resume with the same command")
                raise Stopped(reason, why=stop.name.lower())
        return last

    def read_batch(self, step: int) -> tuple[list | None, SampleError | None]:
        """This rank's micro-batches for `step` (None after the last step), or the SampleError reading them raised:
        the rank that finds a bad sample must not leave the others waiting in a collective."""
        if step >= self.total_steps:
            return None, None
        try:
            return self.data.batch(step, self.plan, self.world.rank), None
        except SampleError as e:
            return None, e

    def bad_sample(self, found: SampleError | None, step: int) -> DataError:
        """What each rank raises when a rank's next batch holds a bad sample: that rank its own error."""
        if found is not None:
            return found
        return DataError(
            f"another rank read a sample it cannot train on in the batch of step {step + 1} (that rank names it)"
            + (f"; step {step} was saved" if step > self.start_step else "")
        )

    def outside_window(self, work, step: int):
        """Run `work(step)` without counting its time as training throughput."""
        t0 = time.perf_counter()
        result = work(step)
        self.window_start += time.perf_counter() - t0
        return result

    def count_bad_steps(self, step: int, stats) -> None:
        """Count consecutive skipped (non-finite) steps; stop the run after train.max_bad_steps of them."""
        if stats.applied:
            self.bad_steps = 0
            return
        self.bad_steps += 1
        loss = self.engine.mean_across_ranks(stats.loss).item()
        log.warning(
            "step %d: non-finite loss or gradients (loss %s, grad norm %s): the update was skipped; global samples "
            "%s (%d consecutive)", step + 1, loss, stats.grad_norm, self.samples_of(step + 1), self.bad_steps,
        )  # fmt: skip
        if self.bad_steps >= self.train.max_bad_steps:
            raise NonFinite(
                f"{self.bad_steps} consecutive steps with non-finite loss or gradients (train.max_bad_steps), the "
                f"last at step {step + 1}; the last good checkpoint is {self.checkpoints.latest() or 'none'}"
            )

    def log_states(self, step: int) -> None:
        """After the first step (when every optimizer has made its states): the model-state bytes this rank holds,
        on the console and as memory/states_bytes (rank 0's), to check a plan (launch/plan.py) against."""
        held = self.engine.state_bytes()
        total = sum(held.values())
        parts = ", ".join(f"{k} {v / 2**30:.3f}" for k, v in held.items())
        log.info("rank %d holds %.3f GiB of model states (%s GiB)", self.world.rank, total / 2**30, parts)
        self.metrics.scalars(
            step, {"memory/states_bytes": float(total), **{f"memory/{k}_bytes": float(v) for k, v in held.items()}}
        )

    def samples_of(self, step: int) -> str:
        """The global sample numbers step `step` (as logged: 1 is the first) trained on, as ranges."""
        first = (step - 1) * self.plan.global_batch
        segments = self.data.skips.segments(first, first + self.plan.global_batch)
        return ", ".join(f"[{a}, {b})" for a, b in segments)

    def watch_loss(self, step: int, stats) -> float:
        """The step's loss over all ranks, checked for a spike (train.spike_threshold): logged with the samples
        it trained on, and as the TensorBoard scalar train/loss_spike (its z-score), at that step."""
        loss = self.engine.mean_across_ranks(stats.loss).item()
        if self.spikes.update(loss):
            z = self.spikes.z(loss)
            log.warning(
                "step %d: loss spike: %.4f is %.1f standard deviations above the running mean %.4f; global samples "
                "%s (launch/inspect_step.py RUN_DIR %d shows them; data.skip_samples leaves them out)",
                step, loss, z, self.spikes.mean, self.samples_of(step), step,
            )  # fmt: skip
            self.metrics.scalars(step, {"train/loss_spike": z})
        return loss

    def save_estimate(self) -> float:
        """Seconds that one more step and a save take, from the last ones measured."""
        return 2 * self.step_seconds + (self.save_seconds or 2 * self.step_seconds)

    def stop_reason(self, step: int, bad: SampleError | None = None) -> Stop:
        """A stop signal, a time limit, a gone launcher or a bad sample in the next batch on any rank: every rank
        gets the same answer."""
        local, limit, grace = Stop.NO, self.train.max_wall_time, self.train.orphan_grace_seconds
        if bad is not None:
            local = Stop.BAD_SAMPLE
        elif self.stop.signal_name:  # its deadline (train.stop_grace_seconds) holds, its launcher gone or not
            local = Stop.SIGNAL
        elif self.stop.launcher:
            left = grace - (time.monotonic() - self.stop.launcher_since)
            local = Stop.LAUNCHER_GONE if self.save_estimate() <= left else Stop.LAUNCHER_GONE_NO_TIME
        elif step == self.train.stop_at_step:
            local = Stop.AT_STEP
        elif limit is not None and time.monotonic() - self.started + self.save_estimate() > limit:
            local = Stop.WALL_TIME
        agreed = Stop(self.world.max(int(local)))
        if agreed in (Stop.LAUNCHER_GONE, Stop.LAUNCHER_GONE_NO_TIME):  # ranks whose launcher lives on exit too
            self.stop.arm_deadline(grace, EXIT_FAILED)
        return agreed

    def describe(self, stop: Stop, step: int) -> str:
        return {
            Stop.SIGNAL: f"{self.stop.signal_name or 'a stop signal'} received",
            Stop.WALL_TIME: f"train.max_wall_time of {self.train.max_wall_time or 0:.0f} s is near",
            Stop.AT_STEP: f"train.stop_at_step {step}",
            Stop.LAUNCHER_GONE: f"the launcher ({self.stop.launcher or 'of a rank'}) is gone",
        }[stop]

    def save(self, step: int) -> None:
        t0 = time.perf_counter()
        self.metrics.flush()  # everything logged up to this step is on disk before the checkpoint exists
        tag, removed = self.checkpoints.save(step)
        self.save_seconds = time.perf_counter() - t0
        self.metrics.console(
            f"saved {self.checkpoints.dir / tag}" + (f" (removed {', '.join(removed)})" if removed else "")
        )

    def log_step(self, step: int, stats, lr: float, loss: float | None = None) -> dict:
        """Log the step's scalars; `loss`: its loss over all ranks, when already known."""
        if loss is None:
            loss = self.engine.mean_across_ranks(stats.loss).item()
        seconds, steps = time.perf_counter() - self.window_start, self.window_steps
        values = {"train/loss": loss, "train/lr": lr, "train/grad_norm": stats.grad_norm}
        if stats.z_loss is not None:
            values["train/z_loss"] = self.engine.mean_across_ranks(stats.z_loss).item()
        values["perf/step_time"] = seconds / steps
        values.update(
            throughput(tokens=steps * self.plan.tokens_per_step, seconds=seconds, flops_per_token=self.flops_per_token,
                       world_size=self.world.size, peak_flops=self.peak_flops)
        )  # fmt: skip
        values["perf/memory_gib"] = memory_gib()
        values["train/tokens_seen"] = float(step * self.plan.tokens_per_step)
        self.metrics.scalars(step, values)
        gn = f"{stats.grad_norm:.3f}" if stats.grad_norm is not None else "-"
        self.metrics.console(
            f"step {step}/{self.total_steps} | loss {loss:.4f} | lr {lr:.2e} | grad norm {gn} | "
            f"{values['perf/tokens_per_sec']:,.0f} tok/s | {values['perf/tflops_per_device'] * 1e3:.1f} GFLOP/s/device | "
            f"MFU {values['perf/mfu'] * 100:.1f}% | {values['perf/step_time']:.3f} s/step | mem {values['perf/memory_gib']:.2f} GiB"
        )
        self.window_start, self.window_steps = time.perf_counter(), 0
        return values

    def evaluate(self, step: int) -> dict:
        """Loss, perplexity and bits per byte on eval_batches global batches of the validation set (pretrain/
        evaluate.py, as launch/evaluate.py computes them), summed over every rank's share."""
        evaluator = Evaluator(self.engine.logits, self.token_bytes)
        for b in range(self.eval_batches):
            for micro_batch in self.val_data.batch(b, self.plan, self.world.rank):
                evaluator.add(micro_batch)
        totals = evaluator.totals().reduce()
        values = {"eval/loss": totals.loss, "eval/ppl": totals.ppl}
        if totals.bytes:
            values["eval/bpb"] = totals.bpb
        self.metrics.scalars(step, values)
        bpb = f" | bpb {totals.bpb:.4f}" if totals.bytes else ""
        self.metrics.console(f"eval step {step} | loss {totals.loss:.4f} | ppl {totals.ppl:.2f}{bpb}")
        self.metrics.flush()
        return values

    def close(self, *exc) -> None:
        """Release what the run holds (metrics files, launcher watch, the run directory lock), once the run has
        ended: `exc` is how (the exception's type, value and traceback; none when it finished), which the attempt
        record in the run directory keeps."""
        self.resources.__exit__(*(exc or (None, None, None)))

    def __enter__(self) -> Trainer:
        return self

    def __exit__(self, *exc) -> None:
        self.close(*exc)
