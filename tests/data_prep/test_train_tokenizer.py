import gzip
import json
import re
from dataclasses import asdict

import pytest
import sentencepiece as spm
import zstandard

from data_prep import train_tokenizer
from data_prep.readers import CorpusReader, InputError
from data_prep.train_tokenizer import (
    ReadReport,
    TokenizerSettings,
    build_parser,
    cut,
    parse_size,
    read_with_budget,
    sample_lines,
    train,
)

from ..helpers import TRICKY, write_jsonl


def test_lossless_round_trip(tokenizer, speeches):
    texts = TRICKY + [p.read_text(encoding="utf-8") for p in speeches[-3:]]  # speeches it was not trained on
    for text in texts:
        assert tokenizer.decode(tokenizer.encode(text)) == text


def test_special_ids_vocab_and_settings(tokenizer, tokenizer_path):
    sp = tokenizer.sp
    assert tokenizer.vocab_size == 2000
    assert [sp.id_to_piece(i) for i in range(4)] == ["<unk>", "<s>", "</s>", "<pad>"]
    assert (sp.unk_id(), tokenizer.bos_id, tokenizer.eod_id, tokenizer.pad_id) == (0, 1, 2, 3)
    vocab = tokenizer_path.with_suffix(".vocab").read_text(encoding="utf-8").splitlines()
    assert len(vocab) == 2000 and vocab[2].split("\t")[0] == "</s>"
    settings = json.loads(tokenizer_path.with_suffix(".json").read_text())
    assert settings["options"]["byte_fallback"] and settings["options"]["normalization_rule_name"] == "identity"
    assert settings["lines_sampled"] == settings["lines_seen"] > 1000


def test_digits_are_split(tokenizer):
    pieces = tokenizer.sp.encode("year 1776", out_type=str)
    assert pieces[-4:] == ["1", "7", "7", "6"]


def test_unseen_characters_fall_back_to_bytes(tokenizer):
    ids = tokenizer.encode("ꙮ")  # not in the training text
    assert 0 not in ids  # never <unk>
    assert [tokenizer.sp.id_to_piece(i) for i in ids][-3:] == ["<0xEA>", "<0x99>", "<0xAE>"]


def test_cut_respects_byte_limit_and_prefers_spaces():
    line = "word " * 100 + "ü" * 100
    pieces = cut(line, 64)
    assert "".join(pieces) == line
    assert all(len(p.encode()) <= 64 for p in pieces)
    assert pieces[0].endswith("word") and pieces[1].startswith(" word")


def test_sample_is_bounded_and_seeded(tmp_path):
    p = write_jsonl(tmp_path / "a.jsonl", [f"line {i}\nother {i}" for i in range(500)])
    a, seen = sample_lines(CorpusReader([p]), k=50, max_bytes=100, seed=1)
    b, _ = sample_lines(CorpusReader([p]), k=50, max_bytes=100, seed=1)
    c, _ = sample_lines(CorpusReader([p]), k=50, max_bytes=100, seed=2)
    assert seen == 1000 and len(a) == 50 and a == b and a != c
    assert sum(x.startswith("line") for x in a) not in (0, 50)  # drawn from the whole corpus


def test_same_seed_same_model_and_unigram(tmp_path, speeches):
    inputs = [str(p) for p in speeches[:20]]
    for name in ("a", "b"):
        assert train_tokenizer.main([*inputs, "--output", str(tmp_path / name), "--vocab-size", "600", "--quiet"]) == 0
    assert (tmp_path / "a.model").read_bytes() == (tmp_path / "b.model").read_bytes()
    args = [*inputs, "--output", str(tmp_path / "u"), "--vocab-size", "600", "--model-type", "unigram", "--quiet"]
    assert train_tokenizer.main(args) == 0
    sp = spm.SentencePieceProcessor(model_file=str(tmp_path / "u.model"))
    assert sp.get_piece_size() == 600 and sp.decode(sp.encode(TRICKY[1])) == TRICKY[1]


def test_existing_output_refused(tmp_path, speeches, capsys):
    args = [str(speeches[0]), "--output", str(tmp_path / "t"), "--vocab-size", "400", "--quiet"]
    assert train_tokenizer.main(args) == 0
    before = (tmp_path / "t.model").read_bytes()
    assert train_tokenizer.main(args) == 1
    err = capsys.readouterr().err
    assert "t.model" in err and "--overwrite" in err
    assert (tmp_path / "t.model").read_bytes() == before
    assert train_tokenizer.main([*args, "--overwrite"]) == 0


def test_vocab_too_large_for_corpus_is_a_clear_error(tmp_path, capsys):
    p = write_jsonl(tmp_path / "tiny.jsonl", ["just a few words"])
    assert train_tokenizer.main([str(p), "--output", str(tmp_path / "t"), "--vocab-size", "5000", "--quiet"]) == 1
    assert "--vocab-size 5000" in capsys.readouterr().err
    assert not (tmp_path / "t.model").exists()


def test_bad_arguments_exit_with_usage(tmp_path):
    with pytest.raises(SystemExit) as e:
        train_tokenizer.main(["x.txt", "--output", str(tmp_path / "t"), "--vocab-size", "100"])
    assert e.value.code == 2


def test_cli_defaults_are_the_settings_defaults():
    args = build_parser().parse_args(["corpus/", "--output", "tok/sp"])
    assert vars(args) == asdict(TokenizerSettings(inputs=["corpus/"], output="tok/sp"))


def test_train_with_settings_writes_what_the_cli_writes(tmp_path, speeches):
    settings = TokenizerSettings(inputs=speeches[:5], output=tmp_path / "lib", vocab_size=400, quiet=True)
    record = train(settings)
    cli = [*map(str, speeches[:5]), "--output", str(tmp_path / "cli"), "--vocab-size", "400", "--quiet"]
    assert train_tokenizer.main(cli) == 0
    for ext in (".model", ".vocab", ".json"):
        assert (tmp_path / f"lib{ext}").read_bytes() == (tmp_path / f"cli{ext}").read_bytes(), ext
    assert record == json.loads((tmp_path / "lib.json").read_text())
    assert record["inputs"] == [str(p) for p in speeches[:5]]


@pytest.mark.parametrize(
    "bad,message",
    [
        ({"vocab_size": 200}, "--vocab-size 200 is too small: byte fallback alone takes 256 pieces plus 4 specials"),
        ({"sample_lines": 0}, "--sample-lines must be >= 1 and --max-line-bytes >= 16"),
        ({"max_line_bytes": 15}, "--sample-lines must be >= 1 and --max-line-bytes >= 16"),
        ({"model_type": "wordpiece"}, "--model-type must be one of bpe, unigram, got 'wordpiece'"),
        ({"on_error": "ignore"}, "--on-error must be one of fail, skip, got 'ignore'"),
        ({"max_read_bytes": 0}, "--max-read-bytes must be a positive number of bytes, got 0"),
    ],
)
def test_bad_settings_name_the_flag(tmp_path, bad, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        TokenizerSettings(inputs=["x.txt"], output=tmp_path / "t", **bad)
    assert not list(tmp_path.iterdir())


def test_small_vocab_without_byte_fallback_is_allowed(tmp_path):
    assert TokenizerSettings(inputs=["x.txt"], output=tmp_path / "t", vocab_size=200, byte_fallback=False)


def test_bad_setting_on_the_command_line_is_a_usage_error(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        train_tokenizer.main(["x.txt", "--output", str(tmp_path / "t"), "--sample-lines", "0"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("usage: python -m data_prep train-tokenizer")
    assert err.endswith("error: --sample-lines must be >= 1 and --max-line-bytes >= 16\n")


# ------------------------------------------------------------------------------------- --max-read-bytes
REGIONS = 10  # the huge file is written in regions; each line names its region
HUGE_BYTES = 50_000_000
MAX_READ_SLACK = 1 << 17  # a compressed file read in part overshoots by one read block of its decompressor


def budget_read(paths, budget: int, *, seed: int = 0, on_error: str = "fail") -> tuple[list[str], ReadReport]:
    reader = CorpusReader(list(paths), on_error=on_error)
    report = ReadReport(budget, bytes_total=reader.total_raw_bytes, files_total=len(reader.paths))
    return list(read_with_budget(reader, report, seed=seed)), report


@pytest.fixture(scope="module")
def huge_jsonl(tmp_path_factory):
    """A 50 MB .jsonl of ~100-byte lines; a line in the r-th tenth of the file says "region r"."""
    path = tmp_path_factory.mktemp("huge") / "huge.jsonl"
    per_region = HUGE_BYTES // REGIONS // 100
    with open(path, "w", encoding="utf-8") as f:
        for r in range(REGIONS):
            f.write("".join(f'{{"text": "region {r} line {i:07d} {"lorem ipsum " * 5}"}}\n' for i in range(per_region)))
    return path


def regions(texts: list[str]) -> set[int]:
    return {int(t.split()[1]) for t in texts}


def test_parse_size_follows_the_project_convention():
    assert parse_size("10GB") == 10 * 10**9 and parse_size("500MB") == 500 * 10**6
    assert parse_size("2GiB") == 2 * 2**30 and parse_size("1.5 kib") == 1536 and parse_size("4096") == 4096
    for bad in ("0", "-1GB", "10XB", ""):
        with pytest.raises(Exception, match="is not a size"):
            parse_size(bad)
    assert build_parser().parse_args(["c/", "--output", "t", "--max-read-bytes", "2MiB"]).max_read_bytes == 2 << 20


def test_bad_size_on_the_command_line_is_a_usage_error(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        train_tokenizer.main(["x.txt", "--output", str(tmp_path / "t"), "--max-read-bytes", "10XB"])
    assert (
        e.value.code == 2 and "argument --max-read-bytes: '10XB' is not a size such as 5GB" in capsys.readouterr().err
    )


def test_huge_file_is_read_in_windows_from_all_over(huge_jsonl):
    budget = 1_000_000
    texts, report = budget_read([huge_jsonl], budget)
    longest = 120
    assert budget <= report.bytes_read <= budget + longest
    assert report.files_read == report.files_partly_read == 1 and report.windows_read >= 32
    assert len(regions(texts)) == REGIONS  # not just the start of the file
    assert all(t.startswith("region ") for t in texts) and len(set(texts)) == len(texts)  # whole lines, none twice


def test_budget_read_is_seeded(huge_jsonl):
    a, _ = budget_read([huge_jsonl], 300_000, seed=1)
    b, _ = budget_read([huge_jsonl], 300_000, seed=1)
    c, _ = budget_read([huge_jsonl], 300_000, seed=2)
    assert a == b and a != c and len(set(a) & set(c)) < len(a) // 2


def test_budget_far_smaller_than_corpus_samples_files(tmp_path):
    paths = [
        write_jsonl(tmp_path / f"f{i:02d}.jsonl", [f"file {i} doc {j} " + "x" * (j % 50) for j in range(400)])
        for i in range(40)
    ]
    total = sum(p.stat().st_size for p in paths)
    budget = total // 10 + 1234  # not a whole number of files
    longest = max(len(line) for p in paths for line in p.read_bytes().splitlines(keepends=True))
    texts, report = budget_read(paths, budget, seed=3)
    assert budget <= report.bytes_read <= budget + longest
    assert report.files_partly_read == 1 and 3 <= report.files_read <= 6 and report.bytes_total == total
    files = sorted({int(t.split()[1]) for t in texts})
    assert files != list(range(len(files)))  # a seeded random choice of files, not the first ones
    assert budget_read(paths, budget, seed=4)[0] != texts


@pytest.mark.parametrize("suffix", [".jsonl.gz", ".txt.zst"])
def test_compressed_file_is_read_from_its_start_up_to_the_budget(tmp_path, suffix):
    lines = [f"region {i * REGIONS // 200_000} line {i} " + "y" * (i % 30) for i in range(200_000)]
    data = "".join((json.dumps({"text": t}) if "jsonl" in suffix else t) + "\n" for t in lines).encode()
    path = tmp_path / f"c{suffix}"
    path.write_bytes(
        gzip.compress(data, compresslevel=1) if suffix.endswith(".gz") else zstandard.ZstdCompressor().compress(data)
    )
    budget = path.stat().st_size // 4
    texts, report = budget_read([path], budget)
    assert budget <= report.bytes_read <= budget + MAX_READ_SLACK
    assert report.files_partly_read == 1 and report.windows_read == 0
    assert texts == lines[: len(texts)] and 0 < len(texts) < len(lines)  # a prefix, whole lines only


def test_bad_lines_in_windows_follow_the_policy(tmp_path):
    good = [json.dumps({"text": f"doc {i}"}) for i in range(20_000)]
    path = tmp_path / "bad.jsonl"
    path.write_text("\n".join(line if i % 100 else "{not json" for i, line in enumerate(good)) + "\n")
    texts, _ = budget_read([path], 20_000, on_error="skip")
    assert texts and all(t.startswith("doc ") for t in texts)
    with pytest.raises(InputError, match=r"bad\.jsonl: byte \d+: malformed JSON"):
        budget_read([path], 200_000, on_error="fail")


def test_same_seed_same_tokenizer_and_the_record_says_what_was_read(tmp_path, huge_jsonl, capsys):
    args = [str(huge_jsonl), "--vocab-size", "300", "--max-read-bytes", "200KB", "--sample-lines", "1000"]
    for name, seed in (("a", "5"), ("b", "5"), ("c", "6")):
        assert train_tokenizer.main([*args, "--output", str(tmp_path / name), "--seed", seed]) == 0
    out = capsys.readouterr().out
    assert out.count(" of 1 files, budget 200,000)") == 3 and "lines (read 200,0" in out
    assert (tmp_path / "a.model").read_bytes() == (tmp_path / "b.model").read_bytes()
    a, c = (json.loads((tmp_path / f"{n}.json").read_text()) for n in "ac")
    assert a["read"]["max_read_bytes"] == 200_000 and 200_000 <= a["read"]["bytes_read"] <= 200_120
    assert a["read"]["files_read"] == 1 and a["read"]["bytes_total"] == huge_jsonl.stat().st_size
    assert a["lines_sampled"] == 1000 < a["lines_seen"] < 2500 and a["sample_seed"] == 5
    assert (tmp_path / "c.model").read_bytes() != (tmp_path / "a.model").read_bytes()  # another sample


def test_no_budget_reads_everything_as_before(tmp_path, speeches):
    inputs = speeches[:8]
    record = train(TokenizerSettings(inputs=inputs, output=tmp_path / "none", vocab_size=400, quiet=True))
    assert "read" not in record
    assert record["lines_seen"] == sample_lines(CorpusReader(inputs), k=1, max_bytes=4192, seed=0)[1]
    # a budget that covers the corpus reads it in the usual order: the same sample, the same model
    total = sum(p.stat().st_size for p in inputs)
    covered = train(
        TokenizerSettings(inputs=inputs, output=tmp_path / "all", vocab_size=400, quiet=True, max_read_bytes=total)
    )
    assert (tmp_path / "none.model").read_bytes() == (tmp_path / "all.model").read_bytes()
    assert covered["read"]["bytes_read"] == total and covered["read"]["files_read"] == len(inputs)
