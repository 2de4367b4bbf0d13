"""How each attempt at a run ended, recorded in the run directory, so that what restarts a run (the Slurm batch
script, or any supervisor) decides from the run itself and never from a launcher's exit status: torchrun reports 1
for a crash and for a stop after saving alike, srun the highest of its tasks' statuses (143 where it terminated
the others), DeepSpeed's launcher 1 or the first failed rank's status.

`<run_dir>/attempts/<id>.json`, one per attempt, written (atomically) by the process that is rank 0 by its
launcher's word, from the moment it starts (before it joins the others or takes the run directory, so that a start
that fails, a busy run directory included, is recorded too): "running", then how it ended: "finished", "stopped"
(after saving a checkpoint; `stop` says why) or "failed", with the exit status and the message. An attempt killed
outright (SIGKILL, out of memory, a lost node) leaves "running" behind.

`<run_dir>/attempts.jsonl`: one line per attempt, appended by `decide` (launch/attempt.py) once the attempt's
processes have ended: what happened and what to do next:

  done     finished, or stopped at train.stop_at_step as asked: nothing to do
  requeue  stopped after saving a checkpoint that moved the run on (a stop signal, train.max_wall_time, a
           launcher that went away): run it again, it resumes
  retry    failed in a way another attempt may not (a crash, a killed process, a lost node, an I/O error, an
           attempt that recorded nothing, a stop that saved no progress): run it again while no more than the
           restart limit of this job's attempts in a row have failed without saving progress
  fatal    what would fail the same way again: bad configuration, data or checkpoint (2), non-finite steps (4),
           the run directory held by another job (5); or the restart limit reached

An attempt is known by its id: PRETRAIN_ATTEMPT_ID if set, else `slurm-<job>-<restart count>` inside a Slurm job,
else one made from the host, the process and the time.
"""

from __future__ import annotations

import json
import os
import socket
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields
from datetime import datetime, timezone
from pathlib import Path

from pretrain import slurm
from pretrain.errors import EXIT_BAD_INPUT, EXIT_BUSY, EXIT_NON_FINITE, EXIT_OK, EXIT_STOPPED, Stopped, exit_code
from pretrain.fileutil import fsync_dir, write_json_atomic

RECORDS, HISTORY = "attempts", "attempts.jsonl"
RUNNING, FINISHED, STOPPED, FAILED = "running", "finished", "stopped", "failed"
DONE, REQUEUE, RETRY, FATAL = "done", "requeue", "retry", "fatal"
FATAL_STATUSES = (EXIT_BAD_INPUT, EXIT_NON_FINITE, EXIT_BUSY)
AT_STEP = "at_step"  # Stopped.why for train.stop_at_step: the user asked for this stop


def attempt_id(env: Mapping[str, str]) -> str | None:
    """This attempt's id from the environment: PRETRAIN_ATTEMPT_ID, else `slurm-<job>-<restart>` inside a Slurm job
    (SLURM_RESTART_COUNT is unset on a job's first run), else None."""
    if env.get("PRETRAIN_ATTEMPT_ID"):
        return env["PRETRAIN_ATTEMPT_ID"]
    job = slurm.job_id(env)
    return f"slurm-{job}-{slurm.restart_count(env)}" if job else None


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


def record_path(run_dir: Path, attempt: str) -> Path:
    return Path(run_dir) / RECORDS / f"{attempt.replace('/', '_')}.json"


@dataclass
class Record:
    state: str
    attempt: str
    host: str
    pid: int
    started: str
    job: str | None = None  # the Slurm job
    start_step: int | None = None  # the step the attempt resumed from (None: it never got that far)
    saved_step: int | None = None  # the newest complete checkpoint's step when it ended
    ended: str | None = None
    exit_status: int | None = None
    stop: str | None = None  # why a stopped attempt stopped (signal, wall_time, at_step, launcher_gone)
    message: str = ""

    @property
    def progressed(self) -> bool:
        return self.saved_step is not None and self.start_step is not None and self.saved_step > self.start_step


class Attempt:
    """The record of this attempt, kept by the process that is rank 0 (see the module docstring).

    attempt = Attempt(run_dir, ckpt_dir)    # writes "running"
    attempt.start_step = 40                 # once the checkpoint is loaded
    attempt.end(exc)                        # the exception the run ended with, None when it finished
    attempt.end_status(137, "...")          # an exit that has no exception (a deadline)
    """

    def __init__(self, run_dir: Path, ckpt_dir: Path, env: Mapping[str, str] = os.environ):
        self.ckpt_dir = Path(ckpt_dir)
        started = now()
        name = attempt_id(env) or f"{socket.gethostname()}-{os.getpid()}-{started}"
        self.path = record_path(run_dir, name)
        self.record = Record(state=RUNNING, attempt=name, host=socket.gethostname(), pid=os.getpid(),
                             started=started, job=slurm.job_id(env))  # fmt: skip
        self.path.parent.mkdir(parents=True, exist_ok=True)
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
        self._end(FAILED, status, message)

    def _end(self, state: str, status: int, message: str, stop: str | None = None) -> None:
        from pretrain.checkpoint import read_latest, step_of  # (torch: not for `decide` in a batch shell)

        if self.record.state != RUNNING:
            return  # the first end wins (a deadline exit while the end is recorded, say)
        try:
            tag = read_latest(self.ckpt_dir)
        except OSError:
            tag = None
        self.record.saved_step = step_of(tag) if tag else None
        self.record.state, self.record.exit_status, self.record.message = state, status, message
        self.record.stop, self.record.ended = stop, now()
        self._write()

    def _write(self) -> None:
        """Atomically, under a temporary name of this process's own: processes that each believe they are rank 0 of
        one attempt (a launch that is refused) may write the same record at once."""
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        write_json_atomic(tmp, asdict(self.record))
        os.replace(tmp, self.path)


def read_record(path: Path) -> Record | None:
    """An attempt's record; None when there is none or it cannot be read."""
    try:
        d = json.loads(Path(path).read_text())
        return Record(**{f.name: d[f.name] for f in fields(Record) if f.name in d})
    except (OSError, ValueError, TypeError):
        return None


def records(run_dir: Path) -> list[Record]:
    """Every attempt's record, oldest first."""
    found = [read_record(p) for p in sorted((Path(run_dir) / RECORDS).glob("*.json"))]
    return sorted((r for r in found if r is not None), key=lambda r: r.started)


@dataclass
class Decision:
    action: str  # done, requeue, retry, fatal
    outcome: str  # finished, stopped, failed
    message: str
    attempt: str | None = None
    job: str | None = None
    progressed: bool = False  # the attempt saved a newer checkpoint than it started from
    failures_in_a_row: int = 0  # this job's failed attempts in a row without progress, this one included
    when: str = field(default_factory=now)

    def line(self) -> str:
        return f"{self.action}\t{self.message}"


def judge(record: Record | None) -> tuple[str, str, str]:
    """(action, outcome, message) for an attempt's record, before the restart limit is applied."""
    if record is None:
        return RETRY, FAILED, "the attempt recorded nothing (it failed before rank 0 started): see its log"
    if record.state == RUNNING:
        return RETRY, FAILED, (
            f"the attempt ended without recording how (pid {record.pid} on {record.host} was killed: out of memory, "
            "a lost node, SIGKILL, or the job step was ended): see its log"
        )  # fmt: skip
    if record.state == FINISHED:
        return DONE, FINISHED, f"the run finished (step {record.saved_step})"
    if record.state == STOPPED:
        if record.stop == AT_STEP:
            return DONE, STOPPED, f"stopped at train.stop_at_step ({record.message}); run again to go on"
        if not record.progressed:
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
    """Judge the attempt that just ended (once its processes are gone; the attempt of `env`), append the decision to
    attempts.jsonl and return it. A `retry` becomes `fatal` once more than `max_restarts` of this job's attempts in
    a row have failed without saving progress; a job being cancelled (`cancelled`) is never run again (`done`)."""
    attempt, job = attempt_id(env), slurm.job_id(env)
    record = read_record(record_path(run_dir, attempt)) if attempt else (records(run_dir) or [None])[-1]
    action, outcome, message = judge(record)
    progressed = record is not None and record.progressed
    failures = 0
    if cancelled and action in (REQUEUE, RETRY):
        action, message = DONE, f"{message}; not run again: the job was cancelled"
    if action == RETRY:
        failures = 1
        if not progressed:  # continue the chain of this job's failed attempts, if the last one was one
            earlier = [d for d in history(run_dir) if d.get("job") == job and d.get("attempt") != attempt]
            if earlier and earlier[-1].get("action") == RETRY:
                failures += int(earlier[-1].get("failures_in_a_row") or 0)
        if failures > max_restarts:
            action = FATAL
            message += (
                f" ({failures} attempts in a row have failed without progress; the restart limit is {max_restarts})"
            )
        else:
            message += f" (failure {failures} in a row; the restart limit is {max_restarts})"
    decision = Decision(action, outcome, message, attempt, job, progressed, failures)
    path = Path(run_dir) / HISTORY
    with open(path, "a") as f:
        f.write(json.dumps(asdict(decision)) + "\n")
        f.flush()
        os.fsync(f.fileno())
    fsync_dir(path.parent)
    return decision
