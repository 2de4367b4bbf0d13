"""Fixtures shared by every test: a small tokenizer trained once on the demo corpus, real documents, tiny datasets.
Helpers to import (runners, readers) are in tests/helpers.py.

Tests under tests/e2e/ are marked `e2e` (real training runs in separate processes, most with 2 ranks over gloo);
the rest are fast unit tests: `pytest -m "not e2e"` runs them alone."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from data_prep.corpora import sotu_dir

from .helpers import tokenize

E2E = Path(__file__).resolve().parent / "e2e"


# DeepSpeed compiles its CPU ops (the shared-memory all-reduce every process group builds, the CPU Adam of ZeRO
# offload) the first time a process needs them: 40 and 55 s on 2 cores, more under load. Built here once, in one
# process, before the end-to-end tests, so that no run started under a timeout pays for it (5 s once built), and into
# this venv's own folder (clones side by side would otherwise rebuild each other's ops in ~/.cache/torch_extensions).
BUILD_OPS = """
from deepspeed.accelerator import get_accelerator
if get_accelerator().device_name() == "cpu":
    for name in ("ShareMemCommBuilder", "CPUAdamBuilder"):
        get_accelerator().create_op_builder(name).load(verbose=False)
"""


def pytest_configure(config):
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(Path(sys.prefix) / "torch_extensions"))


def pytest_collection_modifyitems(config, items):
    for item in items:
        if E2E in Path(item.fspath).parents:
            item.add_marker(pytest.mark.e2e)


def pytest_collection_finish(session):
    if any(item.get_closest_marker("e2e") for item in session.items):
        try:
            built = subprocess.run([sys.executable, "-c", BUILD_OPS], capture_output=True, text=True, timeout=900)
        except subprocess.TimeoutExpired:
            from pretrain.distributed import stale_build_locks

            locks = [str(lock) for lock, _ in stale_build_locks()]
            pytest.exit(f"DeepSpeed's CPU ops did not build in 15 min; stale build locks: {locks}", 3)
        if built.returncode != 0:
            pytest.exit(f"DeepSpeed's CPU ops did not build:\n{(built.stdout + built.stderr)[-4000:]}", returncode=3)


@pytest.fixture(scope="session")
def speeches() -> list[Path]:
    return sorted(sotu_dir().glob("*.txt"))


@pytest.fixture(scope="session")
def tokenizer_path(tmp_path_factory, speeches) -> Path:
    from data_prep import train_tokenizer

    out = tmp_path_factory.mktemp("tok") / "sp"
    code = train_tokenizer.main(
        [str(p) for p in speeches[:60]] + ["--output", str(out), "--vocab-size", "2000", "--quiet"]
    )
    assert code == 0
    return out.with_suffix(".model")


@pytest.fixture(scope="session")
def tokenizer(tokenizer_path):
    from pretrain.tokenizer import Tokenizer

    return Tokenizer(tokenizer_path)


@pytest.fixture(scope="session")
def tiny_dataset(tmp_path_factory, speeches, tokenizer_path) -> Path:
    """Shards of 40 speeches (about 0.5M tokens with the 2000-piece tokenizer), 5% held out."""
    out = tmp_path_factory.mktemp("data") / "sotu40"
    assert tokenize(speeches[:40], out, tokenizer_path, "--val-fraction", "0.05", "--shard-tokens", "100000") == 0
    return out


@pytest.fixture(scope="session")
def second_dataset(tmp_path_factory, speeches, tokenizer_path) -> Path:
    """Shards of 30 later speeches, for blends."""
    out = tmp_path_factory.mktemp("data2") / "sotu_late"
    assert tokenize(speeches[200:230], out, tokenizer_path, "--val-fraction", "0.05", "--shard-tokens", "50000") == 0
    return out


@pytest.fixture(scope="session")
def world():
    """A process group of one in the test process, for in-process tests of the engine and the checkpoint manager.
    (Runs launched by tests/helpers.py get an environment without its RANK, MASTER_PORT, ...)."""
    from pretrain.distributed import init_distributed

    return init_distributed()


@pytest.fixture
def ds_json(tmp_path):
    """A ds_configs-style JSON for a ZeRO stage: ds_json(stage) -> its path."""

    def make(stage: int):
        path = tmp_path / f"zero{stage}.json"
        path.write_text(json.dumps({"zero_optimization": {"stage": stage}}))
        return str(path)

    return make


@pytest.fixture(scope="session")
def slurm(tmp_path_factory):
    """A live 2-node Slurm cluster on this machine (tests/slurm_cluster.py); Slurm is installed with apt when it is
    missing and this is root, else the tests that use it are skipped, saying why."""
    from .slurm_cluster import SlurmCluster, ensure_installed

    reason = ensure_installed()
    if reason:
        pytest.skip(reason)
    cluster = SlurmCluster.start(tmp_path_factory.mktemp("slurm"))
    yield cluster
    cluster.stop()


@pytest.fixture
def tiny_run(tmp_path, world, ds_json, tokenizer_path):
    """A run directory with one checkpoint (step 2, ZeRO-0) of a tiny model trained in this process for 2 steps:
    (run_dir, engine); `engine.module` holds the weights saved."""
    from .helpers import save_tiny_run

    return save_tiny_run(tmp_path / "run", ds_json(0), tokenizer_path)
