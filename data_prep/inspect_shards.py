"""Inspect a tokenized dataset: print its manifest summary, verify every shard, decode sample documents.

Verification checks each shard against the manifest: both files present, index consistent with the .bin,
document and token counts, token ids below the vocab size, and (unless --no-checksums) sha256 of both files.
Exit status 0 when the dataset is sound, 1 with one line per problem otherwise.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from pretrain.shards import IndexedShard, ShardError, manifest_shards, read_manifest, verify_dataset


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


def sample_documents(root: Path, manifest: dict, n: int, max_chars: int, tokenizer: str | None) -> list[str]:
    from pretrain.tokenizer import Tokenizer

    path = tokenizer or manifest["tokenizer"]["path"]
    if not Path(path).is_file():
        return [f"(no samples: the tokenizer {path} is not there; pass --tokenizer)"]
    tok = Tokenizer(path)
    if tok.sha256() != manifest["tokenizer"]["sha256"]:
        return [f"(no samples: {path} is not the tokenizer these shards were made with)"]
    out = []
    for split, shards in manifest_shards(manifest).items():
        if not shards:
            continue
        shard = IndexedShard(root / shards[0].prefix)
        for i in range(min(n, len(shard))):
            text = tok.decode(shard[i])
            text = text if len(text) <= max_chars else text[:max_chars] + " [...]"
            out.append(f"--- {split} {shards[0].prefix} document {i} ({len(shard[i])} tokens)\n{text}")
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m data_prep inspect", description=__doc__.split("\n")[0])
    p.add_argument("dataset", help="dataset directory (holding manifest.json)")
    p.add_argument("--samples", type=int, default=1, help="documents to decode and print per split (default: 1)")
    p.add_argument("--max-chars", type=int, default=300, help="characters shown per sample (default: 300)")
    p.add_argument("--tokenizer", help="decode samples with this .model (default: the manifest's tokenizer path)")
    p.add_argument("--no-checksums", dest="checksums", action="store_false", help="skip the sha256 checks (faster)")
    args = p.parse_args(argv)
    root = Path(args.dataset)
    try:
        manifest = read_manifest(root)
        print(summary(root, manifest))
        problems = verify_dataset(root, checksums=args.checksums)
        if problems:
            print(f"verify     FAILED, {len(problems)} problem(s):")
            for line in problems:
                print(f"  {line}")
            return 1
        n = sum(len(e["shards"]) for e in manifest["splits"].values())
        print(f"verify     ok: {n} shard(s) match the manifest" + (" (sha256 checked)" if args.checksums else ""))
        if args.samples:
            print("\n".join(sample_documents(root, manifest, args.samples, args.max_chars, args.tokenizer)))
    except (ShardError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
