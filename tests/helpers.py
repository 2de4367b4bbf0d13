"""Helpers shared by the tests: text that is easy to get wrong, tiny datasets, real runs of the entry point,
and reading back what a run wrote. Fixtures live in conftest.py; everything importable lives here."""

from __future__ import annotations

import dataclasses
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

# Text that is easy to get wrong: leading/trailing/multiple spaces, tabs, CR/LF, digits, accents, CJK, emoji,
# control characters, a byte-order mark.
TRICKY = [
    "  two leading spaces and a trailing one ",
    "tabs\tand\r\nwindows line ends\r\n",
    "\n\nstarts with blank lines",
    "digits 0123456789 and 3.14159 and 1,000,000",
    "naïve café, Straße, Ελληνικά, русский, 日本語のテキスト, 한국어",
    "emoji 🙂🚀 and symbols ∑∫√ ™ ©",
    "control \x00 \x07 \x7f characters",
    "\ufeffbyte order mark",
    "x",
]


# ----------------------------------------------------------------------------------------------- data
def write_jsonl(path: Path, texts: list[str], field: str = "text") -> Path:
    path.write_text("".join(json.dumps({field: t, "id": i}) + "\n" for i, t in enumerate(texts)), encoding="utf-8")
    return path


def tokenize(inputs, out: Path, tokenizer_path: Path, *extra: str) -> int:
    """`data_prep tokenize` in process; returns its exit status."""
    from data_prep import tokenize_corpus

    argv = [str(p) for p in inputs] + ["--tokenizer", str(tokenizer_path), "--output", str(out), "--quiet", *extra]
    return tokenize_corpus.main(argv)


def dataset_files(out: Path) -> dict[str, bytes]:
    """Every shard file and the manifest of a dataset, by relative path."""
    files = sorted(p for p in out.rglob("*") if p.is_file() and p.name not in (".lock",))
    return {p.relative_to(out).as_posix(): p.read_bytes() for p in files}


# ----------------------------------------------------------------------------------------------- runs
def tiny_overrides(tokenizer_path: Path, dataset: Path, run_dir: Path) -> list[str]:
    """Config overrides for a small, fast training run on the tiny dataset."""
    return [
        f"data.tokenizer={tokenizer_path}",
        f"data.datasets=[{dataset}]",
        f"train.run_dir={run_dir}",
        "model.d_model=64",
        "model.n_layers=2",
        "model.n_heads=4",
        "model.n_kv_heads=2",
        "model.seq_len=32",
        "optim.warmup_steps=2",
        "optim.lr=1e-2",
        "train.threads=1",
    ]


def cluster_args(tokenizer_path: Path, dataset: Path, run_dir: Path, steps: int, *extra: str) -> list[str]:
    """The arguments (config and overrides) of the multi-node and Slurm tests: a tiny model, global batch 4
    (2 ranks x micro-batch 2), a loss logged every step, a checkpoint every 10 steps."""
    return [
        "--config",
        "launch/configs/demo.yaml",
        *tiny_overrides(tokenizer_path, dataset, run_dir),
        "train.global_batch_seqs=4",
        "train.micro_batch_seqs=2",
        f"train.max_steps={steps}",
        "train.eval_every=0",
        "logging.log_every=1",
        "checkpoint.save_every=10",
        *extra,
    ]


def blended_args(tokenizer_path, dataset_a, dataset_b, run_dir, stage, steps=6) -> list[str]:
    """A blend of two datasets (weights 3:1), 2 ranks x micro-batch 2 x accumulation 2, a checkpoint every 2 steps."""
    return tiny_overrides(tokenizer_path, dataset_a, run_dir) + [
        f"data.datasets=[{{path: {dataset_a}, weight: 3}}, {{path: {dataset_b}, weight: 1}}]",
        f"train.ds_config=ds_configs/zero{stage}.json",
        "train.global_batch_seqs=8",
        "train.micro_batch_seqs=2",
        f"train.max_steps={steps}",
        "train.eval_every=0",
        "logging.log_every=1",
        "checkpoint.save_every=2",
    ]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launcher(kind: str, nproc: int) -> list[str]:
    """The command line of a launcher: plain `python` (one process), `deepspeed` or `torchrun`."""
    bin_dir = f"{sys.prefix}/bin"
    if kind == "python":
        return [sys.executable]
    if kind == "deepspeed":
        return [f"{bin_dir}/deepspeed", "--num_gpus", str(nproc), "--master_port", str(free_port())]
    return [f"{bin_dir}/torchrun", "--nproc_per_node", str(nproc), "--master_port", str(free_port())]


def pretrain_cmd(kind: str, nproc: int, args) -> list[str]:
    return [*launcher(kind, nproc), str(REPO / "launch/pretrain.py"), *map(str, args)]


# set in the test process by the `world` fixture's process group of one; a run must make its own
DIST_ENV = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def run_env() -> dict:
    """The environment for a launched run: this one without the test process's own process-group variables."""
    return {k: v for k, v in os.environ.items() if k not in DIST_ENV}


def pretrain(kind: str, nproc: int, args, timeout=600, **kw) -> subprocess.CompletedProcess:
    """Run launch/pretrain.py under a launcher to the end; stdout and stderr captured."""
    return subprocess.run(
        pretrain_cmd(kind, nproc, args), capture_output=True, text=True, timeout=timeout, cwd=REPO, env=run_env(), **kw
    )


def start_pretrain(kind: str, nproc: int, args, **kw) -> subprocess.Popen:
    """Start launch/pretrain.py under a launcher; stdout and stderr are pipes unless given."""
    kw.setdefault("stdout", subprocess.PIPE)
    kw.setdefault("stderr", subprocess.PIPE)
    return subprocess.Popen(pretrain_cmd(kind, nproc, args), text=True, cwd=REPO, env=run_env(), **kw)


# ----------------------------------------------------------------------------------------------- results
def read_metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def losses(run_dir: Path) -> list[tuple[int, float]]:
    return [(m["step"], m["train/loss"]) for m in read_metrics(run_dir) if "train/loss" in m]


def last_attempt(run_dir: Path) -> dict:
    """The newest attempt record of a run (pretrain/attempt.py), as written."""
    from pretrain.attempt import records

    found = records(run_dir)
    assert found, f"no attempt record in {run_dir}"
    return dataclasses.asdict(found[-1])


def final_weights(run_dir: Path) -> dict:
    from pretrain import checkpoint

    ckpt = run_dir / "checkpoints"
    return checkpoint.consolidate(ckpt, (ckpt / "latest").read_text())


def wait_for_step(run_dir: Path, step: int, proc, timeout=120) -> bool:
    """Wait until the run has logged `step` (False if it ended or the time ran out first)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            if any(m["step"] >= step for m in read_metrics(run_dir)):
                return True
        except (FileNotFoundError, json.JSONDecodeError):
            pass
        time.sleep(0.05)
    return False


def tiny_engine(ds_config: str, *, seed: int = 0, global_batch: int = 4, micro: int = 2, **model):
    """A real Engine around a tiny model, in this process (needs the `world` fixture's process group)."""
    from pretrain.config import BatchPlan, ModelConfig, OptimConfig, TrainConfig
    from pretrain.engine import Engine

    model_cfg = ModelConfig(**{**dict(vocab_size=100, d_model=32, n_layers=2, n_heads=2, seq_len=16), **model})
    train = TrainConfig(ds_config=ds_config, micro_batch_seqs=micro, global_batch_seqs=global_batch)
    engine = Engine(OptimConfig(lr=1e-3, warmup_steps=0), train, BatchPlan.resolve(train, seq_len=16, world_size=1))
    engine.build(model_cfg, seed=seed)
    return engine


def save_tiny_run(run_dir: Path, ds_config: str, tokenizer_path: Path, data: dict | None = None):
    """Train a tiny model for 2 steps in this process (needs the `world` fixture) and save its checkpoint (step 2)
    in run_dir, its meta holding `data` (default: just the tokenizer) as the run's data section; (run_dir, engine)."""
    from pretrain.checkpoint import CheckpointManager, CheckpointMeta
    from pretrain.config import CheckpointConfig, ModelConfig, to_dict
    from pretrain.distributed import World
    from pretrain.tokenizer import Tokenizer

    vocab = Tokenizer(tokenizer_path).vocab_size
    model = dict(d_model=32, n_layers=2, n_heads=2, seq_len=16, vocab_size=vocab)
    engine = tiny_engine(ds_config, **model)
    for i in range(2):
        engine.train_step(random_batches(i, vocab=vocab), 1e-2)
    data = {"tokenizer": str(tokenizer_path), **(data or {})}
    config = {"model": to_dict(ModelConfig(**model)), "data": data, "train": {"seed": 0}}
    meta = CheckpointMeta.of_run(global_batch=4, world_size=1, zero_stage=0, config=config, data_fingerprint={})
    manager = CheckpointManager(run_dir / "checkpoints", CheckpointConfig(), engine=engine, world=World(), run=meta)
    manager.save(2)
    return run_dir, engine


def random_batches(seed: int, n: int = 2, micro: int = 2, seq_len: int = 16, vocab: int = 100) -> list:
    import torch

    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (micro, seq_len + 1), generator=g) for _ in range(n)]


# ----------------------------------------------------------------------------------------------- checkpoints
def fake_checkpoint(ckpt_dir, step, *, complete=True, size=10):
    """A checkpoint directory with stand-in files (data.pt, meta.json) and, unless complete=False, its record."""
    from pretrain import checkpoint

    d = ckpt_dir / checkpoint.tag_of(step)
    d.mkdir(parents=True)
    (d / "data.pt").write_bytes(b"x" * size)
    (d / checkpoint.META).write_text("{}")
    if complete:
        record(d)
    return d


def record(d):
    """(Re)write a checkpoint directory's completion record for the files it now holds, as a save does (or as
    someone who tampered with the files and fixed the checksums would)."""
    from pretrain import checkpoint

    files = {
        str(f.relative_to(d)): {"bytes": f.stat().st_size, "crc32": checkpoint.crc32_file(f)}
        for f in sorted(d.rglob("*"))
        if f.is_file() and f.name != checkpoint.RECORD
    }
    (d / checkpoint.RECORD).write_text(json.dumps({"files": files}))
