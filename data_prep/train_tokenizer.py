"""Train a sentencepiece tokenizer (BPE or unigram) on a bounded random sample of a corpus of any size.

Defaults make tokenization lossless: byte fallback (no <unk> for any UTF-8 text), identity normalization and no
whitespace collapsing, so decode(encode(x)) == x. Digits are split one per piece. Special ids are fixed:
unk 0, bos 1, eos 2 (marks the end of a document), pad 3.

The sample is a reservoir of lines (long lines cut at whitespace), so memory is bounded by --sample-lines
whatever the corpus size; the same seed gives the same sample and the same model.
Writes <output>.model, <output>.vocab (piece<TAB>score) and <output>.json (the settings and the sample's size).

As a library: `train(TokenizerSettings(inputs=["corpus/"], output="tok/sp", vocab_size=8000))`; the CLI
(`python -m data_prep train-tokenizer`) only turns its arguments into those settings.
"""

from __future__ import annotations

import argparse
import io
import logging
import os
import random
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, get_args

import sentencepiece as spm

from data_prep.readers import INPUTS_HELP, ON_ERROR, CorpusReader, InputError, OnError
from pretrain import __version__
from pretrain.fileutil import write_bytes_atomic, write_json_atomic

log = logging.getLogger("data_prep.train_tokenizer")

SPECIALS = {"unk": (0, "<unk>"), "bos": (1, "<s>"), "eos": (2, "</s>"), "pad": (3, "<pad>")}
# Text that must survive encode -> decode unchanged with the default settings.
ROUND_TRIP_PROBE = "  Leading spaces,\ttabs,\r\nCRLF, trailing  \n\n1234567 × 3.14 = ? naïve café 日本語 🙂 \x00\x7f"
ModelType = Literal["bpe", "unigram"]
MODEL_TYPES: tuple[str, ...] = get_args(ModelType)


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
    seed: int = 0  # seed of the line sample
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
    rng = random.Random(seed)
    sample: list[str] = []
    seen = 0
    for doc in reader:
        for line in doc.text.split("\n"):
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
    sample, seen = sample_lines(reader, k=settings.sample_lines, max_bytes=settings.max_line_bytes, seed=settings.seed)
    if not sample:
        raise InputError(f"no text in {len(paths)} input file(s)")
    log.info(
        "sampled %d of %d lines in %.1f s; training %s with vocab %d",
        len(sample),
        seen,
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
    write_bytes_atomic(files[".vocab"], vocab.encode("utf-8"))
    write_json_atomic(files[".json"], record)
    write_bytes_atomic(files[".model"], model.getvalue())  # last: the model's presence means all three exist
    if not settings.quiet:
        print(
            f"vocab {sp.get_piece_size()} ({settings.model_type}), {len(sample):,} of {seen:,} lines, {time.perf_counter() - t0:.1f} s -> {files['.model']}"
        )
    return record


EXAMPLES = """
examples:
  python -m data_prep train-tokenizer corpus/ --output tok/sp --vocab-size 32000
  python -m data_prep train-tokenizer 'dumps/*.jsonl.zst' --text-field content --output tok/web --model-type unigram
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
    p.add_argument("--seed", type=int, default=0, help="seed of the line sample (default: 0)")
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
