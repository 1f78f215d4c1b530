"""The LRU kernel of :mod:`lrc_kernels.cpu.cache`: depths from last-use times, no stack (SPEC section 4).

LRU keeps ``P`` sorted by last use, so the depth of ``x`` is the number of experts used since ``x`` was. Up to
``LRU_COUNT_MAX_SLOTS`` slots (:mod:`lrc_kernels.cpu.cache` picks) it is one branch-free count over the ``E``
last-use times, which the compiler vectorises (a push-down under LRU moves every element above ``x`` and
mispredicts where the walk stops; the count was 2.5x faster at both E = 64 and n·E = 1024). Deeper
model-level caches keep a mark at each expert's latest reference time in a Fenwick tree, which counts the
marks after ``last_use[x]`` in O(log N): 9.3x faster than the count at 48 x 128 = 6,144 slots
(``bench_paper_scale.py`` breakdown, bench/RESULTS.md).

Inputs as :mod:`lrc_kernels.cpu.cache` documents; ``hits`` is the int64 ``[S, E]`` output.
"""

import numba
import numpy as np


@numba.njit(inline="always")
def _used_after(last_use, time):
    """How many experts were last used after ``time``: the LRU depth of the expert last used at ``time``."""
    count = 0
    for e in range(last_use.shape[0]):
        count += last_use[e] > time
    return count


@numba.njit(inline="always")
def _tree_add(tree, time, delta, size):
    index = time + 1  # Fenwick trees count from 1
    while index < size:
        tree[index] += delta
        index += index & -index


@numba.njit(inline="always")
def _tree_prefix(tree, time):
    """How many entries at times ``0..time`` are set."""
    total = 0
    index = time + 1
    while index > 0:
        total += tree[index]
        index &= index - 1
    return total


@numba.njit(inline="always")
def _lru_depth(last_use, tree, num_seen, time, use_tree):
    """How many experts were last used after ``time`` (an expert's last use): its LRU depth."""
    if use_tree:
        return num_seen - _tree_prefix(tree, time)
    return _used_after(last_use, time)


@numba.njit(cache=True, nogil=True)
def _lru_depth_hits(topk, lengths, hits, num_experts, free_slot_hits, sequential, use_tree):
    num_sequences, max_tokens, num_slots = topk.shape
    last_use = np.empty(num_experts, np.int64)  # -1: not seen yet, so never counted as used after anything
    # use_tree: a mark at the time of every expert's latest reference, so that the depth is the number of marks
    # after last_use[x], counted in O(log N) instead of a pass over all n·E last uses
    tree = np.zeros(max_tokens * num_slots + 1 if use_tree else 0, np.int64)
    at_depth = np.empty(num_experts, np.int64)
    row_depth = np.empty(num_slots, np.int64)
    for s in range(num_sequences):
        size = lengths[s] * num_slots + 1 if use_tree else 0
        tree[:size] = 0
        last_use[:] = -1
        at_depth[:] = 0
        num_seen = 0
        n = 0
        for i in range(lengths[s]):
            if not sequential:
                # token lookup: depths before any update of this row; first references of the row take
                # consecutive free slots (the free-slot rule)
                first_refs = 0
                for j in range(num_slots):
                    x = topk[s, i, j]
                    if x >= 0:
                        if last_use[x] >= 0:
                            row_depth[j] = _lru_depth(last_use, tree, num_seen, last_use[x], use_tree)
                        else:
                            row_depth[j] = num_seen + first_refs
                            first_refs += 1
            for j in range(num_slots):
                x = topk[s, i, j]
                if x < 0:
                    continue
                seen = last_use[x] >= 0
                if seen or free_slot_hits:
                    if not sequential:
                        at_depth[row_depth[j]] += 1
                    elif seen:
                        at_depth[_lru_depth(last_use, tree, num_seen, last_use[x], use_tree)] += 1
                    else:
                        at_depth[num_seen] += 1
                if not seen:
                    num_seen += 1
                if use_tree:
                    if seen:
                        _tree_add(tree, last_use[x], -1, size)
                    _tree_add(tree, n, 1, size)
                last_use[x] = n
                n += 1
        total = 0
        for d in range(num_experts):
            total += at_depth[d]
            hits[s, d] = total
