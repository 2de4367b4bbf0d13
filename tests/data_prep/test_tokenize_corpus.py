import gzip
import io
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import asdict

import numpy as np
import pytest
import sentencepiece as spm
import zstandard

from data_prep import tokenize_corpus
from data_prep.tokenize_corpus import (
    FIRST_BATCH,
    LongTextEncoder,
    OutputError,
    TokenizeSettings,
    batch_limit,
    build_parser,
    is_val,
    lock_output,
    run,
    split_salt,
    warn_if_encoded_whole,
)
from pretrain.shards import IndexedShard, manifest_shards, read_manifest, verify_dataset

from ..helpers import TRICKY, dataset_files, tokenize, write_jsonl


def decoded_documents(out, tokenizer):
    """Every document of a dataset decoded, per split, in order, with the EOD checked and removed."""
    manifest = read_manifest(out)
    docs = {}
    for split, shards in manifest_shards(manifest).items():
        docs[split] = []
        for info in shards:
            shard = IndexedShard(out / info.prefix)
            for i in range(len(shard)):
                ids = shard[i]
                assert ids[-1] == tokenizer.eod_id
                docs[split].append(tokenizer.decode(ids[:-1]))
    return docs


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, speeches):
    """A jsonl corpus of real speeches (cut into paragraphs-sized documents) and tricky strings."""
    texts = list(TRICKY)
    for p in speeches[:40]:
        paragraphs = p.read_text(encoding="utf-8").split("\n\n")
        texts += ["\n\n".join(paragraphs[i : i + 3]) for i in range(0, len(paragraphs), 3)]
    path = write_jsonl(tmp_path_factory.mktemp("corpus") / "corpus.jsonl", texts)
    return path, texts


def test_round_trip_real_text(tmp_path, corpus, tokenizer, tokenizer_path):
    path, texts = corpus
    out = tmp_path / "ds"
    assert tokenize([path], out, tokenizer_path, "--val-fraction", "0.1", "--shard-tokens", "20000") == 0
    docs = decoded_documents(out, tokenizer)
    salt = split_salt(0)
    expected = {"train": [], "val": []}
    for t in texts:
        expected["val" if is_val(t.encode(), 0.1, salt) else "train"].append(t)
    assert docs == expected
    assert len(expected["val"]) > 10 and len(expected["train"]) > 10 * len(expected["val"]) // 2
    manifest = read_manifest(out)
    assert len(manifest["splits"]["train"]["shards"]) > 3
    assert manifest["splits"]["train"]["documents"] == len(expected["train"])
    assert verify_dataset(out) == []
    assert not [p for p in out.rglob("*") if p.name.endswith(".tmp") or p.name == ".progress.json"]


def test_identical_bytes_for_any_workers_and_batch_size(tmp_path, corpus, tokenizer_path):
    path, _ = corpus
    runs = {
        "w1": ["--workers", "1"],
        "w2": ["--workers", "2"],
        "w2_batch1": ["--workers", "2", "--batch-docs", "1"],
        "w3_small_mb": ["--workers", "3", "--batch-docs", "1000", "--batch-mb", "0.01"],
    }
    results = {}
    for name, extra in runs.items():
        assert tokenize([path], tmp_path / name, tokenizer_path, "--shard-tokens", "30000", *extra) == 0
        results[name] = dataset_files(tmp_path / name)
    reference = results.pop("w1")
    assert len([k for k in reference if k.endswith(".bin")]) > 3
    for name, files in results.items():
        assert files == reference, name  # every shard and the manifest, byte for byte


def test_batches_are_small_at_the_start_and_the_end_of_the_input():
    mb, total = 4 << 20, 1 << 30
    limits = [batch_limit(k, total, mb, 2) for k in range(10)]
    assert limits == [FIRST_BATCH << k for k in range(7)] + [mb] * 3  # doubling from 64 KiB up to --batch-mb
    assert batch_limit(50, 16 << 20, mb, 2) == 2 << 20  # a quarter of the rest per worker toward the end...
    assert batch_limit(50, 1000, mb, 2) == FIRST_BATCH  # ...but not below the first batch's size
    assert batch_limit(0, total, 1000, 2) == batch_limit(50, 0, 1000, 2) == 1000  # --batch-mb bounds them all


def test_split_is_stable(tmp_path, corpus):
    _, texts = corpus
    salt = split_salt(0)
    rule = {t: is_val(t.encode(), 0.2, salt) for t in texts}
    assert 0.1 < sum(rule.values()) / len(rule) < 0.3
    # a document's split depends on its text alone: not on its neighbours, its position, or the fraction's
    # other documents; raising the fraction only moves documents from train to val.
    assert all(is_val(t.encode(), 0.2, salt) == v for t, v in reversed(list(rule.items())))
    assert all(is_val(t.encode(), 0.3, salt) for t, v in rule.items() if v)
    assert any(is_val(t.encode(), 0.2, split_salt(1)) != v for t, v in rule.items())


def test_split_of_a_document_survives_corpus_changes(tmp_path, corpus, tokenizer, tokenizer_path):
    path, texts = corpus
    a = tmp_path / "a"
    assert tokenize([path], a, tokenizer_path, "--val-fraction", "0.2") == 0
    shuffled = list(reversed(texts[5:]))  # drop some, reorder the rest
    b_in = write_jsonl(tmp_path / "b.jsonl", shuffled)
    assert tokenize([b_in], tmp_path / "b", tokenizer_path, "--val-fraction", "0.2") == 0
    da, db = decoded_documents(a, tokenizer), decoded_documents(tmp_path / "b", tokenizer)
    assert set(db["val"]) == set(da["val"]) & set(shuffled)
    assert set(db["train"]) == set(da["train"]) & set(shuffled)


def test_zstd_and_gzip_inputs_give_the_same_shards(tmp_path, corpus, tokenizer_path):
    path, _ = corpus
    raw = path.read_bytes()
    outs = {}
    for name, data in {
        "corpus.jsonl": raw,
        "corpus.jsonl.zst": zstandard.ZstdCompressor(level=3).compress(raw),
        "corpus.jsonl.gz": gzip.compress(raw),
    }.items():
        (tmp_path / name).write_bytes(data)
        assert tokenize([tmp_path / name], tmp_path / f"out_{name}", tokenizer_path) == 0
        files = dataset_files(tmp_path / f"out_{name}")
        outs[name] = {k: v for k, v in files.items() if k != "manifest.json"}
    assert outs["corpus.jsonl.zst"] == outs["corpus.jsonl"] == outs["corpus.jsonl.gz"]


def test_text_files_and_dtype(tmp_path, speeches, tokenizer, tokenizer_path):
    out = tmp_path / "ds"
    assert tokenize(speeches[:5], out, tokenizer_path, "--val-fraction", "0", "--add-bos") == 0
    manifest = read_manifest(out)
    assert manifest["dtype"] == "uint16" and manifest["settings"]["add_bos"]
    shard = IndexedShard(out / "train" / "shard_00000")
    assert shard.dtype == np.uint16 and len(shard) == 5
    for i, p in enumerate(speeches[:5]):
        ids = shard[i]
        assert ids[0] == tokenizer.bos_id and ids[-1] == tokenizer.eod_id
        assert tokenizer.decode(ids[1:-1]) == p.read_text(encoding="utf-8")
    assert manifest["splits"]["val"] == {"documents": 0, "tokens": 0, "text_bytes": 0, "shards": []}


def test_bad_input_fails_by_default_and_skips_on_request(tmp_path, tokenizer_path, capsys):
    good = write_jsonl(tmp_path / "good.jsonl", ["a fine document"] * 5)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{"text": broken\n{"nope": 1}\n{"text": ""}\n', encoding="utf-8")
    out = tmp_path / "ds"
    assert tokenize([good, bad], out, tokenizer_path) == 1
    err = capsys.readouterr().err
    assert "bad.jsonl:2: malformed JSON" in err and "--on-error=skip" in err
    assert not (out / "manifest.json").exists()
    assert tokenize([good, bad], out, tokenizer_path, "--on-error", "skip", "--overwrite") == 0
    manifest = read_manifest(out)
    assert {k: v for k, v in manifest["skipped"].items() if v} == {
        "malformed_json": 1,
        "missing_field": 1,
        "empty_document": 1,
    }
    assert sum(manifest["splits"][s]["documents"] for s in ("train", "val")) == 6


@pytest.mark.parametrize(
    "setup,message",
    [
        (lambda d: [d / "missing.jsonl"], "missing.jsonl: no such file or directory"),
        (lambda d: [d / "empty.jsonl"], "no documents in 1 input file"),
        (lambda d: [str(d / "*.none")], "matches no supported file"),
    ],
)
def test_missing_and_empty_inputs(tmp_path, tokenizer_path, capsys, setup, message):
    (tmp_path / "empty.jsonl").write_text("")
    assert tokenize(setup(tmp_path), tmp_path / "ds", tokenizer_path) == 1
    assert message in capsys.readouterr().err
    assert not (tmp_path / "ds" / "manifest.json").exists()


def test_existing_output_refused_unless_resume_or_overwrite(tmp_path, corpus, tokenizer_path, capsys):
    path, _ = corpus
    out = tmp_path / "ds"
    assert tokenize([path], out, tokenizer_path) == 0
    before = dataset_files(out)
    assert tokenize([path], out, tokenizer_path) == 1
    assert "holds a complete dataset; pass --resume to continue it or --overwrite" in capsys.readouterr().err
    assert tokenize([path], out, tokenizer_path, "--resume") == 0  # already complete: nothing to do
    assert dataset_files(out) == before
    extra = write_jsonl(path.parent / "extra.jsonl", ["one more document"])
    assert tokenize([path, extra], out, tokenizer_path, "--resume") == 1  # complete, but not with these inputs
    assert "differ from the complete dataset: inputs" in capsys.readouterr().err
    assert dataset_files(out) == before
    assert tokenize([path], out, tokenizer_path, "--overwrite", "--shard-tokens", "10000") == 0
    assert dataset_files(out) != before


def run_cli(args, **kw):
    cmd = [sys.executable, "-m", "data_prep", "tokenize", *map(str, args)]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, **kw)


def kill_after_shards(args, out, min_shards, sig=signal.SIGKILL, timeout=60.0):
    """Start the CLI and send `sig` once its progress record lists more than `min_shards` shards."""
    proc = run_cli(args)
    progress = out / ".progress.json"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            n = sum(len(v) for v in json.loads(progress.read_text())["shards"].values())
        except (FileNotFoundError, json.JSONDecodeError):
            n = 0
        if n > min_shards:
            proc.send_signal(sig)
            break
        time.sleep(0.002)
    proc.wait()
    return proc.returncode, n


def test_resume_after_kill_gives_identical_output(tmp_path, speeches, tokenizer_path):
    common = [
        "--tokenizer",
        tokenizer_path,
        "--shard-tokens",
        "15000",
        "--workers",
        "2",
        "--quiet",
        "--batch-docs",
        "4",
    ]
    inputs = speeches[:120]
    ref = tmp_path / "ref"
    assert run_cli([*inputs, *common, "--output", ref]).wait() == 0
    reference = dataset_files(ref)
    out = tmp_path / "ds"
    code, n1 = kill_after_shards([*inputs, *common, "--output", out], out, 0)
    assert code == -signal.SIGKILL, "the run finished before it could be killed"
    assert not (out / "manifest.json").exists()  # an interrupted run never looks complete
    # without a flag the incomplete output is refused; --resume continues, and is killed once more
    proc = run_cli([*inputs, *common, "--output", out])
    assert proc.wait() == 1 and b"incomplete dataset" in proc.stderr.read()
    code, n2 = kill_after_shards([*inputs, *common, "--output", out, "--resume"], out, n1)
    assert code == -signal.SIGKILL and n2 > n1
    proc = run_cli([*inputs, *common, "--output", out, "--resume"])
    assert proc.wait() == 0, proc.stderr.read()
    assert dataset_files(out) == reference


def test_resume_with_different_settings_is_refused(tmp_path, speeches, tokenizer_path):
    common = ["--tokenizer", tokenizer_path, "--shard-tokens", "15000", "--quiet", "--batch-docs", "4"]
    out = tmp_path / "ds"
    code, _ = kill_after_shards([*speeches[:120], *common, "--output", out], out, 0)
    assert code == -signal.SIGKILL
    proc = run_cli([*speeches[:120], *common, "--output", out, "--resume", "--val-fraction", "0.5"])
    assert proc.wait() == 1
    assert b"differ from the interrupted run: val_fraction" in proc.stderr.read()


def test_ctrl_c_exits_130_and_resumes(tmp_path, speeches, tokenizer_path):
    common = ["--tokenizer", tokenizer_path, "--shard-tokens", "15000", "--quiet", "--batch-docs", "4"]
    out = tmp_path / "ds"
    code, _ = kill_after_shards([*speeches[:120], *common, "--output", out], out, 0, sig=signal.SIGINT)
    assert code == 130
    assert not (out / "manifest.json").exists() and not list(out.rglob("*.tmp"))
    assert run_cli([*speeches[:120], *common, "--output", out, "--resume"]).wait() == 0
    assert verify_dataset(out) == []


def test_cli_defaults_are_the_settings_defaults():
    args = build_parser().parse_args(["corpus/", "--tokenizer", "tok/sp.model", "--output", "data/x"])
    assert vars(args) == asdict(TokenizeSettings(inputs=["corpus/"], tokenizer="tok/sp.model", output="data/x"))


def test_run_with_settings_writes_what_the_cli_writes(tmp_path, corpus, tokenizer_path):
    path, _ = corpus
    settings = TokenizeSettings(
        inputs=[path], tokenizer=tokenizer_path, output=tmp_path / "lib", shard_tokens=20000, workers=2, quiet=True
    )
    manifest = run(settings)
    assert tokenize([path], tmp_path / "cli", tokenizer_path, "--shard-tokens", "20000", "--workers", "2") == 0
    lib = dataset_files(tmp_path / "lib")
    assert len([k for k in lib if k.endswith(".bin")]) > 3
    assert lib == dataset_files(tmp_path / "cli")  # every shard and the manifest, byte for byte
    assert manifest == read_manifest(tmp_path / "lib")


@pytest.mark.parametrize(
    "bad,message",
    [
        ({"split_seed": -1}, "--split-seed must be in [0, 2**128), got -1"),
        ({"split_seed": 2**128}, f"--split-seed must be in [0, 2**128), got {2**128}"),
        ({"val_fraction": 1.0}, "--val-fraction must be in [0, 1), got 1.0"),
        ({"shard_tokens": 0}, "--shard-tokens must be at least 1, got 0"),
        ({"workers": 0}, "--workers must be at least 1, got 0"),
        ({"batch_docs": -3}, "--batch-docs must be at least 1, got -3"),
        ({"batch_mb": 0.0}, "--batch-mb must be positive, got 0.0"),
        ({"on_error": "ignore"}, "--on-error must be one of fail, skip, got 'ignore'"),
        ({"resume": True, "overwrite": True}, "--resume and --overwrite exclude each other"),
    ],
)
def test_bad_settings_name_the_flag(tmp_path, bad, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        TokenizeSettings(inputs=["x.jsonl"], tokenizer="sp.model", output=tmp_path / "ds", **bad)
    assert not list(tmp_path.iterdir())


def test_bad_setting_on_the_command_line_is_a_usage_error(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        tokenize_corpus.main(["x.jsonl", "--tokenizer", "sp.model", "--output", str(tmp_path), "--batch-mb", "-1"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("usage: python -m data_prep tokenize")
    assert err.endswith("error: --batch-mb must be positive, got -1.0\n")


def unprivileged(probe) -> list[str]:
    """A command prefix under which file permissions apply. The tests run as root (here and in CI) and root ignores
    permission bits, unless its capabilities to do so are dropped; `probe`, a file without permissions, checks it."""
    prefix = []
    if os.geteuid() == 0:
        if shutil.which("setpriv") is None:
            pytest.skip("running as root, and setpriv (util-linux), needed to drop root's file access, is missing")
        caps = "-dac_override,-dac_read_search"
        prefix = ["setpriv", f"--inh-caps={caps}", f"--bounding-set={caps}"]
    proc = subprocess.run([*prefix, sys.executable, "-c", f"open({str(probe)!r})"], capture_output=True, text=True)
    assert "PermissionError" in proc.stderr, proc.stderr
    return prefix


def test_unreadable_file_and_directory_follow_on_error(tmp_path, tokenizer_path):
    corpus = tmp_path / "corpus"
    (corpus / "locked_dir").mkdir(parents=True)
    good = write_jsonl(corpus / "good.jsonl", ["a fine document"] * 3)
    write_jsonl(corpus / "locked_dir" / "inside.jsonl", ["never read"])
    locked = write_jsonl(corpus / "locked.jsonl", ["never read either"])
    for path in (locked, corpus / "locked_dir"):
        path.chmod(0)
    prefix = unprivileged(locked)

    def cli(inputs, name, *extra):
        cmd = [*prefix, sys.executable, "-m", "data_prep", "tokenize", *map(str, inputs)]
        cmd += ["--tokenizer", str(tokenizer_path), "--output", str(tmp_path / name), "--workers", "1", *extra]
        return subprocess.run(cmd, capture_output=True, text=True, timeout=60)

    try:
        proc = cli([good, locked], "file")
        assert proc.returncode == 1 and "Traceback" not in proc.stderr
        assert f"error: {locked}: cannot open (Permission denied) (pass --on-error=skip" in proc.stderr
        proc = cli([corpus / "**" / "*.jsonl"], "dir")
        assert proc.returncode == 1 and "Traceback" not in proc.stderr
        assert f"error: {corpus / 'locked_dir'}: cannot read the directory (Permission denied)" in proc.stderr
        assert not list(tmp_path.glob("*/manifest.json"))
        proc = cli([corpus], "skip", "--on-error", "skip")
        assert proc.returncode == 0, proc.stderr
    finally:
        for path in (locked, corpus / "locked_dir"):
            path.chmod(0o755)
    manifest = read_manifest(tmp_path / "skip")
    assert {k: v for k, v in manifest["skipped"].items() if v} == {"unreadable": 2}
    assert manifest["unreadable"] == [str(corpus / "locked_dir"), str(locked)]
    assert [i["path"] for i in manifest["inputs"]] == [str(good)]  # known before reading: --resume checks it
    assert manifest["splits"]["train"]["documents"] + manifest["splits"]["val"]["documents"] == 3
    assert "skipped: unreadable=2" in proc.stdout
    assert f"unreadable, not read: {corpus / 'locked_dir'}, {locked}" in proc.stdout


@pytest.mark.parametrize("under", [False, True], ids=["file", "under_a_file"])
def test_output_in_the_way_of_a_directory_is_refused(tmp_path, corpus, tokenizer_path, capsys, under):
    blocker = tmp_path / "somefile"
    blocker.write_text("not a directory")
    out = blocker / "out" if under else blocker
    assert tokenize([corpus[0]], out, tokenizer_path) == 1
    assert (
        f"error: {out}: cannot be used as the output directory ({blocker} is not a directory)"
        in capsys.readouterr().err
    )
    assert blocker.read_text() == "not a directory"


@pytest.mark.parametrize("target_exists", [True, False])
def test_lock_file_symlink_is_not_followed(tmp_path, corpus, tokenizer_path, capsys, target_exists):
    victim = tmp_path / "victim.txt"
    if target_exists:
        victim.write_text("precious")
    out = tmp_path / "ds"
    out.mkdir()
    (out / ".lock").symlink_to(victim)
    assert tokenize([corpus[0]], out, tokenizer_path) == 1
    assert f"error: {out / '.lock'}: is a symlink; remove it" in capsys.readouterr().err
    assert (victim.read_text() == "precious") if target_exists else not victim.exists()
    (out / ".lock").unlink()
    assert tokenize([corpus[0]], out, tokenizer_path) == 0


class Hung(Exception):
    pass


def test_lock_file_fifo_is_refused_without_waiting(tmp_path, corpus, tokenizer_path, capsys):
    out = tmp_path / "ds"
    out.mkdir()
    fifo = out / ".lock"
    os.mkfifo(fifo)

    def hung(*_):
        raise Hung("opening the lock file waited for a reader of the FIFO")

    previous = signal.signal(signal.SIGALRM, hung)
    signal.alarm(20)  # opening a FIFO for writing blocks until a reader comes: fail rather than hang the suite
    try:
        assert tokenize([corpus[0]], out, tokenizer_path) == 1
        assert f"error: {fifo}: is not a regular file; remove it" in capsys.readouterr().err
        reader = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)  # with a reader, the open succeeds: fstat refuses it
        try:
            with pytest.raises(OutputError, match=re.escape(f"{fifo}: is not a regular file; remove it")):
                lock_output(out)
        finally:
            os.close(reader)
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
    fifo.unlink()
    assert tokenize([corpus[0]], out, tokenizer_path) == 0


def test_zstd_without_checksum_is_reported(tmp_path, corpus, tokenizer_path, capsys, caplog):
    lines = corpus[0].read_bytes().splitlines(keepends=True)
    half = len(lines) // 2
    unchecked, checked = tmp_path / "a.jsonl.zst", tmp_path / "b.jsonl.zst"
    unchecked.write_bytes(zstandard.ZstdCompressor(write_checksum=False).compress(b"".join(lines[:half])))
    checked.write_bytes(zstandard.ZstdCompressor(write_checksum=True).compress(b"".join(lines[half:])))
    out = tmp_path / "ds"
    argv = [str(unchecked), str(checked), "--tokenizer", str(tokenizer_path), "--output", str(out)]
    assert tokenize_corpus.main(argv) == 0  # not --quiet: the summary
    summary = capsys.readouterr().out
    assert f"zstd frames without a checksum (corruption in them goes undetected): {unchecked}\n" in summary
    assert f"{unchecked}: zstd frames without a content checksum" in caplog.text
    assert str(checked) not in caplog.text
    assert read_manifest(out)["zstd_without_checksum"] == [str(unchecked)]


def test_long_document_in_pieces_is_encoded_as_a_whole(tokenizer, speeches):
    text = "\n".join(TRICKY) + "".join(p.read_text(encoding="utf-8") for p in speeches[40:42]) + " ends  with  spaces  "
    whole = tokenizer.sp.encode(text, out_type=int)
    long = LongTextEncoder(tokenizer.sp)
    for piece_chars in (40, 1000, 50000):
        pieces = list(long.encode(text, piece_chars))
        assert len(pieces) > len(text) / piece_chars
        assert [i for ids in pieces for i in ids] == whole, piece_chars
    # text without spaces is cut after a newline, else anywhere: the text survives; the ids at a newline are exact
    lines = "".join(f"日本語のテキスト{i}。\n" for i in range(200))
    assert [i for ids in long.encode(lines, 100) for i in ids] == tokenizer.sp.encode(lines, out_type=int)
    line = lines.replace("\n", "")
    assert tokenizer.decode([i for ids in long.encode(line, 100) for i in ids]) == line


def test_long_documents_give_the_same_shards(tmp_path, speeches, tokenizer_path, monkeypatch):
    args = ["--workers", "2", "--val-fraction", "0.3", "--shard-tokens", "5000"]
    assert tokenize(speeches[:8], tmp_path / "whole", tokenizer_path, *args) == 0
    monkeypatch.setattr(tokenize_corpus, "PIECE_CHARS", 1000)  # the forked workers inherit it
    assert tokenize(speeches[:8], tmp_path / "pieces", tokenizer_path, *args) == 0
    whole = dataset_files(tmp_path / "whole")
    assert len([k for k in whole if k.endswith(".bin")]) > 3
    assert dataset_files(tmp_path / "pieces") == whole


def joined(long, text, piece_chars):
    return [i for ids in long.encode(text, piece_chars) for i in ids]


@pytest.fixture(scope="module")
def tiny_lines(speeches):
    """Training lines for tiny tokenizers, half of them with doubled spaces so that pieces of spaces exist."""
    lines = [line for p in speeches[:20] for line in p.read_text(encoding="utf-8").splitlines() if line]
    return [line.replace(" ", "  ") if i % 2 else line for i, line in enumerate(lines)]


@pytest.fixture(scope="module")
def spaced_tokenizer(tmp_path_factory, tiny_lines) -> spm.SentencePieceProcessor:
    """A train-tokenizer model (400 pieces) with a "▁▁" piece, as text with runs of spaces gives."""
    from data_prep import train_tokenizer

    out = tmp_path_factory.mktemp("spaced")
    (out / "lines.txt").write_text("\n".join(tiny_lines) + "\n", encoding="utf-8")
    argv = [str(out / "lines.txt"), "--output", str(out / "sp"), "--vocab-size", "400", "--threads", "1", "--quiet"]
    assert train_tokenizer.main(argv) == 0
    return spm.SentencePieceProcessor(model_file=str(out / "sp.model"))


def test_whitespace_marker_before_a_cut_keeps_the_ids(spaced_tokenizer):
    # a literal "▁" is sentencepiece's whitespace marker, which the identity normalization keeps: "alpha▁ beta" is
    # "▁alpha▁▁beta" to the model, with a word boundary before "▁▁", so no cut may fall between "▁" and " "
    sp = spaced_tokenizer
    assert "▁▁" in [sp.id_to_piece(i) for i in sp.encode("alpha▁ beta")]
    text = "alpha▁ beta ▁gamma  ▁▁ delta▁▁  ▁ epsilon ▁ ▁ zeta▁eta  theta▁ " * 4
    whole = sp.encode(text, out_type=int)
    long = LongTextEncoder(sp)
    for piece_chars in range(12, 60):
        assert joined(long, text, piece_chars) == whole, piece_chars


def train_tiny(lines, **options) -> spm.SentencePieceProcessor:
    """A 400-piece model with train-tokenizer's settings, except `options`."""
    settings = dict(
        model_type="bpe",
        vocab_size=400,
        byte_fallback=True,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        add_dummy_prefix=True,
        allow_whitespace_only_pieces=True,
        num_threads=1,
        minloglevel=2,
    )
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(lines), model_writer=model, **{**settings, **options})
    return spm.SentencePieceProcessor(model_proto=model.getvalue())


def encoded_whole(piece_chars):
    return (
        f"so encoding a long document in pieces could change its token ids: documents longer than {piece_chars} "
        "characters are encoded whole (sentencepiece needs about 40 bytes per character)"
    )


# each setting breaks piecewise encoding of this text: pieces across words ("of▁the"), whitespace as a suffix (a word
# ends after its run of spaces), spaces collapsed around "▁", NFKC making "\u3000 " two spaces (a cut falls between)
BREAKING = "the state of the union  is   strong▁ and\u3000 free, of the  people " * 6


@pytest.mark.parametrize(
    "options, obstacle",
    [
        ({"split_by_whitespace": False}, "trainer_spec.split_by_whitespace is false (pieces may span words)"),
        ({"treat_whitespace_as_suffix": True}, "trainer_spec.treat_whitespace_as_suffix is true"),
        ({"remove_extra_whitespaces": True}, "normalizer_spec.remove_extra_whitespaces is true"),
        ({"normalization_rule_name": "nmt_nfkc"}, "normalizer_spec.name is 'nmt_nfkc', not 'identity'"),
        ({"user_defined_symbols": ["of▁the"]}, "its piece 'of▁the' spans a word boundary"),
        ({}, None),
        ({"add_dummy_prefix": False}, None),
        ({"model_type": "unigram"}, None),
    ],
    ids=lambda v: ",".join(f"{k}={v[k]}" for k in v) if isinstance(v, dict) else None,
)
def test_models_whose_settings_break_pieces_encode_long_texts_whole(tiny_lines, caplog, options, obstacle):
    sp = train_tiny(tiny_lines, **options)
    whole = sp.encode(BREAKING, out_type=int)
    long = LongTextEncoder(sp)
    sizes = range(12, 60)
    assert all(joined(long, BREAKING, n) == whole for n in sizes)
    assert long.whole == (obstacle is not None)
    long.whole = False  # in pieces anyway: the setting does change the ids
    assert all(joined(long, BREAKING, n) == whole for n in sizes) == (obstacle is None)
    warn_if_encoded_whole(long, "tiny.model")
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert warnings == ([f"tiny.model: {obstacle}, {encoded_whole(1 << 20)}"] if obstacle else [])


def test_run_warns_once_and_encodes_whole_with_such_a_model(tmp_path, tiny_lines, monkeypatch, caplog):
    model = tmp_path / "tiny.model"
    model.write_bytes(train_tiny(tiny_lines, split_by_whitespace=False).serialized_model_proto())
    corpus = write_jsonl(tmp_path / "c.jsonl", [BREAKING * (i + 1) for i in range(12)])
    args = ["--workers", "2", "--batch-docs", "2"]
    assert tokenize([corpus], tmp_path / "whole", model, *args) == 0
    monkeypatch.setattr(tokenize_corpus, "PIECE_CHARS", 40)  # the forked workers inherit it
    caplog.clear()
    assert tokenize([corpus], tmp_path / "pieces", model, *args) == 0
    assert dataset_files(tmp_path / "pieces") == dataset_files(tmp_path / "whole")
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert warnings == [
        f"{model}: trainer_spec.split_by_whitespace is false (pieces may span words), {encoded_whole(40)}"
    ]
