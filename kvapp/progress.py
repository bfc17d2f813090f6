"""Progress bars for long operations: drawn on a terminal, silent in a pipe or a file."""

from __future__ import annotations

import sys
from typing import Any


def bar(total: int | None, unit: str, desc: str) -> Any:
    """Return a tqdm bar on stderr, disabled unless stderr is a terminal.

    Use it as a context manager and call update(n); a disabled bar costs
    nothing and writes nothing, so scripts and logs stay clean.
    """
    from tqdm import tqdm  # imported here: serving never needs it

    return tqdm(
        total=total,
        unit=unit,
        desc=desc,
        file=sys.stderr,
        disable=not sys.stderr.isatty(),
        unit_scale=True,
        dynamic_ncols=True,
        leave=False,
    )
