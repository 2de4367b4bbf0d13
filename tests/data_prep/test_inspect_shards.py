import json
import re
import shutil

import numpy as np
import pytest

from data_prep import inspect_shards
from data_prep.__main__ import main as data_prep_main
from pretrain import shards
from pretrain.shards import read_manifest
from pretrain.tokenizer import Tokenizer

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


def edit_manifest(root, edit):
    manifest = json.loads((root / "manifest.json").read_text())
    edit(manifest)
    (root / "manifest.json").write_text(json.dumps(manifest))


def inspect(dataset, capsys, *args):
    code = inspect_shards.main([str(dataset), "--samples", "0", *args])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize(
    "edit,message",
    [
        (lambda m: m["splits"]["train"]["shards"][2].update(tokens="12"), "splits.train.shards[2].tokens: expected"),
        (lambda m: m["tokenizer"].update(vocab_size="2000"), "tokenizer.vocab_size: expected a positive integer"),
        (lambda m: m["tokenizer"].update(sha256=12), "tokenizer.sha256: expected a sha256"),
        (lambda m: m["inputs"][0].pop("bytes"), "inputs[0].bytes: missing"),
        (lambda m: m.update(skipped=[]), "skipped: expected an object"),
        (lambda m: m.update(dtype="bogus"), "dtype: expected one of"),
        (lambda m: m["splits"]["val"]["shards"][0].update(prefix="../../outside/x"), "expected a relative path"),
    ],
)
def test_inspect_names_the_bad_manifest_key(dataset, capsys, edit, message):
    edit_manifest(dataset, edit)
    code, out, err = inspect(dataset, capsys)
    assert code == 1 and out == ""
    assert err.startswith(f"error: {dataset}/manifest.json: ") and message in err and "Traceback" not in err


def test_inspect_does_not_follow_shards_out_of_the_dataset(dataset, tmp_path, capsys):
    outside = tmp_path / "outside"
    shutil.copytree(dataset / "val", outside)  # real shards, with the checksums the manifest records
    edit_manifest(dataset, lambda m: m["splits"]["val"]["shards"][0].update(prefix=str(outside / "shard_00000")))
    code, _, err = inspect(dataset, capsys)
    assert code == 1 and "splits.val.shards[0].prefix: expected a relative path inside the dataset directory" in err
    edit_manifest(dataset, lambda m: m["splits"]["val"]["shards"][0].update(prefix="val/shard_00000"))
    shutil.rmtree(dataset / "val")
    (dataset / "val").symlink_to(outside)
    code, out, _ = inspect(dataset, capsys)
    assert code == 1 and f"{dataset}/val/shard_00000.bin: resolves to {outside}/shard_00000.bin, outside" in out


@pytest.mark.parametrize(
    "edit,problem",
    [
        (lambda m: m["tokenizer"].update(vocab_size=3000), "tokenizer.vocab_size is 3000, but {tok} has 2000"),
        (lambda m: m["tokenizer"].update(sha256="0" * 64), "tokenizer.sha256 is 000000000000..., but {tok} has"),
        (lambda m: m["tokenizer"].update(eod_id=3), "tokenizer.eod_id is 3, but {tok} has 2"),
        (lambda m: m.update(dtype="int32"), "train/shard_00000.idx: dtype uint16, manifest says int32"),
        (lambda m: m["settings"].update(split_seed=7), "belong to 'train' by their text under settings.split_seed 7"),
        (lambda m: m["settings"].update(val_fraction=0.6), "belong to 'val' by their text under settings.split_seed 0"),
    ],
)
def test_inspect_finds_hand_edits(dataset, tokenizer_path, capsys, edit, problem):
    edit_manifest(dataset, edit)
    code, out, _ = inspect(dataset, capsys)
    assert code == 1 and "verify     FAILED" in out and problem.format(tok=tokenizer_path) in out


def test_inspect_reports_a_removed_shard_entry(dataset, capsys):
    def drop_last_val_shard(m):
        val = m["splits"]["val"]
        dropped = val["shards"].pop()
        val["documents"] -= dropped["documents"]
        val["tokens"] -= dropped["tokens"]

    edit_manifest(dataset, drop_last_val_shard)
    code, out, _ = inspect(dataset, capsys)
    assert code == 1 and "verify     FAILED, 2 problem(s)" in out
    assert f"{dataset}/val/shard_00000.bin: a shard file that no manifest entry lists" in out


def test_inspect_says_what_it_could_not_check(dataset, tokenizer_path, capsys, tmp_path):
    edit_manifest(dataset, lambda m: m["tokenizer"].update(path=str(tmp_path / "gone.model")))
    code, out, _ = inspect(dataset, capsys)
    assert code == 0 and "verify     ok:" in out
    assert f"not checked: the tokenizer ({tmp_path / 'gone.model'} is not there; pass --tokenizer)" in out
    code, out, _ = inspect(dataset, capsys, "--tokenizer", str(tokenizer_path))
    assert code == 0 and "not checked" not in out
    assert f"tokenizer  ok: {tokenizer_path} matches the manifest" in out
    assert "split      ok:" in out


def test_inspect_does_not_decode_shards_with_ids_outside_the_vocab(dataset, capsys):
    shard = dataset / "train" / "shard_00000.bin"
    tokens = np.fromfile(shard, dtype=np.uint16)
    tokens[0] = 2500  # in document 0, which the split check samples; sentencepiece cannot decode it
    tokens.tofile(shard)
    code, out, err = inspect(dataset, capsys)
    assert code == 1 and "Traceback" not in err
    assert f"{shard}: token id 2500 >= vocab size 2000" in out
    assert "not checked: the train/val split (verification found problems)" in out


def test_inspect_survives_a_manifest_promising_more_documents(dataset, tokenizer_path, capsys):
    def inflate_last_train_shard(m):
        m["splits"]["train"]["shards"][-1]["documents"] += 5
        m["splits"]["train"]["documents"] += 5

    edit_manifest(dataset, inflate_last_train_shard)
    code, out, err = inspect(dataset, capsys)
    assert code == 1 and "Traceback" not in err
    assert re.search(r"train/shard_\d+\.idx: (\d+) documents, manifest says (\d+)", out)
    # The split check itself samples only documents the shards hold.
    assert inspect_shards.split_problems(dataset, read_manifest(dataset), Tokenizer(tokenizer_path)) == []


def test_inspect_reports_unreadable_files_without_a_traceback(dataset, capsys, monkeypatch):
    def refuse(path):
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(shards, "sha256_file", refuse)
    code, out, err = inspect(dataset, capsys)
    assert code == 1 and err.startswith("error: ") and "Permission denied" in err and "Traceback" not in err
