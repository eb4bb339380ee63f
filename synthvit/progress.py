"""The progress bar every long stage shows (tqdm; redraws rarely when stderr is a log file, not a terminal)."""
from __future__ import annotations

import sys
import weakref

from tqdm.auto import tqdm

_OPEN: weakref.WeakSet = weakref.WeakSet()  # bars made here and not closed yet


def progress_bar(**kwargs) -> tqdm:
    kwargs.setdefault("dynamic_ncols", True)
    kwargs.setdefault("mininterval", 0.1 if sys.stderr.isatty() else 10.0)
    bar = tqdm(**kwargs)
    _OPEN.add(bar)
    return bar


def close_bars() -> None:
    """Close the bars an error left open (each ends its line), so that the CLI's error starts a line of its own."""
    for bar in list(_OPEN):
        if not bar.disable:
            bar.close()
    _OPEN.clear()
