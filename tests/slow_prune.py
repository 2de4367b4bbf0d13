"""launch/pretrain.py with checkpoint retention (rank 0's work after every save) slowed down by SLOW_PRUNE_SECONDS,
as on a large run's parallel file system: for tests of what launchers do to rank 0 while it is still finishing a
save that the other ranks are done with.

    torchrun --nproc_per_node 2 tests/slow_prune.py --config ...      # the arguments of launch/pretrain.py
"""

import os
import runpy
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from pretrain import checkpoint  # noqa: E402

_prune = checkpoint.prune


def slow_prune(*args, **kwargs):
    time.sleep(float(os.environ.get("SLOW_PRUNE_SECONDS", "6")))
    return _prune(*args, **kwargs)


checkpoint.prune = slow_prune
sys.argv = [str(REPO / "launch/pretrain.py"), *sys.argv[1:]]
runpy.run_path(sys.argv[0], run_name="__main__")
