"""The hosts of a Slurm allocation, for launch scripts.

    python launch/slurm/hosts.py head                          # address of the job's first node
    python launch/slurm/hosts.py rendezvous                    # <head address>:<port of this job> for torchrun
    python launch/slurm/hosts.py hostfile hostfile.txt --slots 8
    deepspeed --hostfile hostfile.txt launch/pretrain.py --config ...

`head` prints an address the other nodes reach the first node of SLURM_JOB_NODELIST at: its name when that
resolves, else the node's NodeAddr from `scontrol show node`; `rendezvous` adds a port every node of the job
computes alike (from SLURM_JOB_ID; MASTER_PORT if set). `hostfile` writes DeepSpeed's hostfile (`<host>
slots=<n>` per node of SLURM_JOB_NODELIST, in order; slots default to SLURM_GPUS_ON_NODE, else 1), atomically.
Both take --nodelist to use another list. Exit status: 0 done, 2 no or unreadable node list, 1 an error.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # `pretrain` is the package, not a script

from pretrain import slurm  # noqa: E402
from pretrain.errors import run_tool  # noqa: E402
from pretrain.fileutil import write_bytes_atomic  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n")[0], epilog=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("what", choices=["head", "rendezvous", "hostfile"])
    p.add_argument("output", nargs="?", help="hostfile: where to write it")
    p.add_argument("--slots", type=int, default=None, help="ranks per node (default: SLURM_GPUS_ON_NODE, else 1)")
    p.add_argument("--nodelist", default=os.environ.get("SLURM_JOB_NODELIST"), help="default: SLURM_JOB_NODELIST")
    args = p.parse_args(argv)
    if not args.nodelist:
        print("error: no node list: run inside a Slurm job or give --nodelist", file=sys.stderr)
        return 2
    return run_tool(answer, args, p)


def answer(args, p: argparse.ArgumentParser) -> int:
    if args.what in ("head", "rendezvous"):
        head = slurm.head_address(args.nodelist)
        port = os.environ.get("MASTER_PORT") or slurm.step_port(os.environ)
        print(head if args.what == "head" else f"{head}:{port}")
        return 0
    if not args.output:
        p.error("hostfile: give the file to write")
    gpus = os.environ.get("SLURM_GPUS_ON_NODE", "")
    slots = args.slots or (int(gpus) if gpus.isdigit() and int(gpus) > 0 else 1)
    write_bytes_atomic(Path(args.output), slurm.hostfile(args.nodelist, slots).encode())
    return 0


if __name__ == "__main__":
    sys.exit(main())
