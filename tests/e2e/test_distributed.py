"""The process group's life in real 2-rank processes: joined by init_distributed, left cleanly at exit."""

import contextlib
import os
import signal
import subprocess
import sys

from pretrain.distributed import SHM_DIR

from ..helpers import REPO, free_port, run_env

RANK_SCRIPT = """
import sys, torch, torch.distributed as dist
from pretrain.distributed import init_distributed, leave_distributed
world = init_distributed()
x = torch.ones(4096)
for _ in range(20):
    dist.all_reduce(x)
assert world.broadcast({"from": world.rank})["from"] == 0 and world.max(world.rank) == 1
if sys.argv[1] == "explicit":
    leave_distributed()
    assert not dist.is_initialized()
    leave_distributed()  # a second call (and the one at exit) does nothing
"""


@contextlib.contextmanager
def two_ranks(script: str, *args: str, port: int | None = None, **env):
    """Two processes running `script` as ranks 0 and 1 of a group on this machine (stdin, stdout as pipes); those
    still alive at the end are killed, so a failing test leaves no rank behind (nor a DeepSpeed op build)."""
    env = {**run_env(), **env, "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port or free_port())}
    ranks = [
        subprocess.Popen(
            [sys.executable, "-c", script, *args],
            cwd=REPO,
            env={**env, "RANK": str(r), "LOCAL_RANK": str(r)},
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        )
        for r in range(2)
    ]
    try:
        yield ranks
    finally:
        for p in ranks:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
            p.wait()


def test_ranks_exit_cleanly():
    """A gloo group still alive at interpreter shutdown made about one exit in six abort ("terminate called without
    an active exception", SIGABRT) after a run that had finished well; leave_distributed (called by the trainer's
    close, and at exit as a backstop) destroys it first. Eight pairs of ranks, both ways of leaving."""
    for round in range(8):
        how = "explicit" if round % 2 else "at exit"
        with two_ranks(RANK_SCRIPT, how) as ranks:
            for r, p in enumerate(ranks):
                out = p.communicate(timeout=120)[0]
                assert p.returncode == 0 and "terminate called" not in out, (
                    f"round {round} ({how}) rank {r}:\n{out[-2000:]}"
                )


HOLD_SCRIPT = """
import sys
from pretrain.distributed import init_distributed, shm_workspace
world = init_distributed()
world.barrier()  # every rank has released its own
maps = open("/proc/self/maps").read()
mapped = [r for r in range(world.size) if f"{shm_workspace(r)} (deleted)" in maps]
print("mapped", mapped, flush=True)
sys.stdin.read()  # held until killed
"""


def test_shm_workspaces_are_released_even_when_the_ranks_are_killed():
    """DeepSpeed's CPU backend gives each rank of a one-machine group (LOCAL_SIZE = WORLD_SIZE, as its launcher sets)
    a 66 MB segment in /dev/shm and never removes it (320 of them once held 21 GB of this 23 GB machine).
    Ranks killed with SIGKILL right after joining still leave nothing, while each had mapped both segments."""
    port = free_port()
    with two_ranks(HOLD_SCRIPT, port=port, LOCAL_SIZE="2") as ranks:
        for r, p in enumerate(ranks):
            out = []
            for line in p.stdout:  # until the rank has joined (its DeepSpeed and deprecation chatter before)
                out.append(line)
                if line.startswith("mapped"):
                    break
            assert out[-1] == "mapped [0, 1]\n", f"rank {r}:\n{''.join(out)[-2000:]}"
    assert sorted(SHM_DIR.glob(f"deepspeed_allreduce_buffer_*_{port}_*")) == []
