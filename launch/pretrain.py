"""Pretrain a model: the main entry point.

    deepspeed --num_gpus 2 launch/pretrain.py --config launch/configs/demo.yaml train.max_steps=200
    torchrun --nproc_per_node 2 launch/pretrain.py --config launch/configs/demo.yaml
    srun -N2 --ntasks-per-node=8 python launch/pretrain.py --config ...  # each Slurm task joins as a rank
    python launch/pretrain.py --config launch/configs/demo.yaml          # one process
    sbatch launch/slurm/pretrain.sbatch --config ...                     # a Slurm job that requeues itself

Arguments after the config are dotted overrides (`section.key=value`, values parsed as YAML).
Exit status: 0 done; 3 stopped early by a stop signal (SIGTERM, SIGUSR1), train.max_wall_time, train.stop_at_step
or a launcher that went away, after saving a checkpoint: run the same command again to resume; 2 bad
configuration, data or checkpoint (the message names the key or file); 4 stopped after train.max_bad_steps
consecutive steps with non-finite loss or gradients (each skipped; the last good checkpoint is untouched); 5 the
run directory is held by another job that is still running (the message names it); 1 anything else (an I/O error
included).
(The table is pretrain/errors.py.) Rank 0 also records how the attempt ended in <run_dir>/attempts/<id>.json, which
launch/attempt.py reads for scripts behind launchers that report 1 for every non-zero status (torchrun).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import warnings
from pathlib import Path

# The repo root first: `import pretrain` must find the package, not this script (and works without installing).
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pretrain.config import load_config  # noqa: E402
from pretrain.distributed import launch_rank  # noqa: E402
from pretrain.errors import EXIT_OK, RunError, Stopped, exit_code  # noqa: E402


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n")[0], epilog=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--config", help="run config YAML (launch/configs/*.yaml)")
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)  # set by deepspeed
    p.add_argument("--sample-prompt", default=None, help="after training, print a greedy continuation of this prompt")
    p.add_argument("overrides", nargs="*", help="section.key=value")
    return p.parse_intermixed_args(argv)


def is_rank0() -> bool:
    return launch_rank(os.environ) == 0


def setup_logging() -> None:
    logging.basicConfig(
        level=logging.INFO if is_rank0() else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", category=FutureWarning, module="torch.distributed")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    setup_logging()
    try:
        cfg = load_config(args.config, args.overrides)
        # torch and DeepSpeed are imported only once the config is known to be good
        from pretrain.build import build_trainer

        with build_trainer(cfg) as trainer:
            trainer.fit()
            if args.sample_prompt:
                sample(trainer, cfg, args.sample_prompt)
    except Stopped as e:
        return e.exit_code  # the loop has said why
    except RunError as e:
        if is_rank0():
            print(f"error: {e}", file=sys.stderr)
        elif e.rank_local:  # rank 0 may not know it
            print(f"error: rank {launch_rank(os.environ)}: {e}", file=sys.stderr)
        return exit_code(e)
    except OSError as e:  # the disk, the network file system, a file removed under the run: not the config
        print(f"error: rank {launch_rank(os.environ)}: I/O error: {e}", file=sys.stderr)
        return exit_code(e)
    return EXIT_OK


def sample(trainer, cfg, prompt: str) -> None:
    """Print a greedy continuation of `prompt` from the trained model (every rank takes part under ZeRO-3)."""
    from pretrain.generate import continue_text
    from pretrain.tokenizer import Tokenizer

    engine = trainer.engine
    text = continue_text(engine.module, Tokenizer(cfg.data.tokenizer), prompt, forward=engine.logits)
    if trainer.world.is_main:
        print(f"\n--- greedy continuation of {prompt!r}:\n{prompt}{text}\n", flush=True)


if __name__ == "__main__":
    sys.exit(main())
