"""Input readers shared by tokenizer training and tokenization: files, directories and globs of text corpora.

Supported inputs (compressed ones are decompressed as streams, so memory stays bounded whatever the file size):
  .txt, .txt.gz, .txt.zst          one file is one document
  .jsonl, .jsonl.gz, .jsonl.zst    one JSON object per line; the document is its `text_field` (default "text")

Bad input (invalid UTF-8, malformed JSON, a missing or non-string text field, an empty document, a truncated or
corrupt compressed stream) raises `InputError` naming the file and line under `on_error="fail"`; under "skip" it
is counted in `CorpusReader.skipped` by reason, logged, and reading goes on.
"""

from __future__ import annotations

import glob
import gzip
import json
import logging
import zlib
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, get_args

import zstandard

log = logging.getLogger(__name__)

TEXT_SUFFIXES = (".txt", ".txt.gz", ".txt.zst")
JSONL_SUFFIXES = (".jsonl", ".jsonl.gz", ".jsonl.zst")
SUPPORTED = TEXT_SUFFIXES + JSONL_SUFFIXES
CHUNK = 1 << 20
OnError = Literal["fail", "skip"]  # bad input: stop with an error, or skip it and count it
ON_ERROR: tuple[str, ...] = get_args(OnError)
# Reasons a document or file is skipped; the manifest and the summary count each.
REASONS = ("invalid_utf8", "malformed_json", "missing_field", "bad_field_type", "empty_document", "truncated_stream")
WARN_LIMIT = 10  # warnings logged per reason before they are only counted


class InputError(ValueError):
    """Unusable input, with the file (and line) it came from."""


@dataclass
class Document:
    text: str
    source: str  # "path" or "path:line"
    data: bytes  # the text as UTF-8 (validated once here, so consumers need not encode it again)


def supported(path: Path) -> bool:
    return path.name.endswith(SUPPORTED)


def expand_inputs(specs: list[str]) -> list[Path]:
    """Files, directories (searched recursively for supported files) and globs -> a sorted, de-duplicated list.

    A path that does not exist, a glob that matches nothing, an unsupported file named explicitly and a
    directory without any supported file are errors.
    """
    if not specs:
        raise InputError("no inputs given")
    out: list[Path] = []
    for spec in specs:
        if glob.has_magic(spec):
            matches = sorted(Path(p) for p in glob.glob(spec, recursive=True))
            files = [p for p in matches if p.is_file() and supported(p)]
            if not files:
                raise InputError(f"{spec}: the pattern matches no supported file ({', '.join(SUPPORTED)})")
        else:
            path = Path(spec)
            if path.is_dir():
                files = sorted(p for p in path.rglob("*") if p.is_file() and supported(p))
                if not files:
                    raise InputError(f"{spec}: the directory holds no supported file ({', '.join(SUPPORTED)})")
            elif path.is_file():
                if not supported(path):
                    raise InputError(f"{spec}: unsupported file type (supported: {', '.join(SUPPORTED)})")
                files = [path]
            else:
                raise InputError(f"{spec}: no such file or directory")
        out += files
    seen: set[Path] = set()
    unique = []
    for p in out:
        key = p.resolve()
        if key not in seen:
            seen.add(key)
            unique.append(p)
    return unique


class TruncatedStream(Exception):
    pass


def _raw_chunks(f) -> Iterator[bytes]:
    while chunk := f.read(CHUNK):
        yield chunk


def _zstd_chunks(f) -> Iterator[bytes]:
    """Decompress every frame of a .zst file; a stream that ends inside a frame raises TruncatedStream.

    (zstandard's stream_reader treats a truncated frame as a normal end of data, hence this loop.)
    """
    dctx = zstandard.ZstdDecompressor()
    dobj, in_frame = dctx.decompressobj(), False
    for chunk in _raw_chunks(f):
        while chunk:
            try:
                out = dobj.decompress(chunk)
            except zstandard.ZstdError as e:
                raise TruncatedStream(f"corrupt zstd data ({e})") from None
            in_frame = True
            if out:
                yield out
            if dobj.eof:
                chunk, dobj, in_frame = dobj.unused_data, dctx.decompressobj(), False
            else:
                chunk = b""
    if in_frame:
        raise TruncatedStream("the zstd stream ends inside a frame (truncated file?)")


def _gzip_chunks(f) -> Iterator[bytes]:
    try:
        with gzip.GzipFile(fileobj=f) as g:
            while chunk := g.read1(CHUNK):  # read1: hand over what is decoded before a truncation is hit
                yield chunk
    except EOFError:
        raise TruncatedStream("the gzip stream ends early (truncated file?)") from None
    except (gzip.BadGzipFile, zlib.error) as e:
        raise TruncatedStream(f"corrupt gzip data ({e})") from None


def _lines(chunks: Iterator[bytes]) -> Iterator[bytes]:
    """Split a stream of byte chunks into lines (without their b"\\n")."""
    rest = b""
    for chunk in chunks:
        parts = (rest + chunk).split(b"\n")
        rest = parts.pop()
        yield from parts
    if rest:
        yield rest


class _Counting:
    """A file wrapper that counts the raw (compressed) bytes read, for progress."""

    def __init__(self, f, reader: CorpusReader):
        self.f, self.reader = f, reader

    def read(self, n=-1):
        data = self.f.read(n)
        self.reader.raw_bytes_read += len(data)
        return data


class CorpusReader:
    """Iterates the documents of a list of input files, in order, applying the bad-input policy."""

    def __init__(self, paths: list[Path], *, text_field: str = "text", on_error: OnError = "fail"):
        if on_error not in ON_ERROR:
            raise ValueError(f"on_error must be one of {ON_ERROR}, got {on_error!r}")
        self.paths, self.text_field, self.on_error = paths, text_field, on_error
        self.skipped: Counter[str] = Counter()
        self.raw_bytes_read = 0
        self.total_raw_bytes = sum(p.stat().st_size for p in paths)

    def bad(self, reason: str, where: str, message: str) -> None:
        """Fail, or count and log, one bad item."""
        if self.on_error == "fail":
            raise InputError(f"{where}: {message} (pass --on-error=skip to skip such input and count it)")
        self.skipped[reason] += 1
        if self.skipped[reason] <= WARN_LIMIT:
            log.warning("skipped %s: %s", where, message)
            if self.skipped[reason] == WARN_LIMIT:
                log.warning("further '%s' items are counted but not logged", reason)

    def __iter__(self) -> Iterator[Document]:
        for path in self.paths:
            with open(path, "rb") as raw:
                f = _Counting(raw, self)
                name = path.name
                chunks = (
                    _zstd_chunks(f)
                    if name.endswith(".zst")
                    else _gzip_chunks(f)
                    if name.endswith(".gz")
                    else _raw_chunks(f)
                )
                docs = self._text_file(path, chunks) if name.endswith(TEXT_SUFFIXES) else self._jsonl_file(path, chunks)
                try:
                    yield from docs
                except TruncatedStream as e:
                    self.bad("truncated_stream", str(path), f"{e}; the rest of the file is lost")

    def _text_file(self, path: Path, chunks: Iterator[bytes]) -> Iterator[Document]:
        data = b"".join(chunks)
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as e:
            line = data.count(b"\n", 0, e.start) + 1
            self.bad("invalid_utf8", f"{path}:{line}", f"invalid UTF-8 at byte {e.start}")
            return
        if not text:
            self.bad("empty_document", str(path), "empty document")
            return
        yield Document(text, str(path), data)

    def _jsonl_file(self, path: Path, chunks: Iterator[bytes]) -> Iterator[Document]:
        field = self.text_field
        for lineno, line in enumerate(_lines(chunks), start=1):
            if not line.strip():
                continue  # blank lines hold no document
            where = f"{path}:{lineno}"
            try:
                obj = json.loads(line.decode("utf-8"))
            except UnicodeDecodeError as e:
                self.bad("invalid_utf8", where, f"invalid UTF-8 at byte {e.start} of the line")
                continue
            except json.JSONDecodeError as e:
                self.bad("malformed_json", where, f"malformed JSON ({e.msg} at column {e.colno})")
                continue
            if not isinstance(obj, dict):
                self.bad("malformed_json", where, f"expected a JSON object, got {type(obj).__name__}")
                continue
            if field not in obj:
                self.bad("missing_field", where, f"no '{field}' field (choose it with --text-field)")
                continue
            text = obj[field]
            if not isinstance(text, str):
                self.bad("bad_field_type", where, f"'{field}' is {type(text).__name__}, expected a string")
                continue
            if not text:
                self.bad("empty_document", where, "empty document")
                continue
            try:
                data = text.encode("utf-8")
            except UnicodeEncodeError:
                self.bad("invalid_utf8", where, "the text holds a lone surrogate escape (not valid Unicode)")
                continue
            yield Document(text, where, data)
