"""Join the parts of a tokenize job (`tokenize --num-parts N --part I`, data_prep/parts.py) into one dataset.

    python -m data_prep merge parts/000 parts/001 parts/002 parts/003 --output data/corpus
    python -m data_prep merge parts/* --output data/corpus --move          # rename the shards instead of linking

The shards are hard-linked (or, with --move, renamed) into the output, never copied or rewritten: the parts' files
are on the same file system as the output, and merging a terabyte takes as long as listing it. The manifest is
rebuilt from the parts': shards renumbered in part order per split, counts summed, the inputs as the single run
lists them. The merged dataset holds exactly the documents a single run over the same inputs writes, in the same
split and order (only where shards break differs: each part's last shard may be short, and the manifest says
where the parts end, so `inspect` knows).

Refused, with a message naming the part: a part without a manifest (incomplete, or still running), parts made with
another tokenizer or other settings or inputs, a part missing or given twice, shards that fail their size check
(--checksums also verifies every sha256). Written like everything else: into a temporary directory next to
--output, renamed into place when complete; an existing --output is refused unless --overwrite.
Exit status: 0 done; 1 a part or the output cannot be used (the message names it); 2 bad arguments.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
from pathlib import Path

from pretrain.fileutil import fsync_dir, write_json_atomic
from pretrain.shards import MANIFEST, ShardError, manifest_shards, read_manifest, shard_file, verify_dataset

SPLITS = ("train", "val")
PROGRESS = ".progress.json"


class MergeError(ValueError):
    """A part or output that cannot be merged; the message names it."""


def read_parts(dirs: list[Path], *, checksums: bool) -> list[tuple[Path, dict]]:
    """Each part's manifest, checked (complete, sound, one of a set), sorted by part index."""
    parts = []
    for d in dirs:
        if (d / PROGRESS).exists() or not (d / MANIFEST).exists():
            raise MergeError(f"{d}: not a complete part (no {MANIFEST}: still running, or interrupted: rerun its "
                             "tokenize command with --resume)")  # fmt: skip
        try:
            manifest = read_manifest(d)
            problems = verify_dataset(d, checksums=checksums)
        except ShardError as e:
            raise MergeError(str(e)) from None
        if problems:
            raise MergeError(f"{d}: {problems[0]}" + (f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""))
        if "part" not in manifest:
            raise MergeError(f"{d}: not a part (made without --num-parts)")
        parts.append((d, manifest))
    first_dir, first = parts[0]
    n = first["part"]["of"]
    for d, m in parts[1:]:
        for key, what in (("tokenizer", "tokenizer"), ("settings", "settings"), ("dtype", "dtype")):
            if m[key] != first[key]:
                diff = sorted(k for k in set(m[key]) | set(first[key]) if m[key].get(k) != first[key].get(k)) if isinstance(m[key], dict) else [key]  # fmt: skip
                raise MergeError(f"{d}: made with another {what} than {first_dir} ({', '.join(diff)} differ)")
        if m["part"]["of"] != n or m["part"]["all_inputs"] != first["part"]["all_inputs"]:
            raise MergeError(f"{d}: a part of another job than {first_dir} (other --num-parts or inputs)")
    seen: dict[int, Path] = {}
    for d, m in parts:
        i = m["part"]["index"]
        if i in seen:
            raise MergeError(f"{d}: part {i} is given twice (also {seen[i]})")
        seen[i] = d
    missing = sorted(set(range(n)) - set(seen))
    if missing:
        raise MergeError(
            f"part(s) {', '.join(map(str, missing))} of {n} missing (have {', '.join(map(str, sorted(seen)))})"
        )
    return sorted(parts, key=lambda p: p[1]["part"]["index"])


def merged_manifest(parts: list[tuple[Path, dict]]) -> tuple[dict, list[tuple[Path, str, str]]]:
    """The merged manifest and the shard files to bring over: (source prefix, split, new prefix)."""
    first = parts[0][1]
    links: list[tuple[Path, str, str]] = []
    splits: dict[str, dict] = {}
    part_shards: dict[str, list[int]] = {}
    for split in SPLITS:
        shards, counts = [], []
        for d, m in parts:
            infos = manifest_shards(m).get(split, [])
            counts.append(len(infos))
            for info in infos:
                prefix = f"{split}/shard_{len(shards):05d}"
                links.append((d / info.prefix, split, prefix))
                shards.append({**vars(info), "prefix": prefix})
        splits[split] = {
            "documents": sum(m["splits"][split]["documents"] for _, m in parts),
            "tokens": sum(m["splits"][split]["tokens"] for _, m in parts),
            "text_bytes": sum(m["splits"][split].get("text_bytes", 0) for _, m in parts),
            "shards": shards,
        }
        part_shards[split] = counts
    skipped: dict[str, int] = {}
    for _, m in parts:
        for reason, k in m["skipped"].items():
            skipped[reason] = skipped.get(reason, 0) + k
    manifest = {
        "format": first["format"],
        "tool_version": first.get("tool_version"),
        "tokenizer": first["tokenizer"],
        "dtype": first["dtype"],
        "settings": first["settings"],
        "split_rule": first.get("split_rule"),
        "inputs": first["part"]["all_inputs"],
        "merged": {"parts": len(parts), "part_shards": part_shards},  # where each part's (maybe short) shards end
        "skipped": skipped,
        "unreadable": [u for _, m in parts for u in m.get("unreadable", [])],
        "zstd_without_checksum": [u for _, m in parts for u in m.get("zstd_without_checksum", [])],
        "splits": splits,
    }
    return {k: v for k, v in manifest.items() if v is not None}, links


def merge(
    dirs: list[Path], output: Path, *, move: bool = False, overwrite: bool = False, checksums: bool = False
) -> dict:
    """Merge the part directories into `output`; returns the manifest written."""
    parts = read_parts(dirs, checksums=checksums)
    if output.exists() and not overwrite:
        raise MergeError(f"{output}: exists; pass --overwrite to replace it")
    if any(output.resolve() == d.resolve() for d, _ in parts):
        raise MergeError(f"{output}: is one of the parts")
    manifest, links = merged_manifest(parts)
    tmp = output.with_name(f"{output.name}.merge-{os.getpid()}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        for split in SPLITS:
            (tmp / split).mkdir(parents=True)
        for src, _, prefix in links:
            for ext in (".bin", ".idx"):
                a, b = shard_file(src, ext), shard_file(tmp / prefix, ext)
                try:
                    os.link(a, b)  # renamed only once the merged dataset is complete (below)
                except OSError as e:
                    raise MergeError(
                        f"{a}: cannot be linked into {tmp.parent} ({e.strerror}); the parts and the output must be "
                        "on the same file system (shards are never copied)"
                    ) from None
        for split in SPLITS:
            fsync_dir(tmp / split)
        write_json_atomic(tmp / MANIFEST, manifest)
        problems = verify_dataset(tmp, checksums=False)
        if problems:
            raise MergeError(f"{output}: the merged dataset does not verify: {problems[0]}")
        if output.exists():
            aside = output.with_name(f"{output.name}.replaced-{os.getpid()}.tmp")
            os.replace(output, aside)
            os.replace(tmp, output)
            shutil.rmtree(aside, ignore_errors=True)
        else:
            os.replace(tmp, output)
        fsync_dir(output.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if move:  # the merged dataset holds every shard (links): the parts' own names go
        for d, _ in parts:
            shutil.rmtree(d)
    return manifest


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m data_prep merge", description=__doc__.split("\n")[0], epilog=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )  # fmt: skip
    p.add_argument("parts", nargs="+", help="the part directories (tokenize --num-parts N --part I --output DIR)")
    p.add_argument("--output", required=True, help="the merged dataset directory to write")
    p.add_argument("--move", action="store_true", help="remove the part directories once merged (shards are linked)")
    p.add_argument(
        "--overwrite", action="store_true", help="replace an existing --output (once the new one is complete)"
    )
    p.add_argument("--checksums", action="store_true", help="verify every shard's sha256 first (reads everything)")
    args = p.parse_args(argv)
    try:
        manifest = merge([Path(d) for d in args.parts], Path(args.output), move=args.move, overwrite=args.overwrite,
                         checksums=args.checksums)  # fmt: skip
    except (MergeError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    s = manifest["splits"]
    print(
        f"{args.output}: {len(args.parts)} parts -> " + ", ".join(
            f"{k} {v['documents']:,} documents / {v['tokens']:,} tokens in {len(v['shards'])} shards" for k, v in s.items()
        )
    )  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
