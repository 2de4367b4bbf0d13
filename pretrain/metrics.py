"""Writing metrics on rank 0: TensorBoard scalars and text, `metrics.jsonl` (one JSON object per logged step,
for scripts), and console lines.

metrics.py knows how to write and how to turn timings into throughput; the trainer decides what to log and when.
Scalars arrive as Python floats: the trainer reads tensors (`.item()`) only at log steps.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import torch

from pretrain.fileutil import write_bytes_atomic

log = logging.getLogger("pretrain")

JSONL = "metrics.jsonl"  # in the run directory
TENSORBOARD = "tensorboard"


class Metrics:
    def __init__(self, run_dir: Path, *, rank: int, tensorboard: bool, start_step: int = 0):
        """`start_step`: the step the run (re)starts from; what an earlier attempt logged after it is dropped, so
        the curves continue without duplicates."""
        self.rank = rank
        self.writer = None
        self.jsonl = None
        self.logdir = Path(run_dir) / TENSORBOARD
        if rank == 0:
            Path(run_dir).mkdir(parents=True, exist_ok=True)
            path = Path(run_dir) / JSONL
            kept = []
            if path.exists():
                for line in path.read_text().splitlines():
                    try:
                        if json.loads(line)["step"] <= start_step:
                            kept.append(line + "\n")
                    except (json.JSONDecodeError, KeyError, TypeError):
                        pass  # a line cut by a crash
            write_bytes_atomic(path, "".join(kept).encode())
            self.jsonl = open(path, "a", buffering=1)  # line-buffered: a killed run loses no logged line
            if tensorboard:
                from torch.utils.tensorboard import SummaryWriter

                # purge_step: events an earlier attempt wrote at later steps are hidden from the curves
                self.writer = SummaryWriter(log_dir=str(self.logdir), purge_step=start_step + 1)

    def scalars(self, step: int, values: dict[str, float]) -> None:
        if self.rank != 0:
            return
        values = {k: v for k, v in values.items() if v is not None}
        self.jsonl.write(json.dumps({"step": step, **values}) + "\n")
        if self.writer is not None:
            for tag, value in values.items():
                self.writer.add_scalar(tag, value, step)

    def text(self, tag: str, text: str, step: int = 0) -> None:
        if self.writer is not None:
            self.writer.add_text(tag, text, step)

    def console(self, line: str) -> None:
        if self.rank == 0:
            log.info(line)

    def flush(self) -> None:
        if self.jsonl is not None:
            self.jsonl.flush()
        if self.writer is not None:
            self.writer.flush()

    def close(self) -> None:
        if self.jsonl is not None:
            self.jsonl.close()
        if self.writer is not None:
            self.writer.close()


class LossWatch:
    """Flags loss spikes: a loss above the running mean by `threshold` running standard deviations. The mean and
    variance are exponential averages over about `window` steps; spikes do not enter them, and nothing is flagged
    before `window // 10` (at least 5) steps have been seen."""

    def __init__(self, window: int, threshold: float):
        self.alpha, self.threshold = 2.0 / (window + 1), threshold
        self.warmup = max(window // 10, 5)
        self.mean = self.var = 0.0
        self.seen = 0

    def z(self, loss: float) -> float | None:
        """How many running standard deviations `loss` is above the running mean (None while warming up)."""
        if self.seen < self.warmup or self.var <= 0:
            return None
        return (loss - self.mean) / self.var**0.5

    def update(self, loss: float) -> bool:
        """Take one step's loss; True when it is a spike (then left out of the statistic)."""
        if not math.isfinite(loss):
            return False  # the non-finite step check handles it
        z = self.z(loss)
        if z is not None and z > self.threshold:
            return True
        if self.seen == 0:
            self.mean = loss
        else:  # exponentially weighted mean and variance (West's incremental form)
            delta = loss - self.mean
            self.mean += self.alpha * delta
            self.var = (1 - self.alpha) * (self.var + self.alpha * delta * delta)
        self.seen += 1
        return False


def throughput(
    *, tokens: int, seconds: float, flops_per_token: int, world_size: int, peak_flops: float
) -> dict[str, float]:
    """tokens/s over all ranks, achieved TFLOP/s per device and MFU (model FLOPs / peak)."""
    tokens_per_sec = tokens / seconds
    flops_per_device = tokens_per_sec * flops_per_token / world_size
    return {
        "perf/tokens_per_sec": tokens_per_sec,
        "perf/tflops_per_device": flops_per_device / 1e12,
        "perf/mfu": flops_per_device / peak_flops,
    }


def memory_gib() -> float:
    """Peak accelerator memory allocated on CUDA; the process's resident memory on CPU."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**30
    import psutil

    return psutil.Process().memory_info().rss / 2**30
