"""The progress bar every long stage shows (tqdm; redraws rarely when stderr is a log file, not a terminal)."""
from __future__ import annotations

import sys

from tqdm.auto import tqdm


def progress_bar(**kwargs) -> tqdm:
    kwargs.setdefault("dynamic_ncols", True)
    kwargs.setdefault("mininterval", 0.1 if sys.stderr.isatty() else 10.0)
    return tqdm(**kwargs)
