"""How a run ends: the exception kinds the library raises, each with the exit status `launch/pretrain.py` returns.

The one table of exit statuses; launchers, Slurm scripts and tests ask it:
  0  done
  1  anything else (a bug, a crash, an I/O error such as a full disk or a file removed under the run, a launcher
     that went away before a save could finish)
  2  bad configuration, data or checkpoint (the message names the key or file): what the library checked and
     raised as BadInput, never a bare operating-system error during the run
  3  stopped early after saving a checkpoint (stop signal, train.max_wall_time, train.stop_at_step, a launcher
     that went away): run the same command again to resume
  4  too many consecutive non-finite steps (the last good checkpoint is left as it was)
  5  the run directory belongs to another job that is still alive (the message names it), or this run's lock was
     taken over by another job (its heartbeat had stopped for train.lock_stale_seconds)
  128 + N  stop signal N's train.stop_grace_seconds ran out before the run could save and exit (as a shell
     reports a process killed by signal N)
"""

from __future__ import annotations

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_BAD_INPUT = 2
EXIT_STOPPED = 3
EXIT_NON_FINITE = 4
EXIT_BUSY = 5


class RunError(Exception):
    """An expected way for a run to end early; `exit_code` is what the entry point returns for it. Most are raised
    on every rank alike (rank 0 reports them); `rank_local` ones are found by one rank on its own, which reports
    them itself."""

    exit_code = EXIT_FAILED
    rank_local = False


class BadInput(RunError):
    """A configuration key, dataset or checkpoint this run cannot use; the message names it."""

    exit_code = EXIT_BAD_INPUT


class Stopped(RunError):
    """The run stopped early after saving a checkpoint; `why` names the cause (signal, wall_time, at_step,
    launcher_gone)."""

    exit_code = EXIT_STOPPED

    def __init__(self, message: str, why: str = "signal"):
        super().__init__(message)
        self.why = why


class NonFinite(RunError):
    """The run stopped because the loss or gradients stayed non-finite."""

    exit_code = EXIT_NON_FINITE


class RunDirBusy(RunError):
    """Another job, still alive, holds the run directory."""

    exit_code = EXIT_BUSY


class LauncherGone(RunError):
    """The launcher that started this rank is gone and there was no time left to save."""

    exit_code = EXIT_FAILED


def exit_code(error: BaseException) -> int:
    """The exit status for an exception that ended a run."""
    return error.exit_code if isinstance(error, RunError) else EXIT_FAILED


def run_tool(body, *args) -> int:
    """A command-line tool's body, run: its exit status, or that of the RunError or OSError it raised, reported on
    stderr as `error: ...` (no traceback: the message names the key, file or node)."""
    import sys

    try:
        return body(*args)
    except RunError as e:
        print(f"error: {e}", file=sys.stderr)
        return exit_code(e)
    except OSError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_FAILED
