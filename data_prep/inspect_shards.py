"""Inspect a tokenized dataset: print its manifest summary, verify it, decode sample documents.

Verification checks everything the manifest claims that the files can contradict:
- the manifest itself: every field present with the right type (pretrain.shards.MANIFEST_SCHEMA), shard paths
  inside the dataset directory, the dtype its vocab size needs, special ids below the vocab size, split totals;
- every shard: both files present (inside the dataset directory, symlinks resolved), index consistent with the
  .bin, dtype, document, token and byte counts, token ids in [0, vocab size), every document ending with the
  eod id (and starting with the bos id if settings.add_bos), shards closed where settings.shard_tokens says, and
  (unless --no-checksums) sha256 of both files; shard files in the dataset that no manifest entry lists;
- the tokenizer, if its file is there (the manifest's path, or --tokenizer): sha256, vocab size, eod and bos ids;
- with that tokenizer, and only when verification found no problem, the train/val split: a sample of each split's
  documents, decoded, must hash to their split under settings.val_fraction and settings.split_seed.
What could not be checked is said. Exit status 0 when the dataset is sound, 1 with one line per problem otherwise.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from data_prep.tokenize_corpus import SPLIT_RULE, SPLITS, is_val, split_salt
from pretrain.shards import (
    MANIFEST,
    IndexedShard,
    ShardError,
    dataset_shard,
    manifest_shards,
    read_manifest,
    verify_dataset,
)
from pretrain.tokenizer import Tokenizer

SPLIT_SAMPLE = 64  # documents per split whose text is hashed again
# Text a tokenizer must give back exactly for the split to be checkable (the split hashes the original text).
ROUND_TRIP = "  Tabs\tand\r\nline ends, digits 0123456789, naïve café, Ελληνικά, 日本語, emoji 🙂, \x07 \ufeff "


def summary(root: Path, manifest: dict) -> str:
    tok = manifest["tokenizer"]
    lines = [
        f"dataset    {root}",
        f"tokenizer  {tok['path']} (vocab {tok['vocab_size']}, eod {tok['eod_id']}, sha256 {tok['sha256'][:12]}...)",
        f"dtype      {manifest['dtype']}",
        f"inputs     {len(manifest['inputs'])} file(s), {sum(i['bytes'] for i in manifest['inputs']) / 1e6:,.1f} MB",
        f"split      val_fraction {manifest['settings']['val_fraction']}, seed {manifest['settings']['split_seed']}",
    ]
    for split, e in manifest["splits"].items():
        lines.append(f"{split:<10} {e['documents']:,} documents, {e['tokens']:,} tokens in {len(e['shards'])} shard(s)")
    skipped = {k: v for k, v in manifest["skipped"].items() if v}
    lines.append("skipped    " + (", ".join(f"{k}={v}" for k, v in skipped.items()) if skipped else "none"))
    return "\n".join(lines)


def tokenizer_problems(root: Path, manifest: dict, tok: Tokenizer) -> list[str]:
    """What the tokenizer file contradicts in the manifest."""
    made_with, found = manifest["tokenizer"], tok.describe()
    problems = []
    for key in ("sha256", "vocab_size", "eod_id", "bos_id"):
        said, has = made_with[key], found[key]
        if said != has:
            if key == "sha256":
                said, has = f"{said[:12]}...", f"{has[:12]}..."
            problems.append(f"{root / MANIFEST}: tokenizer.{key} is {said}, but {tok.path} has {has}")
    return problems


def split_problems(root: Path, manifest: dict, tok: Tokenizer) -> list[str]:
    """Shards holding sampled documents whose text hashes to the other split under the manifest's settings."""
    settings = manifest["settings"]
    problems = []
    for split, shards in manifest_shards(manifest).items():
        if split not in SPLITS:
            continue
        starts = np.cumsum([0] + [s.documents for s in shards])
        picks = np.unique(np.linspace(0, starts[-1] - 1, min(SPLIT_SAMPLE, starts[-1])).astype(np.int64))
        for i, info in enumerate(shards):
            docs = picks[(picks >= starts[i]) & (picks < starts[i + 1])] - starts[i]
            try:
                shard = IndexedShard(dataset_shard(root, info.prefix))
            except ShardError:
                continue  # verify_dataset reports it
            docs = docs[docs < len(shard)]  # (a manifest may promise more documents than the shard holds)
            wrong = [int(d) for d in docs if split_of(tok, shard[d], settings) != split]
            if wrong:
                problems.append(
                    f"{root / info.prefix}.bin: {len(wrong)} of {len(docs)} sampled documents belong to "
                    f"'{'train' if split == 'val' else 'val'}' by their text under settings.split_seed "
                    f"{settings['split_seed']} and settings.val_fraction {settings['val_fraction']} (document"
                    f"{'s' * (len(wrong) > 1)} {', '.join(map(str, wrong[:5]))}{', ...' if len(wrong) > 5 else ''})"
                )
    return problems


def split_of(tok: Tokenizer, tokens: np.ndarray, settings: dict) -> str:
    """The split a document's text (without its bos and eod ids) hashes to, as data_prep tokenize assigned it."""
    text = tok.decode(tokens[int(settings["add_bos"]) : -1]).encode("utf-8")
    return "val" if is_val(text, settings["val_fraction"], split_salt(settings["split_seed"])) else "train"


def sample_documents(root: Path, manifest: dict, n: int, max_chars: int, tok: Tokenizer) -> list[str]:
    out = []
    for split, shards in manifest_shards(manifest).items():
        if not shards:
            continue
        shard = IndexedShard(dataset_shard(root, shards[0].prefix))
        for i in range(min(n, len(shard))):
            text = tok.decode(shard[i])
            text = text if len(text) <= max_chars else text[:max_chars] + " [...]"
            out.append(f"--- {split} {shards[0].prefix} document {i} ({len(shard[i])} tokens)\n{text}")
    return out


@dataclass
class Findings:
    """What inspect found: one line per problem, what it could not check, and the tokenizer the shards were made
    with (None when it is not there or does not match the manifest)."""

    problems: list[str] = field(default_factory=list)
    unchecked: list[str] = field(default_factory=list)
    tokenizer: Tokenizer | None = None
    split_checked: bool = False


def check(root: Path, manifest: dict, *, tokenizer: str | None, checksums: bool) -> Findings:
    """Everything the files can contradict in a readable manifest (the module docstring lists it)."""
    found = Findings()
    path = Path(tokenizer or manifest["tokenizer"]["path"])
    if not path.is_file():
        found.unchecked.append(f"the tokenizer ({path} is not there; pass --tokenizer) and the train/val split")
    else:
        try:
            tok = Tokenizer(path)
            found.problems += tokenizer_problems(root, manifest, tok)
            found.tokenizer = None if found.problems else tok
        except ValueError as e:  # not a sentencepiece model
            found.problems.append(str(e))
    shard_problems = verify_dataset(root, checksums=checksums)
    found.problems += shard_problems
    tok = found.tokenizer
    if tok is None and path.is_file():
        found.unchecked.append("the train/val split (no tokenizer matching the manifest)")
    elif tok is not None and shard_problems:  # decoding ids outside the vocab, or documents not there, would fail
        found.unchecked.append("the train/val split (verification found problems)")
    elif tok is not None and manifest.get("split_rule", SPLIT_RULE) != SPLIT_RULE:
        found.unchecked.append("the train/val split (the manifest's split_rule is not this tool's)")
    elif tok is not None and tok.decode(tok.encode(ROUND_TRIP)) != ROUND_TRIP:
        found.unchecked.append(f"the train/val split ({path} does not give text back exactly)")
    elif tok is not None:
        found.problems += split_problems(root, manifest, tok)
        found.split_checked = True
    return found


def report(root: Path, manifest: dict, found: Findings, args: argparse.Namespace) -> int:
    """Print the verdict (and, when the dataset is sound, sample documents); the exit status."""
    if found.problems:
        print(f"verify     FAILED, {len(found.problems)} problem(s):")
        print("\n".join(f"  {line}" for line in found.problems))
    else:
        n = sum(len(e["shards"]) for e in manifest["splits"].values())
        print(f"verify     ok: {n} shard(s) match the manifest" + (" (sha256 checked)" if args.checksums else ""))
        if found.tokenizer is not None:
            print(f"tokenizer  ok: {found.tokenizer.path} matches the manifest (sha256, vocab size, eod and bos ids)")
        if found.split_checked:
            print(f"split      ok: up to {SPLIT_SAMPLE} documents of each split, decoded, hash to their split")
    for line in found.unchecked:
        print(f"not checked: {line}")
    if found.problems:
        return 1
    if args.samples and found.tokenizer is None:
        print("(no samples: no tokenizer to decode them with; pass --tokenizer)")
    elif args.samples:
        print("\n".join(sample_documents(root, manifest, args.samples, args.max_chars, found.tokenizer)))
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m data_prep inspect", description=__doc__.split("\n")[0])
    p.add_argument("dataset", help="dataset directory (holding manifest.json)")
    p.add_argument("--samples", type=int, default=1, help="documents to decode and print per split (default: 1)")
    p.add_argument("--max-chars", type=int, default=300, help="characters shown per sample (default: 300)")
    p.add_argument("--tokenizer", help="check against and decode with this .model (default: the manifest's path)")
    p.add_argument("--no-checksums", dest="checksums", action="store_false", help="skip the sha256 checks (faster)")
    args = p.parse_args(argv)
    root = Path(args.dataset)
    try:
        manifest = read_manifest(root)
        print(summary(root, manifest))
        found = check(root, manifest, tokenizer=args.tokenizer, checksums=args.checksums)
        return report(root, manifest, found, args)
    except (ShardError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except OSError as e:  # a file or directory that cannot be read
        print(f"error: {e.filename}: {e.strerror}" if e.filename and e.strerror else f"error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
