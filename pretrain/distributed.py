"""The process group: joining it (the one bootstrap every entry point and benchmark uses) and the few collectives
the training loop and the checkpoint manager need.

    world = init_distributed()        # under deepspeed / torchrun / srun, or a group of one under plain `python`
    world.rank, world.size, world.local_rank
    world.broadcast(obj)              # rank 0's object on every rank
    leave_distributed()               # at the end (also run at exit, as a backstop)

A `World` of size 1 answers every collective locally, so the loop and the checkpoint manager run in a test process
without a process group.
"""

from __future__ import annotations

import atexit
import logging
import os
import socket
import time
from dataclasses import dataclass
from pathlib import Path

from pretrain import slurm

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.size > 1:
            import torch.distributed as dist

            dist.barrier()

    def broadcast(self, obj):
        """Rank 0's `obj` on every rank (any picklable object)."""
        if self.size == 1:
            return obj
        import torch.distributed as dist

        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def all_gather(self, obj) -> list:
        """Every rank's `obj`, in rank order."""
        if self.size == 1:
            return [obj]
        import torch.distributed as dist

        out = [None] * self.size
        dist.all_gather_object(out, obj)
        return out

    def max(self, value: int) -> int:
        """The largest of every rank's integer."""
        if self.size == 1:
            return value
        import torch
        import torch.distributed as dist
        from deepspeed.accelerator import get_accelerator

        flag = torch.tensor([value], dtype=torch.int64, device=get_accelerator().current_device_name())
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return int(flag.item())


def init_distributed() -> World:
    """Join the process group the launcher describes (RANK, WORLD_SIZE, MASTER_ADDR, ... in the environment set by
    torchrun or deepspeed; for the tasks of an `srun` step, from Slurm's variables), or make a group of one for a
    process started directly. Several processes that would each train alone are refused (LaunchError). DeepSpeed
    picks the backend for the accelerator (nccl on CUDA, gloo on CPU); each rank uses the device of its local rank."""
    import deepspeed
    import torch.distributed as dist
    from deepspeed.accelerator import get_accelerator

    if "RANK" not in os.environ:
        joined = slurm.join_env(os.environ)
        if joined is None:  # plain `python`: a process group of one
            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                port = s.getsockname()[1]
            joined = dict(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        os.environ.update(joined)
    world = World(rank=int(os.environ["RANK"]), size=int(os.environ.get("WORLD_SIZE", "1")),
                  local_rank=int(os.environ.get("LOCAL_RANK", "0")))  # fmt: skip
    slurm.check_world(os.environ, world.size)
    if world.local_rank == 0:  # (the build folders are the node's)
        for lock, age in stale_build_locks():
            log.warning(
                f"{lock} is {age / 60:.0f} min old: a build of a DeepSpeed op in that folder was killed (kill -9, a "
                "job's time limit) or is still running elsewhere. If none is running, delete the file: a run that "
                "needs the op waits for it forever"
            )
    accelerator = get_accelerator()
    if accelerator.device_name() != "cpu":  # before any collective: one device per rank (DeepSpeed does the same)
        check_device(world.local_rank, accelerator.device_count())
        accelerator.set_device(world.local_rank)
    deepspeed.init_distributed(verbose=False)
    atexit.register(leave_distributed)
    world = World(rank=dist.get_rank(), size=dist.get_world_size(), local_rank=world.local_rank)
    if accelerator.device_name() == "cpu":
        release_shm_workspace(world)
    return world


SHM_DIR = Path("/dev/shm")


def shm_workspace(rank: int) -> Path:
    """The shared-memory segment DeepSpeed's CPU backend (0.19) makes for `rank` of the group at MASTER_ADDR:PORT
    when every rank is on one machine (LOCAL_SIZE = WORLD_SIZE, as its launcher sets): 66 MB for its shared-memory
    all-reduce (csrc/cpu/comm/shm.cpp names it so)."""
    addr, port = os.environ.get("MASTER_ADDR", ""), os.environ.get("MASTER_PORT", "")
    return SHM_DIR / f"deepspeed_allreduce_buffer_{os.getuid()}_{addr}_{port}_{rank}"


def release_shm_workspace(world: World) -> None:
    """DeepSpeed never unlinks the segments of `shm_workspace`: each run on one CPU machine left 66 MB of memory per
    rank in /dev/shm, until a machine that ran many ran out of memory. Every rank maps every rank's segment inside
    deepspeed.init_distributed, so after a barrier each rank removes its own name: the mappings stay valid, and the
    memory is freed when the last rank exits, however it exits (kill -9 included)."""
    world.barrier()  # (a group of one, started by the deepspeed launcher, has its segment too)
    shm_workspace(world.rank).unlink(missing_ok=True)


BUILD_LOCK_STALE_SECONDS = 300


def stale_build_locks(now: float | None = None) -> list[tuple[Path, float]]:
    """The lock files older than 5 minutes in torch's extension build folders ($TORCH_EXTENSIONS_DIR, or
    ~/.cache/torch_extensions/<python>_<accelerator>), with their ages in seconds. DeepSpeed compiles some ops the
    first time a process needs them (on a CPU, the shared-memory all-reduce inside init_distributed); torch's builder
    holds a `lock` file in the op's folder while it compiles (a minute or two), and a process that finds one waits,
    without a word and without end, for it to go: a build that was killed leaves it behind."""
    from torch.utils.cpp_extension import get_default_build_root

    root = Path(os.environ.get("TORCH_EXTENSIONS_DIR") or get_default_build_root())
    now = time.time() if now is None else now
    found = []
    for lock in sorted([*root.glob("*/lock"), *root.glob("*/*/lock")]):
        try:
            age = now - lock.stat().st_mtime
        except FileNotFoundError:  # a build that ended just now
            continue
        if age > BUILD_LOCK_STALE_SECONDS:
            found.append((lock, age))
    return found


def launch_rank(env) -> int:
    """This process's rank as its launcher says before it joins (RANK; SLURM_PROCID for a task of an srun step of
    several; else 0, a process alone): the one that logs, reports errors and records the attempt."""
    if env.get("RANK", "").isdigit():
        return int(env["RANK"])
    if slurm.step_tasks(env) > 1 and env.get("SLURM_PROCID", "").isdigit():
        return int(env["SLURM_PROCID"])
    return 0


class DeviceMissing(slurm.LaunchError):
    rank_local = True  # only the ranks without a device find it: each reports it itself


def check_device(local_rank: int, visible: int) -> None:
    """Each rank uses the device numbered by its local rank (DeepSpeed sets it from LOCAL_RANK as well), so every
    rank of a node must see all of the node's devices: srun --gpus-per-task (one device per task, each numbered 0)
    does not fit."""
    if not 0 <= local_rank < visible:
        raise DeviceMissing(
            f"local rank {local_rank} has no device: this process sees {visible} (CUDA_VISIBLE_DEVICES or the "
            "scheduler's binding). Every rank of a node must see all its GPUs: with Slurm, ask --gpus-per-node, not "
            "--gpus-per-task or --gpu-bind; start as many ranks per node as it has GPUs"
        )


def leave_distributed() -> None:
    """Destroy the process group, if this process has one. A process that exits with its gloo group alive can
    abort at interpreter shutdown ("terminate called without an active exception", SIGABRT) after a run that
    finished well: gloo's worker threads outlive the interpreter. Destroying the group is local (no collective), so
    it is safe on every path, an error included. Runs once: build_trainer's close calls it, atexit backs it up."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
