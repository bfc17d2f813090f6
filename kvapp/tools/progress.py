"""Progress bars for long operations: drawn on a terminal, silent in a pipe or a file."""

from __future__ import annotations

import sys
from typing import Any


class NoBar:
    """A progress bar that draws nothing: for pipes, files and callers that want none."""

    def __init__(self, total: int | None = None) -> None:
        self.total = total
        self.n = 0

    def update(self, n: int = 1) -> None:
        self.n += n

    def __enter__(self) -> NoBar:
        return self

    def __exit__(self, *exc: object) -> None:
        pass


def bar(total: int | None, unit: str, desc: str) -> Any:
    """Return a tqdm bar on stderr if stderr is a terminal, else a NoBar.

    Use it as a context manager and call update(n).  Scripts and logs stay
    clean, and without tqdm (pinned in requirements.txt) there is no bar.
    """
    if sys.stderr.isatty():
        try:
            from tqdm import tqdm  # imported here: serving never needs it
        except ImportError:
            pass
        else:
            return tqdm(
                total=total,
                unit=unit,
                desc=desc,
                file=sys.stderr,
                unit_scale=True,
                dynamic_ncols=True,
                leave=False,
            )
    return NoBar(total)
