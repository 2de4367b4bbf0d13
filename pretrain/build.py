"""Wiring a run: every part of the training loop built once, in order, from a RunConfig.

    with build_trainer(cfg) as trainer:
        trainer.fit()

The order matters and is the whole policy of starting a run: join the process group; take the run directory (one
job at a time) before anything writes there; install the stop signals and watch the launcher; open the tokenizer
and the data; settle the DeepSpeed config; find the checkpoint to resume and check it against the run; build the
model and the engine (through DeepSpeed's universal format when the checkpoint needs it); load; open the metrics.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import signal
import sys
import time
from pathlib import Path

import torch

from pretrain.attempt import Attempt
from pretrain.checkpoint import (
    CHECKPOINTS,
    LATEST,
    CheckpointError,
    CheckpointManager,
    CheckpointMeta,
    list_checkpoints,
    step_of,
    universal_tag,
    validate,
)
from pretrain.config import BatchPlan, ConfigError, DataConfig, RunConfig, to_dict, to_yaml
from pretrain.data import BlendedDataset, build_dataset, fingerprint
from pretrain.distributed import World, init_distributed, launch_rank, leave_distributed
from pretrain.engine import Engine, accelerator_name, peak_flops_per_device, tune_cpu_allocator
from pretrain.errors import EXIT_OK, Stopped, exit_code
from pretrain.evaluate import TokenBytes
from pretrain.fileutil import fsync_dir, write_bytes_atomic, write_json_atomic
from pretrain.job import LauncherWatch, StopRequest, detect_launcher, hold_run_dir
from pretrain.metrics import JSONL, TENSORBOARD, Metrics
from pretrain.profiler import StepProfiler
from pretrain.tokenizer import Tokenizer
from pretrain.trainer import Trainer

log = logging.getLogger("pretrain")


def open_tokenizer(path: str) -> Tokenizer:
    try:
        return Tokenizer(path)
    except (FileNotFoundError, ValueError) as e:
        raise ConfigError(f"data.tokenizer: {e}") from None


def resolve(cfg: RunConfig, tokenizer: Tokenizer) -> RunConfig:
    """The run config with what the tokenizer decides filled in (a copy: the caller's config is not changed)."""
    m = cfg.model
    if m.vocab_size is None:
        m = dataclasses.replace(m, vocab_size=tokenizer.vocab_size)
    elif m.vocab_size < tokenizer.vocab_size:
        raise ConfigError(f"model.vocab_size: {m.vocab_size} is smaller than the tokenizer's {tokenizer.vocab_size}")
    if m.document_masking and m.eod_id is None:  # only then: a run without it records none, as before
        m = dataclasses.replace(m, eod_id=tokenizer.eod_id)
    elif m.document_masking and m.eod_id != tokenizer.eod_id:
        raise ConfigError(f"model.eod_id: {m.eod_id} is not the tokenizer's end-of-document id {tokenizer.eod_id}")
    return dataclasses.replace(cfg, model=m)


# What a run writes in its directory (the lock, job.lock, stays: it is this job's)
CONFIG, DS_CONFIG = "config.yaml", "ds_config.json"
RUN_OUTPUTS = (CHECKPOINTS, JSONL, TENSORBOARD, CONFIG, DS_CONFIG)
PREVIOUS = "previous"


def set_aside(run_dir: Path) -> Path | None:
    """Start a run directory over: move an earlier run's outputs to <run_dir>/previous/<UTC time>/ (renames inside
    the run directory: nothing is copied or deleted); returns where, or None when there was nothing to move. The
    caller holds the run directory's lock (`launch/checkpoints.py set-aside`)."""
    present = [run_dir / name for name in RUN_OUTPUTS if (run_dir / name).exists()]
    if not present:
        return None
    dest = _previous(run_dir)
    for path in present:
        os.replace(path, dest / path.name)
    fsync_dir(dest)
    fsync_dir(run_dir)
    return dest


def _previous(run_dir: Path) -> Path:
    """A new folder <run_dir>/previous/<UTC time>[-n]/."""
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    dest, n = run_dir / PREVIOUS / stamp, 1
    while dest.exists():
        n += 1
        dest = run_dir / PREVIOUS / f"{stamp}-{n}"
    dest.mkdir(parents=True)
    return dest


def rewind(run_dir: Path, tag: str) -> tuple[Path | None, list[str]]:
    """Go back to checkpoint `tag` of the run: move every checkpoint after it (with its universal conversion) to
    <run_dir>/previous/<UTC time>/checkpoints/ (renames: nothing is deleted) and point `latest` at `tag`, so that the
    next attempt resumes from it (with `data.skip_samples`, say). Returns (where they went, their tags). The caller
    holds the run directory's lock (`launch/checkpoints.py rewind`)."""
    ckpt_dir = run_dir / CHECKPOINTS
    problem = validate(ckpt_dir, tag)
    if problem:
        raise CheckpointError(f"cannot rewind to it: {problem}")
    later = sorted(c.tag for c in list_checkpoints(ckpt_dir) if c.step > step_of(tag))
    dest = None
    if later:
        dest = _previous(run_dir) / CHECKPOINTS
        dest.mkdir()
        for t in later:
            for path in (ckpt_dir / t, ckpt_dir / universal_tag(t)):
                if path.exists():
                    os.replace(path, dest / path.name)
        fsync_dir(dest)
    write_bytes_atomic(ckpt_dir / LATEST, tag.encode())
    fsync_dir(ckpt_dir)
    return dest, later


def open_attempt(run_dir: Path) -> Attempt:
    try:
        return Attempt(run_dir, run_dir / CHECKPOINTS)
    except OSError as e:
        raise ConfigError(f"train.run_dir: cannot write in {run_dir} ({e})") from None


def deadline_message(status: int) -> str:
    """What a deadline exit with `status` means (pretrain.job.StopRequest)."""
    if status > 128:
        name = signal.Signals(status - 128).name
        return f"{name}: train.stop_grace_seconds ran out before the run could save and exit"
    return "the launcher is gone and train.orphan_grace_seconds ran out before a save finished"


def ended(attempt, world: World, stop: StopRequest, error: BaseException | None) -> None:
    """The run has ended (`error`: how; None when it finished): rank 0 records it while the stop signals are still
    handled, and after a clean end (finished, or stopped after saving: every rank got here together) no rank exits
    before it has, since launchers end the last ranks once one has exited (srun --kill-on-bad-exit, torchrun). A
    rank that never comes (it failed while closing) holds the others for train.stop_grace_seconds at most."""
    if attempt is not None:
        attempt.end(error)
    if error is None or isinstance(error, Stopped):
        stop.arm_deadline(stop.grace, exit_code(error) if error else EXIT_OK)
        try:
            world.barrier()
        except Exception as e:  # a rank gone already: nothing left to wait for
            log.warning("the last barrier failed (%s)", e)
        stop.disarm()


def validation_data(
    data: DataConfig, plan: BatchPlan, *, tokenizer: dict, wanted: int
) -> tuple[BlendedDataset | None, int]:
    """The validation set (data.val_datasets, else the val split of data.datasets) and how many global batches
    of it one evaluation reads (at most `wanted`, as many as it holds)."""
    specs, key = (data.val_datasets, "data.val_datasets") if data.val_datasets else (data.datasets, "data.datasets")
    val = build_dataset(specs, "val", seq_len=plan.seq_len, seed=data.seed + 1, tokenizer=tokenizer, key=key)
    batches = min(wanted, val.num_samples // plan.global_batch)
    if batches < wanted:
        log.warning(
            "the validation set holds %d samples: evaluating %d batch(es), not %d", val.num_samples, batches, wanted
        )
    return (val, batches) if batches else (None, 0)


def build_trainer(cfg: RunConfig) -> Trainer:
    """Build every part of a run from its config and hand them to a Trainer (closing what was opened if a part
    fails). Every rank calls this together."""
    started = time.monotonic()  # train.max_wall_time counts the start-up too
    run_dir = Path(cfg.train.run_dir)
    stack = contextlib.ExitStack()
    # rank 0 (by its launcher's word, before joining) records the attempt from the start: a start that fails (a
    # launch that cannot join, a busy run directory) is recorded too; its own file, so it disturbs no other job
    attempt = open_attempt(run_dir) if launch_rank(os.environ) == 0 else None
    if attempt is not None:
        stack.push(lambda kind, error, tb: attempt.end(error))  # (an end recorded earlier wins)
    try:
        launcher = detect_launcher()
        world = init_distributed()
        stack.callback(leave_distributed)  # closed last, after everything that may still talk to the other ranks
        return _build(cfg, world, launcher, stack, started, attempt)
    except BaseException:
        stack.__exit__(*sys.exc_info())  # the attempt record learns how the start failed
        raise


def _build(cfg: RunConfig, world: World, launcher, stack: contextlib.ExitStack, started: float, attempt) -> Trainer:
    t = cfg.train
    if t.threads:
        torch.set_num_threads(t.threads)
    if accelerator_name() == "cpu":
        tune_cpu_allocator()
    run_dir = Path(t.run_dir)
    stop = StopRequest(t.stop_signals, t.stop_grace_seconds)  # handled until the lock is released
    stack.callback(stop.restore)
    lock = stack.enter_context(hold_run_dir(run_dir, world, stale_after=t.lock_stale_seconds))
    if lock is not None:  # a deadline exit records how the attempt ended and leaves the directory to the next job
        if attempt is not None:
            stop.before_exit.append(lambda status: attempt.end_status(status, deadline_message(status)))
        stop.before_exit.append(lambda status: lock.release())
    if launcher is not None:  # watched until the very end (a rank orphaned in the last barrier exits too)
        watch = LauncherWatch(launcher, lambda gone: stop.launcher_gone(gone.describe(), t.orphan_grace_seconds))
        stack.callback(watch.close)
    stack.push(lambda kind, error, tb: ended(attempt, world, stop, error))

    tokenizer = open_tokenizer(cfg.data.tokenizer)
    cfg = resolve(cfg, tokenizer)
    tok = tokenizer.describe()
    plan = BatchPlan.resolve(t, seq_len=cfg.model.seq_len, world_size=world.size)
    train_data = build_dataset(
        cfg.data.datasets, "train", seq_len=plan.seq_len, seed=cfg.data.seed, tokenizer=tok, key="data.datasets",
        skip_samples=cfg.data.skip_samples,
    )  # fmt: skip
    val_data, eval_batches = None, 0
    if t.eval_every:
        val_data, eval_batches = validation_data(cfg.data, plan, tokenizer=tok, wanted=t.eval_batches)

    engine = Engine(cfg.optim, t, plan)
    run = CheckpointMeta.of_run(
        global_batch=plan.global_batch,
        world_size=world.size,
        zero_stage=engine.zero_stage,
        config=to_dict(cfg),
        data_fingerprint=fingerprint(cfg.data.datasets, seq_len=plan.seq_len, seed=cfg.data.seed),
    )
    checkpoints = CheckpointManager(run_dir / CHECKPOINTS, cfg.checkpoint, engine=engine, world=world, run=run)
    point = checkpoints.find()
    weights = None
    if point is None and t.init_from:
        from pretrain.inference import initial_weights

        weights = initial_weights(t.init_from, cfg.model)
        log.info("starting from the weights of %s (train.init_from)", t.init_from)
    universal = point is not None and point.universal
    model = engine.build(cfg.model, seed=t.seed, load_universal=universal, weights=weights)
    start_step = checkpoints.load(point) if point is not None else 0
    if attempt is not None:
        attempt.start_step = start_step

    metrics = Metrics(run_dir, rank=world.rank, tensorboard=cfg.logging.tensorboard, start_step=start_step)
    stack.callback(metrics.close)
    if world.is_main:
        write_bytes_atomic(run_dir / CONFIG, to_yaml(cfg).encode())
        write_json_atomic(run_dir / DS_CONFIG, engine.ds_config)
        metrics.text("config", "```\n" + to_yaml(cfg) + "```")
    peak_flops, peak_source = peak_flops_per_device(t.peak_flops_per_device)
    flops_per_token = model.flops_per_token(plan.seq_len)
    metrics.console(
        f"model {model.num_params() / 1e6:.2f}M parameters, {flops_per_token / 1e6:.1f} MFLOP/token | "
        f"{world.size} rank(s) on {accelerator_name()}, ZeRO {engine.zero_stage}, {engine.precision} | "
        f"global batch {plan.global_batch} x {plan.seq_len} tokens, micro {plan.micro_batch}, accumulation "
        f"{plan.grad_accum} | peak {peak_flops / 1e12:.3f} TFLOP/s per device ({peak_source})"
        + (f" | launched by {launcher.name}" if launcher else "")
    )
    profiler = None
    if t.profile_steps and world.rank in t.profile_ranks:
        profiler = StepProfiler(run_dir, *t.profile_steps, rank=world.rank)
        stack.callback(profiler.close)  # a run that stops inside the window still writes its trace
    return Trainer(
        engine=engine,
        data=train_data,
        plan=plan,
        world=world,
        checkpoints=checkpoints,
        metrics=metrics,
        stop=stop,
        optim=cfg.optim,
        train=t,
        save_every=cfg.checkpoint.save_every,
        log_every=cfg.logging.log_every,
        flops_per_token=flops_per_token,
        peak_flops=peak_flops,
        start_step=start_step,
        started=started,
        val_data=val_data,
        eval_batches=eval_batches,
        token_bytes=TokenBytes(tokenizer) if val_data is not None else None,
        profiler=profiler,
        resources=stack,
    )
