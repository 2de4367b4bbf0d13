"""What this project reads from Slurm: who a task is in its job step, where the step's first node is, and the
hosts of an allocation. `pretrain.distributed` asks `join_env()` when no launcher has set RANK; the batch script
(launch/slurm/pretrain.sbatch) and `launch/slurm/hosts.py` ask `head_address()` and `hostfile()`.

    env = join_env(os.environ)     # RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT for an srun task
    head_address(nodelist)         # an address the other nodes can reach the first node of `nodelist` at
    hostfile(nodelist, slots=8)    # DeepSpeed's hostfile: "<host> slots=<n>" per node

Facts measured on Slurm 22.05 (../shared/notes/slurm-local.md): srun sets SLURM_STEP_NUM_TASKS, SLURM_PROCID and
SLURM_LOCALID in each task; a batch script's own shell is not a task of a step (it has no SLURM_STEP_NUM_TASKS) even
when the job asked for several tasks; node names need not resolve as host names (then the node's NodeAddr, from
`scontrol show node`, is the address).
"""

from __future__ import annotations

import re
import socket
import subprocess
import zlib
from collections.abc import Mapping

from pretrain.errors import BadInput


class LaunchError(BadInput):
    """The processes of a job cannot form one run (the message says why and what to do)."""


# Environment variables of launchers that start several processes without setting RANK: each process would
# otherwise train alone as a world of one, on the same run directory. (name of the size variable, the launcher)
UNJOINED = (
    ("OMPI_COMM_WORLD_SIZE", "Open MPI's mpirun"),
    ("PMI_SIZE", "an MPI launcher (PMI)"),
    ("PMIX_SIZE", "an MPI launcher (PMIx)"),
    ("MV2_COMM_WORLD_SIZE", "MVAPICH's mpirun"),
)
# MASTER_PORT for a job step when none is given: in [20000, 32000), below Linux's ephemeral ports (32768-60999)
PORT_BASE, PORT_SPAN = 20000, 12000


def job_id(env: Mapping[str, str]) -> str | None:
    """The Slurm job (an array task as `<array job>_<task>`), or None outside Slurm."""
    if env.get("SLURM_ARRAY_JOB_ID") and env.get("SLURM_ARRAY_TASK_ID"):
        return f"{env['SLURM_ARRAY_JOB_ID']}_{env['SLURM_ARRAY_TASK_ID']}"
    return env.get("SLURM_JOB_ID") or None


def restart_count(env: Mapping[str, str]) -> int:
    """How many times the job has been requeued (SLURM_RESTART_COUNT is unset on its first run)."""
    value = env.get("SLURM_RESTART_COUNT") or ""
    return int(value) if value.isdigit() else 0


def step_tasks(env: Mapping[str, str]) -> int:
    """How many tasks the Slurm job step this process belongs to runs (0 outside a step, the batch shell
    included)."""
    value = env.get("SLURM_STEP_NUM_TASKS") or ""
    return int(value) if value.isdigit() else 0


def join_env(env: Mapping[str, str]) -> dict[str, str] | None:
    """The process-group variables for a process that no launcher gave a RANK: for a task of a Slurm step of
    several tasks (`srun -N2 --ntasks-per-node=4 python launch/pretrain.py ...`), its rank, world and local rank
    from the step and the rendezvous at the step's first node; None for a process meant to run alone. Raises
    LaunchError where several processes were started that cannot join (an MPI launcher)."""
    tasks = step_tasks(env)
    if tasks > 1:
        if env.get("SLURM_GPUS_PER_TASK"):  # every task refuses alike, rank 0 included, so it is reported
            raise LaunchError(
                f"srun --gpus-per-task={env['SLURM_GPUS_PER_TASK']} gives each task its own GPU, numbered 0: each "
                "rank uses the GPU of its local rank, so every task must see all of its node's GPUs. Ask "
                "--gpus-per-node (and --ntasks-per-node = GPUs per node) instead"
            )
        missing = [k for k in ("SLURM_PROCID", "SLURM_LOCALID", "SLURM_STEP_NODELIST") if not env.get(k)]
        if missing:
            raise LaunchError(f"this Slurm step runs {tasks} tasks, but {', '.join(missing)} is not set: cannot join")
        nodelist = env["SLURM_STEP_NODELIST"]
        return {
            "RANK": env["SLURM_PROCID"],
            "WORLD_SIZE": str(tasks),
            "LOCAL_RANK": env["SLURM_LOCALID"],
            "MASTER_ADDR": env.get("MASTER_ADDR") or head_address(nodelist),
            "MASTER_PORT": env.get("MASTER_PORT") or str(step_port(env)),
        }
    for name, launcher in UNJOINED:
        size = env.get(name, "")
        if size.isdigit() and int(size) > 1:
            raise LaunchError(
                f"started by {launcher} as one of {size} processes ({name}={size}), which sets no RANK: each would "
                "train alone on the same run directory. Start the ranks with srun, torchrun or deepspeed (README, "
                "'Running on a cluster')"
            )
    return None


def check_world(env: Mapping[str, str], world_size: int) -> None:
    """Refuse a launcher's world that is smaller than the Slurm step it runs in: `srun -N2 torchrun --standalone`
    makes one world per task, each training alone on the same run directory."""
    tasks = step_tasks(env)
    if tasks > world_size:
        raise LaunchError(
            f"this Slurm step runs {tasks} tasks, but the launcher made a world of {world_size} process(es): the "
            f"tasks would train as {tasks} separate runs on one run directory. Give torchrun the whole job "
            "(--nnodes=$SLURM_NNODES with a c10d rendezvous, as launch/slurm/pretrain.sbatch does), or let srun start "
            "the ranks without a launcher"
        )


def step_port(env: Mapping[str, str]) -> int:
    """A rendezvous port every task of a step computes alike (from the job id, restart count and step id), so
    that two steps on one node, or a requeued attempt and a leftover of the last one, do not collide."""
    step = env.get("SLURM_STEP_ID", env.get("SLURM_STEPID", ""))
    key = f"{env.get('SLURM_JOB_ID', '')}.{restart_count(env)}.{step}"
    return PORT_BASE + zlib.crc32(key.encode()) % PORT_SPAN


# ----------------------------------------------------------------------------------------------- hosts
def expand_nodelist(nodelist: str) -> list[str]:
    """The host names of a Slurm hostlist expression (`gpu[01-03,07],login1` -> gpu01 gpu02 gpu03 gpu07 login1),
    in order: `scontrol show hostnames` where it answers (inside a job; it needs Slurm's configuration), else our
    reading of the usual forms (one bracket group per name, ranges with zero padding)."""
    try:
        out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True, timeout=30)
        if out.returncode == 0 and out.stdout.split():
            return out.stdout.split()
    except (OSError, subprocess.TimeoutExpired):
        pass
    return read_nodelist(nodelist)


def read_nodelist(nodelist: str) -> list[str]:
    """expand_nodelist without Slurm's commands."""
    names, depth, start = [], 0, 0
    for i, ch in enumerate(nodelist + ","):
        if ch == "[":
            depth += 1
        elif ch == "]":
            depth -= 1
        elif ch == "," and depth == 0:
            part = nodelist[start:i].strip()
            start = i + 1
            if part:
                names.extend(_expand_one(part, nodelist))
    if depth != 0 or not names:
        raise LaunchError(f"cannot read the Slurm node list {nodelist!r}")
    return names


def _expand_one(part: str, nodelist: str) -> list[str]:
    m = re.fullmatch(r"([^\[\]]*)\[([^\[\]]+)\]([^\[\]]*)", part)
    if m is None:
        if "[" in part or "]" in part:
            raise LaunchError(f"cannot read the Slurm node list {nodelist!r} (at {part!r})")
        return [part]
    prefix, ranges, suffix = m.groups()
    out = []
    for r in ranges.split(","):
        lo, _, hi = r.partition("-")
        if not lo.isdigit() or (hi and not hi.isdigit()):
            raise LaunchError(f"cannot read the Slurm node list {nodelist!r} (at {r!r})")
        width = len(lo)
        out.extend(f"{prefix}{n:0{width}d}{suffix}" for n in range(int(lo), int(hi or lo) + 1))
    return out


def node_address(name: str) -> str:
    """An address of Slurm node `name`: the name itself when it resolves as a host name, else the NodeAddr Slurm
    has for it (nodes named apart from their hosts, as in a test cluster on one machine)."""
    try:
        socket.getaddrinfo(name, None)
        return name
    except OSError:
        pass
    try:
        out = subprocess.run(["scontrol", "-o", "show", "node", name], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise LaunchError(f"Slurm node {name} does not resolve as a host name, and scontrol failed: {e}") from None
    m = re.search(r"\bNodeAddr=(\S+)", out.stdout)
    if out.returncode != 0 or m is None:
        raise LaunchError(
            f"Slurm node {name} does not resolve as a host name, and `scontrol show node {name}` gave no NodeAddr: "
            f"{(out.stderr or out.stdout).strip()}. Set MASTER_ADDR to an address of the first node"
        )
    return m.group(1)


def head_address(nodelist: str) -> str:
    """The address of the first node of `nodelist`, where rank 0 runs and the rendezvous listens."""
    return node_address(expand_nodelist(nodelist)[0])


def hostfile(nodelist: str, slots: int) -> str:
    """DeepSpeed's hostfile for an allocation: one line `<host> slots=<n>` per node, in the node list's order."""
    return "".join(f"{name} slots={slots}\n" for name in expand_nodelist(nodelist))
