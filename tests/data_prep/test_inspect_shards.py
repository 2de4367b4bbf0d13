import pytest

from data_prep import inspect_shards
from data_prep.__main__ import main as data_prep_main

from ..helpers import tokenize, write_jsonl


@pytest.fixture
def dataset(tmp_path, tokenizer_path):
    texts = [
        f"Document number {i}: " + "the quick brown fox jumps over the lazy dog. " * (i % 7 + 1) for i in range(300)
    ]
    out = tmp_path / "ds"
    assert (
        tokenize(
            [write_jsonl(tmp_path / "c.jsonl", texts)],
            out,
            tokenizer_path,
            "--val-fraction",
            "0.1",
            "--shard-tokens",
            "3000",
        )
        == 0
    )
    return out


def test_inspect_sound_dataset(dataset, capsys):
    assert inspect_shards.main([str(dataset), "--samples", "2"]) == 0
    out = capsys.readouterr().out
    assert "verify     ok:" in out and "(sha256 checked)" in out
    assert "--- train train/shard_00000 document 1" in out and "Document number 1: the quick" in out
    assert "train      2" in out  # "train      2xx documents, ..."


@pytest.mark.parametrize(
    "damage,message",
    [
        (lambda d: (d / "train" / "shard_00001.idx").unlink(), "shard_00001.idx: missing"),
        (lambda d: (d / "val" / "shard_00000.bin").write_bytes(b"\x00\x00"), "shard_00000.bin: 2 bytes, index expects"),
        (lambda d: flip_byte(d / "train" / "shard_00002.bin"), "shard_00002.bin: sha256"),
    ],
)
def test_inspect_reports_damage(dataset, capsys, damage, message):
    damage(dataset)
    assert inspect_shards.main([str(dataset)]) == 1
    out = capsys.readouterr().out
    assert "verify     FAILED, 1 problem(s)" in out and message in out


def flip_byte(path):
    data = bytearray(path.read_bytes())
    data[10] ^= 1
    path.write_bytes(bytes(data))


def test_inspect_without_manifest(tmp_path, capsys):
    assert inspect_shards.main([str(tmp_path)]) == 1
    assert "manifest.json: missing" in capsys.readouterr().err


def test_module_entry_point(capsys):
    assert data_prep_main(["nonsense"]) == 2
    assert "train-tokenizer,tokenize,inspect" in capsys.readouterr().err
