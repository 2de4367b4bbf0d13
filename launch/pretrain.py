"""Pretrain a model: the main entry point.

    deepspeed --num_gpus 2 launch/pretrain.py --config launch/configs/demo.yaml train.max_steps=200
    torchrun --nproc_per_node 2 launch/pretrain.py --config launch/configs/demo.yaml
    python launch/pretrain.py --config launch/configs/demo.yaml          # one process

Arguments after the config are dotted overrides (`section.key=value`, values parsed as YAML).
Exit status: 0 done, 2 bad configuration or data (the message names the key), 1 anything else.
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


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    setup_logging()
    try:
        cfg = load_config(args.config, args.overrides)
        from pretrain.trainer import Trainer  # imports torch and DeepSpeed: after the config is known to be good

        trainer = Trainer(cfg)
        trainer.fit()
        if args.sample_prompt:
            text = trainer.sample(args.sample_prompt)
            if trainer.rank == 0:
                print(f"\n--- greedy continuation of {args.sample_prompt!r}:\n{args.sample_prompt}{text}\n", flush=True)
    except (ConfigError, DataError, FileNotFoundError) as e:
        if os.environ.get("RANK", "0") == "0":
            print(f"error: {e}", file=sys.stderr)
        return EXIT_CONFIG
    return 0


if __name__ == "__main__":
    sys.exit(main())
