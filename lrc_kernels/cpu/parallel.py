"""The CPU kernels' thread count, and running a kernel over slices of its sequences on that many threads.

Every CPU kernel is ``nogil`` and writes only the output rows of the sequences it is given, so a batch is
cut into contiguous slices of sequences and the slices run at once on a shared thread pool. Each sequence is
still computed by one thread from start to end, so the integers are identical for every thread count.
Threads, rather than numba's ``prange``, keep one compiled signature per kernel and stay out of numba's
threading layers, which contend with torch's OpenMP pool.

This module imports neither numba nor torch.
"""

from __future__ import annotations

import os
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Optional, Sequence

_configured_threads: Optional[int] = None
_pool: Optional[ThreadPoolExecutor] = None
_pool_size = 0
_pool_lock = threading.Lock()
# a slice below this many slot references costs less than handing it to another thread (~20-50 us)
MIN_REFERENCES_PER_SLICE = 1 << 15


def available_cores() -> int:
    """The cores this process may run on (``os.sched_getaffinity``; ``os.cpu_count()`` where it is missing)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


def get_num_threads() -> int:
    """Threads the CPU kernels use: the value given to :func:`set_num_threads`, else :func:`available_cores`.

    Example:
        >>> import lrc_kernels
        >>> lrc_kernels.set_num_threads(None); lrc_kernels.get_num_threads() == available_cores()
        True
    """
    return _configured_threads if _configured_threads is not None else available_cores()


def set_num_threads(num_threads: Optional[int]) -> None:
    """Run the CPU kernels on ``num_threads`` threads (``None``: every core the process may use).

    Results do not depend on it: each sequence is computed by one thread.

    Example:
        >>> import lrc_kernels
        >>> lrc_kernels.set_num_threads(1); lrc_kernels.get_num_threads()
        1
        >>> lrc_kernels.set_num_threads(None)
    """
    global _configured_threads
    if num_threads is not None:
        if isinstance(num_threads, bool) or not isinstance(num_threads, int):
            raise TypeError(f"num_threads: expected an int or None, received {type(num_threads).__name__}")
        if num_threads < 1:
            raise ValueError(f"num_threads: expected an int >= 1 or None, received {num_threads}")
    _configured_threads = num_threads


def _executor(num_threads: int) -> ThreadPoolExecutor:
    global _pool, _pool_size
    with _pool_lock:
        if _pool is None or _pool_size < num_threads:
            # The smaller pool is dropped, not shut down: another thread may be about to submit to it. Its idle
            # workers exit once the last caller holding it lets go (ThreadPoolExecutor's weakref callback).
            _pool = ThreadPoolExecutor(max_workers=num_threads, thread_name_prefix="lrc_kernels")
            _pool_size = num_threads
        return _pool


def slice_bounds(num_rows: int, work: int, num_threads: Optional[int] = None) -> list:
    """Boundaries ``[0, ..., num_rows]`` of at most ``num_threads`` near-equal slices of rows.

    ``work`` (slot references in the batch) bounds the slice count so that no slice is too small to pay for
    its thread.
    """
    most_slices = min(num_rows, work // MIN_REFERENCES_PER_SLICE)
    if most_slices <= 1:  # small batches (a monitor's) skip the affinity system call
        return [0, num_rows]
    threads = get_num_threads() if num_threads is None else num_threads
    slices = max(1, min(threads, most_slices))
    return [num_rows * i // slices for i in range(slices + 1)]


def run_sliced(kernel: Callable, row_arrays: Sequence, other_args: Sequence, work: int,
               num_threads: Optional[int] = None) -> None:
    """``kernel(*[a[lo:hi] for a in row_arrays], *other_args)`` for slices of rows, on the thread pool.

    Args:
        kernel: a ``nogil`` numba kernel that writes only the rows it is given.
        row_arrays: numpy arrays whose first dimension is the sequence (inputs and outputs alike).
        other_args: arguments passed unchanged to every slice.
        work: slot references in the batch, for :func:`slice_bounds`.
        num_threads: override of :func:`get_num_threads`.
    """
    bounds = slice_bounds(len(row_arrays[0]), work, num_threads)
    if len(bounds) == 2:
        kernel(*row_arrays, *other_args)
        return
    pool = _executor(len(bounds) - 2)
    futures = [pool.submit(kernel, *[array[lo:hi] for array in row_arrays], *other_args)
               for lo, hi in zip(bounds[1:-1], bounds[2:])]
    # the calling thread takes the first slice instead of waiting idle
    kernel(*[array[:bounds[1]] for array in row_arrays], *other_args)
    for future in futures:
        future.result()
