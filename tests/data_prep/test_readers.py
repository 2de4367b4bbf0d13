import errno
import gzip
import json
import os
import subprocess
import sys

import pytest
import zstandard

from data_prep import readers
from data_prep.readers import CorpusReader, InputError, expand_inputs

from ..helpers import REPO, write_jsonl


def read(paths, **kw):
    reader = CorpusReader(paths, **kw)
    return [d.text for d in reader], reader


def test_expand_inputs_files_dirs_globs(tmp_path):
    (tmp_path / "d" / "sub").mkdir(parents=True)
    for name in ["d/b.txt", "d/a.jsonl", "d/sub/c.jsonl.zst", "d/ignored.csv", "e.txt.gz"]:
        (tmp_path / name).write_bytes(b"")
    got = expand_inputs([str(tmp_path / "d"), str(tmp_path / "*.gz"), str(tmp_path / "d" / "b.txt")])
    rel = [p.relative_to(tmp_path).as_posix() for p in got]
    assert rel == ["d/a.jsonl", "d/b.txt", "d/sub/c.jsonl.zst", "e.txt.gz"]  # sorted, de-duplicated


@pytest.mark.parametrize(
    "spec,message",
    [
        ("missing.txt", "missing.txt: no such file or directory"),
        ("*.nothing", r"\*.nothing: the pattern matches no supported file"),
        ("data.csv", "data.csv: unsupported file type"),
        ("empty_dir", "empty_dir: the directory holds no supported file"),
    ],
)
def test_expand_inputs_errors(tmp_path, monkeypatch, spec, message):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data.csv").write_text("a,b\n")
    (tmp_path / "empty_dir").mkdir()
    with pytest.raises(InputError, match=message):
        expand_inputs([spec])


def test_formats_read_the_same(tmp_path):
    texts = ["first document\nwith two lines", "second", "third ünïcode 🙂"]
    plain = write_jsonl(tmp_path / "a.jsonl", texts)
    raw = plain.read_bytes()
    (tmp_path / "a.jsonl.gz").write_bytes(gzip.compress(raw))
    # two zstd frames back to back, cut mid-line: frames must be joined seamlessly
    cctx = zstandard.ZstdCompressor(write_checksum=True)
    (tmp_path / "a.jsonl.zst").write_bytes(cctx.compress(raw[:30]) + cctx.compress(raw[30:]))
    (tmp_path / "t.txt").write_text(texts[0], encoding="utf-8")
    (tmp_path / "t.txt.zst").write_bytes(cctx.compress(texts[0].encode()))
    for name in ["a.jsonl", "a.jsonl.gz", "a.jsonl.zst"]:
        assert read([tmp_path / name])[0] == texts
    assert read([tmp_path / "t.txt"])[0] == [texts[0]]
    assert read([tmp_path / "t.txt.zst"])[0] == [texts[0]]


def test_text_field_and_blank_lines(tmp_path):
    p = tmp_path / "a.jsonl"
    p.write_text('{"content": "one"}\n\n   \n{"content": "two"}', encoding="utf-8")  # no final newline
    assert read([p], text_field="content")[0] == ["one", "two"]


def bad_inputs(tmp_path):
    """(file, expected error text, skip reason) for each kind of bad input."""
    good = json.dumps({"text": "fine"}) + "\n"
    cases = {
        "utf8.jsonl": (
            good.encode() + b'{"text": "bad \xff byte"}\n' + good.encode(),
            "utf8.jsonl:2: invalid UTF-8",
            "invalid_utf8",
        ),
        "json.jsonl": (
            good + good + '{"text": "unterminated}\n' + good,
            "json.jsonl:3: malformed JSON",
            "malformed_json",
        ),
        "array.jsonl": (good + "[1, 2]\n", "array.jsonl:2: expected a JSON object, got list", "malformed_json"),
        "field.jsonl": (good + '{"body": "x"}\n', "field.jsonl:2: no 'text' field", "missing_field"),
        "type.jsonl": (good + '{"text": 42}\n', "type.jsonl:2: 'text' is int, expected a string", "bad_field_type"),
        "empty.jsonl": (good + '{"text": ""}\n', "empty.jsonl:2: empty document", "empty_document"),
        "surrogate.jsonl": (good + '{"text": "lone \\ud800"}\n', "surrogate.jsonl:2: .*lone surrogate", "invalid_utf8"),
        "latin1.txt": ("line one\nline two caf\xe9\n".encode("latin-1"), "latin1.txt:2: invalid UTF-8", "invalid_utf8"),
        "empty.txt": (b"", "empty.txt: empty document", "empty_document"),
    }
    big = "".join(json.dumps({"text": f"document {i} " * 20}) + "\n" for i in range(2000)).encode()
    zst = zstandard.ZstdCompressor().compress(big)
    gz = gzip.compress(big)
    cases["cut.jsonl.zst"] = (
        zst[: len(zst) // 2],
        "cut.jsonl.zst: the zstd stream ends inside a frame",
        "truncated_stream",
    )
    cases["cut.jsonl.gz"] = (gz[: len(gz) // 2], "cut.jsonl.gz: the gzip stream ends early", "truncated_stream")
    out = []
    for name, (data, message, reason) in cases.items():
        path = tmp_path / name
        path.write_bytes(data if isinstance(data, bytes) else data.encode())
        out.append((path, message, reason))
    return out


def test_each_bad_input_fails_naming_file_and_line(tmp_path):
    for path, message, _ in bad_inputs(tmp_path):
        with pytest.raises(InputError, match=message) as e:
            read([path])
        assert "--on-error=skip" in str(e.value)


def test_each_bad_input_is_skipped_and_counted(tmp_path):
    for path, _, reason in bad_inputs(tmp_path):
        texts, reader = read([path], on_error="skip")
        assert dict(reader.skipped) == {reason: 1}, path.name
        if reason == "truncated_stream":
            assert 0 < len(texts) < 2000  # the complete lines before the cut are kept
        elif path.suffix == ".jsonl":
            assert texts and set(texts) == {"fine"}
        else:
            assert texts == []


def test_raw_bytes_counted_for_progress(tmp_path):
    p = write_jsonl(tmp_path / "a.jsonl", ["x" * 1000] * 10)
    zp = tmp_path / "a.jsonl.zst"
    zp.write_bytes(zstandard.ZstdCompressor().compress(p.read_bytes()))
    _, reader = read([p, zp])
    assert reader.raw_bytes_read == reader.total_raw_bytes == p.stat().st_size + zp.stat().st_size


def test_recursive_search_does_not_enter_symlinked_directories(tmp_path):
    corpus, data = tmp_path / "corpus", tmp_path / "data"
    (corpus / "sub").mkdir(parents=True)
    data.mkdir()
    for path in [corpus / "a.txt", corpus / "sub" / "b.jsonl", data / "c.txt"]:
        path.write_text("x")
    (corpus / "self").symlink_to(".")  # two loops: a search that follows them branches for ever
    (corpus / "sub" / "up").symlink_to("..")
    (corpus / "elsewhere").symlink_to(data)
    (corpus / "link.txt").symlink_to(data / "c.txt")  # a symlinked file is read
    code = "import json, sys; from data_prep.readers import expand_inputs; print(json.dumps([str(p) for p in expand_inputs(sys.argv[1:])]))"
    expected = {
        corpus: ["a.txt", "link.txt", "sub/b.jsonl"],
        corpus / "**": ["a.txt", "link.txt", "sub/b.jsonl"],
        corpus / "**" / "*.txt": ["a.txt", "link.txt"],
        corpus / "elsewhere": ["elsewhere/c.txt"],  # named, a symlinked directory is searched
        corpus / "*" / "c.txt": ["elsewhere/c.txt"],  # and so it is by a glob component other than **
    }
    for spec, want in expected.items():
        # in a child process: the old glob never came back
        proc = subprocess.run(
            [sys.executable, "-c", code, str(spec)], capture_output=True, text=True, timeout=20, cwd=REPO
        )
        assert proc.returncode == 0, proc.stderr
        assert json.loads(proc.stdout) == [str(corpus / p) for p in want], spec
        if spec in (corpus, corpus / "**"):
            for link in ["elsewhere", "self", "sub/up"]:
                assert f"{corpus / link}: a symlinked directory, not searched" in proc.stderr


def test_paths_that_are_not_readable_files_follow_the_policy(tmp_path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "good.txt").write_text("fine")
    (corpus / "gone.txt").symlink_to(tmp_path / "missing.txt")
    os.mkfifo(corpus / "pipe.jsonl")  # opening it would wait for a writer for ever
    with pytest.raises(InputError, match="gone.txt: a symlink to a missing file"):
        expand_inputs([str(corpus)])
    with pytest.raises(InputError, match="pipe.jsonl: not a regular file"):
        expand_inputs([str(corpus / "pipe.jsonl")])
    with pytest.raises(InputError, match="gone.txt: a symlink to a missing file .*--on-error=skip"):
        CorpusReader.from_inputs([str(corpus)])
    reader = CorpusReader.from_inputs([str(corpus)], on_error="skip")
    assert [d.text for d in reader] == ["fine"]
    assert reader.skipped == {"unreadable": 2}
    assert reader.unreadable == [str(corpus / "gone.txt"), str(corpus / "pipe.jsonl")]


def test_file_gone_or_failing_while_read_follows_the_policy(tmp_path, monkeypatch):
    a = write_jsonl(tmp_path / "a.jsonl", ["one"])
    gone = write_jsonl(tmp_path / "gone.jsonl", ["two"])
    reader = CorpusReader([a, gone])
    gone.unlink()  # after it was listed
    with pytest.raises(InputError, match=r"gone.jsonl: cannot open \(No such file or directory\)"):
        list(reader)
    texts, reader = read([a, gone], on_error="skip")
    assert texts == ["one"] and reader.skipped == {"unreadable": 1} and reader.unreadable == [str(gone)]

    def failing_disk(f):
        yield f.read(len(b'{"text": "one", "id": 0}\n'))
        raise OSError(errno.EIO, os.strerror(errno.EIO))

    monkeypatch.setattr(readers, "_raw_chunks", failing_disk)
    b = write_jsonl(tmp_path / "b.jsonl", ["one", "two"])
    with pytest.raises(InputError, match=r"b.jsonl: read error \(Input/output error\); the rest of the file is lost"):
        read([b])
    texts, reader = read([b], on_error="skip")
    assert texts == ["one"] and reader.skipped == {"unreadable": 1}


def test_zstd_frames_without_checksum_are_noted(tmp_path, monkeypatch, caplog):
    raw = write_jsonl(tmp_path / "a.jsonl", ["one", "two"]).read_bytes()
    checked, unchecked = zstandard.ZstdCompressor(write_checksum=True), zstandard.ZstdCompressor(write_checksum=False)
    files = {
        "checked.jsonl.zst": checked.compress(raw[:10]) + checked.compress(raw[10:]),
        "unchecked.jsonl.zst": unchecked.compress(raw),
        "second_frame_unchecked.jsonl.zst": checked.compress(raw[:10]) + unchecked.compress(raw[10:]),
    }
    paths = []
    for name, data in files.items():
        paths.append(tmp_path / name)
        paths[-1].write_bytes(data)
    for chunk in (1 << 20, 3):  # 3: frame headers cut across reads
        monkeypatch.setattr(readers, "CHUNK", chunk)
        caplog.clear()
        texts, reader = read(paths)
        assert texts == ["one", "two"] * 3
        assert reader.unchecked == [str(paths[1]), str(paths[2])]
        for p in paths[1:]:
            assert f"{p}: zstd frames without a content checksum" in caplog.text
        assert str(paths[0]) not in caplog.text
