"""Inspect and convert the checkpoints of a run.

    python launch/checkpoints.py list runs/demo                       # every checkpoint: step, size, validity
    python launch/checkpoints.py list runs/demo --checksums           # ... verifying every checksum as well
    python launch/checkpoints.py consolidate runs/demo --output model.pt [--tag step_00000300]
    python launch/checkpoints.py universal runs/demo [--tag step_00000300]
    python launch/checkpoints.py set-aside runs/demo                  # start the run directory over
    python launch/checkpoints.py rewind runs/demo --to step_00001000  # go back to a checkpoint (e.g. a loss spike)

`consolidate` writes the model's full fp32 state dict (one file, torch.save; DeepSpeed's zero_to_fp32 for ZeRO
checkpoints) from the newest valid checkpoint or --tag, for export and evaluation. `universal` converts a ZeRO
checkpoint to DeepSpeed's universal format next to it (<tag>.universal/); resuming on another number of ranks does
this by itself. Both refuse a checkpoint holding a pickle that would call anything our saves do not contain.
`set-aside` moves a run's checkpoints, metrics.jsonl, TensorBoard logs, config.yaml and ds_config.json to
<run_dir>/previous/<UTC time>/ (renames: nothing is copied or deleted), so that the next run starts from step 0;
it holds the run directory's lock while it does (refused, status 5, while a job runs there). `rewind` moves the
checkpoints after --to to <run_dir>/previous/<UTC time>/checkpoints/ (renames) and points `latest` at --to, so the
next attempt resumes there (add `data.skip_samples` to leave out what made a spike); same lock.
Exit status: 0 done (`list`: every checkpoint valid); 1 an error, or `list` found no checkpoint, an invalid one or
a `latest` that names none.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `pretrain` is the package, not a script


def ckpt_dir(run: str) -> Path:
    from pretrain.checkpoint import checkpoints_of

    return checkpoints_of(run)


def cmd_list(args) -> int:
    from pretrain import checkpoint

    listed = checkpoint.list_checkpoints(ckpt_dir(args.run), checksums=args.checksums)
    if not listed:
        print(f"{ckpt_dir(args.run)}: no checkpoints")
        return 1
    pointer = checkpoint.read_latest(ckpt_dir(args.run))
    print(f"{'tag':<16} {'step':>9} {'size':>10}  state")
    for c in listed:
        mark = " (latest)" if c.tag == pointer else ""
        print(
            f"{c.tag:<16} {c.step:>9,} {c.bytes / 2**20:>8.1f} MiB  {'valid' if c.problem is None else c.problem}{mark}"
        )
    dangling = pointer is not None and pointer not in {c.tag for c in listed}
    if dangling:
        print(f"latest names {pointer!r}, which is not a checkpoint here")
    invalid = sum(c.problem is not None for c in listed)
    if invalid:
        print(f"{invalid} of {len(listed)} checkpoint(s) invalid")
    return 1 if invalid or dangling else 0


def cmd_consolidate(args) -> int:
    import torch

    from pretrain import checkpoint
    from pretrain.fileutil import commit, tmp_name

    src = ckpt_dir(args.run)
    tag = args.tag or checkpoint.newest_valid(src)
    if tag is None:
        print(f"error: {src}: no valid checkpoint", file=sys.stderr)
        return 1
    problem = checkpoint.validate(src, tag)
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return 1
    try:
        state = checkpoint.consolidate(src, tag)
    except checkpoint.CheckpointError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    torch.save(state, tmp_name(out))
    commit(tmp_name(out), out)
    n = sum(t.numel() for t in state.values())
    print(f"{src / tag} -> {out}: {len(state)} tensors, {n:,} parameters (fp32)")
    return 0


def cmd_universal(args) -> int:
    from pretrain import checkpoint

    src = ckpt_dir(args.run)
    tag = args.tag or checkpoint.newest_valid(src)
    problem = checkpoint.validate(src, tag) if tag else f"{src}: no valid checkpoint"
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return 1
    try:
        if checkpoint.read_meta(src, tag).zero_stage == 0:
            print(
                f"error: {src / tag} has no ZeRO states (ZeRO-0): it loads on any number of ranks as it is",
                file=sys.stderr,
            )
            return 1
        out = checkpoint.to_universal(src, tag)
    except checkpoint.CheckpointError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"{src / tag} -> {out}")
    return 0


def locked(args, work, failed: str):
    """`work(run_dir)` holding the run directory's lock: (its result, None), or (None, the exit status) after
    printing why it could not run (`failed` prefixes an OSError's message)."""
    from pretrain.checkpoint import CheckpointError
    from pretrain.errors import RunDirBusy, exit_code
    from pretrain.job import RunLock

    run_dir = Path(args.run)
    if not run_dir.is_dir():
        print(f"error: {run_dir}: no such run directory", file=sys.stderr)
        return None, 1
    try:
        with RunLock(run_dir, stale_after=args.lock_stale_seconds):
            return work(run_dir), None
    except RunDirBusy as e:
        print(f"error: {e}", file=sys.stderr)
        return None, exit_code(e)
    except CheckpointError as e:
        print(f"error: {e}", file=sys.stderr)
        return None, 1
    except OSError as e:
        print(f"error: {run_dir}: {failed}: {e}", file=sys.stderr)
        return None, 1


def cmd_set_aside(args) -> int:
    from pretrain.build import set_aside

    moved, status = locked(args, set_aside, "could not move the earlier run aside")
    if status is not None:
        return status
    run_dir = args.run
    print(f"{run_dir}: nothing to set aside" if moved is None else f"{run_dir}: the earlier run is now in {moved}")
    return 0


def cmd_rewind(args) -> int:
    from pretrain.build import rewind

    result, status = locked(args, lambda run_dir: rewind(run_dir, args.to), "could not rewind")
    if status is not None:
        return status
    dest, moved = result
    print(f"{args.run}: resumes from {args.to}" + (f"; {', '.join(moved)} moved to {dest}" if moved else ""))
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n")[0], epilog=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = p.add_subparsers(dest="command", required=True)
    ls = sub.add_parser("list", help="list checkpoints with step, size and validity")
    ls.add_argument("run", help="run directory (or its checkpoints/ directory)")
    ls.add_argument("--checksums", action="store_true", help="verify the checksum of every file (reads everything)")
    co = sub.add_parser("consolidate", help="write one fp32 state dict")
    co.add_argument("run", help="run directory (or its checkpoints/ directory)")
    co.add_argument("--tag", help="checkpoint tag (default: the newest valid one)")
    co.add_argument("--output", required=True, help="file to write (torch.save of the state dict)")
    un = sub.add_parser("universal", help="convert a ZeRO checkpoint to DeepSpeed's universal format")
    un.add_argument("run", help="run directory (or its checkpoints/ directory)")
    un.add_argument("--tag", help="checkpoint tag (default: the newest valid one)")
    sa = sub.add_parser("set-aside", help="move a run's outputs to <run_dir>/previous/<time>/ to start it over")
    sa.add_argument("run", help="run directory")
    sa.add_argument(
        "--lock-stale-seconds", type=float, default=300, help="as train.lock_stale_seconds of the run (default 300)"
    )
    rw = sub.add_parser("rewind", help="go back to a checkpoint: later ones move to <run_dir>/previous/<time>/")
    rw.add_argument("run", help="run directory")
    rw.add_argument("--to", required=True, help="the checkpoint tag to resume from (e.g. step_00001000)")
    rw.add_argument(
        "--lock-stale-seconds", type=float, default=300, help="as train.lock_stale_seconds of the run (default 300)"
    )
    args = p.parse_args(argv)
    commands = {
        "rewind": cmd_rewind,
        "list": cmd_list,
        "consolidate": cmd_consolidate,
        "universal": cmd_universal,
        "set-aside": cmd_set_aside,
    }
    return commands[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
