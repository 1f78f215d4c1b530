"""CPU backend for cache hit counts at every cache size at once (SPEC section 4).

SCH, LRU, LFU and Belady are stack algorithms (Mattson et al., 1970): their keys do not depend on the cache
size, so one priority stack ``P`` of the distinct experts seen so far holds every cache at once (``P[:m]`` is
the content of the size-``m`` cache). A reference found at depth ``d`` is a hit for every ``m > d``, so one
histogram of depths gives the hits of all sizes.

LRU keeps ``P`` sorted by last use, so the depth of ``x`` is the number of experts used since ``x`` was. It
needs no stack. Up to ``LRU_COUNT_MAX_SLOTS`` slots it is one branch-free count over the ``E`` last-use
times, which the compiler vectorises (a push-down under LRU moves every element above ``x`` and mispredicts
where the walk stops; the count was 2.5x faster at both E = 64 and n·E = 1024). Deeper model-level caches
keep a mark at each expert's latest reference time in a Fenwick tree, which counts the marks after
``last_use[x]`` in O(log N): 9.3x faster than the count at 48 x 128 = 6,144 slots (``bench_paper_scale.py``
breakdown, bench/RESULTS.md).

LFU, Belady and SCH keep an explicit stack. Each reference ``x`` is pushed down: ``x`` goes on top and a carry
walks down to ``x``'s old depth only, keeping the higher-key element at each position, so the work per
reference is O(d + 1) however deep the stack is. Two kernels do this, picked by the number of slots:

* ``_scan_depth_hits`` (up to ``SCAN_MAX_SLOTS``, layer level): the stack holds uint32 expert ids and the keys
  live per expert, so SCH's look-ahead updates touch no stack position and there is no position array at
  all. The push-down scan itself finds ``x`` (a sentinel copy of ``x`` below the stack stops it for a new
  expert) and each position is a branch-free compare-and-move. Token lookup needs no pass of its own: the
  scans of a token note the token-start depths of the row's experts as they first reach them. Its only
  unpredictable branches are where a scan stops and where it passes the deepest position read in the token.
* ``_stack_depth_hits`` (deeper model-level stacks): each key is stored next to its expert in the stack
  (``stack_key``) and a position index finds ``x``. The walk branches only where the carry changes, which at
  model level is a few of the hundreds of positions walked, and beats the branch-free scan there (measured,
  bench/RESULTS.md). A position changes only if its key is below the carry's, and the carry's key only
  falls along the walk, so a block of ``2^LOG_SKIP_BLOCK`` positions whose keys' lower bound is not below it
  is passed over in one comparison: the cost grows with the blocks that hold a change, not with the depth.

Pair keys ``(a, τ)`` pack into one int64 as ``a·2^32 + τ``, which is exact while a sequence holds fewer than
2^31 slots (``MAX_CACHE_SLOTS_PER_SEQUENCE`` in :mod:`lrc_kernels.cpu`, which the dispatcher checks).

Inputs are validated by the public API layer (docs/architecture.md): ``topk`` is int32, contiguous,
``[S, T, k]`` with ids in ``[-1, E)`` and no repeated valid id in a row; ``lengths`` is int64 ``[S]`` with
values in ``[0, T]``. All options are runtime arguments, so each kernel compiles one signature. Slices of
sequences run in parallel (``parallel.run_sliced``).
"""

import numba
import numpy as np
import torch

from .parallel import run_sliced

_LFU, _BELADY, _SCH = 0, 1, 2
_STACK_POLICY_CODES = {"lfu": _LFU, "belady": _BELADY, "sch": _SCH}
_PAIR_SHIFT = 1 << 32
_ABOVE_EVERY_KEY = np.int64(2**63 - 1)
# up to this many slots the branch-free scan wins; deeper model-level stacks change few positions per
# push-down, where the walk that branches only on a change is faster (bench/RESULTS.md)
SCAN_MAX_SLOTS = 256
# the deep walk passes over blocks of 2^LOG_SKIP_BLOCK positions where no key is below the carry
LOG_SKIP_BLOCK = 4
# up to this many slots LRU counts the experts used after x directly; above, a Fenwick tree over the times
LRU_COUNT_MAX_SLOTS = 256


@numba.njit(inline="always")
def _used_after(last_use, time):
    """How many experts were last used after ``time``: the LRU depth of the expert last used at ``time``."""
    count = 0
    for e in range(last_use.shape[0]):
        count += last_use[e] > time
    return count


@numba.njit(inline="always")
def _next_uses(topk, s, num_tokens, num_experts, next_use, upcoming):
    """``next_use[n]``: the time of reference n's next use, ``N_s + 1 + x`` if none (Belady's key)."""
    num_slots = topk.shape[2]
    num_refs = 0
    for t in range(num_tokens):
        for j in range(num_slots):
            if topk[s, t, j] >= 0:
                num_refs += 1
    for e in range(num_experts):
        upcoming[e] = num_refs + 1 + e
    n = num_refs
    for t in range(num_tokens - 1, -1, -1):
        for j in range(num_slots - 1, -1, -1):
            x = topk[s, t, j]
            if x >= 0:
                n -= 1
                next_use[n] = upcoming[x]
                upcoming[x] = n


@numba.njit(inline="always")
def _referenced_key(policy, count, x, n, next_use):
    """The eviction key of expert x just referenced as reference n (its count updated for LFU and SCH)."""
    if policy == _LFU:
        count[x] += 1
        return count[x] * _PAIR_SHIFT + n
    if policy == _BELADY:
        return -next_use[n]
    count[x] -= 1  # SCH: the reference leaves the look-ahead window's count
    return count[x] * _PAIR_SHIFT + n


@numba.njit(inline="always")
def _prepare_keys(topk, s, num_tokens, num_experts, policy, seg_len, next_use, upcoming, count):
    """Per-sequence key state before the first token: Belady's next uses, or SCH's counts of tokens 0..L-1."""
    if policy == _BELADY:
        _next_uses(topk, s, num_tokens, num_experts, next_use, upcoming)
    elif policy == _SCH:
        for t in range(min(seg_len, num_tokens)):
            for j in range(topk.shape[2]):
                x = topk[s, t, j]
                if x >= 0:
                    count[x] += 1


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


@numba.njit(cache=True, nogil=True)
def _stack_depth_hits(topk, lengths, hits, num_experts, policy, seg_len, free_slot_hits, sequential, log_block):
    num_sequences, _, num_slots = topk.shape
    stack = np.zeros(num_experts, np.int64)
    stack_key = np.zeros(num_experts, np.int64)
    # a lower bound of the keys in each block of 2^log_block positions (block 0 is always walked): keys
    # only fall where a push-down sets position 0 or its last position, and those lower the bound
    block = 1 << log_block
    block_mask = block - 1
    block_low = np.empty((num_experts >> log_block) + 1, np.int64)
    pos = np.empty(num_experts, np.int64)
    # f (LFU: references so far) or F (SCH: references still ahead inside the look-ahead window)
    count = np.empty(num_experts, np.int64)
    at_depth = np.empty(num_experts, np.int64)
    row_depth = np.empty(num_slots, np.int64)
    max_refs = topk.shape[1] * num_slots
    next_use = np.empty(max_refs if policy == _BELADY else 0, np.int64)
    upcoming = np.empty(num_experts if policy == _BELADY else 0, np.int64)
    for s in range(num_sequences):
        num_tokens = lengths[s]
        pos[:] = -1
        count[:] = 0
        at_depth[:] = 0
        block_low[:] = _ABOVE_EVERY_KEY
        depth_of_new = 0  # |P|
        _prepare_keys(topk, s, num_tokens, num_experts, policy, seg_len, next_use, upcoming, count)

        n = 0
        for i in range(num_tokens):
            if not sequential:
                # token lookup: depths in the stack as it was at token start; first references of the row
                # take consecutive free slots (the free-slot rule)
                first_refs = 0
                for j in range(num_slots):
                    x = topk[s, i, j]
                    if x >= 0:
                        if pos[x] >= 0:
                            row_depth[j] = pos[x]
                        else:
                            row_depth[j] = depth_of_new + first_refs
                            first_refs += 1
            for j in range(num_slots):
                x = topk[s, i, j]
                if x < 0:
                    continue
                depth = pos[x]
                seen = depth >= 0
                if not seen:
                    depth = depth_of_new
                    depth_of_new += 1
                if seen or free_slot_hits:
                    if sequential:
                        at_depth[depth] += 1
                    else:
                        at_depth[row_depth[j]] += 1
                if depth > 0:
                    # A position changes only where its key is below the carry's, which only falls along
                    # the walk: a whole block whose lower bound is not below it is passed over.
                    carry = stack[0]
                    carry_key = stack_key[0]
                    start = 1
                    while start < depth:
                        stop = min((start | block_mask) + 1, depth)
                        full = stop - start == block
                        if full and block_low[start >> log_block] >= carry_key:
                            start = stop
                            continue
                        new_low = _ABOVE_EVERY_KEY
                        for q in range(start, stop):
                            key = stack_key[q]
                            if key < carry_key:
                                lower = stack[q]
                                stack[q] = carry
                                stack_key[q] = carry_key
                                pos[carry] = q
                                carry = lower
                                carry_key = key
                            new_low = min(new_low, stack_key[q])
                        if full:
                            block_low[start >> log_block] = new_low
                        start = stop
                    stack[depth] = carry
                    stack_key[depth] = carry_key
                    pos[carry] = depth
                    last_block = depth >> log_block
                    block_low[last_block] = min(block_low[last_block], carry_key)
                stack[0] = x
                pos[x] = 0
                stack_key[0] = _referenced_key(policy, count, x, n, next_use)
                n += 1
            if policy == _SCH and i + seg_len < num_tokens:
                for j in range(num_slots):
                    y = topk[s, i + seg_len, j]
                    if y >= 0:
                        count[y] += 1
                        if pos[y] >= 0:
                            stack_key[pos[y]] += _PAIR_SHIFT
        total = 0
        for d in range(num_experts):
            total += at_depth[d]
            hits[s, d] = total


@numba.njit(inline="always")
def _keep_higher_key(stack, key, q, y, carry, carry_key):
    """One branch-free step of the push-down at position q, which holds y: the higher key stays at q."""
    y_key = key[y]
    lower = y_key < carry_key
    stack[q] = carry if lower else y
    return (y if lower else carry), (y_key if lower else carry_key)


@numba.njit(cache=True, nogil=True)
def _scan_depth_hits(topk, lengths, hits, num_experts, policy, seg_len, free_slot_hits, sequential):
    num_sequences, _, num_slots = topk.shape
    # ids by stack position; one spare slot holds the sentinel copy of a new expert
    stack = np.empty(num_experts + 1, np.uint32)
    # per expert, not per position: SCH look-ahead updates need no position lookup
    key = np.empty(num_experts, np.int64)
    seen = np.empty(num_experts, np.bool_)
    # the row slot of each expert during a token; num_slots = not in the row
    slot_of = np.empty(num_experts, np.int64)
    slot_of[:] = num_slots
    count = np.empty(num_experts, np.int64)
    at_depth = np.empty(num_experts, np.int64)
    row_depth = np.empty(num_slots + 1, np.int64)  # entry num_slots absorbs the stores of experts not in the row
    max_refs = topk.shape[1] * num_slots
    next_use = np.empty(max_refs if policy == _BELADY else 0, np.int64)
    upcoming = np.empty(num_experts if policy == _BELADY else 0, np.int64)
    for s in range(num_sequences):
        num_tokens = lengths[s]
        seen[:] = False
        count[:] = 0
        key[:] = 0
        at_depth[:] = 0
        num_seen = 0
        _prepare_keys(topk, s, num_tokens, num_experts, policy, seg_len, next_use, upcoming, count)
        n = 0
        for i in range(num_tokens):
            # Token lookup needs each reference's depth in the stack as it was at token start. A push-down
            # only moves experts it reads, so the scans of a token leave every position below the deepest one
            # read so far (``reach``) holding its token-start expert: each scan notes the depths of the row's
            # experts it reads past ``reach``, and an expert found past it stood there at token start (a new
            # expert stops at the sentinel, at the next free slot: the free-slot rule).
            reach = num_experts if sequential else -1
            if not sequential:
                for j in range(num_slots):
                    x = topk[s, i, j]
                    if x >= 0:
                        slot_of[np.uint32(x)] = j
            for j in range(num_slots):
                signed_x = topk[s, i, j]
                if signed_x < 0:
                    continue
                x = np.uint32(signed_x)  # unsigned, so no index below needs a negative-index wraparound
                was_seen = seen[x]
                # push-down: x enters as a carry above every key, so position 0 takes it; the scan stops
                # where x stood, or at the sentinel copy of x below the stack if x is new
                stack[num_seen] = x
                carry = x
                carry_key = _ABOVE_EVERY_KEY
                q = 0
                y = stack[0]
                while y != x and q <= reach:
                    carry, carry_key = _keep_higher_key(stack, key, q, y, carry, carry_key)
                    q += 1
                    y = stack[q]
                while y != x:
                    row_depth[np.uint64(slot_of[y])] = q
                    carry, carry_key = _keep_higher_key(stack, key, q, y, carry, carry_key)
                    q += 1
                    y = stack[q]
                stack[q] = carry
                if q > reach:
                    row_depth[j] = q
                    reach = q
                if not was_seen:
                    seen[x] = True
                    num_seen += 1
                if was_seen or free_slot_hits:
                    at_depth[np.uint64(q if sequential else row_depth[j])] += 1
                key[x] = _referenced_key(policy, count, x, n, next_use)
                n += 1
            if not sequential:
                for j in range(num_slots):
                    x = topk[s, i, j]
                    if x >= 0:
                        slot_of[np.uint32(x)] = num_slots
            if policy == _SCH and i + seg_len < num_tokens:
                for j in range(num_slots):
                    y = topk[s, i + seg_len, j]
                    if y >= 0:
                        count[np.uint32(y)] += 1
                        key[np.uint32(y)] += _PAIR_SHIFT  # unseen experts' keys are set at their first reference
        total = 0
        for d in range(num_experts):
            total += at_depth[d]
            hits[s, d] = total


def cache_hits(topk, lengths, num_experts, policy, seg_len, free_slot_hits, lookup):
    """Hits of every cache size ``m = 1..num_experts`` for every sequence, in one pass per sequence.

    Args:
        topk: int32 ``[S, T, k]``, contiguous; ids in ``[-1, num_experts)``, ``-1`` = no expert.
        lengths: int64 ``[S]``; sequence ``s`` uses tokens ``0..lengths[s]-1``.
        num_experts: number of cache slots ``E`` (``n·E`` at model level).
        policy: ``"sch"``, ``"lru"``, ``"lfu"`` or ``"belady"``.
        seg_len: SCH look-ahead ``L`` (int) for ``"sch"``, ``None`` otherwise.
        free_slot_hits: whether first references that find a free slot count as hits.
        lookup: ``"token"`` (classify at token start) or ``"sequential"``.

    Returns:
        int64 ``[S, num_experts]``; entry ``[s, m-1]`` is the hits of the size-``m`` cache.
    """
    num_sequences, num_tokens, num_slots = topk.shape  # T·k < 2^31: lrc_kernels.cpu.supports, checked by dispatch
    topk = np.ascontiguousarray(topk.numpy())
    lengths = np.ascontiguousarray(lengths.numpy())
    hits = np.zeros((num_sequences, num_experts), np.int64)
    work = num_sequences * num_tokens * num_slots
    if policy == "lru":
        run_sliced(_lru_depth_hits, (topk, lengths, hits),
                   (num_experts, bool(free_slot_hits), lookup == "sequential", num_experts > LRU_COUNT_MAX_SLOTS), work)
    else:
        # the look-ahead never reaches past T, so clipping L keeps i + L from overflowing int64
        look_ahead = min(seg_len, num_tokens + 1) if policy == "sch" else 0
        options = (num_experts, _STACK_POLICY_CODES[policy], look_ahead, bool(free_slot_hits),
                   lookup == "sequential")
        if num_experts <= SCAN_MAX_SLOTS:
            run_sliced(_scan_depth_hits, (topk, lengths, hits), options, work)
        else:
            run_sliced(_stack_depth_hits, (topk, lengths, hits), (*options, LOG_SKIP_BLOCK), work)
    return torch.from_numpy(hits)
