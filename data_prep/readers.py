"""Input readers shared by tokenizer training and tokenization: files, directories and globs of text corpora.

Supported inputs (compressed ones are decompressed as streams, so memory stays bounded whatever the file size):
  .txt, .txt.gz, .txt.zst          one file is one document
  .jsonl, .jsonl.gz, .jsonl.zst    one JSON object per line; the document is its `text_field` (default "text")

Directories are searched recursively, and so is `**` in a glob; neither enters a symlinked directory (it is
logged instead), so a symlink loop cannot make the search endless. Symlinks to files are read, and a symlinked
directory named as an input, or matched by a glob component other than `**`, is searched.

Bad input (invalid UTF-8, malformed JSON, a missing or non-string text field, an empty document, a truncated or
corrupt compressed stream, a file or directory that cannot be read) raises `InputError` naming the file and line
under `on_error="fail"`; under "skip" it is counted in `CorpusReader.skipped` by reason, logged, and reading goes
on. zstd detects corruption only in frames written with a content checksum (`zstd` writes one by default,
python-zstandard does not); files with frames without one are logged and listed in `CorpusReader.unchecked`.
"""

from __future__ import annotations

import errno
import fnmatch
import glob
import gzip
import json
import logging
import os
import stat
import zlib
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import cached_property, partial
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
REASONS = (
    "invalid_utf8",
    "malformed_json",
    "missing_field",
    "bad_field_type",
    "empty_document",
    "truncated_stream",
    "unreadable",  # a file or directory that cannot be opened or read, or a path that is not a regular file
)
WARN_LIMIT = 10  # warnings logged per reason before they are only counted
INPUTS_HELP = (
    "files, directories or globs (.txt, .jsonl, with .gz or .zst); directories and ** are searched recursively "
    "without entering symlinked directories"
)
ZSTD_MAGIC = 0xFD2FB528
_JSON = json.JSONDecoder()  # what json.loads(str) uses, minus its per-call checks


class InputError(ValueError):
    """Unusable input, with the file (and line) it came from."""


Bad = Callable[[str, str, str], None]  # bad(reason, where, message): the bad-input policy (`CorpusReader.bad`)


def _fail(reason: str, where: str, message: str) -> None:
    raise InputError(f"{where}: {message}")


@dataclass
class Document:
    text: str
    source: str  # "path" or "path:line"
    data: bytes  # the text as UTF-8 (validated once here, so consumers need not encode it again)


def supported(path: Path) -> bool:
    return path.name.endswith(SUPPORTED)


def expand_inputs(specs: list[str], *, bad: Bad = _fail) -> list[Path]:
    """Files, directories (searched recursively for supported files) and globs -> a sorted, de-duplicated list.

    A path that does not exist, a glob that matches nothing, an unsupported file named explicitly and a
    directory without any supported file are errors. What exists but cannot be read (a directory or file without
    permission, a FIFO, a dangling symlink) goes to `bad` with the reason "unreadable".
    """
    if not specs:
        raise InputError("no inputs given")
    out: list[Path] = []
    for spec in specs:
        out += _expand(spec, bad)
    seen: set[Path] = set()
    unique = []
    for p in out:
        key = p.resolve()
        if key not in seen:
            seen.add(key)
            unique.append(p)
    return unique


def _expand(spec: str, bad: Bad) -> list[Path]:
    problems: list[str] = []  # what went to `bad`: a spec with unreadable parts is not "empty"

    def report(reason: str, where: str, message: str) -> None:
        problems.append(where)
        bad(reason, where, message)

    path = Path(spec)
    if glob.has_magic(spec):
        files = sorted(p for p in _glob(spec, report) if supported(p) and _readable_file(p, report))
        if not files and not problems:
            raise InputError(f"{spec}: the pattern matches no supported file ({', '.join(SUPPORTED)})")
    elif os.path.isdir(path):
        files = sorted(d / name for d, names in _walk(path, report) for name in names)
        files = [p for p in files if supported(p) and _readable_file(p, report)]
        if not files and not problems:
            raise InputError(f"{spec}: the directory holds no supported file ({', '.join(SUPPORTED)})")
    elif _readable_file(path, report):
        if not supported(path):
            raise InputError(f"{spec}: unsupported file type (supported: {', '.join(SUPPORTED)})")
        files = [path]
    elif not problems:
        raise InputError(f"{spec}: no such file or directory")
    else:
        files = []
    return files


def _readable_file(path: Path, bad: Bad) -> bool:
    """Whether `path` is a regular file (symlinks followed) that can be opened. What exists but is not one goes to
    `bad`, so that what a run reads is settled before it starts (--resume checks the list); a missing path and a
    directory are just not files."""
    try:
        mode = path.stat().st_mode
    except OSError as e:
        if os.path.islink(path) and e.errno == errno.ENOENT:
            bad("unreadable", str(path), "a symlink to a missing file")
        elif e.errno not in (errno.ENOENT, errno.ENOTDIR):
            bad("unreadable", str(path), f"cannot read ({e.strerror})")
        return False
    if stat.S_ISDIR(mode):
        return False
    if not stat.S_ISREG(mode):
        bad("unreadable", str(path), "not a regular file")
        return False
    try:
        os.close(os.open(path, os.O_RDONLY))
    except OSError as e:
        bad("unreadable", str(path), f"cannot open ({e.strerror})")
        return False
    return True


def _walk(top: Path, bad: Bad, *, hidden: bool = True) -> Iterator[tuple[Path, list[str]]]:
    """(directory, its file names) for `top` and every directory below it, sorted, like os.walk; symlinked
    directories are logged and not entered, nor (unless `hidden`) names starting with a dot. A directory that
    cannot be read goes to `bad`."""

    def unreadable(e: OSError) -> None:
        if e.errno not in (errno.ENOENT, errno.ENOTDIR):  # gone since it was listed: nothing to read
            bad("unreadable", str(e.filename), f"cannot read the directory ({e.strerror})")

    for d, dirs, files in os.walk(top, onerror=unreadable):
        keep = []
        for name in sorted(dirs):
            if not hidden and name.startswith("."):
                continue
            if os.path.islink(os.path.join(d, name)):
                log.warning("%s: a symlinked directory, not searched (name it as an input to read it)", Path(d, name))
            else:
                keep.append(name)
        dirs[:] = keep  # what os.walk goes on to enter
        yield Path(d), sorted(f for f in files if hidden or not f.startswith("."))


def _glob(pattern: str, bad: Bad) -> list[Path]:
    """glob.glob(pattern, recursive=True), one path component at a time (hidden names only match a pattern that
    starts with a dot), except that `**` does not enter symlinked directories and unreadable directories go to
    `bad` instead of being passed over."""
    parts = Path(pattern).parts
    if parts[-1] == "**":
        parts += ("*",)  # a final ** matches everything below; only files are wanted
    first = next(i for i, part in enumerate(parts) if glob.has_magic(part))
    paths = [Path(*parts[:first])]
    for part in parts[first:]:
        if part == "**":
            paths = [d for top in paths for d, _ in _walk(top, bad, hidden=False)]
        elif glob.has_magic(part):
            paths = [
                p / name
                for p in paths
                for name in _listdir(p, bad)
                if fnmatch.fnmatchcase(name, part) and (part.startswith(".") or not name.startswith("."))
            ]
        else:
            paths = [p / part for p in paths]
    return paths


def _listdir(d: Path, bad: Bad) -> list[str]:
    try:
        return sorted(os.listdir(d))
    except (FileNotFoundError, NotADirectoryError):
        return []
    except OSError as e:
        bad("unreadable", str(d), f"cannot read the directory ({e.strerror})")
        return []


class TruncatedStream(Exception):
    pass


def _raw_chunks(f) -> Iterator[bytes]:
    while chunk := f.read(CHUNK):
        yield chunk


def _range_chunks(f, start: int, end: int) -> Iterator[bytes]:
    """The bytes of the lines that start in [start, end) of an uncompressed file (data_prep/parts.py): a line that
    began before `start` is left to the range that holds its first byte; the last line that starts before `end`
    is read to its end."""
    pos, rest = 0, b""  # `rest`: bytes read from offset `pos` on, not yet given out
    if start > 0:
        f.seek(start - 1)
        pos = start - 1
        while True:  # drop the line holding byte start - 1, up to and including its newline
            chunk = f.read(CHUNK)
            if not chunk:
                return
            i = chunk.find(b"\n")
            if i >= 0:
                pos, rest = pos + i + 1, chunk[i + 1 :]
                break
            pos += len(chunk)
    if pos >= end:  # no line starts in the range
        return
    while True:  # give out everything up to the first newline at offset end - 1 or later
        if not rest:
            rest = f.read(CHUNK)
            if not rest:
                return
        k = max(end - 1 - pos, 0)
        if k < len(rest) and (i := rest.find(b"\n", k)) >= 0:
            yield rest[: i + 1]
            return
        yield rest
        pos, rest = pos + len(rest), b""


def _zstd_chunks(f, unchecked: Callable[[], None]) -> Iterator[bytes]:
    """Decompress every frame of a .zst file; a stream that ends inside a frame raises TruncatedStream, and
    `unchecked()` is called for each frame that carries no content checksum (its corruption goes undetected).

    (zstandard's stream_reader treats a truncated frame as a normal end of data, hence this loop.)
    """
    dctx = zstandard.ZstdDecompressor()
    dobj, in_frame, head = dctx.decompressobj(), False, b""
    for chunk in _raw_chunks(f):
        while chunk:
            if len(head) < 5:  # RFC 8878: the 4-byte magic number, then the Frame_Header_Descriptor
                head += chunk[: 5 - len(head)]
                if len(head) == 5 and int.from_bytes(head[:4], "little") == ZSTD_MAGIC and not head[4] & 0x04:
                    unchecked()  # bit 2 of the descriptor: Content_Checksum_flag (skippable frames hold no content)
            try:
                out = dobj.decompress(chunk)
            except zstandard.ZstdError as e:
                raise TruncatedStream(f"corrupt zstd data ({e})") from None
            in_frame = True
            if out:
                yield out
            if dobj.eof:
                chunk, dobj, in_frame, head = dobj.unused_data, dctx.decompressobj(), False, b""
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
        self.ranges: dict[Path, tuple[int, int]] = {}  # byte ranges read of some paths (data_prep/parts.py)
        self.skipped: Counter[str] = Counter()
        self.unreadable: list[str] = []  # files and directories skipped as unreadable
        self.unchecked: list[str] = []  # .zst files with frames that carry no content checksum
        self.raw_bytes_read = 0

    @classmethod
    def from_inputs(cls, specs: list[str], *, text_field: str = "text", on_error: OnError = "fail") -> CorpusReader:
        """A reader of files, directories and globs (see `expand_inputs`), expanded under its own policy: an
        unreadable directory or file met on the way fails the run or is skipped and counted like other bad input."""
        reader = cls([], text_field=text_field, on_error=on_error)
        reader.paths = expand_inputs(specs, bad=reader.bad)
        return reader

    def read_slices(self, slices: list) -> None:
        """Read only these files, and of a file given as a byte range only the lines that start in it
        (data_prep/parts.py's Slice: path, start, end, whole)."""
        self.paths = [s.path for s in slices]
        self.ranges = {s.path: (s.start, s.end) for s in slices if not s.whole}
        self.__dict__.pop("total_raw_bytes", None)

    @cached_property
    def total_raw_bytes(self) -> int:
        return sum(self.ranges[p][1] - self.ranges[p][0] if p in self.ranges else p.stat().st_size for p in self.paths)

    def bad(self, reason: str, where: str, message: str) -> None:
        """Fail, or count and log, one bad item."""
        if self.on_error == "fail":
            raise InputError(f"{where}: {message} (pass --on-error=skip to skip such input and count it)")
        if reason == "unreadable":
            if where in self.unreadable:
                return  # met again through another input that covers it
            self.unreadable.append(where)
        self.skipped[reason] += 1
        if self.skipped[reason] <= WARN_LIMIT:
            log.warning("skipped %s: %s", where, message)
            if self.skipped[reason] == WARN_LIMIT:
                log.warning("further '%s' items are counted but not logged", reason)

    def _unchecked(self, path: Path) -> None:
        if self.unchecked and self.unchecked[-1] == str(path):
            return  # one note per file
        self.unchecked.append(str(path))
        if len(self.unchecked) <= WARN_LIMIT:
            log.warning("%s: zstd frames without a content checksum: corruption in them cannot be detected", path)
            if len(self.unchecked) == WARN_LIMIT:
                log.warning("further .zst files without checksums are listed but not logged")

    def __iter__(self) -> Iterator[Document]:
        for path in self.paths:
            try:
                raw = open(path, "rb")
            except OSError as e:  # no permission, removed since it was listed, ...
                self.bad("unreadable", str(path), f"cannot open ({e.strerror})")
                continue
            with raw:
                f = _Counting(raw, self)
                name = path.name
                chunks = (
                    _zstd_chunks(f, partial(self._unchecked, path))
                    if name.endswith(".zst")
                    else _gzip_chunks(f)
                    if name.endswith(".gz")
                    else _range_chunks(raw, *self.ranges[path])
                    if path in self.ranges
                    else _raw_chunks(f)
                )
                if path in self.ranges:  # lines are counted from the range's start
                    label = Path(f"{path}[bytes {self.ranges[path][0]}-{self.ranges[path][1]}]")
                    chunks = self._counted_range(chunks, *self.ranges[path])
                else:
                    label = path
                docs = (
                    self._text_file(label, chunks) if name.endswith(TEXT_SUFFIXES) else self._jsonl_file(label, chunks)
                )
                try:
                    yield from docs
                except TruncatedStream as e:
                    self.bad("truncated_stream", str(path), f"{e}; the rest of the file is lost")
                except OSError as e:  # an I/O error: a failing disk, a network file system gone away
                    self.bad("unreadable", str(path), f"read error ({e.strerror}); the rest of the file is lost")

    def _counted_range(self, chunks: Iterator[bytes], start: int, end: int) -> Iterator[bytes]:
        """`chunks` of a byte range, counted in `raw_bytes_read` as they are given out; at the end the count is made
        the range's size (the lines given out may begin before or end after it)."""
        given = 0
        for chunk in chunks:
            self.raw_bytes_read += len(chunk)
            given += len(chunk)
            yield chunk
        self.raw_bytes_read += end - start - given

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
        # Per-line work is the main process's share of a tokenize run (workers only encode): kept minimal.
        prefix, parse = f"{path}:", self.jsonl_document
        for lineno, line in enumerate(_lines(chunks), start=1):
            if not line or line.isspace():  # as `not line.strip()`, without copying the line
                continue  # blank lines hold no document
            doc = parse(line, prefix + str(lineno))
            if doc is not None:
                yield doc

    def jsonl_document(self, line: bytes, where: str) -> Document | None:
        """The document of one JSON line (`where` names it in messages), or None: bad input under the policy."""
        field = self.text_field
        try:
            obj = _JSON.decode(line.decode("utf-8"))
        except UnicodeDecodeError as e:
            self.bad("invalid_utf8", where, f"invalid UTF-8 at byte {e.start} of the line")
            return None
        except json.JSONDecodeError as e:
            self.bad("malformed_json", where, f"malformed JSON ({e.msg} at column {e.colno})")
            return None
        if not isinstance(obj, dict):
            self.bad("malformed_json", where, f"expected a JSON object, got {type(obj).__name__}")
            return None
        if field not in obj:
            self.bad("missing_field", where, f"no '{field}' field (choose it with --text-field)")
            return None
        text = obj[field]
        if not isinstance(text, str):
            self.bad("bad_field_type", where, f"'{field}' is {type(text).__name__}, expected a string")
            return None
        if not text:
            self.bad("empty_document", where, "empty document")
            return None
        try:
            data = text.encode("utf-8")
        except UnicodeEncodeError:
            self.bad("invalid_utf8", where, "the text holds a lone surrogate escape (not valid Unicode)")
            return None
        return Document(text, where, data)
