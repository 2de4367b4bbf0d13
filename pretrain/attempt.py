"""How each attempt at a run ended, recorded in the run directory, so that what restarts a run (the Slurm batch
script, or any supervisor) decides from the run itself and never from a launcher's exit status: torchrun reports 1
for a crash and for a stop after saving alike, and DeepSpeed's launcher 1 or the first failed rank's status.

`<run_dir>/attempt.json` (rank 0 writes it, atomically): "running" when the attempt has the run directory, then how
it ended: "finished", "stopped" (after saving a checkpoint; `stop` says why) or "failed", with the exit status and
the message. An attempt killed outright (SIGKILL, out of memory, a lost node) leaves "running" behind.

`<run_dir>/attempts.jsonl`: one line per attempt, appended by `decide` (launch/attempt.py) once the attempt's
processes have ended: what happened and what to do next:

  done     finished, or stopped at train.stop_at_step as asked: nothing to do
  requeue  stopped after saving a checkpoint that moved the run on (a stop signal, train.max_wall_time, a
           launcher that went away): run it again, it resumes
  retry    failed in a way another attempt may not (a crash, a killed process, a lost node, an I/O error, an
           attempt that recorded nothing, a stop that saved no progress): run it again while fewer than the
           restart limit of attempts in a row have failed
  fatal    what would fail the same way again: bad configuration, data or checkpoint (2), non-finite steps (4),
           the run directory held by another job (5)

An attempt is known by its id: PRETRAIN_ATTEMPT_ID if set, else the Slurm job id and restart count.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from pretrain.errors import EXIT_BAD_INPUT, EXIT_BUSY, EXIT_NON_FINITE, EXIT_OK, EXIT_STOPPED, Stopped, exit_code
from pretrain.fileutil import fsync_dir, write_json_atomic

RECORD, HISTORY = "attempt.json", "attempts.jsonl"
RUNNING, FINISHED, STOPPED, FAILED = "running", "finished", "stopped", "failed"
DONE, REQUEUE, RETRY, FATAL = "done", "requeue", "retry", "fatal"
FATAL_STATUSES = (EXIT_BAD_INPUT, EXIT_NON_FINITE, EXIT_BUSY)
AT_STEP = "at_step"  # Stopped.why for train.stop_at_step: the user asked for this stop


def attempt_id(env: Mapping[str, str]) -> str | None:
    """This attempt's id: PRETRAIN_ATTEMPT_ID, else `slurm-<job>-<restart>` inside a Slurm job, else None."""
    if env.get("PRETRAIN_ATTEMPT_ID"):
        return env["PRETRAIN_ATTEMPT_ID"]
    job = env.get("SLURM_ARRAY_JOB_ID") and env.get("SLURM_ARRAY_TASK_ID")
    job = f"{env['SLURM_ARRAY_JOB_ID']}_{env['SLURM_ARRAY_TASK_ID']}" if job else env.get("SLURM_JOB_ID")
    return f"slurm-{job}-{env.get('SLURM_RESTART_COUNT') or 0}" if job else None


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


@dataclass
class Record:
    state: str
    attempt: str | None
    host: str
    pid: int
    started: str
    start_step: int | None = None  # the step the attempt resumed from
    saved_step: int | None = None  # the newest complete checkpoint's step when it ended
    ended: str | None = None
    exit_status: int | None = None
    stop: str | None = None  # why a stopped attempt stopped (signal, wall_time, at_step, launcher_gone)
    message: str = ""


class Attempt:
    """Rank 0's record of this attempt (see the module docstring).

    attempt = Attempt(run_dir, ckpt_dir)    # writes "running"
    attempt.start_step = 40
    attempt.end(exc)                        # the exception the run ended with, None when it finished
    attempt.end_status(137, "...")          # an exit that has no exception (a deadline)
    """

    def __init__(self, run_dir: Path, ckpt_dir: Path):
        import socket

        self.path = Path(run_dir) / RECORD
        self.ckpt_dir = Path(ckpt_dir)
        self.record = Record(state=RUNNING, attempt=attempt_id(os.environ), host=socket.gethostname(),
                             pid=os.getpid(), started=now())  # fmt: skip
        self._write()

    @property
    def start_step(self) -> int | None:
        return self.record.start_step

    @start_step.setter
    def start_step(self, step: int) -> None:
        self.record.start_step = step

    def end(self, error: BaseException | None) -> None:
        if error is None:
            self._end(FINISHED, EXIT_OK, "")
        elif isinstance(error, Stopped):
            self._end(STOPPED, EXIT_STOPPED, str(error), stop=error.why)
        else:
            self._end(FAILED, exit_code(error), f"{type(error).__name__}: {error}")

    def end_status(self, status: int, message: str) -> None:
        self._end(FAILED if status != EXIT_STOPPED else STOPPED, status, message)

    def _end(self, state: str, status: int, message: str, stop: str | None = None) -> None:
        from pretrain.checkpoint import read_latest, step_of  # (torch: not for `decide` in a batch shell)

        if self.record.state != RUNNING:
            return  # the first end wins (a deadline exit during the save of a stop, say)
        tag = read_latest(self.ckpt_dir)
        self.record.saved_step = step_of(tag) if tag else None
        self.record.state, self.record.exit_status, self.record.message = state, status, message
        self.record.stop, self.record.ended = stop, now()
        self._write()

    def _write(self) -> None:
        write_json_atomic(self.path, asdict(self.record))


def read_record(run_dir: Path) -> Record | None:
    """The last attempt's record; None when there is none or it cannot be read."""
    try:
        d = json.loads((Path(run_dir) / RECORD).read_text())
        return Record(**d)
    except (OSError, ValueError, TypeError):
        return None


@dataclass
class Decision:
    action: str  # done, requeue, retry, fatal
    outcome: str  # finished, stopped, failed
    message: str
    failures_in_a_row: int = 0  # this attempt included
    attempt: str | None = None
    when: str = field(default_factory=now)

    def line(self) -> str:
        return f"{self.action}\t{self.message}"


def judge(record: Record | None, attempt: str | None) -> tuple[str, str, str]:
    """(action, outcome, message) for this attempt's record; before the restart limit is applied."""
    if record is None or (attempt is not None and record.attempt != attempt):
        return RETRY, FAILED, "the attempt recorded nothing (it failed before it had the run directory): see its log"
    if record.state == RUNNING:
        return RETRY, FAILED, (
            f"the attempt ended without recording how (pid {record.pid} on {record.host} was killed: out of memory, "
            "a lost node, SIGKILL): see its log"
        )  # fmt: skip
    if record.state == FINISHED:
        return DONE, FINISHED, f"the run finished (step {record.saved_step})"
    if record.state == STOPPED:
        if record.stop == AT_STEP:
            return DONE, STOPPED, f"stopped at train.stop_at_step ({record.message}); run again to go on"
        if record.saved_step is None or (record.start_step is not None and record.saved_step <= record.start_step):
            return RETRY, STOPPED, f"stopped ({record.message}) without saving progress beyond step {record.start_step}"
        return REQUEUE, STOPPED, f"stopped after saving step {record.saved_step} ({record.message})"
    status = record.exit_status
    if status in FATAL_STATUSES:
        return FATAL, FAILED, f"failed with exit status {status}, which another attempt would repeat: {record.message}"
    return RETRY, FAILED, f"failed with exit status {status}: {record.message}"


def history(run_dir: Path) -> list[dict]:
    try:
        lines = (Path(run_dir) / HISTORY).read_text().splitlines()
    except FileNotFoundError:
        return []
    out = []
    for line in lines:
        try:
            out.append(json.loads(line))
        except ValueError:
            continue  # a line cut by a crash: the rest still count
    return out


def decide(
    run_dir: Path, *, max_restarts: int, cancelled: bool = False, env: Mapping[str, str] = os.environ
) -> Decision:
    """Judge the attempt that just ended (once its processes are gone), append the decision to attempts.jsonl and
    return it. `retry` becomes `fatal` once `max_restarts` attempts in a row have failed after the first; a job
    being cancelled (`cancelled`) is never run again (`done`)."""
    attempt = attempt_id(env)
    action, outcome, message = judge(read_record(run_dir), attempt)
    failures = 0
    if cancelled and action in (REQUEUE, RETRY):
        action, message = DONE, f"{message}; not run again: the job was cancelled"
    if action == RETRY:
        earlier = [d for d in history(run_dir) if d.get("attempt") != attempt]
        failures = 1
        for d in reversed(earlier):
            if d.get("action") != RETRY:
                break
            failures += 1
        if failures > max_restarts:
            action = FATAL
            message += f" ({failures} attempts in a row have failed; the restart limit is {max_restarts})"
        else:
            message += f" (attempt {failures} of {max_restarts + 1} in a row to fail)"
    decision = Decision(action, outcome, message, failures, attempt)
    path = Path(run_dir) / HISTORY
    with open(path, "a") as f:
        f.write(json.dumps(asdict(decision)) + "\n")
        f.flush()
        os.fsync(f.fileno())
    fsync_dir(path.parent)
    return decision
