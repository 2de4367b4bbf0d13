import json
import re
import shutil
import struct
from pathlib import Path

import numpy as np
import pytest

from pretrain.shards import (
    MANIFEST,
    IndexedShard,
    ShardError,
    ShardWriter,
    SplitWriter,
    dataset_shard,
    dtype_for_vocab,
    encode_index,
    read_manifest,
    shard_prefix,
    verify_dataset,
    verify_shard,
)

DOCS = [[5, 6, 7], [8], [9, 10]]


def write(tmp_path, docs, dtype):
    w = ShardWriter(tmp_path / "s", dtype)
    for d in docs:
        w.add(np.array(d, dtype=dtype), np.array([len(d)]))
    return w.finish(tmp_path)


@pytest.mark.parametrize("dtype,code,fmt,item", [(np.uint16, 8, "H", 2), (np.int32, 4, "i", 4)])
def test_three_documents_byte_for_byte(tmp_path, dtype, code, fmt, item):
    info = write(tmp_path, DOCS, dtype)
    expected_bin = struct.pack(f"<6{fmt}", 5, 6, 7, 8, 9, 10)
    expected_idx = (
        b"MMIDIDX\x00\x00"
        + struct.pack("<Q", 1)  # version
        + struct.pack("<B", code)  # dtype code
        + struct.pack("<Q", 3)  # sequences
        + struct.pack("<Q", 4)  # document indices (D + 1)
        + struct.pack("<3i", 3, 1, 2)  # lengths
        + struct.pack("<3q", 0, 3 * item, 4 * item)  # byte offsets
        + struct.pack("<4q", 0, 1, 2, 3)  # document indices
    )
    assert (tmp_path / "s.bin").read_bytes() == expected_bin
    assert (tmp_path / "s.idx").read_bytes() == expected_idx
    assert (info.documents, info.tokens, info.bin_bytes) == (3, 6, 6 * item)
    assert not list(tmp_path.glob("*.tmp"))


def test_reader_round_trip(tmp_path):
    write(tmp_path, DOCS, np.uint16)
    shard = IndexedShard(tmp_path / "s")
    assert len(shard) == 3 and shard.num_tokens == 6 and shard.dtype == np.uint16
    assert [shard[i].tolist() for i in range(3)] == DOCS


def test_empty_shard(tmp_path):
    (tmp_path / "e.bin").write_bytes(b"")
    (tmp_path / "e.idx").write_bytes(encode_index(np.zeros(0, np.int32), np.uint16))
    shard = IndexedShard(tmp_path / "e")
    assert len(shard) == 0 and shard.num_tokens == 0


def test_unfinished_writer_leaves_no_final_files(tmp_path):
    w = ShardWriter(tmp_path / "s", np.uint16)
    w.add(np.array([1, 2], np.uint16), np.array([2]))
    assert not (tmp_path / "s.bin").exists() and not (tmp_path / "s.idx").exists()
    w.abort()
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "corrupt,message",
    [
        (lambda b, i: (b, i[:-3]), "bytes, expected"),
        (lambda b, i: (b, b""), "0 bytes is shorter than the 34-byte header"),
        (lambda b, i: (b, b"XXIDIDX\x00\x00" + i[9:]), "bad magic"),
        (lambda b, i: (b[:-2], i), "index expects"),
        (lambda b, i: (b, i[:9] + struct.pack("<Q", 2) + i[17:]), "unsupported version"),
        (lambda b, i: (b, i[:17] + b"\x63" + i[18:]), "unknown dtype code"),
        (lambda b, i: (b, i[: 34 + 12 + 8] + struct.pack("<q", 4) + i[34 + 12 + 16 :]), "byte offset of sequence 1"),
    ],
)
def test_corrupt_shards_are_refused(tmp_path, corrupt, message):
    write(tmp_path, DOCS, np.uint16)
    b, i = corrupt((tmp_path / "s.bin").read_bytes(), (tmp_path / "s.idx").read_bytes())
    (tmp_path / "s.bin").write_bytes(b)
    (tmp_path / "s.idx").write_bytes(i)
    with pytest.raises(ShardError, match=message):
        IndexedShard(tmp_path / "s")


def test_missing_file_named(tmp_path):
    write(tmp_path, DOCS, np.uint16)
    (tmp_path / "s.bin").unlink()
    with pytest.raises(ShardError, match=r"s\.bin: missing"):
        IndexedShard(tmp_path / "s")


def test_dtype_for_vocab():
    assert dtype_for_vocab(32000) == np.uint16
    assert dtype_for_vocab(65536) == np.uint16
    assert dtype_for_vocab(65537) == np.int32


def split_writer_run(root, lengths, batch_sizes):
    """Feed documents with the given lengths (token value = document number) in batches of varying size."""
    infos = []
    w = SplitWriter(root, "train", np.dtype(np.uint16), shard_tokens=10, on_shard=lambda s, i: infos.append(i))
    docs = [np.full(n, k, dtype=np.uint16) for k, n in enumerate(lengths)]
    i = 0
    for b in batch_sizes:
        chunk = docs[i : i + b]
        if chunk:
            w.add(np.concatenate(chunk).tobytes(), np.array([len(d) for d in chunk]))
        i += b
    w.finish()
    return infos


def test_split_writer_breaks_shards_independently_of_batching(tmp_path):
    lengths = [3, 4, 2, 7, 1, 1, 12, 5, 5, 2]
    a = split_writer_run(tmp_path / "a", lengths, [1] * len(lengths))
    b = split_writer_run(tmp_path / "b", lengths, [4, 3, 3])
    c = split_writer_run(tmp_path / "c", lengths, [10])
    # Shard closes at the first document that brings it to >= 10 tokens: [3,4,2,7] [1,1,12] [5,5] [2]
    assert [i.documents for i in a] == [4, 3, 2, 1]
    assert [i.tokens for i in a] == [16, 14, 10, 2]
    for other in (b, c):
        assert [(i.documents, i.tokens, i.bin_sha256, i.idx_sha256) for i in other] == [
            (i.documents, i.tokens, i.bin_sha256, i.idx_sha256) for i in a
        ]
    shard = IndexedShard(shard_prefix(tmp_path / "a", "train", 1))
    assert [shard[k][0] for k in range(3)] == [4, 5, 6]


def test_megatron_reads_ours_and_we_read_megatrons(tmp_path):
    torch = pytest.importorskip("torch")
    indexed = pytest.importorskip("megatron.core.datasets.indexed_dataset")
    rng = np.random.default_rng(0)
    docs = [rng.integers(0, 32000, size=rng.integers(1, 50)).astype(np.uint16) for _ in range(40)]
    w = ShardWriter(tmp_path / "ours", np.uint16)
    w.add(np.concatenate(docs), np.array([len(d) for d in docs]))
    w.finish(tmp_path)
    theirs = indexed.IndexedDataset(str(tmp_path / "ours"))
    assert len(theirs) == 40
    assert all(np.array_equal(theirs[i], docs[i]) for i in range(40))
    assert theirs.document_indices.tolist() == list(range(41))

    builder = indexed.IndexedDatasetBuilder(str(tmp_path / "meg.bin"), dtype=np.uint16)
    for d in docs:
        builder.add_item(torch.from_numpy(d.astype(np.int64)))
        builder.end_document()
    builder.finalize(str(tmp_path / "meg.idx"))
    shard = IndexedShard(tmp_path / "meg")
    assert len(shard) == 40 and all(np.array_equal(shard[i], docs[i]) for i in range(40))
    assert (tmp_path / "meg.idx").read_bytes() == (tmp_path / "ours.idx").read_bytes()
    assert (tmp_path / "meg.bin").read_bytes() == (tmp_path / "ours.bin").read_bytes()


# ----------------------------------------------------------------------------------------------- manifests
@pytest.fixture
def dataset_copy(tmp_path, tiny_dataset):
    """A copy of the tiny dataset to damage (the fixture itself is shared by the session)."""
    return Path(shutil.copytree(tiny_dataset, tmp_path / "ds"))


def edit_manifest(root, edit):
    manifest = json.loads((root / MANIFEST).read_text())
    edit(manifest)
    (root / MANIFEST).write_text(json.dumps(manifest))


def shard_entry(m, split, i):
    return m["splits"][split]["shards"][i]


@pytest.mark.parametrize(
    "edit,message",
    [
        (
            lambda m: shard_entry(m, "train", 1).update(tokens="12"),
            'splits.train.shards[1].tokens: expected a non-negative integer, got "12"',
        ),
        (
            lambda m: shard_entry(m, "train", 0).update(documents=-1),
            "splits.train.shards[0].documents: expected a non-negative integer, got -1",
        ),
        (lambda m: shard_entry(m, "val", 0).pop("bin_sha256"), "splits.val.shards[0].bin_sha256: missing"),
        (
            lambda m: shard_entry(m, "val", 0).update(idx_sha256="abc"),
            'splits.val.shards[0].idx_sha256: expected a sha256 (64 hex digits), got "abc"',
        ),
        (lambda m: m["splits"]["val"].update(shards={}), "splits.val.shards: expected a list, got {}"),
        (
            lambda m: m["splits"]["train"].update(documents=True),
            "splits.train.documents: expected a non-negative integer, got true",
        ),
        (
            lambda m: m["tokenizer"].update(vocab_size="2000"),
            'tokenizer.vocab_size: expected a positive integer, got "2000"',
        ),
        (lambda m: m["tokenizer"].update(sha256=None), "tokenizer.sha256: expected a sha256 (64 hex digits), got null"),
        (lambda m: m["tokenizer"].pop("eod_id"), "tokenizer.eod_id: missing"),
        (
            lambda m: m.update(dtype="float16"),
            'dtype: expected one of uint8, int8, int16, int32, int64, uint16, got "float16"',
        ),
        (lambda m: m["settings"].update(add_bos="no"), 'settings.add_bos: expected true or false, got "no"'),
        (lambda m: m["settings"].update(val_fraction=2), "settings.val_fraction: expected a number in [0, 1), got 2"),
        (lambda m: m.update(skipped=[]), "skipped: expected an object, got []"),
        (
            lambda m: m["skipped"].update(empty_document="3"),
            'skipped.empty_document: expected a non-negative integer, got "3"',
        ),
        (lambda m: m["inputs"][0].pop("bytes"), "inputs[0].bytes: missing"),
        (lambda m: m["splits"].update(val=[]), "splits.val: expected an object, got []"),
    ],
)
def test_manifest_fields_of_the_wrong_type_name_file_and_key(dataset_copy, edit, message):
    edit_manifest(dataset_copy, edit)
    with pytest.raises(ShardError) as e:
        read_manifest(dataset_copy)
    assert str(e.value) == f"{dataset_copy / MANIFEST}: {message}"


@pytest.mark.parametrize("prefix", ["../../outside/x", "/etc/x", "train/../../x", "", 7])
def test_manifest_shard_paths_stay_inside_the_dataset(dataset_copy, prefix):
    edit_manifest(dataset_copy, lambda m: shard_entry(m, "train", 1).update(prefix=prefix))
    with pytest.raises(
        ShardError, match=r"manifest\.json: splits\.train\.shards\[1\]\.prefix: expected a relative path"
    ):
        read_manifest(dataset_copy)


def test_symlinks_out_of_the_dataset_are_refused(dataset_copy, tmp_path):
    assert verify_dataset(dataset_copy) == []
    link = tmp_path / "link"
    link.symlink_to(dataset_copy)  # a dataset reached through a symlink is still itself
    assert verify_dataset(link) == []
    outside = tmp_path / "outside"
    outside.mkdir()
    shard = dataset_copy / "train" / "shard_00001.bin"
    shutil.move(shard, outside / shard.name)
    shard.symlink_to(outside / shard.name)
    (problem,) = verify_dataset(dataset_copy)
    assert problem == f"{shard}: resolves to {outside / shard.name}, outside the dataset directory {dataset_copy}"
    with pytest.raises(ShardError, match="outside the dataset directory"):
        dataset_shard(dataset_copy, "train/shard_00001")
    shard.unlink()
    shutil.move(outside / shard.name, shard)
    shutil.move(dataset_copy / "val", outside / "val")  # a split directory that is a symlink out of the dataset
    (dataset_copy / "val").symlink_to(outside / "val")
    problems = verify_dataset(dataset_copy)
    assert problems and all("outside the dataset directory" in p for p in problems)


@pytest.mark.parametrize(
    "key,value,problem",
    [
        ("dtype", "int32", r"train/shard_00000\.idx: dtype uint16, manifest says int32"),
        ("dtype", "int32", r"manifest\.json: dtype is int32, but a vocab of 2000 needs uint16"),
        ("settings.dtype", "int32", r"manifest\.json: settings\.dtype is int32, dtype is uint16"),
        ("tokenizer.eod_id", 3, r"train/shard_00000\.bin: (\d+) of \1 documents do not end with the eod id 3"),
        ("tokenizer.eod_id", 2000, r"manifest\.json: tokenizer\.eod_id 2000 is not below tokenizer\.vocab_size 2000"),
        ("tokenizer.vocab_size", 70000, r"manifest\.json: dtype is uint16, but a vocab of 70000 needs int32"),
        (
            "settings.add_bos",
            True,
            r"train/shard_00000\.bin: (\d+) of \1 documents do not start with the bos id 1, but",
        ),
        (
            "splits.val.shards.0.prefix",
            "train/shard_00001",
            r"shards\[0\]\.prefix is train/shard_00001, already listed",
        ),
        ("settings.shard_tokens", 50000, r"train/shard_00000\.bin: [\d,]+ tokens before its last document"),
        ("settings.shard_tokens", 200000, r"train/shard_00000\.bin: [\d,]+ tokens, fewer than settings\.shard_tokens"),
        ("splits.train.shards.1.bin_bytes", 5, r"train/shard_00001\.bin: [\d,]+ bytes, manifest says 5$"),
    ],
)
def test_verify_checks_what_the_files_can_contradict(dataset_copy, key, value, problem):
    def edit(m):
        target = m
        *parents, last = key.split(".")
        for part in parents:
            target = target[int(part)] if isinstance(target, list) else target[part]
        target[last] = value

    edit_manifest(dataset_copy, edit)
    problems = verify_dataset(dataset_copy, checksums=False)
    assert any(re.search(problem, p) for p in problems), problems


def test_verify_reports_shard_files_no_entry_lists(dataset_copy):
    def drop_val(m):
        m["splits"]["val"].update(documents=0, tokens=0, shards=[])

    edit_manifest(dataset_copy, drop_val)
    assert verify_dataset(dataset_copy) == [
        f"{dataset_copy / 'val' / name}: a shard file that no manifest entry lists (a removed entry?)"
        for name in ("shard_00000.bin", "shard_00000.idx")
    ]


def test_verify_shard_catches_negative_ids(tmp_path):
    w = ShardWriter(tmp_path / "s", np.int32)  # the dtype of vocabularies over 65536: signed
    w.add(np.array([5, -1, 7, 2], dtype=np.int32), np.array([4]))
    info = w.finish(tmp_path)
    manifest = {
        "dtype": "int32",
        "tokenizer": {"vocab_size": 70000, "eod_id": 2, "bos_id": 1},
        "settings": {"add_bos": False, "shard_tokens": 100},
    }
    assert verify_shard(tmp_path, info, manifest) == [f"{tmp_path}/s.bin: token id -1 is negative"]
