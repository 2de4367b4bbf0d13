"""A tokenize job split into parts (tokenize --num-parts N --part I) and merged (data_prep merge): the merged dataset
holds a single run's documents, split for split, in the same order; bad parts are refused by name."""

import gzip
import json
import random
from pathlib import Path

import numpy as np
import pytest

from data_prep import inspect_shards
from data_prep import merge as merge_cli
from data_prep.parts import Slice, plan, splittable
from data_prep.readers import CorpusReader
from pretrain.shards import IndexedShard, manifest_shards, read_manifest, verify_dataset

from ..helpers import TRICKY, tokenize, write_jsonl


def split_stream(out: Path) -> dict[str, tuple[list[int], np.ndarray]]:
    """Per split: the document lengths and all tokens, in order (shard boundaries do not matter)."""
    manifest = read_manifest(out)
    result = {}
    for split, shards in manifest_shards(manifest).items():
        lengths, tokens = [], []
        for info in shards:
            shard = IndexedShard(out / info.prefix)
            lengths += [len(shard[i]) for i in range(len(shard))]
            tokens += [np.asarray(shard[i]) for i in range(len(shard))]
        result[split] = (lengths, np.concatenate(tokens) if tokens else np.zeros(0))
    return result


@pytest.fixture(scope="module")
def inputs(tmp_path_factory, speeches):
    """Inputs of every kind, in order: a big .jsonl (split between parts), .txt files (whole), a .jsonl.gz (whole),
    a small .jsonl, an empty .jsonl."""
    root = tmp_path_factory.mktemp("inputs")
    paragraphs = [p for s in speeches[:30] for p in s.read_text(encoding="utf-8").split("\n\n") if p.strip()]
    write_jsonl(root / "a_big.jsonl", paragraphs + TRICKY)
    for i, s in enumerate(speeches[30:34]):
        (root / f"b_{i}.txt").write_text(s.read_text(encoding="utf-8"), encoding="utf-8")
    lines = "".join(json.dumps({"text": p}) + "\n" for p in paragraphs[:200])
    (root / "c.jsonl.gz").write_bytes(gzip.compress(lines.encode()))
    write_jsonl(root / "d_small.jsonl", paragraphs[200:260])
    (root / "e_empty.jsonl").write_text("")
    return root


def test_the_plan_cuts_the_inputs_into_contiguous_balanced_ranges(tmp_path):
    paths = [Path(n) for n in ("a.jsonl", "b.txt", "c.jsonl.zst", "d.jsonl")]
    sizes = [1000, 50, 300, 650]
    for n in (1, 2, 3, 4, 7, 40):
        parts = plan(paths, sizes, n)
        assert len(parts) == n
        flat = [s for part in parts for s in part]
        for p, size in zip(paths, sizes):  # every file's ranges, in part order, cover it exactly once
            ranges = [(s.start, s.end) for s in flat if s.path == p]
            assert ranges[0][0] == 0 and ranges[-1][1] == size
            assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))
            assert splittable(p) or ranges == [(0, size)]
        load = [sum(s.end - s.start for s in part) for part in parts]
        if n <= 4:  # splittable files keep the parts within one unsplittable file of each other
            assert max(load) - min(load) <= 300
    assert plan(paths, sizes, 1) == [[Slice(p, 0, s, s) for p, s in zip(paths, sizes)]]


def test_byte_ranges_read_every_line_once(tmp_path):
    rng = random.Random(0)
    texts = [f"document {i} " + "word " * rng.randint(0, 300) for i in range(500)]
    path = write_jsonl(tmp_path / "corpus.jsonl", texts)
    size = path.stat().st_size
    for n in (2, 3, 5, 16, 1000):
        seen = []
        for part in plan([path], [size], n):
            reader = CorpusReader([])
            reader.read_slices(part)
            docs = iter(reader)
            first = next(docs, None)  # progress counts what is given out, not the whole range at once
            if first is not None and reader.total_raw_bytes > 2 * (1 << 20):
                assert reader.raw_bytes_read < reader.total_raw_bytes
            seen += ([first.text] if first else []) + [d.text for d in docs]
            assert reader.raw_bytes_read == reader.total_raw_bytes  # the range's size, lines straddling or not
        assert seen == texts, n


@pytest.mark.parametrize("num_parts", [4, 7])
def test_merged_parts_equal_a_single_run(tmp_path, inputs, tokenizer_path, num_parts):
    common = ["--val-fraction", "0.1", "--shard-tokens", "20000", "--workers", "1"]
    single = tmp_path / "single"
    assert tokenize([inputs], single, tokenizer_path, *common) == 0
    dirs = []
    for i in range(num_parts):
        dirs.append(tmp_path / f"part{i}")
        assert (
            tokenize([inputs], dirs[-1], tokenizer_path, *common, "--num-parts", str(num_parts), "--part", str(i)) == 0
        )
    big = read_manifest(dirs[0])["inputs"][0]
    assert big["path"].endswith("a_big.jsonl") and "end" in big  # the big file was split
    merged = tmp_path / "merged"
    assert merge_cli.main([*map(str, reversed(dirs)), "--output", str(merged)]) == 0  # any order of arguments

    want, got = split_stream(single), split_stream(merged)
    for split in ("train", "val"):
        assert got[split][0] == want[split][0] and np.array_equal(got[split][1], want[split][1]), split
    a, b = read_manifest(single), read_manifest(merged)
    for split in ("train", "val"):
        for key in ("documents", "tokens", "text_bytes"):
            assert a["splits"][split][key] == b["splits"][split][key]
    assert a["inputs"] == b["inputs"] and a["settings"] == b["settings"] and a["tokenizer"] == b["tokenizer"]
    assert b["merged"]["parts"] == num_parts
    # shards were linked, not copied
    first = b["splits"]["train"]["shards"][0]["prefix"]
    assert (merged / f"{first}.bin").stat().st_nlink == 2
    assert inspect_shards.main([str(merged), "--samples", "0"]) == 0
    # each part's last shard may be short, no other: a manifest that moves the part boundaries does not verify
    counts = b["merged"]["part_shards"]["train"]
    assert any(c > 1 for c in counts)
    shifted = {
        **b,
        "merged": {
            **b["merged"],
            "part_shards": {**b["merged"]["part_shards"], "train": [sum(counts)] + [0] * (len(counts) - 1)},
        },
    }
    (merged / "manifest.json").write_text(json.dumps(shifted))
    assert any("fewer than settings.shard_tokens" in p for p in verify_dataset(merged, checksums=False))
    shifted["merged"]["part_shards"]["train"] = [1]
    (merged / "manifest.json").write_text(json.dumps(shifted))
    assert any("does not account for" in p for p in verify_dataset(merged, checksums=False))


def test_bad_parts_are_refused_by_name(tmp_path, inputs, tokenizer_path, speeches, capsys):
    from data_prep import train_tokenizer

    common = ["--val-fraction", "0.1", "--workers", "1"]
    dirs = [tmp_path / f"p{i}" for i in range(3)]
    for i, d in enumerate(dirs):
        assert tokenize([inputs], d, tokenizer_path, *common, "--num-parts", "3", "--part", str(i)) == 0

    def refused(*parts, output=tmp_path / "out") -> str:
        assert merge_cli.main([*map(str, parts), "--output", str(output)]) == 1
        assert not output.exists() and not list(tmp_path.glob("*.tmp"))
        return capsys.readouterr().err

    assert "part(s) 2 of 3 missing" in refused(dirs[0], dirs[1])
    assert f"{dirs[1]}: part 1 is given twice" in refused(dirs[0], dirs[1], dirs[1], dirs[2])
    other = tmp_path / "q2"
    assert (
        tokenize(
            [inputs],
            other,
            tokenizer_path,
            "--val-fraction",
            "0.2",
            "--workers",
            "1",
            "--num-parts",
            "3",
            "--part",
            "2",
        )
        == 0
    )
    err = refused(dirs[0], dirs[1], other)
    assert f"{other}: made with another settings" in err and "val_fraction" in err
    tok2 = tmp_path / "tok2"
    assert train_tokenizer.main([str(speeches[100]), "--output", str(tok2), "--vocab-size", "500", "--quiet"]) == 0
    other2 = tmp_path / "r2"
    assert tokenize([inputs], other2, tok2.with_suffix(".model"), *common, "--num-parts", "3", "--part", "2") == 0
    assert f"{other2}: made with another tokenizer" in refused(dirs[0], dirs[1], other2)
    four = tmp_path / "s3"
    assert tokenize([inputs], four, tokenizer_path, *common, "--num-parts", "4", "--part", "3") == 0
    assert "a part of another job" in refused(dirs[0], dirs[1], dirs[2], four)
    single = tmp_path / "single"
    assert tokenize([inputs], single, tokenizer_path, *common) == 0
    assert f"{single}: not a part" in refused(dirs[0], dirs[1], single)
    (dirs[2] / "manifest.json").rename(dirs[2] / "manifest.json.away")
    assert f"{dirs[2]}: not a complete part" in refused(*dirs)
    (dirs[2] / "manifest.json.away").rename(dirs[2] / "manifest.json")
    out = tmp_path / "merged"
    assert merge_cli.main([*map(str, dirs), "--output", str(out)]) == 0
    capsys.readouterr()
    assert merge_cli.main([*map(str, dirs), "--output", str(out)]) == 1
    assert "exists; pass --overwrite" in capsys.readouterr().err
    assert merge_cli.main([*map(str, dirs), "--output", str(out), "--overwrite", "--move"]) == 0
    assert not any(d.exists() for d in dirs) and inspect_shards.main([str(out), "--samples", "0"]) == 0


def test_part_arguments_are_checked(tmp_path, inputs, tokenizer_path, capsys):
    with pytest.raises(SystemExit) as e:
        tokenize([inputs], tmp_path / "x", tokenizer_path, "--num-parts", "3")
    assert e.value.code == 2 and "--num-parts 3 needs --part" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        tokenize([inputs], tmp_path / "x", tokenizer_path, "--num-parts", "3", "--part", "3")
    assert "--part must be in [0, 3)" in capsys.readouterr().err
