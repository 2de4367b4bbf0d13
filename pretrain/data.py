"""Training samples from token shards: packing, a deterministic global order, blending, per-rank slicing.

- A split of a dataset is one token stream: its shards' documents concatenated in order (each ends with EOD).
- Packing: sample i of a stream is the window of seq_len + 1 tokens starting at token i * seq_len (inputs are the
  first seq_len, targets the last seq_len); windows cross document boundaries, as in GPT-style pretraining.
- Order: a dataset's k-th sample is window perm_e[k mod n], where n is its number of windows, e = k // n its
  epoch and perm_e a permutation seeded by (seed, dataset number, e): every epoch is reshuffled.
- Blending: global sample number g is assigned to a dataset by stride scheduling: dataset d's k-th sample sits at
  position (k + 0.5) / w_d and samples are taken in order of position, ties to the lower d. Any prefix of n
  samples then holds n * w_d samples of dataset d to within one, and the assignment of a range of sample numbers
  is computed directly, without materialising an index over the whole run.
- Step s consumes slots [s * G, (s + 1) * G); rank r of W takes the contiguous G / W of them and cuts them into
  micro-batches. Slot j holds global sample j, or, with `data.skip_samples` (ranges of global sample numbers), the
  j-th sample number outside the skipped ranges (`Skips`): the rest of the order is unchanged. Everything is a
  pure function of (seed, sample number, skips), so a run resumes at any step on any number of ranks and sees
  exactly the samples it has not seen yet.
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path

import numpy as np

from pretrain.config import BatchPlan, DatasetSpec
from pretrain.errors import BadInput
from pretrain.shards import IndexedShard, ShardError, dataset_shard, read_manifest, shard_file

log = logging.getLogger(__name__)


class DataError(BadInput, ValueError):
    """A dataset that cannot be used by this run; the message names the dataset and the config key."""


class SampleError(DataError):
    """A sample that cannot be trained on (found by the rank that reads it); the message names where it is."""

    rank_local = True


class TokenStream:
    """The shards of one split, read as one sequence of tokens; `vocab_size` bounds its ids (None: unchecked)."""

    def __init__(self, prefixes: list[Path], name: str, *, vocab_size: int | None = None):
        self.name, self.vocab_size = name, vocab_size
        self.shards = [IndexedShard(p) for p in prefixes]
        sizes = [s.num_tokens for s in self.shards]
        self.starts = np.concatenate([[0], np.cumsum(sizes, dtype=np.int64)])
        self.num_tokens = int(self.starts[-1])
        self._doc_starts: list[np.ndarray] | None = None  # made by `documents`
        self._docs_before: np.ndarray | None = None

    def read(self, start: int, length: int) -> np.ndarray:
        """Tokens [start, start + length) as int64, across shard boundaries."""
        out = np.empty(length, dtype=np.int64)
        filled = 0
        i, _ = self.shard_at(start)
        while filled < length:
            shard = self.shards[i]
            offset = start + filled - int(self.starts[i])
            n = min(length - filled, shard.num_tokens - offset)
            out[filled : filled + n] = shard.tokens[offset : offset + n]
            filled += n
            i += 1
        return out

    def shard_at(self, position: int) -> tuple[int, int]:
        """(shard number, token offset in it) of token `position` of the stream."""
        i = int(np.searchsorted(self.starts, position, side="right")) - 1
        return i, position - int(self.starts[i])

    def locate(self, position: int) -> str:
        """Where token `position` of the stream lies: its shard file and its place in it."""
        i, offset = self.shard_at(position)
        return f"{shard_file(self.shards[i].prefix, '.bin')}, token {offset:,}"

    def documents(self, start: int, stop: int) -> list[dict]:
        """The documents that tokens [start, stop) of the stream overlap, in order: `id` (its number in the
        stream), `shard` (the shard's prefix) and `index` (its number there), `length` in tokens, and `tokens`
        [a, b): the part of it inside the range, counted from the document's first token."""
        if self._doc_starts is None:  # per shard: where each document starts in the stream; documents before it
            self._doc_starts = [int(self.starts[i]) + np.concatenate([[0], np.cumsum(s.sizes[:-1], dtype=np.int64)])
                                for i, s in enumerate(self.shards)]  # fmt: skip
            self._docs_before = np.concatenate([[0], np.cumsum([len(s.sizes) for s in self.shards])])
        out, position = [], start
        while position < stop:
            i, _ = self.shard_at(position)
            starts = self._doc_starts[i]
            j = int(np.searchsorted(starts, position, side="right")) - 1
            first, length = int(starts[j]), int(self.shards[i].sizes[j])
            end = min(first + length, stop)
            out.append({"id": int(self._docs_before[i]) + j, "shard": str(self.shards[i].prefix), "index": j,
                        "length": length, "tokens": [position - first, end - first]})  # fmt: skip
            position = end
        return out


def open_stream(spec: DatasetSpec, split: str, *, tokenizer: dict, key: str) -> TokenStream:
    """A dataset directory's split (checked against the run's tokenizer), or a bare Megatron prefix.

    Token ids must be below the tokenizer's vocab (the model's is at least as large): a dataset's manifest vouches
    for its shards, a bare prefix is scanned here, and every sample is checked again when it is read."""
    path = Path(spec.path)
    try:
        if path.is_dir():
            prefixes, name = _split_shards(path, split, tokenizer), f"{path}:{split}"
        elif shard_file(_strip_ext(path), ".idx").is_file():
            path = _strip_ext(path)
            prefixes, name = [path], str(path)
        else:
            raise DataError(f"{path} is neither a dataset directory (with manifest.json) nor a .bin/.idx prefix")
        stream = TokenStream(prefixes, name, vocab_size=tokenizer["vocab_size"])
    except (ShardError, DataError) as e:
        raise DataError(f"{key}: {e}") from None
    if not path.is_dir():  # no manifest vouches for the ids: check them once (both ends: int32 shards are signed)
        low = min((int(s.tokens.min()) for s in stream.shards if s.num_tokens), default=0)
        top = max((int(s.tokens.max()) for s in stream.shards if s.num_tokens), default=0)
        if low < 0 or top >= tokenizer["vocab_size"]:
            bad = low if low < 0 else top
            raise DataError(f"{key}: {path} holds token id {bad}, outside the vocab of {tokenizer['vocab_size']}")
    return stream


def _split_shards(path: Path, split: str, tokenizer: dict) -> list[Path]:
    """The shards of a dataset directory's split, once its manifest is found sound and made with `tokenizer`."""
    manifest = read_manifest(path)
    made_with = manifest["tokenizer"]
    if made_with["sha256"] != tokenizer["sha256"] or made_with["vocab_size"] != tokenizer["vocab_size"]:
        raise DataError(
            f"{path} was tokenized with {made_with['path']} (sha256 {made_with['sha256'][:12]}..., "
            f"vocab {made_with['vocab_size']}), but data.tokenizer is {tokenizer['path']} (sha256 "
            f"{tokenizer['sha256'][:12]}..., vocab {tokenizer['vocab_size']}); re-tokenize or fix data.tokenizer"
        )
    entry = manifest["splits"].get(split)
    if entry is None or not entry["shards"]:
        hint = (
            " (tokenized with --val-fraction 0?): set data.val_datasets, or train.eval_every=0"
            if split == "val"
            else ""
        )
        raise DataError(f"{path} has no '{split}' shards{hint}")
    return [dataset_shard(path, s["prefix"]) for s in entry["shards"]]


def _strip_ext(path: Path) -> Path:
    """A Megatron prefix given with its .bin or .idx ending -> the bare prefix."""
    return Path(str(path)[:-4]) if str(path).endswith((".bin", ".idx")) else path


class PackedDataset:
    """Windows of seq_len + 1 tokens over a stream, in a reshuffled order every epoch."""

    def __init__(self, stream: TokenStream, seq_len: int, *, seed: int, index: int):
        self.stream, self.seq_len, self.seed, self.index = stream, seq_len, seed, index
        self.num_samples = (stream.num_tokens - 1) // seq_len
        self._orders: dict[int, np.ndarray] = {}
        if self.num_samples < 1:
            raise DataError(f"{stream.name}: {stream.num_tokens} tokens is less than one sample of {seq_len + 1}")

    def order(self, epoch: int) -> np.ndarray:
        """The permutation of windows for one epoch (the last two are kept)."""
        if epoch not in self._orders:
            if len(self._orders) >= 2:
                self._orders.pop(min(self._orders))
            self._orders[epoch] = np.random.default_rng([self.seed, self.index, epoch]).permutation(self.num_samples)
        return self._orders[epoch]

    def window_of(self, k: int) -> int:
        return int(self.order(k // self.num_samples)[k % self.num_samples])

    def sample(self, k: int) -> np.ndarray:
        """This dataset's k-th sample: (seq_len + 1,) int64."""
        start = self.window_of(k) * self.seq_len
        x = self.stream.read(start, self.seq_len + 1)
        # A min and a max over the sample (cheap next to reading it): an id outside the vocab would otherwise be
        # an IndexError deep in the model, or silently train an unused row of the padded embedding.
        vocab = self.stream.vocab_size
        if vocab is not None and not 0 <= x.min() <= x.max() < vocab:
            i = int(np.argmax((x < 0) | (x >= vocab)))
            raise SampleError(
                f"{self.stream.name}, sample {k}: token {i} is {x[i]}, outside the vocab of {vocab} "
                f"({self.stream.locate(start + i)})"
            )
        return x


def _positions(weight: float, k: np.ndarray) -> np.ndarray:
    return (k + 0.5) / weight


def _count_at(weight: float, x: float) -> int:
    """How many of a dataset's samples have position <= x (with the same float arithmetic as _positions)."""
    c = max(int(np.floor(x * weight + 0.5)), 0)
    while _positions(weight, np.array([c]))[0] <= x:
        c += 1
    while c > 0 and _positions(weight, np.array([c - 1]))[0] > x:
        c -= 1
    return c


def blend(weights: np.ndarray, start: int, count: int) -> tuple[np.ndarray, np.ndarray]:
    """Dataset number and per-dataset sample number of global samples [start, start + count)."""
    d = len(weights)
    if d == 1:
        return np.zeros(count, dtype=np.int64), np.arange(start, start + count, dtype=np.int64)
    x_lo, x_hi = start - d, start + count + d  # at most `start` samples lie at or before x_lo, enough before x_hi
    first = [_count_at(w, x_lo) for w in weights]
    last = [_count_at(w, x_hi) for w in weights]
    ks = [np.arange(lo, hi, dtype=np.int64) for lo, hi in zip(first, last)]
    pos = np.concatenate([_positions(w, k) for w, k in zip(weights, ks)])
    ds = np.concatenate([np.full(len(k), i, dtype=np.int64) for i, k in enumerate(ks)])
    kk = np.concatenate(ks)
    order = np.lexsort((ds, pos))
    skip = start - sum(first)
    take = order[skip : skip + count]
    return ds[take], kk[take]


class Skips:
    """Ranges [start, stop) of global sample numbers left out of the order (`data.skip_samples`): slot j holds the
    j-th sample number outside them."""

    def __init__(self, ranges: list[list[int]] | None = None):
        merged: list[list[int]] = []
        for start, stop in sorted(tuple(r) for r in ranges or [] if r[0] < r[1]):
            if merged and start <= merged[-1][1]:
                merged[-1][1] = max(merged[-1][1], stop)
            else:
                merged.append([start, stop])
        self.ranges = merged

    def number(self, slot: int) -> int:
        """The global sample number slot `slot` holds."""
        n = slot
        for start, stop in self.ranges:
            if n < start:
                break
            n += stop - start
        return n

    def segments(self, first: int, last: int) -> list[tuple[int, int]]:
        """The sample numbers of slots [first, last) as contiguous ranges [a, b), in order."""
        out, n, left = [], self.number(first), last - first
        for start, stop in self.ranges:
            if left <= 0:
                break
            if stop <= n:
                continue
            if n < start:
                take = min(start - n, left)
                out.append((n, n + take))
                left -= take
            n = max(n, stop)
        if left > 0:
            out.append((n, n + left))
        return out

    def numbers(self, first: int, last: int) -> np.ndarray:
        return np.concatenate([np.arange(a, b, dtype=np.int64) for a, b in self.segments(first, last)] or [[]])

    def same_until(self, other: Skips, slots: int) -> bool:
        """Whether slots [0, slots) hold the same sample numbers under both (a run that trained on them may switch)."""
        if slots <= 0:
            return True
        last = self.number(slots - 1)
        return other.number(slots - 1) == last and self.clip(last) == other.clip(last)

    def clip(self, last: int) -> list[list[int]]:
        """The ranges as far as they reach sample number `last` (inclusive)."""
        return [[a, min(b, last + 1)] for a, b in self.ranges if a <= last]


class BlendedDataset:
    """Datasets blended by weight; `batch(step, plan, rank)` gives a rank's micro-batches for an optimizer step."""

    def __init__(self, datasets: list[PackedDataset], weights: list[float], skips: Skips | None = None):
        self.datasets = datasets
        w = np.asarray(weights, dtype=np.float64)
        self.weights = w / w.sum()
        self.skips = skips or Skips()

    def locate(self, first: int, last: int) -> list[tuple[int, int, int]]:
        """(global sample number, dataset number, the dataset's sample number) of slots [first, last)."""
        out = []
        for a, b in self.skips.segments(first, last):
            ds, ks = blend(self.weights, a, b - a)
            out += [(a + i, int(d), int(k)) for i, (d, k) in enumerate(zip(ds, ks))]
        return out

    def samples(self, start: int, stop: int) -> np.ndarray:
        """The samples of slots [start, stop): (stop - start, seq_len + 1) int64."""
        return np.stack([self.datasets[d].sample(k) for _, d, k in self.locate(start, stop)])

    def batch(self, step: int, plan: BatchPlan, rank: int) -> list[np.ndarray]:
        """(micro_batch, seq_len + 1) int64 arrays, plan.grad_accum of them."""
        start, stop = plan.rank_range(step, rank)
        x = self.samples(start, stop)
        return [x[i : i + plan.micro_batch] for i in range(0, len(x), plan.micro_batch)]

    @property
    def num_samples(self) -> int:
        return sum(d.num_samples for d in self.datasets)


def fingerprint(specs: list[DatasetSpec], *, seq_len: int, seed: int) -> dict:
    """What the training data of a run is, for checking a checkpoint against: each dataset's manifest (which
    holds every shard's sha256) or, for a bare Megatron prefix, its index hash and data size; weights; packing."""
    items = []
    for spec in specs:
        path = Path(spec.path)
        if (path / "manifest.json").is_file():
            content = hashlib.sha256((path / "manifest.json").read_bytes()).hexdigest()
        else:
            prefix = _strip_ext(path)
            idx = shard_file(prefix, ".idx")
            content = hashlib.sha256(idx.read_bytes()).hexdigest() if idx.is_file() else "missing"
            content += f":{shard_file(prefix, '.bin').stat().st_size if shard_file(prefix, '.bin').is_file() else -1}"
        items.append({"path": str(spec.path), "weight": spec.weight, "content": content})
    return {"datasets": items, "seq_len": seq_len, "seed": seed}


def build_dataset(
    specs: list[DatasetSpec],
    split: str,
    *,
    seq_len: int,
    seed: int,
    tokenizer: dict,
    key: str,
    skip_samples: list[list[int]] | None = None,
) -> BlendedDataset:
    datasets = []
    for i, spec in enumerate(specs):
        stream = open_stream(spec, split, tokenizer=tokenizer, key=f"{key}[{i}]")
        datasets.append(PackedDataset(stream, seq_len, seed=seed, index=i))
        log.info(
            "%s: %s, %d tokens, %d samples of %d",
            key,
            stream.name,
            stream.num_tokens,
            datasets[-1].num_samples,
            seq_len,
        )
    return BlendedDataset(datasets, [s.weight for s in specs], Skips(skip_samples))
