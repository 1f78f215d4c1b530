"""Progress bars of the command line's long steps (tqdm on stderr); ``--quiet``, a log file or a missing tqdm
give none."""

from __future__ import annotations

import sys
from typing import Callable, Optional


def progress_bar(total: int, desc: str, unit: str, enabled: bool):
    """A tqdm bar on stderr, or None when disabled, when stderr is not a terminal or tqdm is not installed."""
    if not enabled or not sys.stderr.isatty():
        return None
    try:
        from tqdm import tqdm
    except ImportError:
        return None
    return tqdm(total=total, desc=desc, unit=unit, file=sys.stderr, leave=False)


def step_progress(desc: str, enabled: bool) -> Optional[Callable[[int, int], None]]:
    """A ``progress(done, total)`` callback (the one :func:`lrc_kernels.analyze.analyze` takes) drawing a bar
    that closes itself at ``done == total``; None when there is nothing to draw."""
    if not enabled or not sys.stderr.isatty():
        return None
    state = {"bar": None}

    def progress(done: int, total: int) -> None:
        if state["bar"] is None:
            state["bar"] = progress_bar(total, desc, "stream", True)
            if state["bar"] is None:
                return
        state["bar"].n = done
        state["bar"].refresh()
        if done >= total:
            state["bar"].close()

    return progress
