"""CPU backend for cache hit counts at every cache size at once (SPEC section 4).

SCH, LRU, LFU and Belady are stack algorithms (Mattson et al., 1970): their keys do not depend on the cache
size, so one priority stack ``P`` of the distinct experts seen so far holds every cache at once (``P[:m]`` is
the content of the size-``m`` cache). A reference found at depth ``d`` is a hit for every ``m > d``, so one
histogram of depths gives the hits of all sizes.

The kernels live in :mod:`lrc_kernels.cpu.cache_lru` (LRU: a count over last-use times, or a Fenwick tree
above ``LRU_COUNT_MAX_SLOTS`` slots) and :mod:`lrc_kernels.cpu.cache_stack` (LFU, Belady, SCH: the
branch-free scan up to ``SCAN_MAX_SLOTS`` slots, the walk with block skips above). This module picks one per
cache; :func:`cache_hits_many` runs several caches of one stream, each slice of sequences running all of
them.

Inputs are validated by the public API layer (docs/architecture.md): ``topk`` is int32, contiguous,
``[S, T, k]`` with ids in ``[-1, E)`` and no repeated valid id in a row; ``lengths`` is int64 ``[S]`` with
values in ``[0, T]``. All options are runtime arguments, so each kernel compiles one signature. Slices of
sequences run in parallel (``parallel.run_sliced``), each slice running every cache of its sequences.
"""

from typing import Optional, Sequence, Tuple

import numpy as np
import torch

from .cache_lru import _lru_depth_hits
from .cache_stack import BELADY, LFU, SCH, _scan_depth_hits, _stack_depth_hits
from .parallel import run_sliced

_STACK_POLICY_CODES = {"lfu": LFU, "belady": BELADY, "sch": SCH}
# up to this many slots the branch-free scan wins; deeper model-level stacks change few positions per
# push-down, where the walk that branches only on a change is faster (bench/RESULTS.md)
SCAN_MAX_SLOTS = 256
# the deep walk passes over blocks of 2^LOG_SKIP_BLOCK positions where no key is below the carry
LOG_SKIP_BLOCK = 4
# up to this many slots LRU counts the experts used after x directly; above, a Fenwick tree over the times
LRU_COUNT_MAX_SLOTS = 256

_LRU_COUNT, _LRU_TREE, _SCAN, _WALK = range(4)  # the kernel that runs a cache


def _kernel_of(policy: str, num_experts: int) -> int:
    if policy == "lru":
        return _LRU_TREE if num_experts > LRU_COUNT_MAX_SLOTS else _LRU_COUNT
    return _WALK if num_experts > SCAN_MAX_SLOTS else _SCAN


def _depth_hits_many(topk, lengths, hits, num_experts, kernels, policy_codes, look_aheads, free_slot_hits,
                     sequential, log_block):
    # A Python loop over the nogil kernels, not one numba function calling them: numba's on-disk cache
    # would not notice edits to kernels in other files, and each kernel compiles only when used.
    # Each kernel fills a contiguous [S, E] array, as when called alone (a column view of hits measured up
    # to 3 % slower).
    out = np.empty((hits.shape[0], hits.shape[2]), np.int64)
    for c, kernel in enumerate(kernels):
        if kernel == _SCAN:
            _scan_depth_hits(topk, lengths, out, num_experts, policy_codes[c], look_aheads[c], free_slot_hits,
                             sequential)
        elif kernel == _WALK:
            _stack_depth_hits(topk, lengths, out, num_experts, policy_codes[c], look_aheads[c], free_slot_hits,
                              sequential, log_block)
        else:
            _lru_depth_hits(topk, lengths, out, num_experts, free_slot_hits, sequential, kernel == _LRU_TREE)
        hits[:, c] = out


def cache_hits_many(topk, lengths, num_experts, caches: Sequence[Tuple[str, Optional[int]]], free_slot_hits,
                    lookup):
    """Hits of every cache size ``m = 1..num_experts`` for several caches of the same sequences at once.

    Args:
        topk: int32 ``[S, T, k]``, contiguous; ids in ``[-1, num_experts)``, ``-1`` = no expert.
        lengths: int64 ``[S]``; sequence ``s`` uses tokens ``0..lengths[s]-1``.
        num_experts: number of cache slots ``E`` (``n·E`` at model level).
        caches: ``(policy, seg_len)`` pairs: ``"sch"`` with its look-ahead ``L``, or ``"lru"``, ``"lfu"``,
            ``"belady"`` with None.
        free_slot_hits: whether first references that find a free slot count as hits.
        lookup: ``"token"`` (classify at token start) or ``"sequential"``.

    Returns:
        int64 ``[S, C, num_experts]`` for the C caches; entry ``[s, c, m-1]`` is the hits of cache c at size m.
    """
    num_sequences, num_tokens, num_slots = topk.shape  # T·k < 2^31: lrc_kernels.cpu.supports, checked by dispatch
    kernels = [_kernel_of(policy, num_experts) for policy, _ in caches]
    policy_codes = [None if policy == "lru" else _STACK_POLICY_CODES[policy] for policy, _ in caches]
    # the look-ahead never reaches past T, so clipping L keeps i + L from overflowing int64
    look_aheads = [min(seg_len, num_tokens + 1) if policy == "sch" else 0 for policy, seg_len in caches]
    hits = np.zeros((num_sequences, len(caches), num_experts), np.int64)
    # A batch is sliced by one cache's references, as a single cache would be: the monitor's batch, too small
    # to split for one cache, ran 5 % slower inside a training step when split for its seven (torch's
    # OpenMP workers spin on the other core; bench/RESULTS.md, fifth session).
    run_sliced(_depth_hits_many, (np.ascontiguousarray(topk.numpy()), np.ascontiguousarray(lengths.numpy()), hits),
               (num_experts, kernels, policy_codes, look_aheads, bool(free_slot_hits), lookup == "sequential",
                LOG_SKIP_BLOCK), num_sequences * num_tokens * num_slots)
    return torch.from_numpy(hits)


def cache_hits(topk, lengths, num_experts, policy, seg_len, free_slot_hits, lookup):
    """Hits of every cache size ``m = 1..num_experts`` for every sequence, in one pass per sequence.

    Args:
        topk, lengths, num_experts, free_slot_hits, lookup: as in :func:`cache_hits_many`.
        policy: ``"sch"``, ``"lru"``, ``"lfu"`` or ``"belady"``.
        seg_len: SCH look-ahead ``L`` (int) for ``"sch"``, ``None`` otherwise.

    Returns:
        int64 ``[S, num_experts]``; entry ``[s, m-1]`` is the hits of the size-``m`` cache.
    """
    return cache_hits_many(topk, lengths, num_experts, ((policy, seg_len),), free_slot_hits, lookup)[:, 0]
