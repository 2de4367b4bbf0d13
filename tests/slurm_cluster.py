"""A real 2-node Slurm cluster on this machine, for tests: munged, slurmctld and two slurmd (n1, n2) with every
file (key, sockets, slurm.conf, state, spool, pid and log files) under one temporary directory.

    reason = ensure_installed()          # None when Slurm and munge are there (installs them with apt when root)
    if reason:
        pytest.skip(reason)
    cluster = SlurmCluster.start(tmp_dir)  # seconds; checks both nodes with `srun -N2`
    job = cluster.sbatch(["-N2", "--ntasks-per-node=1"], script="#!/bin/bash\\nsrun hostname\\n")
    info = cluster.wait_job(job, timeout=60)   # {"JobState": "COMPLETED", "ExitCode": "0:0", "Restarts": "0", ...}
    cluster.stop()                        # cancels jobs, stops the daemons by pid, leaves no process behind

Facts this relies on (see /work/shared/notes/slurm-local.md): Debian's slurm-wlm is built with multiple-slurmd
support; clients and daemons honour SLURM_CONF; there is no accounting, so no sacct: `scontrol show job` answers for
MinJobAge (300) seconds after a job ends. Ports are picked free, so two clusters (or a leftover) do not collide.
Every daemon, and every job started through this module, carries SLURM_TEST_CLUSTER=<tag> in its environment; stop()
uses it (and the pid files, never process names) to find what is left. That matters: a job process whose parent
dies (e.g. a torchrun worker, started in its own session, after torchrun itself died of SIGUSR1) is reparented to
init, proctrack/linuxproc loses it, and neither scancel nor the end of the job reaches it. (A job submitted with
--export=NONE loses the tag; its escaped processes are then not found.)
"""

from __future__ import annotations

import fcntl
import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import uuid
from pathlib import Path

TAG_VAR = "SLURM_TEST_CLUSTER"
NODES = ("n1", "n2")
CPUS_PER_NODE = 4
PARTITION = "debug"
KILL_WAIT = 5
MIN_JOB_AGE = 300
# scontrol's JobState values after which a job does not run again by itself
FINAL_STATES = {
    "COMPLETED",
    "FAILED",
    "CANCELLED",
    "TIMEOUT",
    "NODE_FAIL",
    "PREEMPTED",
    "OUT_OF_MEMORY",
    "BOOT_FAIL",
    "DEADLINE",
    "SPECIAL_EXIT",
    "REVOKED",
}
DAEMONS = ("slurmctld", "slurmd", "munged")
CLIENTS = ("sbatch", "srun", "squeue", "scontrol", "scancel", "sinfo")
PACKAGES = ("slurmctld", "slurmd", "slurm-client", "munge")
SBIN = ("/usr/sbin", "/sbin", "/usr/local/sbin")
# a unix socket path is at most 107 bytes; slurmd's step sockets are <spool>/n1/n1_<job>.<step> (about 25 more)
MAX_ROOT_LEN = 70


# ----------------------------------------------------------------------------------------------- installation
def which(name: str) -> str | None:
    """A program on PATH or in an sbin directory (root's PATH may lack /usr/sbin)."""
    return shutil.which(name) or shutil.which(name, path=os.pathsep.join(SBIN))


def missing() -> list[str]:
    return [n for n in (*DAEMONS, *CLIENTS) if which(n) is None]


def ensure_installed(timeout: float = 900) -> str | None:
    """Install Slurm and munge with apt when they are missing. None when everything is there (and this process is
    root, which the daemons need), else why not, for `pytest.skip(reason)`. Idempotent and quiet (about 12 s on the
    2-core test machine when it has to install, well under 1 ms when it has not); concurrent callers wait for each
    other (a lock file)."""
    if os.geteuid() != 0:  # the daemons run as root here (SlurmUser=root), and so does apt-get
        return "a local Slurm cluster needs root" + (f" ({', '.join(missing())} not installed)" if missing() else "")
    if not missing():
        return None
    apt = shutil.which("apt-get") or shutil.which("apt-get", path=os.pathsep.join(SBIN + ("/usr/bin",)))
    if apt is None:
        return f"Slurm is not installed ({', '.join(missing())} missing) and there is no apt-get"
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    with open(Path(tempfile.gettempdir()) / "slurm_cluster_install.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not missing():  # somebody else installed it meanwhile
            return None
        try:
            for cmd in (
                [apt, "-qq", "update"],
                [apt, "-qq", "install", "-y", "--no-install-recommends", *PACKAGES],
            ):
                r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)
                if r.returncode != 0:
                    tail = (r.stderr or r.stdout).strip().splitlines()[-3:]
                    return f"`{' '.join(cmd)}` failed ({r.returncode}): {' | '.join(tail)}"
        except (OSError, subprocess.TimeoutExpired) as e:
            return f"installing Slurm failed: {e}"
    if missing():
        return f"Slurm installed, but {', '.join(missing())} still missing"
    return None


# ----------------------------------------------------------------------------------------------- helpers
def free_ports(n: int) -> list[int]:
    """n distinct free TCP ports on 127.0.0.1 (held open together so they differ)."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def parse_record(line: str) -> dict[str, str]:
    """One `scontrol -o show ...` line as a dict. Values may contain spaces (Command=, Reason=, ...): a new field
    starts only where a space is followed by `Key=`."""
    fields = re.split(r"\s+(?=[A-Za-z][\w:/]*=)", line.strip())
    out = {}
    for f in fields:
        key, sep, value = f.partition("=")
        if sep:
            out[key] = value
    return out


def exit_code(info: dict) -> tuple[int, int]:
    """(status, signal) from a job's ExitCode=S:G."""
    status, _, sig = info.get("ExitCode", "0:0").partition(":")
    return int(status), int(sig or 0)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # a zombie counts as gone
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def _read_pid(path: Path) -> int | None:
    try:
        return int(path.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def _wait_gone(pids, timeout: float) -> list[int]:
    deadline = time.monotonic() + timeout
    left = [p for p in pids if _pid_alive(p)]
    while left and time.monotonic() < deadline:
        time.sleep(0.05)
        left = [p for p in left if _pid_alive(p)]
    return left


def _processes() -> dict[int, int]:
    """pid -> parent pid, for every process."""
    out = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                out[int(d.name)] = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                pass
    return out


def _tagged(tag: str) -> list[int]:
    """Processes whose environment carries TAG_VAR=tag."""
    needle = f"{TAG_VAR}={tag}".encode()
    out = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                if needle in (d / "environ").read_bytes().split(b"\0"):
                    out.append(int(d.name))
            except OSError:
                pass
    return out


# ----------------------------------------------------------------------------------------------- the cluster
class SlurmCluster:
    """A running cluster; make one with SlurmCluster.start(root). Also a context manager (stops on exit)."""

    def __init__(self, root: Path):
        self.root = Path(root).resolve()
        self.tag = uuid.uuid4().hex[:12]
        self._short: Path | None = None  # a short directory for state when root's path is too long for sockets
        self.dir = self.root
        self.conf = self.root / "slurm.conf"
        self.ctld_port, *ports = free_ports(1 + len(NODES))
        self.node_ports = dict(zip(NODES, ports))
        self.env: dict[str, str] = {}
        self.started = False

    # ------------------------------------------------------------------ layout
    def _layout(self):
        self.root.mkdir(parents=True, exist_ok=True)
        if len(str(self.root)) > MAX_ROOT_LEN:
            self._short = Path(tempfile.mkdtemp(prefix="slurm-"))
            (self.root / "state").symlink_to(self._short)  # so everything is still reachable from root
            self.dir = self._short
        else:
            self.dir = self.root / "state"
            self.dir.mkdir()
        for sub in ("munge", "ctld", "spool", "log", "run", "jobs"):
            (self.dir / sub).mkdir()
        (self.dir / "munge").chmod(0o700)

    @property
    def munge_socket(self) -> Path:
        return self.dir / "munge" / "munge.socket"

    def pid_files(self) -> dict[str, Path]:
        d = self.dir / "run"
        return {"munged": d / "munged.pid", "slurmctld": d / "slurmctld.pid"} | {
            f"slurmd-{n}": d / f"slurmd-{n}.pid" for n in NODES
        }

    def log(self, name: str) -> Path:
        """A daemon's log file: 'munged', 'slurmctld' or 'slurmd-n1' / 'slurmd-n2'."""
        return self.dir / "log" / f"{name}.log"

    def slurm_conf(self) -> str:
        d = self.dir
        host = socket.gethostname().split(".")[0]
        lines = [
            "ClusterName=pretraintest",
            f"SlurmctldHost={host}(127.0.0.1)",
            f"SlurmctldPort={self.ctld_port}",
            "SlurmUser=root",
            "SlurmdUser=root",
            "AuthType=auth/munge",
            "CredType=cred/munge",
            f"AuthInfo=socket={self.munge_socket},cred_expire=10",
            "ProctrackType=proctrack/linuxproc",
            "TaskPlugin=task/none",
            "SelectType=select/cons_tres",
            "SelectTypeParameters=CR_Core",
            "SchedulerParameters=bf_interval=1,sched_interval=2",
            "SlurmdParameters=config_overrides",
            f"KillWait={KILL_WAIT}",
            f"MinJobAge={MIN_JOB_AGE}",
            "MailProg=/bin/true",
            "ReturnToService=2",
            "JobAcctGatherType=jobacct_gather/none",
            "AccountingStorageType=accounting_storage/none",
            "JobCompType=jobcomp/none",
            "MpiDefault=none",
            f"StateSaveLocation={d / 'ctld'}",
            f"SlurmdSpoolDir={d / 'spool'}/%n",
            f"SlurmctldPidFile={self.pid_files()['slurmctld']}",
            f"SlurmdPidFile={d / 'run'}/slurmd-%n.pid",
            f"SlurmctldLogFile={self.log('slurmctld')}",
            f"SlurmdLogFile={d / 'log'}/slurmd-%n.log",
            "SlurmctldDebug=info",
            "SlurmdDebug=info",
        ]
        for n, port in self.node_ports.items():
            lines.append(
                f"NodeName={n} NodeHostname=localhost NodeAddr=127.0.0.1 Port={port} "
                f"CPUs={CPUS_PER_NODE} RealMemory=1000 State=UNKNOWN"
            )
        lines.append(f"PartitionName={PARTITION} Nodes={','.join(NODES)} Default=YES MaxTime=INFINITE State=UP")
        return "\n".join(lines) + "\n"

    # ------------------------------------------------------------------ start / stop
    @classmethod
    def start(cls, root: Path, timeout: float = 60) -> SlurmCluster:
        """Write the configuration under root, start munged, slurmctld and two slurmd, wait until both nodes are
        idle and check them with `srun -N2`. Stops what it started if anything fails."""
        reason = ensure_installed()
        if reason:
            raise RuntimeError(reason)
        self = cls(root)
        try:
            self._start(timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def _daemon_env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "SLURMD_", "SBATCH_", "SRUN_"))}
        env.pop("SQUEUE_FORMAT", None)
        env["SLURM_CONF"] = str(self.conf)
        env[TAG_VAR] = self.tag
        env["PATH"] = os.pathsep.join([env.get("PATH", "/usr/bin:/bin"), *SBIN])
        return env

    def _spawn(self, name: str, cmd: list[str], pid_file: Path, timeout: float):
        """Start a daemon that forks into the background; wait for its pid file and its process."""
        r = subprocess.run(cmd, env=self.env, capture_output=True, text=True, timeout=timeout, cwd=self.dir)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            pid = _read_pid(pid_file)
            if pid and _pid_alive(pid):
                return pid
            time.sleep(0.05)
        log = self.log(name)
        tail = log.read_text()[-2000:] if log.exists() else ""
        raise RuntimeError(f"{name} did not start (status {r.returncode}): {r.stdout}{r.stderr}\n{tail}")

    def _start(self, timeout: float):
        self._layout()
        self.conf.write_text(self.slurm_conf())
        self.env = self._daemon_env()
        self.started = True
        pids = self.pid_files()

        key = self.dir / "munge" / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o400)
        self._spawn(
            "munged",
            [
                which("munged"),
                "--force",
                f"--key-file={key}",
                f"--socket={self.munge_socket}",
                f"--pid-file={pids['munged']}",
                f"--log-file={self.log('munged')}",
                f"--seed-file={self.dir / 'munge' / 'munge.seed'}",
            ],
            pids["munged"],
            timeout,
        )
        self._spawn("slurmctld", [which("slurmctld"), "-i", "-f", str(self.conf)], pids["slurmctld"], timeout)
        for n in NODES:
            self._spawn(f"slurmd-{n}", [which("slurmd"), "-N", n, "-f", str(self.conf)], pids[f"slurmd-{n}"], timeout)
        self.wait_nodes_idle(timeout)
        r = self.run(["srun", "-N2", "-n2", "-l", "--time=1", "bash", "-c", "echo $SLURMD_NODENAME"], timeout=timeout)
        got = sorted(r.stdout.split())
        if r.returncode != 0 or got != ["0:", "1:", *NODES]:
            raise RuntimeError(f"`srun -N2` check failed ({r.returncode}): {r.stdout!r} {r.stderr!r}")

    def stop(self, timeout: float = KILL_WAIT + 10):
        """Cancel every job, stop slurmd, slurmctld and munged by their pid files, and kill anything left that
        carries this cluster's tag (or descends from it). Safe to call twice or after a failed start."""
        if not self.started:
            self._cleanup_short()
            return
        try:
            self._cancel_all(timeout)
        except Exception:
            pass
        pids = self.pid_files()
        for names in (["slurmd-n1", "slurmd-n2"], ["slurmctld"], ["munged"]):
            alive = [p for p in (_read_pid(pids[n]) for n in names) if p and _pid_alive(p)]
            for p in alive:
                _signal(p, signal.SIGTERM)
            for p in _wait_gone(alive, timeout / 3):
                _signal(p, signal.SIGKILL)
            _wait_gone(alive, 5)
        self._kill_leftovers()
        self.started = False
        self._cleanup_short()

    def _cancel_all(self, timeout: float):
        jobs = self.jobs()
        if not jobs:
            return
        self.run(["scancel", *jobs], timeout=10)
        # job processes that escaped proctrack get no signal from Slurm and hold their step's output open, so the
        # job would stay COMPLETING (up to 60 s): kill them at once
        self._kill_escaped()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and self.jobs():
            time.sleep(0.2)

    def _kill_escaped(self):
        """Tagged processes that are neither a Slurm/munge daemon nor a descendant of one (reparented to init)."""
        daemons = {os.path.realpath(p) for p in map(which, (*DAEMONS, "slurmstepd")) if p}
        daemons |= {os.path.realpath(p) for p in ("/usr/sbin/slurmstepd",) if os.path.exists(p)}
        tree = _processes()
        for pid in _tagged(self.tag):
            try:
                exe = os.path.realpath(f"/proc/{pid}/exe")
            except OSError:
                continue
            if exe in daemons or pid == os.getpid():
                continue
            p, seen = tree.get(pid, 0), set()
            while p > 1 and p not in seen:  # a descendant of a live slurmstepd is still tracked: leave it
                seen.add(p)
                try:
                    if os.path.realpath(f"/proc/{p}/exe") in daemons:
                        break
                except OSError:
                    pass
                p = tree.get(p, 0)
            else:
                _signal(pid, signal.SIGKILL)

    def _kill_leftovers(self):
        """Processes tagged with this cluster (daemons, slurmstepd, job processes with the submitted environment)
        and their descendants; never this process or its ancestors."""
        me, tree = os.getpid(), _processes()
        spare, p = set(), me
        while p and p not in spare:
            spare.add(p)
            p = tree.get(p, 0)
        victims = set(_tagged(self.tag))
        grew = True
        while grew:
            kids = {pid for pid, parent in tree.items() if parent in victims} - victims
            victims |= kids
            grew = bool(kids)
        victims -= spare
        for p in victims:
            _signal(p, signal.SIGKILL)
        _wait_gone(victims, 5)

    def _cleanup_short(self):
        if self._short is not None:
            shutil.rmtree(self._short, ignore_errors=True)
            self._short = None

    def leftover_pids(self) -> list[int]:
        """Live processes of this cluster (for checks after stop(); [] when all is gone)."""
        pids = [p for p in (_read_pid(f) for f in self.pid_files().values()) if p and _pid_alive(p)]
        return sorted(set(pids) | {p for p in _tagged(self.tag) if _pid_alive(p)})

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()

    # ------------------------------------------------------------------ clients
    def run(self, cmd: list[str], check: bool = False, timeout: float = 60, **kw) -> subprocess.CompletedProcess:
        """A client command (sbatch, srun, squeue, scontrol, scancel, sinfo, ...) against this cluster; text output
        captured unless stdout/stderr are given. Runs in the cluster's jobs directory unless cwd= is given."""
        kw.setdefault("env", self.env)
        kw.setdefault("cwd", self.dir / "jobs")
        if "stdout" not in kw and "stderr" not in kw:
            kw["capture_output"] = True
        kw.setdefault("text", True)
        return subprocess.run(list(map(str, cmd)), check=check, timeout=timeout, **kw)

    def popen(self, cmd: list[str], **kw) -> subprocess.Popen:
        """Like run(), without waiting (e.g. an `srun` that a test signals)."""
        kw.setdefault("env", self.env)
        kw.setdefault("cwd", self.dir / "jobs")
        kw.setdefault("text", True)
        return subprocess.Popen(list(map(str, cmd)), **kw)

    def sbatch(self, args=(), script: str | None = None, wrap: str | None = None, **kw) -> int:
        """Submit a job: `sbatch --parsable <args> [script file]`. script is the text of a batch script (written
        under the jobs directory), wrap a command line for --wrap; with neither, args must name the script.
        Returns the job id."""
        cmd = ["sbatch", "--parsable", *map(str, args)]
        if wrap is not None:
            cmd.append(f"--wrap={wrap}")
        if script is not None:
            fd, path = tempfile.mkstemp(prefix="job-", suffix=".sh", dir=self.dir / "jobs")
            with os.fdopen(fd, "w") as f:
                f.write(script)
            cmd.append(path)
        r = self.run(cmd, timeout=kw.pop("timeout", 30), **kw)
        if r.returncode != 0:
            raise RuntimeError(f"sbatch failed ({r.returncode}): {r.stderr.strip()}")
        return int(r.stdout.strip().split(";")[0])

    def job_info(self, job_id) -> dict[str, str]:
        """`scontrol -o show job J` as a dict ({} once the job is unknown, MinJobAge seconds after its end)."""
        r = self.run(["scontrol", "-o", "show", "job", str(job_id)], timeout=15)
        if r.returncode != 0 or not r.stdout.strip():
            return {}
        return parse_record(r.stdout.splitlines()[0])

    def output(self, job_id) -> str:
        """The text of a job's output file (StdOut of job_info; '' when it does not exist)."""
        path = self.job_info(job_id).get("StdOut", "")
        try:
            return Path(path).read_text(errors="replace") if path else ""
        except OSError:
            return ""

    def job_state(self, job_id) -> str:
        return self.job_info(job_id).get("JobState", "")

    def wait_job(self, job_id, timeout: float = 120, states=FINAL_STATES, poll: float = 0.25) -> dict[str, str]:
        """Wait until the job is in one of `states` (by default a final state: COMPLETED, FAILED, CANCELLED,
        TIMEOUT, ...; a requeued job passes PENDING/REQUEUED and goes on) and return its job_info (JobState,
        ExitCode, Restarts, ...). TimeoutError with the last info otherwise."""
        deadline = time.monotonic() + timeout
        info: dict[str, str] = {}
        while time.monotonic() < deadline:
            info = self.job_info(job_id)
            if info.get("JobState") in states:
                return info
            time.sleep(poll)
        raise TimeoutError(f"job {job_id} not in {sorted(states)} after {timeout}s: {info}")

    def wait_running(self, job_id, timeout: float = 60) -> dict[str, str]:
        return self.wait_job(job_id, timeout, states={"RUNNING"} | FINAL_STATES)

    def jobs(self) -> list[str]:
        """Ids of the jobs slurmctld still runs or holds (pending, running, completing, requeued)."""
        r = self.run(["squeue", "-h", "-o", "%i %T"], timeout=15)
        if r.returncode != 0:
            return []
        return [line.split()[0] for line in r.stdout.splitlines() if line.split()]

    def nodes(self) -> dict[str, dict[str, str]]:
        """`scontrol -o show node` per node name."""
        r = self.run(["scontrol", "-o", "show", "node"], timeout=15)
        recs = [parse_record(line) for line in r.stdout.splitlines() if line.strip()]
        return {rec["NodeName"]: rec for rec in recs if "NodeName" in rec}

    def wait_nodes_idle(self, timeout: float = 60) -> dict[str, dict[str, str]]:
        """Wait until every node is IDLE (no job, not completing, not down/drained); returns nodes()."""
        deadline = time.monotonic() + timeout
        nodes: dict = {}
        while time.monotonic() < deadline:
            nodes = self.nodes()
            if set(nodes) == set(NODES) and all(n.get("State") == "IDLE" for n in nodes.values()):
                return nodes
            time.sleep(0.2)
        states = {name: node.get("State") for name, node in nodes.items()}
        raise TimeoutError(f"nodes not idle after {timeout}s: {states}")


def _signal(pid: int, sig: int):
    try:
        os.kill(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass
