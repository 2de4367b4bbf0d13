"""The training loop: build the parts from a RunConfig, then step, log and evaluate until a limit is reached.

    Trainer(load_config("launch/configs/demo.yaml")).fit()

Runs the same under `deepspeed`, `torchrun` and plain `python` (one process): the distributed environment is
whatever the launcher set, with single-process defaults otherwise.
"""

from __future__ import annotations

import logging
import math
import os
import signal
import socket
import threading
import time
from pathlib import Path

import deepspeed
import torch
from deepspeed.accelerator import get_accelerator

from pretrain import checkpoint
from pretrain.checkpoint import CheckpointError
from pretrain.config import ConfigError, RunConfig, TrainConfig, global_batch_seqs, to_dict, to_yaml
from pretrain.data import BatchPlan, build_dataset, fingerprint
from pretrain.engine import Engine, lr_at, peak_flops_per_device, tune_cpu_allocator
from pretrain.fileutil import write_bytes_atomic, write_json_atomic
from pretrain.generate import greedy
from pretrain.metrics import Metrics, memory_gib, throughput
from pretrain.model import Transformer
from pretrain.tokenizer import Tokenizer

log = logging.getLogger("pretrain")


def init_distributed() -> tuple[int, int]:
    """Join the process group the launcher describes (or a group of one); returns (rank, world size)."""
    if "RANK" not in os.environ:  # plain `python`: a process group of one
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    deepspeed.init_distributed(verbose=False)
    return torch.distributed.get_rank(), torch.distributed.get_world_size()


def total_steps(train: TrainConfig, tokens_per_step: int) -> int:
    """Optimizer steps of the run: max_steps, or fewer if max_tokens is reached first."""
    if train.max_tokens is None:
        return train.max_steps
    return min(train.max_steps, math.ceil(train.max_tokens / tokens_per_step))


EXIT_STOPPED = 3  # stopped early by a signal or max_wall_time, after saving a checkpoint: run again to resume


class Stopped(Exception):
    """The run stopped early after saving a checkpoint."""


EXIT_NON_FINITE = 4  # too many consecutive non-finite steps; the last good checkpoint is left as it was


class NonFinite(Exception):
    """The run stopped because the loss or gradients stayed non-finite."""


class StopRequest:
    """Signal handlers: the first stop signal asks the loop to save and exit (within `grace` seconds, saved or
    not); a second one exits at once."""

    def __init__(self, names: list[str], grace: float):
        self.signal_name: str | None = None
        self.grace = grace
        for name in names:
            signal.signal(getattr(signal, name), self._handle)

    def _handle(self, signum, frame) -> None:
        name = signal.Signals(signum).name
        if self.signal_name is not None:
            os._exit(128 + signum)
        self.signal_name = name
        timer = threading.Timer(self.grace, os._exit, args=(128 + signum,))
        timer.daemon = True
        timer.start()
        log.warning(
            "%s received: finishing the step, saving a checkpoint and exiting (within %.0f s)", name, self.grace
        )


class Trainer:
    def __init__(self, cfg: RunConfig):
        self.cfg = cfg
        self.rank, self.world_size = init_distributed()
        if cfg.train.threads:
            torch.set_num_threads(cfg.train.threads)
        if get_accelerator().device_name() == "cpu":
            tune_cpu_allocator()
        self.run_dir = Path(cfg.train.run_dir)

        self.ckpt_dir = self.run_dir / "checkpoints"
        self.started = time.monotonic()
        try:
            self.tokenizer = Tokenizer(cfg.data.tokenizer)
        except (FileNotFoundError, ValueError) as e:
            raise ConfigError(f"data.tokenizer: {e}") from None
        tok = self.tokenizer.describe()
        if cfg.model.vocab_size is None:
            cfg.model.vocab_size = self.tokenizer.vocab_size
        elif cfg.model.vocab_size < self.tokenizer.vocab_size:
            raise ConfigError(
                f"model.vocab_size: {cfg.model.vocab_size} is smaller than the tokenizer's {self.tokenizer.vocab_size}"
            )
        seq_len = cfg.model.seq_len
        self.global_batch = global_batch_seqs(cfg.train, seq_len)
        self.total_steps = total_steps(cfg.train, self.global_batch * seq_len)
        self.plan = BatchPlan(self.global_batch, cfg.train.micro_batch_seqs, self.rank, self.world_size)
        self.train_data = build_dataset(
            cfg.data.datasets, "train", seq_len=seq_len, seed=cfg.data.seed, tokenizer=tok, key="data.datasets"
        )
        self.val_data = None
        if cfg.train.eval_every:
            specs, key = (
                (cfg.data.val_datasets, "data.val_datasets")
                if cfg.data.val_datasets
                else (cfg.data.datasets, "data.datasets")
            )
            self.val_data = build_dataset(specs, "val", seq_len=seq_len, seed=cfg.data.seed + 1, tokenizer=tok, key=key)
            self.eval_batches = min(cfg.train.eval_batches, self.val_data.num_samples // self.global_batch)
            if self.eval_batches < cfg.train.eval_batches:
                log.warning(
                    "the validation set holds %d samples: evaluating %d batch(es), not %d",
                    self.val_data.num_samples,
                    self.eval_batches,
                    cfg.train.eval_batches,
                )
            if self.eval_batches == 0:
                self.val_data = None

        self.data_fingerprint = fingerprint(cfg.data.datasets, seq_len=seq_len, seed=cfg.data.seed)
        self.resume_from = self.find_resume()  # (checkpoints dir, tag, meta) or None; checked against this run
        self.engine = Engine(
            cfg.optim, cfg.train, global_batch=self.global_batch, load_universal=self._needs_universal()
        )
        with self.engine.model_context():
            model = Transformer(cfg.model)
        model.init_weights(cfg.train.seed, gather=self.engine.gather)
        self.flops_per_token = model.flops_per_token(seq_len)
        self.num_params = model.num_params()
        self.engine.initialize(model)
        self.start_step = self.load_resume()
        self.stop = StopRequest(cfg.train.stop_signals, cfg.train.stop_grace_seconds)
        self.bad_steps = 0  # consecutive steps whose update was skipped (non-finite)
        self.step_seconds = 0.0
        self.save_seconds = 0.0  # the last save's duration
        self.peak_flops, peak_source = peak_flops_per_device(cfg.train.peak_flops_per_device)
        self.metrics = Metrics(
            self.run_dir, rank=self.rank, tensorboard=cfg.logging.tensorboard, start_step=self.start_step
        )
        if self.rank == 0:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            write_bytes_atomic(self.run_dir / "config.yaml", to_yaml(cfg).encode())
            write_json_atomic(self.run_dir / "ds_config.json", self.engine.ds_config)
            self.metrics.text("config", "```\n" + to_yaml(cfg) + "```")
        self.metrics.console(
            f"model {self.num_params / 1e6:.2f}M parameters, {self.flops_per_token / 1e6:.1f} MFLOP/token | "
            f"{self.world_size} rank(s) on {get_accelerator().device_name()}, ZeRO {self.engine.zero_stage}, "
            f"{self.engine.precision} | global batch {self.global_batch} x {seq_len} tokens, micro {cfg.train.micro_batch_seqs}, "
            f"accumulation {self.engine.grad_accum} | peak {self.peak_flops / 1e12:.3f} TFLOP/s per device ({peak_source})"
        )

    def fit(self) -> dict:
        """Train until max_steps / max_tokens, saving as configured; returns the last logged scalars.

        Raises Stopped after saving a checkpoint when a stop signal arrived or max_wall_time is near.
        """
        step, last = self.start_step, {}
        window_start, window_steps = time.perf_counter(), 0
        while step < self.total_steps:
            step_start = time.perf_counter()
            lr = lr_at(step, self.cfg.optim, self.total_steps)
            stats = self.engine.train_step(self.train_data.batch(step, self.plan), lr)
            self.check_finite(step, stats)
            step += 1
            window_steps += 1
            self.step_seconds = time.perf_counter() - step_start
            final = step == self.total_steps
            if step % self.cfg.logging.log_every == 0 or final:
                seconds = time.perf_counter() - window_start
                last = self.log_step(step, stats, lr, seconds, window_steps)
                window_start, window_steps = time.perf_counter(), 0
            if self.val_data is not None and (step % self.cfg.train.eval_every == 0 or final):
                eval_start = time.perf_counter()
                last.update(self.evaluate(step))
                window_start += time.perf_counter() - eval_start  # evaluation time is not training throughput
            reason = self.stop_reason(step)
            every = self.cfg.checkpoint.save_every
            periodic = (every and step % every == 0) or final
            if reason or (periodic and not self.bad_steps):  # no periodic save in a run of skipped steps
                save_start = time.perf_counter()
                self.save(step)
                self.save_seconds = time.perf_counter() - save_start
                window_start += self.save_seconds
            if reason and not final:
                self.metrics.console(f"stopping at step {step}: {reason}; resume with the same command")
                self.metrics.close()
                raise Stopped(reason)
        self.metrics.close()
        return last

    def check_finite(self, step: int, stats) -> None:
        """Count consecutive skipped (non-finite) steps; stop the run after train.max_bad_steps of them."""
        if stats.applied:
            self.bad_steps = 0
            return
        self.bad_steps += 1
        start, stop = step * self.global_batch, (step + 1) * self.global_batch
        loss = self.engine.mean_across_ranks(stats.loss).item()
        log.warning(
            "step %d: non-finite loss or gradients (loss %s, grad norm %s): the update was skipped; global samples "
            "[%d, %d) (%d consecutive)",
            step + 1,
            loss,
            stats.grad_norm,
            start,
            stop,
            self.bad_steps,
        )
        if self.bad_steps >= self.cfg.train.max_bad_steps:
            latest = self.ckpt_dir / checkpoint.LATEST
            good = latest.read_text().strip() if latest.is_file() else "none"
            self.metrics.close()
            raise NonFinite(
                f"{self.bad_steps} consecutive steps with non-finite loss or gradients (train.max_bad_steps), the "
                f"last at step {step + 1}; the last good checkpoint is {self.ckpt_dir / good if good != 'none' else 'none'}"
            )

    def stop_reason(self, step: int) -> str | None:
        """A stop signal on any rank, or max_wall_time about to pass: every rank gets the same answer."""
        local = 0
        limit = self.cfg.train.max_wall_time
        if self.stop.signal_name:
            local = 1
        elif step == self.cfg.train.stop_at_step:
            local = 3
        elif limit is not None:
            margin = 2 * self.step_seconds + (self.save_seconds or 2 * self.step_seconds)
            local = 2 if time.monotonic() - self.started + margin > limit else 0
        flag = torch.tensor([local], dtype=torch.int32, device=self.engine.device)
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
        code = int(flag.item())
        if code == 3:
            return f"train.stop_at_step {step}"
        if code == 2:
            return f"train.max_wall_time of {limit:.0f} s is near"
        return f"{self.stop.signal_name or 'a stop signal'} received" if code == 1 else None

    def save(self, step: int) -> None:
        meta = {
            "step": step,
            "consumed_samples": step * self.global_batch,
            "tokens_seen": step * self.global_batch * self.cfg.model.seq_len,
            "global_batch": self.global_batch,
            "world_size": self.world_size,
            "zero_stage": self.engine.zero_stage,
            "config": to_dict(self.cfg),
            "data_fingerprint": self.data_fingerprint,
        }
        ck = self.cfg.checkpoint
        self.metrics.flush()  # everything logged up to this step is on disk before the checkpoint exists
        tag = checkpoint.save(self.engine.ds, self.ckpt_dir, step, meta, checksums=ck.checksums)
        if self.rank == 0:
            removed = checkpoint.prune(self.ckpt_dir, keep_last=ck.keep_last, keep_every=ck.keep_every, protect=tag)
            self.metrics.console(
                f"saved {self.ckpt_dir / tag}" + (f" (removed {', '.join(removed)})" if removed else "")
            )

    def find_resume(self) -> tuple[Path, str, dict] | None:
        """The checkpoint checkpoint.resume names (auto: the newest valid one), checked against this run."""
        ck = self.cfg.checkpoint
        if ck.resume == "none":
            if checkpoint.list_checkpoints(self.ckpt_dir):
                raise ConfigError(
                    f"checkpoint.resume: none, but {self.ckpt_dir} holds checkpoints of an earlier run; use another "
                    "train.run_dir, or resume it (checkpoint.resume=auto)"
                )
            return None
        found = [None, None]
        if self.rank == 0:
            found = self._find_checkpoint(ck.resume)
        torch.distributed.broadcast_object_list(found, src=0)
        src, tag = found
        if isinstance(src, Exception):
            raise src
        if tag is None:
            return None
        meta = checkpoint.read_meta(Path(src), tag)
        self._check_compatible(Path(src) / tag, meta)
        return Path(src), tag, meta

    def _needs_universal(self) -> bool:
        """ZeRO states saved by another number of ranks (or another stage) load through DeepSpeed's universal
        checkpoint format, converted once next to the original."""
        if self.resume_from is None:
            return False
        meta = self.resume_from[2]
        stage = Engine.stage_of(self.cfg.train.ds_config)
        return meta["zero_stage"] > 0 and (meta["world_size"] != self.world_size or meta["zero_stage"] != stage)

    def load_resume(self) -> int:
        """Load the checkpoint found by find_resume into the engine; returns its step (0: none)."""
        if self.resume_from is None:
            return 0
        src, tag, meta = self.resume_from
        load_tag = tag
        if self.engine.load_universal:
            if self.rank == 0:
                log.info(
                    "converting %s (%d ranks, ZeRO-%d) to DeepSpeed's universal format",
                    src / tag,
                    meta["world_size"],
                    meta["zero_stage"],
                )
                checkpoint.to_universal(src, tag)
            torch.distributed.barrier()
            load_tag = checkpoint.universal_tag(tag)
        load_path = self.engine.load(str(src), load_tag)
        if load_path is None:
            raise CheckpointError(f"{src / load_tag}: DeepSpeed could not load it")
        rng = checkpoint.read_rng(src, tag, self.rank)
        if rng is not None and meta["world_size"] == self.world_size:
            checkpoint.set_rng_state(rng)
        if self.rank == 0:
            log.info("resumed from %s at step %d", src / tag, meta["step"])
        return meta["step"]

    def _find_checkpoint(self, resume: str) -> list:
        """[checkpoints directory, tag] to resume from ([.., None]: start fresh), or [error, None]."""
        ck = self.cfg.checkpoint
        try:
            if resume == "auto":
                return [str(self.ckpt_dir), checkpoint.newest_valid(self.ckpt_dir, checksums=ck.checksums)]
            path = Path(resume)
            if path.is_dir() and ((path / checkpoint.RECORD).exists() or (path / checkpoint.META).exists()):
                src, tag = path.parent, path.name
            elif path.is_dir():
                src, tag = path, checkpoint.newest_valid(path, checksums=ck.checksums)
                if tag is None:
                    raise ConfigError(f"checkpoint.resume: {path} holds no valid checkpoint")
            else:
                src, tag = self.ckpt_dir, resume
            problem = checkpoint.validate(src, tag, checksums=ck.checksums)
            if problem:
                raise ConfigError(f"checkpoint.resume: {problem}")
            return [str(src), tag]
        except (ConfigError, CheckpointError) as e:
            return [e, None]

    def _check_compatible(self, where: Path, meta: dict) -> None:
        old_model = dict(meta["config"]["model"])
        new_model = to_dict(self.cfg.model)
        for key in ("activation_checkpointing",):  # may change between attempts
            old_model.pop(key, None)
            new_model.pop(key, None)
        diff = [
            f"model.{k}: {old_model.get(k)!r} -> {new_model.get(k)!r}"
            for k in new_model
            if old_model.get(k) != new_model.get(k)
        ]
        if diff:
            raise CheckpointError(f"{where}: the model differs from the checkpoint's: {'; '.join(diff)}")
        if meta["global_batch"] != self.global_batch:
            raise CheckpointError(
                f"{where}: trained with a global batch of {meta['global_batch']} sequences, this run has "
                f"{self.global_batch}; the data position is counted in batches, so it must stay the same"
            )
        if meta["data_fingerprint"] != self.data_fingerprint and not self.cfg.checkpoint.allow_data_change:
            raise CheckpointError(
                f"{where}: the training data differs from the checkpoint's (datasets, their contents, weights, "
                "seq_len or data.seed); set checkpoint.allow_data_change=true if that is deliberate"
            )
        stage = Engine.stage_of(self.cfg.train.ds_config)
        if meta["zero_stage"] != stage and 3 in (meta["zero_stage"], stage):
            raise CheckpointError(
                f"{where}: saved with ZeRO-{meta['zero_stage']}, this run uses ZeRO-{stage}; moving between ZeRO-3 "
                "and the other stages is not supported (DeepSpeed's universal format differs between them); any "
                "number of ranks is, with the checkpoint's stage"
            )
        if (meta["zero_stage"] == 0) != (stage == 0):
            raise CheckpointError(
                f"{where}: saved with ZeRO-{meta['zero_stage']}, this run uses ZeRO-{stage}; moving between no ZeRO "
                "and ZeRO is not supported (between ZeRO stages 1-3, and across numbers of ranks, it is)"
            )

    def log_step(self, step: int, stats, lr: float, seconds: float, steps: int) -> dict:
        loss = self.engine.mean_across_ranks(stats.loss).item()
        grad_norm = stats.grad_norm
        tokens = steps * self.global_batch * self.cfg.model.seq_len
        values = {"train/loss": loss, "train/lr": lr, "train/grad_norm": grad_norm, "perf/step_time": seconds / steps}
        values.update(
            throughput(
                tokens=tokens,
                seconds=seconds,
                flops_per_token=self.flops_per_token,
                world_size=self.world_size,
                peak_flops=self.peak_flops,
            )
        )
        values["perf/memory_gib"] = memory_gib()
        values["train/tokens_seen"] = float(step * self.global_batch * self.cfg.model.seq_len)
        self.metrics.scalars(step, values)
        gn = f"{grad_norm:.3f}" if grad_norm is not None else "-"
        self.metrics.console(
            f"step {step}/{self.total_steps} | loss {loss:.4f} | lr {lr:.2e} | grad norm {gn} | "
            f"{values['perf/tokens_per_sec']:,.0f} tok/s | {values['perf/tflops_per_device'] * 1e3:.1f} GFLOP/s/device | "
            f"MFU {values['perf/mfu'] * 100:.1f}% | {values['perf/step_time']:.3f} s/step | mem {values['perf/memory_gib']:.2f} GiB"
        )
        return values

    def evaluate(self, step: int) -> dict:
        total = torch.zeros((), device=self.engine.device)
        for b in range(self.eval_batches):
            total += self.engine.eval_step(self.val_data.batch(b, self.plan))
        loss = self.engine.mean_across_ranks(total / self.eval_batches).item()
        values = {"eval/loss": loss, "eval/ppl": float(torch.exp(torch.tensor(loss)))}
        self.metrics.scalars(step, values)
        self.metrics.console(f"eval step {step} | loss {loss:.4f} | ppl {values['eval/ppl']:.2f}")
        self.metrics.flush()
        return values

    def sample(self, prompt: str, max_new_tokens: int = 40) -> str:
        """A greedy continuation of `prompt` (every rank must call this together under ZeRO-3)."""
        self.engine.ds.eval()
        prompt_ids = self.tokenizer.encode(prompt)
        ids = greedy(
            self.engine.ds,
            prompt_ids,
            max_new_tokens=max_new_tokens,
            max_len=self.cfg.model.seq_len,
            vocab_size=self.tokenizer.vocab_size,
            eod_id=self.tokenizer.eod_id,
            device=self.engine.device,
        )
        # decode with the prompt: a piece's leading space is dropped at the start of a decoded sequence
        return self.tokenizer.decode(prompt_ids + ids)[len(self.tokenizer.decode(prompt_ids)) :]
