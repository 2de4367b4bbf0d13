"""What ties a run to the job that runs it: one job per run directory, stop signals, and the launcher's life.

- `RunLock`: rank 0 holds `<run_dir>/job.lock` for the life of the run. The lock records the job (host, pid,
  start time, Slurm job id); a second job on the same directory is refused naming it (`RunDirBusy`, exit 5). A lock
  whose holder is dead is taken over with a warning: on the same host, when its process is gone (pid and process
  start time, so a reused pid does not count) or the host has restarted since; on another host, when its heartbeat
  (the file's mtime, touched every `stale_after / 10` seconds) is older than `stale_after`. Taking and handing over
  the lock use only link, rename and unlink, which are atomic on NFS and the other shared filesystems clusters
  use, where flock may do nothing.
- `StopRequest`: the stop signals (SIGTERM, SIGUSR1) and the launcher watch ask the loop to save and exit; each
  request also arms a deadline after which the process exits whatever it is doing.
- `LauncherWatch`: a rank started by torchrun, DeepSpeed's launcher or srun watches that launcher (for the
  `deepspeed` command, both of its processes) and, once it is gone, asks the loop to stop, so that no rank outlives
  its job. A process started directly (`python launch/pretrain.py`, under nohup or tmux) has no launcher to watch.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import signal
import socket
import threading
import time
import uuid
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path

import psutil

from pretrain import slurm
from pretrain.distributed import World
from pretrain.errors import EXIT_BUSY, EXIT_FAILED, BadInput, RunDirBusy

log = logging.getLogger("pretrain")

LOCK = "job.lock"


# ----------------------------------------------------------------------------------------------- run lock
def _boot_id() -> str:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return ""


def _pid_namespace() -> int:
    """The PID namespace (containers on one host share its name and boot, not their pids)."""
    try:
        return os.stat("/proc/self/ns/pid").st_ino
    except OSError:
        return 0


@dataclass
class Holder:
    """The job that holds a run directory, as recorded in its lock file."""

    host: str
    pid: int
    started: str  # when the lock was taken (UTC, ISO 8601)
    pid_started: float  # the process's start time, so that a reused pid is not taken for the holder
    boot_id: str  # the host's boot
    pid_ns: int  # the PID namespace its pid belongs to
    slurm_job_id: str | None = None
    slurm_restart: int = 0  # SLURM_RESTART_COUNT: a requeued job's earlier run is over

    @classmethod
    def me(cls) -> Holder:
        return cls(
            host=socket.gethostname(),
            pid=os.getpid(),
            started=datetime.now(timezone.utc).isoformat(timespec="seconds"),
            pid_started=psutil.Process().create_time(),
            boot_id=_boot_id(),
            pid_ns=_pid_namespace(),
            slurm_job_id=slurm.job_id(os.environ),
            slurm_restart=slurm.restart_count(os.environ),
        )

    def describe(self) -> str:
        slurm = f", Slurm job {self.slurm_job_id}" if self.slurm_job_id else ""
        return f"host {self.host}, pid {self.pid}{slurm}, started {self.started}"


def _read_holder(path: Path) -> Holder | None:
    """The recorded holder; None when the file cannot be read as one (its heartbeat decides then)."""
    try:
        return Holder(**json.loads(path.read_text()))
    except (OSError, ValueError, TypeError):
        return None


class RunLock:
    """`<run_dir>/job.lock`, held by one job at a time (see the module docstring). Used by rank 0:

    with RunLock(run_dir, stale_after=300):
        ...            # RunDirBusy if a live job holds it
    """

    LOST_AFTER = 3  # heartbeats in a row that find the lock gone or another's before it counts as lost

    def __init__(self, run_dir: Path, *, stale_after: float, on_lost=None):
        self.path = Path(run_dir) / LOCK
        self.stale_after = stale_after
        self.on_lost = on_lost or self._lost  # called (from the heartbeat thread) if another job took the lock
        self.me = Holder.me()
        self.fd: int | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> RunLock:
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    def acquire(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(5):  # a lost race with another job taking over a dead lock: look again
            fd = self._create()
            if fd is not None:
                self.fd = fd
                self._thread = threading.Thread(target=self._heartbeat, name="run-lock", daemon=True)
                self._thread.start()
                return
            self._take_over_if_dead()
        raise RunDirBusy(f"{self.path.parent}: could not take {self.path} (other jobs are taking it at the same time)")

    def _create(self) -> int | None:
        """Create the lock atomically and return a descriptor of it (None: it exists). Our record is written under
        a unique name, then hard-linked to the lock's name, which fails if the lock exists; the link count tells
        whether it worked even where (NFS) link's answer can be lost. The descriptor is of that same file, never
        reopened by name. Where hard links are not supported, an exclusive create does the same."""
        record = json.dumps(asdict(self.me)).encode()
        tmp = self.path.with_name(f".{LOCK}.{self.me.host}.{self.me.pid}.{uuid.uuid4().hex[:8]}")
        fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            os.write(fd, record)
            os.fsync(fd)
            try:
                os.link(tmp, self.path)
            except FileExistsError:
                pass
            except OSError as e:
                if e.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EMLINK):
                    raise
                os.close(fd)
                fd = None
                return self._create_exclusive(record)
            if os.fstat(fd).st_nlink == 2:
                fd, mine = None, fd
                return mine
            return None
        finally:
            if fd is not None:
                os.close(fd)
            os.unlink(tmp)

    def _create_exclusive(self, record: bytes) -> int | None:
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            return None
        os.write(fd, record)
        os.fsync(fd)
        return fd

    def _take_over_if_dead(self) -> None:
        """Raise RunDirBusy naming the holder if it is alive; else move its lock aside and remove it."""
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            return  # released meanwhile: try again
        holder = _read_holder(self.path)
        dead = self._dead(holder, st.st_mtime)
        who = holder.describe() if holder else f"unreadable record in {self.path}"
        if dead is None:
            age = time.time() - st.st_mtime
            raise RunDirBusy(
                f"{self.path.parent} is in use by another job ({who}; heartbeat {age:.0f} s ago): one job per run "
                f"directory. Wait for it to end or stop it, or use another train.run_dir. (A lock whose holder died "
                f"on another host is taken over once its heartbeat is older than {self.stale_after:.0f} s, "
                "train.lock_stale_seconds.)"
            )
        aside = self.path.with_name(f".{LOCK}.dead.{uuid.uuid4().hex[:8]}")
        try:
            os.rename(self.path, aside)
        except FileNotFoundError:
            return  # another job moved it first
        moved = os.stat(aside)
        if (moved.st_ino, moved.st_mtime) != (st.st_ino, st.st_mtime):  # replaced or touched after we looked
            try:
                os.link(aside, self.path)  # put it back, unless a new lock is already there
            except FileExistsError:
                pass
            os.unlink(aside)
            return
        os.unlink(aside)
        log.warning("%s: took over the lock of a job that is gone (%s: %s)", self.path.parent, who, dead)

    def _dead(self, holder: Holder | None, mtime: float) -> str | None:
        """Why the holder is dead, or None if it may be alive. Its pid is only looked at when it ran on this host,
        in this boot and in this PID namespace; otherwise its heartbeat decides."""
        me = self.me
        if holder is not None and holder.slurm_job_id and holder.slurm_job_id == me.slurm_job_id:
            if holder.slurm_restart < me.slurm_restart:
                return f"it is the earlier run of this requeued Slurm job (restart {holder.slurm_restart})"
        if holder is not None and (holder.host, holder.boot_id, holder.pid_ns) == (me.host, me.boot_id, me.pid_ns):
            return None if _alive(holder.pid, holder.pid_started) else "its process is gone"
        age = time.time() - mtime
        return f"no heartbeat for {age:.0f} s" if age > self.stale_after else None

    def _heartbeat(self) -> None:
        fd, every = self.fd, max(self.stale_after / 10, 0.5)
        strikes = 0
        while not self._stop.wait(every):
            try:
                os.utime(fd)
                st = os.stat(self.path)
            except FileNotFoundError:
                st = None
            except OSError as e:  # a server failover, a soft-mount timeout: not a reason to give up the run
                log.warning("%s: heartbeat failed (%s); trying again", self.path, e)
                continue
            if st is not None and st.st_ino == os.fstat(fd).st_ino:
                strikes = 0
                continue
            strikes += 1  # gone (maybe for a moment, while another job looks at it) or another job's
            if strikes >= self.LOST_AFTER:
                self.on_lost(_read_holder(self.path))
                return

    def _lost(self, holder: Holder | None) -> None:
        who = holder.describe() if holder else "another job"
        log.error("%s: the run directory lock was taken over by %s; exiting at once", self.path.parent, who)
        os._exit(EXIT_BUSY)

    def release(self) -> None:
        """Remove the lock if it is still ours (callable from any thread, more than once)."""
        fd, self.fd = self.fd, None
        if fd is None:
            return
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join()
        try:
            if os.fstat(fd).st_ino == os.stat(self.path).st_ino:
                os.unlink(self.path)
        except OSError:
            pass
        os.close(fd)


def _alive(pid: int, started: float) -> bool:
    """Whether process `pid` runs and is the one that started at `started` (not a zombie, not a reused pid)."""
    try:
        p = psutil.Process(pid)
        return abs(p.create_time() - started) < 1.0 and p.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


# ----------------------------------------------------------------------------------------------- stop requests
class StopRequest:
    """Why the run should stop early. The first stop signal asks the loop to save and exit, and arms a deadline:
    `grace` seconds later the process exits, saved or not (status 128 + the signal's number, as a shell reports a
    process killed by it). Later stop signals change nothing: they are copies (Slurm signals every process of a
    job step, and torchrun forwards the same signal to its ranks a few milliseconds later), or a second stage (a
    time limit's TERM after its warning; a launcher terminating the last rank once the others have exited), and
    none of them may cut a save short; SIGKILL is the way to exit at once. The launcher watch asks through
    `launcher_gone`. Before a deadline exit, the callables in `before_exit` run with the exit status (the attempt
    is recorded and the run directory lock released there). `restore()` puts the earlier handlers back."""

    def __init__(self, names: list[str], grace: float):
        self.signal_name: str | None = None
        self.launcher: str | None = None  # set when the launcher is gone: which one
        self.launcher_since: float | None = None  # time.monotonic() when it was seen gone
        self.grace = grace
        self.before_exit: list = []
        self._timer: threading.Timer | None = None
        self._previous = {name: signal.signal(getattr(signal, name), self._handle) for name in names}

    def _handle(self, signum, frame) -> None:
        name = signal.Signals(signum).name
        if self.signal_name is not None:
            log.warning("%s received as well: already saving and stopping (%s)", name, self.signal_name)
            return
        self.signal_name = name
        self.arm_deadline(self.grace, 128 + signum)
        log.warning(
            "%s received: finishing the step, saving a checkpoint and exiting (within %.0f s)", name, self.grace
        )

    def launcher_gone(self, launcher: str, grace: float) -> None:
        self.launcher, self.launcher_since = launcher, time.monotonic()
        self.arm_deadline(grace, EXIT_FAILED)
        log.warning("the launcher (%s) is gone: saving if there is time and exiting (within %.0f s)", launcher, grace)

    def arm_deadline(self, seconds: float, status: int) -> None:
        """Exit with `status` after `seconds`, whatever the process is doing then (once; later calls do nothing)."""
        if self._timer is not None:
            return
        self._timer = threading.Timer(seconds, self.exit_now, args=(status,))
        self._timer.daemon = True
        self._timer.start()

    def disarm(self) -> None:
        """Cancel the deadline (the run has ended in time)."""
        timer, self._timer = self._timer, None
        if timer is not None:
            timer.cancel()

    def exit_now(self, status: int) -> None:
        for release in self.before_exit:
            try:
                release(status)
            except Exception:  # exiting regardless
                pass
        os._exit(status)

    def restore(self) -> None:
        for name, handler in self._previous.items():
            signal.signal(getattr(signal, name), handler)


# ----------------------------------------------------------------------------------------------- launcher
@dataclass
class Launcher:
    name: str  # torchrun, deepspeed, srun
    processes: list[tuple[int, float]]  # (pid, start time) of each process whose end means the launcher is gone

    def describe(self) -> str:
        return f"{self.name}, pid {', '.join(str(pid) for pid, _ in self.processes)}"


def detect_launcher() -> Launcher | None:
    """The launcher that started this process, from its parent processes; None for a process started directly.

    Measured (torch 2.13, deepspeed 0.19.8): torchrun's ranks are its children (TORCHELASTIC_RUN_ID set); the
    `deepspeed` command is two processes, the runner and its child `deepspeed.launcher.launch`, the ranks' parent;
    srun's tasks are children of slurmstepd.
    """
    try:
        parent = psutil.Process().parent()
        if parent is None:
            return None
        if "TORCHELASTIC_RUN_ID" in os.environ:
            return Launcher("torchrun", [(parent.pid, parent.create_time())])
        cmd = " ".join(parent.cmdline())
        if "deepspeed.launcher.launch" in cmd:
            procs = [(parent.pid, parent.create_time())]
            runner = parent.parent()
            if runner is not None and any(
                Path(arg).name == "deepspeed" or "deepspeed.launcher.runner" in arg for arg in runner.cmdline()[:3]
            ):
                procs.append((runner.pid, runner.create_time()))  # single node; under pdsh the runner is elsewhere
            return Launcher("deepspeed", procs)
        if parent.name() == "slurmstepd":
            return Launcher("srun", [(parent.pid, parent.create_time())])
    except psutil.Error as e:
        log.warning("cannot tell which launcher started this process (%s): it is not watched", e)
    return None


class LauncherWatch:
    """Polls the launcher's processes every `interval` seconds; calls `on_gone(launcher)` once when one ends."""

    def __init__(self, launcher: Launcher, on_gone, *, interval: float = 0.5):
        self.launcher = launcher
        self.on_gone = on_gone
        self.interval = interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="launcher-watch", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            if not all(_alive(pid, started) for pid, started in self.launcher.processes):
                self.on_gone(self.launcher)
                return

    def close(self) -> None:
        self._stop.set()


@contextlib.contextmanager
def hold_run_dir(run_dir: Path, world: World, *, stale_after: float):
    """Rank 0 holds the run directory's lock for the life of the block; every rank raises the same error if it
    cannot be had (RunDirBusy: another job; BadInput: the directory cannot be written)."""
    lock = RunLock(run_dir, stale_after=stale_after) if world.is_main else None
    try:
        error = None
        if lock is not None:
            try:
                lock.acquire()
            except RunDirBusy as e:
                error = e
            except OSError as e:
                error = BadInput(f"train.run_dir: cannot hold a lock in {run_dir} ({e})")
        error = world.broadcast(error)
        if error is not None:
            raise error
        yield lock
    finally:
        if lock is not None:
            lock.release()
