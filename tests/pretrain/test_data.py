import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest

from pretrain.config import BatchPlan, ConfigError, DatasetSpec, TrainConfig
from pretrain.data import BlendedDataset, DataError, PackedDataset, Skips, TokenStream, blend, build_dataset
from pretrain.shards import ShardWriter


def make_shards(root, docs_per_shard):
    """Shards whose tokens count up 0, 1, 2, ... across shard boundaries; returns their prefixes."""
    prefixes, next_token = [], 0
    for i, doc_lengths in enumerate(docs_per_shard):
        w = ShardWriter(root / f"s{i}", np.uint16)
        n = sum(doc_lengths)
        w.add(np.arange(next_token, next_token + n, dtype=np.uint16), np.array(doc_lengths))
        w.finish(root)
        prefixes.append(root / f"s{i}")
        next_token += n
    return prefixes


@pytest.fixture
def stream(tmp_path):
    return TokenStream(make_shards(tmp_path, [[10, 5], [7], [20, 3, 2]]), "counting")  # 47 tokens


def test_stream_reads_across_shards(stream):
    assert stream.num_tokens == 47
    assert stream.read(0, 47).tolist() == list(range(47))
    assert stream.read(13, 12).tolist() == list(range(13, 25))  # spans all three shards


def test_packing_windows_and_epoch_reshuffle(stream):
    ds = PackedDataset(stream, seq_len=8, seed=0, index=0)
    assert ds.num_samples == (47 - 1) // 8 == 5
    windows = {tuple(ds.sample(k).tolist()) for k in range(5)}
    assert windows == {tuple(range(i * 8, i * 8 + 9)) for i in range(5)}  # every window once per epoch
    epoch0 = [ds.window_of(k) for k in range(5)]
    epoch1 = [ds.window_of(k) for k in range(5, 10)]
    assert sorted(epoch1) == sorted(epoch0) == list(range(5)) and epoch0 != epoch1
    again = PackedDataset(stream, seq_len=8, seed=0, index=0)
    assert [again.window_of(k) for k in range(10)] == epoch0 + epoch1  # a pure function of (seed, k)
    other = PackedDataset(stream, seq_len=8, seed=1, index=0)
    assert [other.window_of(k) for k in range(10)] != epoch0 + epoch1


def test_documents_of_a_token_range(stream):
    # documents of 10, 5 | 7 | 20, 3, 2 tokens: ids 0-5 in order, starting at tokens 0, 10, 15, 22, 42, 45
    docs = stream.documents(8, 44)
    assert [(d["id"], Path(d["shard"]).name, d["index"], d["length"], d["tokens"]) for d in docs] == [
        (0, "s0", 0, 10, [8, 10]),
        (1, "s0", 1, 5, [0, 5]),
        (2, "s1", 0, 7, [0, 7]),
        (3, "s2", 0, 20, [0, 20]),
        (4, "s2", 1, 3, [0, 2]),
    ]
    assert [d["tokens"] for d in stream.documents(45, 47)] == [[0, 2]]


def test_skipped_samples_leave_the_rest_of_the_order_unchanged():
    skips = Skips([[5, 8], [10, 12], [7, 9], [20, 20]])  # overlapping ranges merge; an empty one is nothing
    assert skips.ranges == [[5, 9], [10, 12]]
    kept = [n for n in range(40) if not (5 <= n < 9 or 10 <= n < 12)]
    assert [skips.number(j) for j in range(30)] == kept[:30]
    for first in range(0, 12):
        for last in range(first, 20):
            assert skips.numbers(first, last).tolist() == kept[first:last], (first, last)
    assert Skips().numbers(3, 7).tolist() == [3, 4, 5, 6]
    # a run that trained on 5 slots (samples 0-4) may add skips from sample 5 on, not before
    none = Skips()
    assert none.same_until(Skips([[5, 9]]), 5) and not none.same_until(Skips([[4, 9]]), 5)
    assert skips.same_until(Skips([[5, 9], [10, 12], [30, 31]]), 7)  # slots 0-6: samples 0-4, 9, 12
    assert not skips.same_until(Skips([[5, 9]]), 7)  # slot 6 would be sample 10
    assert Skips([[0, 3]]).same_until(Skips(), 0)  # nothing trained yet: anything goes


def test_blended_dataset_with_skips_gives_the_samples_without_them(stream):
    ds = PackedDataset(stream, seq_len=4, seed=0, index=0)  # 11 windows
    plain, skipping = BlendedDataset([ds], [1.0]), BlendedDataset([ds], [1.0], Skips([[2, 5]]))
    expect = np.concatenate([plain.samples(0, 2), plain.samples(5, 9)])
    assert np.array_equal(skipping.samples(0, 6), expect)
    assert [n for n, _, _ in skipping.locate(0, 6)] == [0, 1, 5, 6, 7, 8]


@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_rank_slices_are_disjoint_and_complete(world_size):
    G, micro = 12, 2
    seen = []
    for rank in range(world_size):
        plan = BatchPlan(G, micro, world_size, seq_len=8)
        assert plan.grad_accum == G // (world_size * micro)
        for step in range(5):
            start, stop = plan.rank_range(step, rank)
            seen += list(range(start, stop))
    assert sorted(seen) == list(range(5 * G))


def test_batch_arithmetic_that_does_not_divide():
    with pytest.raises(ConfigError, match="12 sequences does not split into 5 rank"):
        BatchPlan.resolve(TrainConfig(global_batch_seqs=12, micro_batch_seqs=2), seq_len=8, world_size=5)
    with pytest.raises(ConfigError, match="micro-batches of 5"):
        BatchPlan.resolve(TrainConfig(global_batch_seqs=12, micro_batch_seqs=5), seq_len=8, world_size=2)


def test_batches_per_rank_concatenate_to_the_global_batch(stream):
    data = BlendedDataset([PackedDataset(stream, 4, seed=3, index=0)], [1.0])
    whole = np.concatenate(data.batch(2, BatchPlan(6, 6, 1, seq_len=4), rank=0))
    parts = [np.concatenate(data.batch(2, BatchPlan(6, 1, 3, seq_len=4), rank=r)) for r in range(3)]
    assert np.array_equal(np.concatenate(parts), whole) and whole.shape == (6, 5)


def test_blend_proportions_exact_to_one_sample():
    w = np.array([0.6, 0.25, 0.15])
    ds, ks = blend(w, 0, 20_000)
    for d in range(3):
        counts = np.cumsum(ds == d)
        assert np.abs(counts - np.arange(1, 20_001) * w[d]).max() <= 1.0
        assert np.array_equal(np.sort(ks[ds == d]), np.arange((ds == d).sum()))  # each dataset in its own order
    pieces = [blend(w, s, 333) for s in range(0, 19_980, 333)]  # any range, computed alone, agrees
    assert np.array_equal(np.concatenate([p[0] for p in pieces]), ds[: len(pieces) * 333])
    assert np.array_equal(np.concatenate([p[1] for p in pieces]), ks[: len(pieces) * 333])
    far_ds, _ = blend(w, 10**12, 1000)  # far into a run: no index over the whole run needed
    assert np.abs(np.bincount(far_ds, minlength=3) - 1000 * w).max() <= 2


def test_blended_dataset_draws_by_weight(tmp_path):
    (tmp_path / "a").mkdir()
    a = TokenStream(make_shards(tmp_path / "a", [[100]]), "a")
    b_root = tmp_path / "b"
    b_root.mkdir()
    w = ShardWriter(b_root / "s", np.uint16)
    w.add(np.full(100, 999, dtype=np.uint16), np.array([100]))
    w.finish(b_root)
    b = TokenStream([b_root / "s"], "b")
    data = BlendedDataset([PackedDataset(a, 4, seed=0, index=0), PackedDataset(b, 4, seed=0, index=1)], [3, 1])
    x = data.samples(0, 400)
    from_b = (x[:, 0] == 999).sum()
    assert from_b == 100  # exactly a quarter


def test_megatron_written_files_are_read(tmp_path):
    torch = pytest.importorskip("torch")
    indexed = pytest.importorskip("megatron.core.datasets.indexed_dataset")
    prefix = tmp_path / "wiki.en_text_document"  # Megatron's naming: a dot in the prefix
    builder = indexed.IndexedDatasetBuilder(f"{prefix}.bin", dtype=np.int32)
    for n in (30, 12, 50):
        builder.add_item(torch.arange(n, dtype=torch.int64) + 7)
        builder.end_document()
    builder.finalize(f"{prefix}.idx")
    (tmp_path / "wiki.idx").write_bytes(b"decoy")  # what Path.with_suffix(".idx") would wrongly open
    tok = {"path": "t", "sha256": "x", "vocab_size": 100}

    def build(path, tokenizer=tok):
        return build_dataset(
            [DatasetSpec(str(path))], "train", seq_len=10, seed=0, tokenizer=tokenizer, key="data.datasets"
        )

    data = build(prefix)
    assert data.num_samples == (92 - 1) // 10
    stream = data.datasets[0].stream
    assert stream.read(0, 92).tolist() == list(range(7, 37)) + list(range(7, 19)) + list(range(7, 57))
    assert build(f"{prefix}.bin").num_samples == data.num_samples  # the prefix may carry its .bin ending
    with pytest.raises(
        DataError, match=r"data.datasets\[0\]: .*en_text_document holds token id 56, outside the vocab of 50"
    ):
        build(prefix, {**tok, "vocab_size": 50})


def test_dataset_errors_name_the_key(tmp_path, tiny_dataset, tokenizer):
    tok = tokenizer.describe()
    spec = [DatasetSpec(str(tiny_dataset))]
    assert build_dataset(spec, "train", seq_len=32, seed=0, tokenizer=tok, key="data.datasets").num_samples > 1000
    with pytest.raises(DataError, match=r"data.datasets\[0\]: .*nowhere is neither a dataset directory"):
        build_dataset(
            [DatasetSpec(str(tmp_path / "nowhere"))], "train", seq_len=32, seed=0, tokenizer=tok, key="data.datasets"
        )
    other = {**tok, "sha256": "0" * 64, "path": "other.model"}
    with pytest.raises(
        DataError, match=r"data.datasets\[0\]: .* was tokenized with .* but data.tokenizer is other.model"
    ):
        build_dataset(spec, "train", seq_len=32, seed=0, tokenizer=other, key="data.datasets")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="manifest.json: missing"):
        build_dataset(
            [DatasetSpec(str(tmp_path / "empty"))], "train", seq_len=32, seed=0, tokenizer=tok, key="data.datasets"
        )
    manifest = json.loads((tiny_dataset / "manifest.json").read_text())
    assert manifest["splits"]["val"]["shards"]  # the fixture has a val split


@pytest.fixture
def dataset_copy(tmp_path, tiny_dataset):
    """A copy of the tiny dataset to damage (the fixture itself is shared by the session)."""
    return Path(shutil.copytree(tiny_dataset, tmp_path / "ds"))


def edit_manifest(root, edit):
    manifest = json.loads((root / "manifest.json").read_text())
    edit(manifest)
    (root / "manifest.json").write_text(json.dumps(manifest))


def build_train(root, tokenizer):
    spec = [DatasetSpec(str(root))]
    return build_dataset(spec, "train", seq_len=32, seed=0, tokenizer=tokenizer.describe(), key="data.datasets")


def test_a_malformed_manifest_is_a_data_error_naming_file_and_key(dataset_copy, tokenizer):
    edit_manifest(dataset_copy, lambda m: m["splits"]["train"]["shards"][1].pop("prefix"))
    with pytest.raises(DataError) as e:
        build_train(dataset_copy, tokenizer)
    assert str(e.value) == f"data.datasets[0]: {dataset_copy}/manifest.json: splits.train.shards[1].prefix: missing"


def test_shards_outside_the_dataset_directory_are_refused(dataset_copy, tmp_path, tokenizer):
    outside = tmp_path / "outside"
    shutil.copytree(dataset_copy / "train", outside)
    edit_manifest(dataset_copy, lambda m: m["splits"]["train"]["shards"][1].update(prefix="../outside/shard_00001"))
    with pytest.raises(DataError, match=r"splits\.train\.shards\[1\]\.prefix: expected a relative path inside"):
        build_train(dataset_copy, tokenizer)
    edit_manifest(dataset_copy, lambda m: m["splits"]["train"]["shards"][1].update(prefix="train/shard_00001"))
    build_train(dataset_copy, tokenizer)
    idx = dataset_copy / "train" / "shard_00001.idx"
    idx.unlink()
    idx.symlink_to(outside / idx.name)
    with pytest.raises(DataError, match=rf"data\.datasets\[0\]: {re.escape(str(idx))}: resolves to .*, outside the"):
        build_train(dataset_copy, tokenizer)


def test_token_ids_outside_the_vocab_stop_the_run_where_they_are_read(dataset_copy, tokenizer):
    """The manifest vouches for the ids, so they are not scanned at the start; a shard changed behind its back
    must still fail with the dataset and the position named, not with an IndexError inside the model."""
    shard = dataset_copy / "train" / "shard_00001.bin"
    tokens = np.fromfile(shard, dtype=np.uint16)
    tokens[1234] = tokenizer.vocab_size + 500
    tokens.tofile(shard)
    data = build_train(dataset_copy, tokenizer)
    first = json.loads((dataset_copy / "manifest.json").read_text())["splits"]["train"]["shards"][0]["tokens"]
    window = (first + 1234) // 32  # the window holding the bad token (and the one before, if it starts there)
    k = next(k for k in range(data.num_samples) if data.datasets[0].window_of(k) == window)
    with pytest.raises(DataError) as e:
        data.samples(k, k + 1)
    assert str(e.value) == (
        f"{dataset_copy}:train, sample {k}: token {(first + 1234) % 32} is {tokenizer.vocab_size + 500}, outside "
        f"the vocab of {tokenizer.vocab_size} ({shard}, token 1,234)"
    )
    good = next(k for k in range(data.num_samples) if data.datasets[0].window_of(k) not in (window, window - 1))
    assert data.samples(good, good + 1).max() < tokenizer.vocab_size


def test_the_sample_guard_catches_negative_ids(tmp_path):
    w = ShardWriter(tmp_path / "s", np.int32)  # the dtype of vocabularies over 65536: signed
    w.add(np.array([5, 6, -1, 7, 8], dtype=np.int32), np.array([5]))
    w.finish(tmp_path)
    data = PackedDataset(TokenStream([tmp_path / "s"], "signed", vocab_size=100), seq_len=2, seed=0, index=0)
    with pytest.raises(
        DataError, match=r"signed, sample \d: token \d is -1, outside the vocab of 100 \(.*s\.bin, token 2\)"
    ):
        [data.sample(k) for k in range(data.num_samples)]


def test_a_bare_prefix_with_negative_ids_is_refused_at_the_start(tmp_path):
    w = ShardWriter(tmp_path / "s", np.int32)
    w.add(np.array([5, 6, -3, 7, 8], dtype=np.int32), np.array([5]))
    w.finish(tmp_path)
    tok = {"path": "t", "sha256": "x", "vocab_size": 100}
    with pytest.raises(DataError, match=r"data.datasets\[0\]: .*/s holds token id -3, outside the vocab of 100"):
        build_dataset(
            [DatasetSpec(str(tmp_path / "s"))], "train", seq_len=2, seed=0, tokenizer=tok, key="data.datasets"
        )
