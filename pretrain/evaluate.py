"""Loss, perplexity and bits per byte of a model on held-out text: the one code path behind the trainer's periodic
evaluation and launch/evaluate.py.

    token_bytes = TokenBytes(tokenizer)                                  # UTF-8 bytes each token id stands for
    batches = source_windows(["data/sotu"], tokenizer, split="val", seq_len=512, batch_size=8)
    totals = evaluate(model_logits(model), token_bytes, batches)        # Totals: nats, tokens, bytes, documents
    totals.loss, totals.ppl, totals.bpb

The trainer feeds its validation windows (pretrain/data.py) through the same `Evaluator` and sums across ranks
(`Totals.reduce`).

Bits per byte = the summed cross-entropy of every predicted token (nats) / ln 2 / the UTF-8 bytes of the text those
tokens stand for. Unlike the loss it does not depend on the tokenizer, so models with different vocabularies
compare. The bytes come from the tokens themselves (`TokenBytes`), so shards, whose text is gone, count as the text
they were made from: a piece counts its UTF-8 bytes ("▁" as the space it stands for), a byte-fallback piece <0xNN>
one byte, a control piece (eod, bos, pad) none, and a document's first piece one byte less when it starts with the
"▁" the tokenizer's dummy prefix added. With the tokenizers data_prep trains (identity normalization, byte fallback)
this is the text's exact byte count, leading spaces, tabs, CR/LF, control characters, a BOM, CJK and emoji
included; the one exception is the character "▁" (U+2581) itself, which sentencepiece cannot tell from a space
(`decode` returns a space too): it counts 1 byte, not 3 (a text source warns when its documents hold one). An
<unk> piece (a tokenizer without byte fallback) counts no byte.

A source of documents (a dataset directory's split, shard prefixes, .txt/.jsonl files or folders) is evaluated as
one stream, packed as training data is: an EOD first, then each document's tokens followed by EOD (data_prep
tokenize's ids), cut into windows of seq_len + 1 tokens that overlap by one. Every document token and each
document's EOD is predicted exactly once, from the tokens before it in its window; the last window may be shorter.
"""

from __future__ import annotations

import itertools
import logging
import math
import os
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from pretrain.config import DatasetSpec
from pretrain.data import open_stream
from pretrain.errors import BadInput
from pretrain.shards import MANIFEST, ShardError, read_manifest, shard_file
from pretrain.tokenizer import Tokenizer

log = logging.getLogger(__name__)

SPACE = "\u2581"  # sentencepiece's whitespace marker
READ_TOKENS = 1 << 20  # tokens read from shards at a time
ENCODE_CHARS = 1 << 20  # characters of text handed to sentencepiece at a time


class EvalError(BadInput, ValueError):
    """A source or option that cannot be evaluated; the message names the file or option."""


class TokenBytes:
    """The UTF-8 bytes each token id stands for (`table`), so the bytes of any run of tokens are a sum; a
    document's first piece (after eod or bos, or at the start) loses the byte of its dummy-prefix "▁"."""

    def __init__(self, tokenizer: Tokenizer):
        from sentencepiece import sentencepiece_model_pb2

        sp = tokenizer.sp
        proto = sentencepiece_model_pb2.ModelProto.FromString(sp.serialized_model_proto())
        dummy_prefix = proto.normalizer_spec.add_dummy_prefix
        n = tokenizer.vocab_size
        self.table = np.zeros(n, dtype=np.int64)
        self.dummy = np.zeros(n, dtype=bool)  # a piece that starts with "▁": at a document's start, the dummy prefix
        for i in range(n):
            if sp.is_control(i) or sp.is_unknown(i) or sp.is_unused(i):
                continue
            if sp.is_byte(i):
                self.table[i] = 1
                continue
            piece = sp.id_to_piece(i)
            self.table[i] = len(piece.replace(SPACE, " ").encode("utf-8"))
            self.dummy[i] = dummy_prefix and piece.startswith(SPACE)
        self.starts = np.zeros(n, dtype=bool)  # ids after which a document starts
        self.starts[[i for i in (tokenizer.eod_id, tokenizer.bos_id) if 0 <= i < n]] = True
        self.eod_id = tokenizer.eod_id

    def count(self, previous: np.ndarray, tokens: np.ndarray) -> int:
        """The bytes `tokens` stand for, each preceded by the same place of `previous` (for the document starts)."""
        first = self.dummy[tokens] & self.starts[previous]
        return int(self.table[tokens].sum(dtype=np.int64)) - int(np.count_nonzero(first))

    def of_document(self, ids: list[int]) -> int:
        """The bytes of one document's ids (as encoded, without eod)."""
        ids = np.asarray(ids, dtype=np.int64)
        previous = np.concatenate([[self.eod_id], ids[:-1]]).astype(np.int64)
        return self.count(previous, ids)


@dataclass
class Totals:
    """Sums over everything evaluated: `nats` of cross-entropy over `tokens` predicted tokens that stand for
    `bytes` UTF-8 bytes; `documents` whose end (EOD) was predicted."""

    nats: float = 0.0
    tokens: int = 0
    bytes: int = 0
    documents: int = 0

    @property
    def loss(self) -> float:
        """Mean cross-entropy per token, in nats."""
        return self.nats / self.tokens if self.tokens else math.nan

    @property
    def ppl(self) -> float:
        return math.exp(self.loss) if self.loss < 700 else math.inf  # (exp overflows past ~709)

    @property
    def bpb(self) -> float:
        """Bits per UTF-8 byte of text."""
        return self.nats / math.log(2) / self.bytes if self.bytes else math.nan

    def reduce(self) -> Totals:
        """The sums over every rank of the process group (all-reduced in float64); itself in a group of one."""
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
            return self
        device = "cpu"
        if dist.get_backend() == "nccl":
            from deepspeed.accelerator import get_accelerator

            device = get_accelerator().current_device_name()
        values = torch.tensor([self.nats, self.tokens, self.bytes, self.documents], dtype=torch.float64, device=device)
        dist.all_reduce(values)
        nats, tokens, nbytes, documents = values.tolist()
        return Totals(nats=nats, tokens=round(tokens), bytes=round(nbytes), documents=round(documents))

    def as_dict(self) -> dict:
        return {"loss": self.loss, "ppl": self.ppl, "bpb": self.bpb, **asdict(self)}


class Evaluator:
    """Accumulates the cross-entropy of batches of token windows. `logits_fn(inputs)` maps (batch, n) token ids to
    (batch, n, vocab) logits (the trainer's is `Engine.logits`, which every rank calls together under ZeRO-3);
    `token_bytes` None counts no bytes (bpb is then nan)."""

    def __init__(self, logits_fn: Callable[[torch.Tensor], torch.Tensor], token_bytes: TokenBytes | None):
        self.logits_fn, self.token_bytes = logits_fn, token_bytes
        self._nats: torch.Tensor | None = None  # float64, on the logits' device: read once, by `totals`
        self.tokens = self.bytes = self.documents = 0

    @torch.no_grad()
    def add(self, windows) -> None:
        """Predict tokens[:, 1:] of a (batch, n + 1) array of token windows from tokens[:, :-1]."""
        w = np.asarray(windows, dtype=np.int64)
        if w.ndim != 2 or w.shape[1] < 2:
            raise ValueError(f"expected (batch, n + 1) token windows with n >= 1, got shape {w.shape}")
        inputs, targets = w[:, :-1], w[:, 1:]
        logits = self.logits_fn(torch.from_numpy(np.ascontiguousarray(inputs)))  # (batch, n, vocab)
        target = torch.from_numpy(np.ascontiguousarray(targets)).to(logits.device)
        nats = F.cross_entropy(logits.flatten(0, 1).float(), target.flatten(), reduction="sum").double()
        self._nats = nats if self._nats is None else self._nats + nats
        self.tokens += targets.size
        if self.token_bytes is not None:
            self.bytes += self.token_bytes.count(inputs, targets)
            self.documents += int(np.count_nonzero(targets == self.token_bytes.eod_id))

    def totals(self) -> Totals:
        """What this process evaluated (`Totals.reduce` sums it over ranks)."""
        nats = 0.0 if self._nats is None else float(self._nats.item())
        return Totals(nats=nats, tokens=self.tokens, bytes=self.bytes, documents=self.documents)


def evaluate(logits_fn, token_bytes: TokenBytes | None, batches: Iterable[np.ndarray]) -> Totals:
    """Evaluate every batch of windows (see `source_windows`); the totals of this process."""
    evaluator = Evaluator(logits_fn, token_bytes)
    for windows in batches:
        evaluator.add(windows)
    return evaluator.totals()


def model_logits(model: torch.nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    """A model's logits_fn: its inputs moved to the model's device, no autograd."""
    device = next(model.parameters()).device

    def logits(tokens: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            return model(tokens.to(device))

    return logits


# ----------------------------------------------------------------------------------------------- sources
def cut_windows(stream: Iterable[np.ndarray], *, seq_len: int, batch_size: int) -> Iterator[np.ndarray]:
    """Batches of (batch_size, seq_len + 1) windows of a token stream (given in chunks): window i holds tokens
    [i * seq_len, (i + 1) * seq_len], so every token but the first is predicted once. The last batch holds the
    whole windows left; a shorter last window comes alone, as (1, k + 1)."""
    if seq_len < 1 or batch_size < 1:
        raise ValueError(f"seq_len and batch_size must be positive, got {seq_len} and {batch_size}")
    step, full = seq_len, batch_size * seq_len + 1
    parts, have = [], 0
    for chunk in stream:
        parts.append(np.asarray(chunk, dtype=np.int64))
        have += len(chunk)
        if have < full:
            continue
        pending = np.concatenate(parts)
        while len(pending) >= full:
            yield _windows(pending[:full], step)
            pending = pending[full - 1 :]  # the last token is the first of the next window
        parts, have = [pending], len(pending)
    pending = np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)
    whole = (len(pending) - 1) // step if len(pending) else 0
    if whole:
        yield _windows(pending[: whole * step + 1], step)
    rest = pending[whole * step :]
    if len(rest) > 1:
        yield rest[None].copy()


def _windows(tokens: np.ndarray, step: int) -> np.ndarray:
    """(k, step + 1) windows of k * step + 1 tokens, overlapping by one."""
    return np.lib.stride_tricks.sliding_window_view(tokens, step + 1)[::step].copy()


def take_documents(chunks: Iterable[np.ndarray], eod_id: int, limit: int | None) -> Iterator[np.ndarray]:
    """The token stream of documents (each ending with EOD) up to and including the `limit`-th EOD."""
    left = limit
    if left is not None and left < 1:
        return
    for chunk in chunks:
        if left is not None:
            ends = np.flatnonzero(chunk == eod_id)
            if len(ends) >= left:
                yield chunk[: ends[left - 1] + 1]
                return
            left -= len(ends)
        yield chunk


def take_tokens(chunks: Iterable[np.ndarray], limit: int | None) -> Iterator[np.ndarray]:
    left = limit
    for chunk in chunks:
        if left is not None:
            chunk = chunk[:left]
            left -= len(chunk)
        if len(chunk):
            yield chunk
        if left == 0:
            return


def is_shards(path: str | Path) -> bool:
    """A dataset directory (with manifest.json) or a Megatron .bin/.idx prefix, rather than text."""
    path = Path(path)
    if path.is_dir():
        return (path / MANIFEST).is_file()
    prefix = Path(str(path)[:-4]) if str(path).endswith((".bin", ".idx")) else path
    return shard_file(prefix, ".idx").is_file()


def shard_documents(path: str, tokenizer: Tokenizer, *, split: str) -> Iterator[np.ndarray]:
    """The tokens of a dataset directory's split (its manifest checked against `tokenizer`) or of a shard prefix,
    in chunks: its documents, each ending with EOD, as the trainer reads them (pretrain/data.py)."""
    made_with = tokenizer.describe()
    if Path(path).is_dir():  # a missing split (open_stream's message for it speaks to the trainer's config)
        try:
            manifest = read_manifest(Path(path))
        except ShardError as e:
            raise EvalError(f"--data: {e}") from None
        splits = sorted(name for name, entry in manifest["splits"].items() if entry["shards"])
        if split not in splits and manifest["tokenizer"]["sha256"] == made_with["sha256"]:  # (else: see below)
            raise EvalError(f"--data: {path} has no '{split}' shards (it has: {', '.join(splits) or 'none'})")
    # a dataset made with another tokenizer is refused here, a shard that does not match its manifest too
    stream = open_stream(DatasetSpec(path), split, tokenizer=made_with, key="--data")
    for start in range(0, stream.num_tokens, READ_TOKENS):
        yield stream.read(start, min(READ_TOKENS, stream.num_tokens - start))


def text_documents(
    paths: list[str], tokenizer: Tokenizer, *, text_field: str = "text", add_bos: bool = False
) -> Iterator[np.ndarray]:
    """The tokens of each document of text inputs (files, folders, globs: data_prep/readers.py), each followed by
    EOD (and begun with bos if `add_bos`), with the ids data_prep tokenize gives it (long documents are encoded in
    pieces as it does)."""
    from data_prep.readers import CorpusReader, InputError
    from data_prep.tokenize_corpus import PIECE_CHARS, LongTextEncoder

    try:
        reader = CorpusReader.from_inputs(paths, text_field=text_field, on_error="fail")
        long = LongTextEncoder(tokenizer.sp)
        batch, chars, marked = [], 0, 0
        for doc in reader:
            marked += SPACE in doc.text
            batch.append(doc.text)
            chars += len(doc.text)
            if chars >= ENCODE_CHARS:
                yield from _encode(batch, tokenizer, long, PIECE_CHARS, add_bos)
                batch, chars = [], 0
        yield from _encode(batch, tokenizer, long, PIECE_CHARS, add_bos)
    except InputError as e:
        raise EvalError(f"--data: {e}") from None
    if marked:
        log.warning(
            "%d document(s) hold the character %r (U+2581), which the tokenizer cannot tell from a space: each "
            "counts 1 byte, not 3",
            marked,
            SPACE,
        )


def _encode(texts: list[str], tokenizer: Tokenizer, long, piece_chars: int, add_bos: bool) -> Iterator[np.ndarray]:
    short = iter(tokenizer.encode([t for t in texts if len(t) <= piece_chars], num_threads=os.cpu_count() or 1))
    bos = [tokenizer.bos_id] if add_bos else []
    for text in texts:
        ids = next(short) if len(text) <= piece_chars else [i for part in long.encode(text, piece_chars) for i in part]
        yield np.asarray([*bos, *ids, tokenizer.eod_id], dtype=np.int64)


def source_documents(
    paths: list[str], tokenizer: Tokenizer, *, split: str = "val", text_field: str = "text", add_bos: bool = False
) -> Iterator[np.ndarray]:
    """The documents of every source in order: dataset directories and shard prefixes (`is_shards`) through
    pretrain/data.py, consecutive text inputs through data_prep/readers.py (begun with bos if `add_bos`, as the
    model's training documents were)."""
    if not paths:
        raise EvalError("--data: no source given")
    text: list[str] = []
    for path in paths:
        if is_shards(path):
            if text:
                yield from text_documents(text, tokenizer, text_field=text_field, add_bos=add_bos)
                text = []
            yield from shard_documents(path, tokenizer, split=split)
        else:
            text.append(path)
    if text:
        yield from text_documents(text, tokenizer, text_field=text_field, add_bos=add_bos)


def source_windows(
    paths: list[str],
    tokenizer: Tokenizer,
    *,
    seq_len: int,
    batch_size: int,
    split: str = "val",
    text_field: str = "text",
    max_tokens: int | None = None,
    max_documents: int | None = None,
    add_bos: bool = False,
) -> Iterator[np.ndarray]:
    """Batches of windows over the sources' documents as one stream (see the module's docstring): at most
    `max_documents` documents and `max_tokens` predicted tokens (the last document may be cut)."""
    documents = take_documents(source_documents(paths, tokenizer, split=split, text_field=text_field,
                                                add_bos=add_bos), tokenizer.eod_id, max_documents)  # fmt: skip
    first = np.array([tokenizer.eod_id], dtype=np.int64)  # so that the first document starts as every other does
    stream = take_tokens(itertools.chain([first], documents), None if max_tokens is None else max_tokens + 1)
    return cut_windows(stream, seq_len=seq_len, batch_size=batch_size)
