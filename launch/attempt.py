"""How the last attempt at a run ended, and what to do next: for batch scripts and supervisors that restart runs.

    python launch/attempt.py check  --config X.yaml [overrides]          # the config is good: prints the run dir
    python launch/attempt.py decide --max-restarts 3 --config X.yaml [overrides]
    python launch/attempt.py status [--otherwise N] --config X.yaml [overrides]
    python launch/attempt.py show   runs/demo                            # the last record and every decision

`decide` runs once the attempt's processes have all ended (launch/slurm/pretrain.sbatch calls it after each srun):
it reads this attempt's record, <run_dir>/attempts/<id>.json (rank 0 writes it), appends its decision to
<run_dir>/attempts.jsonl, and prints one line, `<action><TAB><message>`, where the action is
  done     the run finished, or stopped at train.stop_at_step as asked
  requeue  it stopped after saving progress (a stop signal, train.max_wall_time, a launcher gone): run it again
  retry    it failed in a way another attempt may not (crash, killed, lost node, I/O error); given while no
           more than --max-restarts of this job's attempts in a row have failed without saving progress
  fatal    it failed in a way another attempt would repeat (bad configuration, data or checkpoint; non-finite
           steps; a run directory held by another job), or the restart limit is reached
With --cancelled (the job is being cancelled), `requeue` and `retry` become `done`.
`status` prints how this attempt ended and exits with launch/pretrain.py's exit status for it (0 finished, 3
stopped after saving, 2, 4, 5 or 1 failed: pretrain/errors.py), read from the record, so that a script behind a
launcher that reports 1 for all of them (torchrun) gets them apart; --otherwise N (default 1) when this attempt
left no record of its end. launch/torchrun.sh ends with it.
The attempt is the one of this Slurm job and restart count (or PRETRAIN_ATTEMPT_ID; without either, the newest
record). The arguments after the subcommand's own options are launch/pretrain.py's, all of them accepted.
Exit status (check, decide): 0 (whatever the decision), 2 bad configuration, 1 an error.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `pretrain` is the package, not a script

from pretrain.config import ConfigError  # noqa: E402


def run_dir_of(args) -> Path:
    """train.run_dir of the launch/pretrain.py arguments (parsed by that script's own parser)."""
    import importlib.util

    from pretrain.config import load_config

    spec = importlib.util.spec_from_file_location("pretrain_entry", Path(__file__).with_name("pretrain.py"))
    entry = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(entry)
    parsed = entry.parse_args(args.pretrain_args)
    if not parsed.config:
        raise ConfigError("give --config <file> (and overrides), as for launch/pretrain.py")
    return Path(load_config(parsed.config, parsed.overrides).train.run_dir)


def cmd_check(args) -> int:
    print(run_dir_of(args))
    return 0


def cmd_decide(args) -> int:
    from pretrain.attempt import decide

    run_dir = run_dir_of(args)
    run_dir.mkdir(parents=True, exist_ok=True)
    print(decide(run_dir, max_restarts=args.max_restarts, cancelled=args.cancelled).line(), flush=True)
    return 0


def cmd_status(args) -> int:
    from pretrain.attempt import RUNNING, attempt_id, read_record, record_path, records

    run_dir, me = run_dir_of(args), attempt_id(os.environ)
    record = read_record(record_path(run_dir, me)) if me else (records(run_dir) or [None])[-1]
    if record is None or record.state == RUNNING:
        print(f"{run_dir}: this attempt left no record of how it ended (killed?): exit status {args.otherwise}")
        return args.otherwise
    how = f": {record.message}" if record.message else ""
    print(f"{run_dir}: {record.state} (exit status {record.exit_status}){how}")
    return record.exit_status


def cmd_show(args) -> int:
    from pretrain.attempt import history, records

    for r in records(Path(args.run)):
        ended = f"{r.state} {r.ended} (exit status {r.exit_status})" if r.ended else r.state
        print(f"{r.attempt}: started {r.started} on {r.host} at step {r.start_step}, {ended}; saved step "
              f"{r.saved_step}{': ' + r.message if r.message else ''}")  # fmt: skip
    for d in history(Path(args.run)):
        print(f"{d.get('when')}  {d.get('attempt')}  {d.get('action'):<8} {d.get('message')}")
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n")[0], epilog=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = p.add_subparsers(dest="cmd", required=True)
    for name, fn in (("check", cmd_check), ("decide", cmd_decide), ("status", cmd_status)):
        s = sub.add_parser(name, help="then launch/pretrain.py's arguments: --config X.yaml [overrides]")
        s.set_defaults(fn=fn)
        if name == "decide":
            s.add_argument("--max-restarts", type=int, default=3, help="failed attempts in a row retried")
            s.add_argument("--cancelled", action="store_true", help="the job is being cancelled: never run it again")
        if name == "status":
            s.add_argument("--otherwise", type=int, default=1, help="the status when the attempt left no record")
    s = sub.add_parser("show")
    s.add_argument("run")
    s.set_defaults(fn=cmd_show)
    args, args.pretrain_args = p.parse_known_args(argv)

    from pretrain.errors import run_tool

    return run_tool(args.fn, args)


if __name__ == "__main__":
    sys.exit(main())
