"""Count the words of text files: a finite batch job for ``pipekit run``.

    pipekit run examples.wordcount:pipe                    # pipekit's own docs and code
    WORDCOUNT_PATH=~/books pipekit run examples.wordcount:pipe --workers 4

Run it from the repository root (the working directory is importable, as with
``python -m``). The source is a list, so on a terminal a progress bar shows how far it
got; at the end the ``count`` stage's shutdown hook prints the ten most common words,
then ``pipekit`` prints the run's summary.
"""

from __future__ import annotations

import os
import re
import threading
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pipekit

_WORD = re.compile(r"[a-z][a-z']+")
_SUFFIXES = (".md", ".txt", ".py", ".rst")

pipe = pipekit.Pipeline("wordcount")


def read_lines() -> list[str]:
    """Every line of the text files under ``$WORDCOUNT_PATH`` (default: this repository)."""
    root = Path(os.environ.get("WORDCOUNT_PATH", Path(__file__).resolve().parent.parent))
    files = [root] if root.is_file() else sorted(
        p for p in root.rglob("*") if p.suffix in _SUFFIXES and ".venv" not in p.parts)
    return [line for f in files for line in f.read_text(errors="replace").splitlines()]


@pipe.stage(fanout=True)
def words(line: str) -> Iterator[str]:
    """Split a line into lower-case words (one line in, several words out)."""
    return iter(_WORD.findall(line.lower()))


class Tally:
    """Counts words across the ``count`` stage's worker threads."""

    def __init__(self) -> None:
        self.counts: Counter[str] = Counter()
        self._lock = threading.Lock()

    def add(self, word: str) -> str:
        """Count one word."""
        with self._lock:
            self.counts[word] += 1
        return word

    def report(self) -> None:
        """The stage's ``on_shutdown`` hook: print the most common words."""
        top = ", ".join(f"{w} {n}" for w, n in self.counts.most_common(10))
        print(f"{sum(self.counts.values()):,} words, {len(self.counts):,} distinct; top: {top}")


tally = Tally()
pipe.add_stage("count", tally.add, workers=2, on_shutdown=tally.report)
pipe.source(read_lines)
