"""One tokenize job split into parts for many machines: which inputs (and byte ranges of them) part I of N reads.

    python -m data_prep tokenize CORPUS... --tokenizer tok.model --output parts/003 --num-parts 8 --part 3
    python -m data_prep merge parts/* --output data/corpus        # data_prep/merge.py

The inputs, in the order a single run reads them, are laid end to end as one stream of bytes, cut into N ranges of
(nearly) equal size: part I takes the I-th range. An uncompressed .jsonl file that a cut falls into is split at
line boundaries: a line belongs to the part whose range holds its first byte. Other files (compressed ones, which
cannot be entered in the middle, and .txt files, one document each) go whole to the part whose range holds their
first byte. So every document is read by exactly one part, the parts in order read the documents in the single
run's order, and each document's train/val split (a hash of its text) is the one a single run gives it: merging the
parts gives the single run's documents, split for split, in the same order.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Slice:
    """The lines of `path` that start in bytes [start, end) (the whole file: 0, size)."""

    path: Path
    start: int
    end: int
    size: int  # of the whole file

    @property
    def whole(self) -> bool:
        return self.start == 0 and self.end == self.size

    def describe(self) -> dict:
        """As the manifest's `inputs` lists it."""
        d = {"path": str(self.path), "bytes": self.size}
        return d if self.whole else {**d, "start": self.start, "end": self.end}


def splittable(path: Path) -> bool:
    """Whether a part may start or end inside the file: uncompressed JSON lines, one document per line."""
    return path.name.endswith(".jsonl")


def check_part(num_parts: int, part: int | None) -> None:
    """ValueError naming the flag for a part that does not exist."""
    if num_parts < 1:
        raise ValueError(f"--num-parts must be at least 1, got {num_parts}")
    if num_parts > 1 and part is None:
        raise ValueError(f"--num-parts {num_parts} needs --part (0 to {num_parts - 1})")
    if part is not None and not 0 <= part < num_parts:
        raise ValueError(f"--part must be in [0, {num_parts}) for --num-parts {num_parts}, got {part}")


def plan(paths: list[Path], sizes: list[int], num_parts: int) -> list[list[Slice]]:
    """What each of `num_parts` parts reads of `paths` (of `sizes` bytes), as described in the module docstring."""
    total = sum(sizes)
    bounds = [total * i // num_parts for i in range(num_parts + 1)]
    parts: list[list[Slice]] = [[] for _ in range(num_parts)]
    offset = 0
    for path, size in zip(paths, sizes):
        if splittable(path) and size > 0:
            for i in range(num_parts):
                start, end = max(bounds[i], offset), min(bounds[i + 1], offset + size)
                if start < end:
                    parts[i].append(Slice(path, start - offset, end - offset, size))
        else:
            owner = max(i for i in range(num_parts) if bounds[i] <= offset or i == 0)
            parts[owner].append(Slice(path, 0, size, size))
        offset += size
    return parts
