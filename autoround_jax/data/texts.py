"""Offline English text from Debian's `fortunes` package, split into disjoint evaluation and calibration halves.

Fortunes are assigned alternately (even index -> evaluation, odd -> calibration) over the files in sorted order, so
both halves cover every topic while never sharing a fortune.
"""

from __future__ import annotations

import functools
import os

FORTUNES_DIR = "/usr/share/games/fortunes"
_SKIP = {"ascii-art", "translate-me"}  # pictures and non-English text


@functools.lru_cache(maxsize=2)
def fortunes(directory: str = FORTUNES_DIR) -> tuple[str, ...]:
    """All fortunes, in file order, stripped."""
    if not os.path.isdir(directory):
        raise FileNotFoundError(
            f"{directory} not found: install Debian's fortunes text (apt-get install fortunes fortunes-min) "
            "or pass your own text file"
        )
    out: list[str] = []
    for name in sorted(os.listdir(directory)):
        path = os.path.join(directory, name)
        if name in _SKIP or "." in name or not os.path.isfile(path):
            continue
        with open(path, encoding="utf-8", errors="replace") as f:
            out.extend(p.strip() for p in f.read().split("\n%\n") if p.strip())
    if not out:
        raise FileNotFoundError(f"{directory} holds no fortunes: reinstall the fortunes package")
    return tuple(out)


def eval_text(directory: str = FORTUNES_DIR) -> str:
    """Held-out text for perplexity."""
    return "\n\n".join(fortunes(directory)[0::2])


def calibration_texts(directory: str = FORTUNES_DIR) -> list[str]:
    """Calibration fortunes (disjoint from eval_text)."""
    return list(fortunes(directory)[1::2])
