"""The LFU, Belady and SCH kernels of :mod:`lrc_kernels.cpu.cache`: an explicit push-down stack (SPEC section 4).

Each reference ``x`` is pushed down: ``x`` goes on top and a carry walks down to ``x``'s old depth only,
keeping the higher-key element at each position, so the work per reference is O(d + 1) however deep the
stack is. Two kernels do this; :mod:`lrc_kernels.cpu.cache` picks one by the number of slots:

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
  falls along the walk, so a block of ``2^log_block`` positions whose keys' lower bound is not below it is
  passed over in one comparison: the cost grows with the blocks that hold a change, not with the depth.

Pair keys ``(a, τ)`` pack into one int64 as ``a·2^32 + τ``, where the kernels
number a reference by its slot position ``t·k + j`` instead of its time: -1 slots leave gaps, but the order of
the references, all that a key comparison sees, is the same. This is exact while a sequence holds fewer than
2^31 slots (``MAX_CACHE_SLOTS_PER_SEQUENCE`` in :mod:`lrc_kernels.cpu`, which the dispatcher checks).

Inputs as :mod:`lrc_kernels.cpu.cache` documents; ``hits`` is the int64 ``[S, E]`` output and ``policy`` one of
the codes below.
"""

import numba
import numpy as np

LFU, BELADY, SCH = 0, 1, 2  # policy codes
_PAIR_SHIFT = 1 << 32
_ABOVE_EVERY_KEY = np.int64(2**63 - 1)


@numba.njit(inline="always")
def _next_uses(topk, s, num_tokens, num_experts, next_use, upcoming):
    """``next_use[n]``: the slot position of the next use of the expert in slot position ``n = t·k + j``, or
    ``T_s·k + 1 + x`` if none (Belady's key; slot positions order references as their times do)."""
    num_slots = topk.shape[2]
    never = num_tokens * num_slots + 1
    for e in range(num_experts):
        upcoming[e] = never + e
    for t in range(num_tokens - 1, -1, -1):
        for j in range(num_slots - 1, -1, -1):
            x = topk[s, t, j]
            if x >= 0:
                n = t * num_slots + j
                next_use[n] = upcoming[x]
                upcoming[x] = n


@numba.njit(inline="always")
def _referenced_key(policy, count, x, n, next_use):
    """The eviction key of expert x just referenced in slot position n (its count updated for LFU and SCH)."""
    if policy == LFU:
        count[x] += 1
        return count[x] * _PAIR_SHIFT + n
    if policy == BELADY:
        return -next_use[n]
    count[x] -= 1  # SCH: the reference leaves the look-ahead window's count
    return count[x] * _PAIR_SHIFT + n


@numba.njit(inline="always")
def _prepare_keys(topk, s, num_tokens, num_experts, policy, seg_len, next_use, upcoming, count):
    """Per-sequence key state before the first token: Belady's next uses, or SCH's counts of tokens 0..L-1."""
    if policy == BELADY:
        _next_uses(topk, s, num_tokens, num_experts, next_use, upcoming)
    elif policy == SCH:
        for t in range(min(seg_len, num_tokens)):
            for j in range(topk.shape[2]):
                x = topk[s, t, j]
                if x >= 0:
                    count[x] += 1


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
    next_use = np.empty(max_refs if policy == BELADY else 0, np.int64)
    upcoming = np.empty(num_experts if policy == BELADY else 0, np.int64)
    for s in range(num_sequences):
        num_tokens = lengths[s]
        pos[:] = -1
        count[:] = 0
        at_depth[:] = 0
        block_low[:] = _ABOVE_EVERY_KEY
        depth_of_new = 0  # |P|
        _prepare_keys(topk, s, num_tokens, num_experts, policy, seg_len, next_use, upcoming, count)

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
                stack_key[0] = _referenced_key(policy, count, x, i * num_slots + j, next_use)
            if policy == SCH and i + seg_len < num_tokens:
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
    next_use = np.empty(max_refs if policy == BELADY else 0, np.int64)
    upcoming = np.empty(num_experts if policy == BELADY else 0, np.int64)
    for s in range(num_sequences):
        num_tokens = lengths[s]
        seen[:] = False
        count[:] = 0
        key[:] = 0
        at_depth[:] = 0
        num_seen = 0
        _prepare_keys(topk, s, num_tokens, num_experts, policy, seg_len, next_use, upcoming, count)
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
                key[x] = _referenced_key(policy, count, x, i * num_slots + j, next_use)
            if not sequential:
                for j in range(num_slots):
                    x = topk[s, i, j]
                    if x >= 0:
                        slot_of[np.uint32(x)] = num_slots
            if policy == SCH and i + seg_len < num_tokens:
                for j in range(num_slots):
                    y = topk[s, i + seg_len, j]
                    if y >= 0:
                        count[np.uint32(y)] += 1
                        key[np.uint32(y)] += _PAIR_SHIFT  # unseen experts' keys are set at their first reference
        total = 0
        for d in range(num_experts):
            total += at_depth[d]
            hits[s, d] = total
