import json
import re
from dataclasses import asdict

import pytest
import sentencepiece as spm

from data_prep import train_tokenizer
from data_prep.readers import CorpusReader
from data_prep.train_tokenizer import TokenizerSettings, build_parser, cut, sample_lines, train

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
