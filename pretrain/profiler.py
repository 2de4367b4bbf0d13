"""torch.profiler over a window of training steps (`train.profile_steps`), on chosen ranks (`train.profile_ranks`).

The trace is written when the window ends (or the run stops inside it) to <run_dir>/tensorboard/profile/ as
rank<R>.<time>.pt.trace.json: a Chrome trace, which Perfetto (ui.perfetto.dev) and chrome://tracing open, and which
TensorBoard's PyTorch profiler view reads from the run's log directory. CPU activity always, CUDA kernels on a GPU;
shapes and memory are recorded. Off (None) by default, when the trainer does nothing but a comparison per step.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

log = logging.getLogger("pretrain")

PROFILE_DIR = "tensorboard/profile"


class StepProfiler:
    """Profiles steps [first, last] (numbered as logged: step 1 is the first update)."""

    def __init__(self, run_dir: Path, first: int, last: int, rank: int):
        self.out = Path(run_dir) / PROFILE_DIR
        self.first, self.last, self.rank = first, last, rank
        self.prof: torch.profiler.profile | None = None
        self.mark: torch.profiler.record_function | None = None  # the step in progress, named in the trace

    def begin(self, step: int) -> None:
        """Before step `step`."""
        if step == self.first:
            self.start()
        if self.prof is not None:
            self.mark = torch.profiler.record_function(f"train step {step}")
            self.mark.__enter__()

    def start(self) -> None:
        activities = [torch.profiler.ProfilerActivity.CPU]
        if torch.cuda.is_available():
            activities.append(torch.profiler.ProfilerActivity.CUDA)
        self.out.mkdir(parents=True, exist_ok=True)
        handler = torch.profiler.tensorboard_trace_handler(str(self.out), worker_name=f"rank{self.rank}")
        self.prof = torch.profiler.profile(
            activities=activities, record_shapes=True, profile_memory=True, on_trace_ready=handler
        )
        self.prof.start()

    def end(self, step: int) -> None:
        """After step `step`."""
        if self.prof is None:
            return
        if self.mark is not None:
            self.mark.__exit__(None, None, None)
            self.mark = None
        self.prof.step()
        if step >= self.last:
            self.close()

    def close(self) -> None:
        """Stop and write the trace (also when the run stops inside the window)."""
        if self.prof is None:
            return
        if self.mark is not None:
            self.mark.__exit__(None, None, None)
            self.mark = None
        prof, self.prof = self.prof, None
        prof.stop()
        log.info("profile of steps %d-%d (rank %d) written to %s", self.first, self.last, self.rank, self.out)
