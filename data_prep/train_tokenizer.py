"""Train a sentencepiece tokenizer (BPE or unigram) on a bounded random sample of a corpus of any size.

Defaults make tokenization lossless: byte fallback (no <unk> for any UTF-8 text), identity normalization and no
whitespace collapsing, so decode(encode(x)) == x. Digits are split one per piece. Special ids are fixed:
unk 0, bos 1, eos 2 (marks the end of a document), pad 3.

The sample is a reservoir of lines (long lines cut at whitespace), so memory is bounded by --sample-lines
whatever the corpus size; the same seed gives the same sample and the same model.

By default every input is read. --max-read-bytes bounds the bytes read from disk instead: files are taken in an
order shuffled by --seed and read whole while they fit in what is left of the budget; the file that does not fit is
read in part: an uncompressed one as random line-aligned byte windows spread over the whole file, a compressed one
(.gz, .zst: it can only be read from the start) from its start until the budget is spent. The budget is exceeded
by at most one line (a compressed file: one read block). A budget that covers the whole corpus reads it in the
usual order, so the sample is the one without a budget.
Writes <output>.model, <output>.vocab (piece<TAB>score) and <output>.json (the settings and the sample's size,
and with a budget what was read: "read").

As a library: `train(TokenizerSettings(inputs=["corpus/"], output="tok/sp", vocab_size=8000))`; the CLI
(`python -m data_prep train-tokenizer`) only turns its arguments into those settings.
"""

from __future__ import annotations

import argparse
import gzip
import io
import logging
import math
import os
import random
import sys
import time
import zlib
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal, get_args

import sentencepiece as spm
import zstandard

from data_prep.readers import INPUTS_HELP, ON_ERROR, TEXT_SUFFIXES, CorpusReader, InputError, OnError
from pretrain import __version__
from pretrain.fileutil import parse_size, write_bytes_atomic, write_json_atomic

log = logging.getLogger("data_prep.train_tokenizer")

SPECIALS = {"unk": (0, "<unk>"), "bos": (1, "<s>"), "eos": (2, "</s>"), "pad": (3, "<pad>")}
# Text that must survive encode -> decode unchanged with the default settings.
ROUND_TRIP_PROBE = "  Leading spaces,\ttabs,\r\nCRLF, trailing  \n\n1234567 × 3.14 = ? naïve café 日本語 🙂 \x00\x7f"
ModelType = Literal["bpe", "unigram"]
MODEL_TYPES: tuple[str, ...] = get_args(ModelType)
# --max-read-bytes: a file read in part is read as windows of at most WINDOW_BYTES (sequential I/O that is
# worth a seek), but at least MIN_WINDOWS of them (so a small budget still sees the whole file).
WINDOW_BYTES = 1 << 20
MIN_WINDOWS = 64
CHUNK = 1 << 20  # decompressed bytes handed over at a time by a compressed file read in part


@dataclass
class TokenizerSettings:
    """Everything `train` reads. Field names are the CLI's flags (`vocab_size` is `--vocab-size`), defaults its
    defaults; invalid values raise `ValueError` naming the flag when the settings are made."""

    inputs: list[str]  # files, directories or globs (.txt, .jsonl, with .gz or .zst)
    output: str | Path  # output prefix: writes PREFIX.model, PREFIX.vocab, PREFIX.json
    vocab_size: int = 32000  # pieces, the 4 specials and the 256 byte pieces included
    model_type: ModelType = "bpe"
    sample_lines: int = 2_000_000  # lines in the random training sample (reservoir: bounds memory)
    max_line_bytes: int = 4192  # longer lines are cut at whitespace; also sentencepiece's max_sentence_length
    character_coverage: float = 0.9995  # share of characters given their own piece; the rest fall back to bytes
    byte_fallback: bool = True  # False: unknown characters become <unk> (lossy)
    text_field: str = "text"  # JSON field holding the text in .jsonl inputs
    on_error: OnError = "fail"  # bad input: stop, or skip and count it
    seed: int = 0  # seed of the line sample, and of the files and windows read under max_read_bytes
    max_read_bytes: int | None = None  # bytes read from disk at most (a sample of files and windows); None: all
    threads: int = field(default_factory=lambda: len(os.sched_getaffinity(0)))  # sentencepiece trainer threads
    overwrite: bool = False  # replace an existing model with the same prefix
    quiet: bool = False  # no summary line on stdout

    def __post_init__(self) -> None:
        self.inputs = [os.fspath(p) for p in self.inputs]  # Path objects welcome; expand_inputs globs strings
        self.validate()

    def validate(self) -> None:
        """Raise ValueError, naming the CLI flag, for a value `train` cannot use."""
        if self.vocab_size < 300 and self.byte_fallback:
            raise ValueError(
                f"--vocab-size {self.vocab_size} is too small: byte fallback alone takes 256 pieces plus 4 specials"
            )
        if self.sample_lines < 1 or self.max_line_bytes < 16:
            raise ValueError("--sample-lines must be >= 1 and --max-line-bytes >= 16")
        if self.model_type not in MODEL_TYPES:
            raise ValueError(f"--model-type must be one of {', '.join(MODEL_TYPES)}, got {self.model_type!r}")
        if self.on_error not in ON_ERROR:
            raise ValueError(f"--on-error must be one of {', '.join(ON_ERROR)}, got {self.on_error!r}")
        if self.max_read_bytes is not None and (isinstance(self.max_read_bytes, bool) or self.max_read_bytes < 1):
            raise ValueError(f"--max-read-bytes must be a positive number of bytes, got {self.max_read_bytes!r}")


def cut(line: str, max_bytes: int) -> list[str]:
    """Split a line into pieces of at most `max_bytes` UTF-8 bytes, preferring to cut before a space."""
    if len(line.encode("utf-8")) <= max_bytes:
        return [line]
    pieces, start, width = [], 0, max_bytes // 4  # 4 bytes per character at most
    while start < len(line):
        end = min(start + width, len(line))
        if end < len(line):
            space = line.rfind(" ", start + 1, end)
            end = space if space > start else end
        pieces.append(line[start:end])
        start = end
    return pieces


def sample_lines(reader: CorpusReader, *, k: int, max_bytes: int, seed: int) -> tuple[list[str], int]:
    """A uniform random sample of at most k non-empty lines (reservoir sampling); returns it and the lines seen."""
    return reservoir((doc.text for doc in reader), k=k, max_bytes=max_bytes, seed=seed)


def reservoir(texts: Iterable[str], *, k: int, max_bytes: int, seed: int) -> tuple[list[str], int]:
    """A uniform random sample of at most k non-empty lines of `texts`; returns it and the lines seen."""
    rng = random.Random(seed)
    sample: list[str] = []
    seen = 0
    for text in texts:
        for line in text.split("\n"):
            if not line.strip():
                continue
            for piece in cut(line, max_bytes):
                if seen < k:
                    sample.append(piece)
                else:
                    j = rng.randrange(seen + 1)
                    if j < k:
                        sample[j] = piece
                seen += 1
    return sample, seen


@dataclass
class ReadReport:
    """What a budgeted read read; PREFIX.json records it as "read"."""

    max_read_bytes: int  # the budget
    bytes_total: int  # on-disk size of all inputs
    files_total: int
    bytes_read: int = 0  # bytes read from disk (a compressed file: its compressed bytes)
    files_read: int = 0  # files touched, whole or in part
    files_partly_read: int = 0  # files larger than what was left of the budget (at most one, the last)
    windows_read: int = 0  # byte windows read in uncompressed files read in part


def read_with_budget(reader: CorpusReader, report: ReadReport, *, seed: int) -> Iterator[str]:
    """Texts (documents, or lines of a file read in part) of the reader's files within `report.max_read_bytes`.

    Files come in an order shuffled by `seed` (in the reader's order when the budget covers them all) and are read
    whole by the reader while they fit in what is left; the first that does not fit is read in part and ends the
    read. Bad input goes to the reader's policy either way. `report` is updated as the texts are handed over.
    """
    rng = random.Random(f"train-tokenizer read {seed}")  # apart from the reservoir's generator
    paths = list(reader.paths)
    if report.bytes_total > report.max_read_bytes:
        rng.shuffle(paths)
    for path in paths:
        left = report.max_read_bytes - report.bytes_read
        if left <= 0:
            break
        try:
            size = path.stat().st_size
        except OSError as e:
            reader.bad("unreadable", str(path), f"cannot read ({e.strerror})")
            continue
        report.files_read += 1
        if size <= left:
            yield from _whole_file(reader, path, report)
            continue
        report.files_partly_read += 1
        if path.name.endswith((".gz", ".zst")):
            lines = _compressed_prefix(reader, path, report, limit=left)
        else:
            lines = _windows(reader, path, report, limit=left, rng=rng)
        for line, where in lines:
            if (text := _line_text(reader, path, line, where)) is not None:
                yield text
        return


def _whole_file(reader: CorpusReader, path: Path, report: ReadReport) -> Iterator[str]:
    """The documents of one file, read by a CorpusReader that counts bad input in `reader`'s counters."""
    one = CorpusReader([path], text_field=reader.text_field, on_error=reader.on_error)
    one.skipped, one.unreadable, one.unchecked = reader.skipped, reader.unreadable, reader.unchecked
    try:
        for doc in one:
            yield doc.text
    finally:
        report.bytes_read += one.raw_bytes_read


def _windows(
    reader: CorpusReader, path: Path, report: ReadReport, *, limit: int, rng: random.Random
) -> Iterator[tuple[bytes, str]]:
    """(line, where) from random line-aligned windows of an uncompressed file until `limit` bytes are read.

    The file is cut into windows of equal size; as many as the limit needs are drawn without replacement and read
    in the drawn order (so a budget spent early by long lines is not spent on the file's start). A window owns the
    lines that start inside it: it seeks to its start, skips the rest of the line under way, and reads lines while
    they start before its end.
    """
    size = path.stat().st_size
    width = max(1, min(WINDOW_BYTES, limit // MIN_WINDOWS))
    slots = math.ceil(size / width)
    read = 0
    try:
        with open(path, "rb") as f:
            for slot in rng.sample(range(slots), min(slots, math.ceil(limit / width))):
                if read >= limit:
                    break
                start, end = slot * width, min(size, (slot + 1) * width)
                report.windows_read += 1
                if start:
                    f.seek(start - 1)
                    skipped = len(f.readline())  # up to and including the newline at or after start - 1
                    read += skipped
                    report.bytes_read += skipped
                while read < limit and (pos := f.tell()) < end:
                    line = f.readline()
                    if not line:
                        break
                    read += len(line)
                    report.bytes_read += len(line)
                    yield line.rstrip(b"\n"), f"{path}: byte {pos}"
    except OSError as e:
        reader.bad("unreadable", str(path), f"read error ({e.strerror}); the rest of the file is not read")


class _Counted:
    """A raw file that adds the bytes read from it to a ReadReport."""

    def __init__(self, f, report: ReadReport):
        self.f, self.report, self.count = f, report, 0

    def read(self, n=-1):
        data = self.f.read(n)
        self.count += len(data)
        self.report.bytes_read += len(data)
        return data


def _compressed_prefix(
    reader: CorpusReader, path: Path, report: ReadReport, *, limit: int
) -> Iterator[tuple[bytes, str]]:
    """(line, where) from the start of a .gz or .zst file until `limit` compressed bytes are read (a line cut by the
    limit is dropped)."""
    lineno = 0
    try:
        with open(path, "rb") as raw:
            f = _Counted(raw, report)
            if path.name.endswith(".gz"):
                stream = gzip.GzipFile(fileobj=f)
                read = stream.read1
            else:
                stream = zstandard.ZstdDecompressor().stream_reader(f, read_across_frames=True)
                read = stream.read
            with stream:
                rest = b""
                while f.count < limit:
                    if not (chunk := read(CHUNK)):
                        if rest:
                            yield rest, f"{path}:{lineno + 1}"
                        break
                    lines = (rest + chunk).split(b"\n")
                    rest = lines.pop()
                    for line in lines:
                        lineno += 1
                        yield line, f"{path}:{lineno}"
    except (EOFError, zlib.error, zstandard.ZstdError) as e:
        reader.bad("truncated_stream", str(path), f"corrupt or truncated data ({e}); the rest of the file is not read")
    except OSError as e:  # gzip.BadGzipFile is one
        reader.bad("unreadable", str(path), f"read error ({e}); the rest of the file is not read")


def _line_text(reader: CorpusReader, path: Path, line: bytes, where: str) -> str | None:
    """The text of one line of a file read in part, or None (blank, or bad input under the reader's policy): a
    .txt line is its text, a .jsonl line is parsed and checked as CorpusReader does when it reads the whole file."""
    if not line.strip():
        return None
    if not path.name.endswith(TEXT_SUFFIXES):
        doc = reader.jsonl_document(line, where)
        return None if doc is None else doc.text
    try:
        return line.decode("utf-8")
    except UnicodeDecodeError as e:
        reader.bad("invalid_utf8", where, f"invalid UTF-8 at byte {e.start} of the line")
        return None


def train(settings: TokenizerSettings) -> dict:
    """Sample the inputs, train, write PREFIX.model/.vocab/.json; returns what PREFIX.json records."""
    out = Path(settings.output)
    files = {ext: out.with_name(out.name + ext) for ext in (".model", ".vocab", ".json")}
    existing = [str(p) for p in files.values() if p.exists()]
    if existing and not settings.overwrite:
        raise FileExistsError(f"{', '.join(existing)} already exist(s); pass --overwrite to replace")
    out.parent.mkdir(parents=True, exist_ok=True)
    reader = CorpusReader.from_inputs(settings.inputs, text_field=settings.text_field, on_error=settings.on_error)
    paths = reader.paths
    t0 = time.perf_counter()
    report = None
    if settings.max_read_bytes is None:
        texts: Iterable[str] = (doc.text for doc in reader)
    else:
        report = ReadReport(settings.max_read_bytes, bytes_total=reader.total_raw_bytes, files_total=len(paths))
        texts = read_with_budget(reader, report, seed=settings.seed)
    sample, seen = reservoir(texts, k=settings.sample_lines, max_bytes=settings.max_line_bytes, seed=settings.seed)
    if not sample:
        raise InputError(f"no text in {len(paths)} input file(s)")
    log.info(
        "sampled %d of %d lines%s in %.1f s; training %s with vocab %d",
        len(sample),
        seen,
        f" ({_read_summary(report)})" if report is not None else "",
        time.perf_counter() - t0,
        settings.model_type,
        settings.vocab_size,
    )
    options = dict(
        model_type=settings.model_type,
        vocab_size=settings.vocab_size,
        character_coverage=settings.character_coverage,
        byte_fallback=settings.byte_fallback,
        split_digits=True,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        add_dummy_prefix=True,
        allow_whitespace_only_pieces=True,
        max_sentence_length=settings.max_line_bytes,
        input_sentence_size=0,
        num_threads=settings.threads,
        seed_sentencepiece_size=1_000_000,
        **{f"{name}_id": i for name, (i, _) in SPECIALS.items()},
        **{f"{name}_piece": piece for name, (_, piece) in SPECIALS.items()},
        minloglevel=1,
    )
    model = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(sentence_iterator=iter(sample), model_writer=model, **options)
    except RuntimeError as e:
        raise InputError(
            f"sentencepiece could not train with --vocab-size {settings.vocab_size} on {len(sample)} lines: {e}"
        ) from None
    sp = spm.SentencePieceProcessor(model_proto=model.getvalue())
    if settings.byte_fallback and sp.decode(sp.encode(ROUND_TRIP_PROBE)) != ROUND_TRIP_PROBE:
        log.warning("the trained model does not round-trip %r exactly", ROUND_TRIP_PROBE)
    vocab = "".join(f"{sp.id_to_piece(i)}\t{sp.get_score(i):g}\n" for i in range(sp.get_piece_size()))
    record = {
        "tool_version": __version__,
        "sentencepiece_version": spm.__version__,
        "inputs": [str(p) for p in paths],
        "text_field": settings.text_field,
        "lines_seen": seen,
        "lines_sampled": len(sample),
        "sample_seed": settings.seed,
        "skipped": dict(reader.skipped),
        "options": {k: v for k, v in options.items() if k not in ("num_threads", "minloglevel")},
    }
    if report is not None:
        record["read"] = asdict(report)  # absent without a budget: that record is what it always was
    write_bytes_atomic(files[".vocab"], vocab.encode("utf-8"))
    write_json_atomic(files[".json"], record)
    write_bytes_atomic(files[".model"], model.getvalue())  # last: the model's presence means all three exist
    if not settings.quiet:
        read = f" ({_read_summary(report)})" if report is not None else ""
        print(
            f"vocab {sp.get_piece_size()} ({settings.model_type}), {len(sample):,} of {seen:,} lines{read}, {time.perf_counter() - t0:.1f} s -> {files['.model']}"
        )
    return record


def _read_summary(report: ReadReport) -> str:
    return (
        f"read {report.bytes_read:,} of {report.bytes_total:,} bytes, {report.files_read:,} of "
        f"{report.files_total:,} files, budget {report.max_read_bytes:,}"
    )


EXAMPLES = """
examples:
  python -m data_prep train-tokenizer corpus/ --output tok/sp --vocab-size 32000
  python -m data_prep train-tokenizer 'dumps/*.jsonl.zst' --text-field content --output tok/web --model-type unigram
  python -m data_prep train-tokenizer 'web/**/*.jsonl' --max-read-bytes 10GB --output tok/web --seed 1
"""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m data_prep train-tokenizer",
        description="Train a lossless sentencepiece tokenizer on a bounded random sample of a corpus.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("inputs", nargs="+", help=INPUTS_HELP)
    p.add_argument("--output", required=True, help="output prefix: writes PREFIX.model, PREFIX.vocab, PREFIX.json")
    p.add_argument(
        "--vocab-size",
        type=int,
        default=32000,
        help="number of pieces, specials and byte pieces included (default: 32000)",
    )
    p.add_argument("--model-type", choices=MODEL_TYPES, default="bpe", help="default: bpe")
    p.add_argument(
        "--sample-lines", type=int, default=2_000_000, help="lines in the random training sample (default: 2M)"
    )
    p.add_argument(
        "--max-line-bytes", type=int, default=4192, help="longer lines are cut at whitespace (default: 4192)"
    )
    p.add_argument(
        "--character-coverage",
        type=float,
        default=0.9995,
        help="share of characters given their own piece; the rest fall back to bytes (default: 0.9995)",
    )
    p.add_argument(
        "--no-byte-fallback",
        dest="byte_fallback",
        action="store_false",
        help="map unknown characters to <unk> instead of bytes (lossy)",
    )
    p.add_argument("--text-field", default="text", help="JSON field holding the text in .jsonl inputs (default: text)")
    p.add_argument(
        "--on-error", choices=ON_ERROR, default="fail", help="bad input: stop, or skip and count it (default: fail)"
    )
    p.add_argument(
        "--seed", type=int, default=0, help="seed of the line sample and of the files read under a budget (default: 0)"
    )
    p.add_argument(
        "--max-read-bytes",
        type=parse_size,
        default=None,
        metavar="SIZE",
        help="read at most about SIZE bytes (10GB, 500MB, 2GiB): files in a seeded random order, a file too large "
        "for what is left as random windows (a compressed one from its start) (default: read everything)",
    )
    p.add_argument(
        "--threads",
        type=int,
        default=len(os.sched_getaffinity(0)),
        help="sentencepiece trainer threads (default: all cores)",
    )
    p.add_argument("--overwrite", action="store_true", help="replace an existing model with the same prefix")
    p.add_argument("--quiet", action="store_true")
    return p


def main(argv: list[str] | None = None) -> int:
    p = build_parser()
    try:
        settings = TokenizerSettings(**vars(p.parse_args(argv)))  # the parser's dests are the settings' fields
    except ValueError as e:
        p.error(str(e))  # usage and the message on stderr, exit status 2, as for any bad argument
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        train(settings)
    except (InputError, FileExistsError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
