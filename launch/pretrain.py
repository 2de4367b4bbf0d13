"""Pretrain a model: the main entry point.

    deepspeed --num_gpus 2 launch/pretrain.py --config launch/configs/demo.yaml train.max_steps=200
    torchrun --nproc_per_node 2 launch/pretrain.py --config launch/configs/demo.yaml
    python launch/pretrain.py --config launch/configs/demo.yaml          # one process

Arguments after the config are dotted overrides (`section.key=value`, values parsed as YAML).
Exit status: 0 done; 3 stopped early by a stop signal (SIGTERM, SIGUSR1) or train.max_wall_time, after saving a
checkpoint: run the same command again to resume; 2 bad configuration, data or checkpoint (the message names the
key or file); 4 stopped after train.max_bad_steps consecutive steps with non-finite loss or gradients (each
skipped; the last good checkpoint is untouched); 1 anything else.
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

from pretrain.config import ConfigError, load_config  # noqa: E402
from pretrain.data import DataError  # noqa: E402

EXIT_CONFIG = 2
EXIT_STOPPED = 3


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n")[0], epilog=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--config", help="run config YAML (launch/configs/*.yaml)")
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)  # set by deepspeed
    p.add_argument("--sample-prompt", default=None, help="after training, print a greedy continuation of this prompt")
    p.add_argument("overrides", nargs="*", help="section.key=value")
    return p.parse_intermixed_args(argv)


def setup_logging() -> None:
    rank0 = os.environ.get("RANK", "0") == "0"
    logging.basicConfig(
        level=logging.INFO if rank0 else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", category=FutureWarning, module="torch.distributed")


def fail(e: Exception) -> int:
    if os.environ.get("RANK", "0") == "0":
        print(f"error: {e}", file=sys.stderr)
    return EXIT_CONFIG


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    setup_logging()
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as e:
        return fail(e)
    # torch and DeepSpeed are imported only once the config is known to be good
    from pretrain.checkpoint import CheckpointError
    from pretrain.trainer import EXIT_NON_FINITE, NonFinite, Stopped, Trainer

    try:
        trainer = Trainer(cfg)
        trainer.fit()
    except Stopped:
        return EXIT_STOPPED
    except NonFinite as e:
        if os.environ.get("RANK", "0") == "0":
            print(f"error: {e}", file=sys.stderr)
        return EXIT_NON_FINITE
    except (ConfigError, DataError, CheckpointError, FileNotFoundError) as e:
        return fail(e)
    if args.sample_prompt:
        text = trainer.sample(args.sample_prompt)
        if trainer.rank == 0:
            print(f"\n--- greedy continuation of {args.sample_prompt!r}:\n{args.sample_prompt}{text}\n", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
