"""How the last attempt at a run ended, and what to do next: for batch scripts and supervisors that restart runs.

    python launch/attempt.py check  --config X.yaml [overrides]          # the config is good: prints the run dir
    python launch/attempt.py decide --config X.yaml [overrides] --max-restarts 3
    python launch/attempt.py status --config X.yaml [overrides] [--otherwise N]
    python launch/attempt.py show   runs/demo                            # the last record and every decision

`decide` runs once the attempt's processes have all ended (launch/slurm/pretrain.sbatch calls it after each srun):
it reads <run_dir>/attempt.json, which rank 0 wrote, appends its decision to <run_dir>/attempts.jsonl, and prints
one line, `<action><TAB><message>`, where the action is
  done     the run finished, or stopped at train.stop_at_step as asked
  requeue  it stopped after saving progress (a stop signal, train.max_wall_time, a launcher gone): run it again
  retry    it failed in a way another attempt may not (crash, killed, lost node, I/O error); given while fewer
           than --max-restarts + 1 attempts in a row have failed
  fatal    it failed in a way another attempt would repeat (bad configuration, data or checkpoint; non-finite
           steps; a run directory held by another job), or the restart limit is reached
With --cancelled (the job is being cancelled), `requeue` and `retry` become `done`.
`status` prints how this attempt ended and exits with launch/pretrain.py's exit status for it (0 finished, 3
stopped after saving, 2, 4, 5 or 1 failed: pretrain/errors.py), read from the record, so that a script behind a
launcher that reports 1 for all of them (torchrun) gets them apart; --otherwise N (default 1) when this attempt
left no record of its end. launch/torchrun.sh ends with it.
The attempt is the one of this Slurm job and restart count (or PRETRAIN_ATTEMPT_ID); a record left by another
attempt counts as none. Exit status (check, decide): 0 (whatever the decision), 2 bad configuration, 1 an error.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `pretrain` is the package, not a script


def run_dir_of(args) -> Path:
    from pretrain.config import load_config

    return Path(load_config(args.config, args.overrides).train.run_dir)


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
    from pretrain.attempt import RUNNING, attempt_id, read_record

    run_dir = run_dir_of(args)
    record, me = read_record(run_dir), attempt_id(os.environ)
    if record is None or (me is not None and record.attempt != me) or record.state == RUNNING:
        print(f"{run_dir}: this attempt left no record of how it ended (killed?): exit status {args.otherwise}")
        return args.otherwise
    print(
        f"{run_dir}: {record.state} (exit status {record.exit_status}){': ' + record.message if record.message else ''}"
    )
    return record.exit_status


def cmd_show(args) -> int:
    from pretrain.attempt import history, read_record

    record = read_record(Path(args.run))
    print(json.dumps(record.__dict__ if record else None, indent=2))
    for d in history(Path(args.run)):
        print(f"{d.get('when')}  {d.get('attempt')}  {d.get('action'):<8} {d.get('message')}")
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n")[0], epilog=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = p.add_subparsers(dest="cmd", required=True)
    for name, fn in (("check", cmd_check), ("decide", cmd_decide), ("status", cmd_status)):
        s = sub.add_parser(name)
        s.add_argument("--config", required=True)
        s.add_argument("overrides", nargs="*", help="section.key=value, as for launch/pretrain.py")
        s.set_defaults(fn=fn)
        if name == "decide":
            s.add_argument("--max-restarts", type=int, default=3, help="failed attempts retried in a row")
            s.add_argument("--cancelled", action="store_true", help="the job is being cancelled: never run it again")
        if name == "status":
            s.add_argument("--otherwise", type=int, default=1, help="the status when the attempt left no record")
    s = sub.add_parser("show")
    s.add_argument("run")
    s.set_defaults(fn=cmd_show)
    args = p.parse_args(argv)

    from pretrain.errors import run_tool

    return run_tool(args.fn, args)


if __name__ == "__main__":
    sys.exit(main())
