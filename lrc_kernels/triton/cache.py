"""Triton kernels for cache hit counts at every cache size (SPEC sections 4 and 6).

All four policies are stack algorithms: one priority stack ``P`` of the distinct experts seen so far holds
every cache size at once (``P[0..m-1]`` is the size-m cache). A reference at depth d is a hit for every
m > d, so a program only builds the depth histogram ``at_depth[s, d]``; the launcher's cumulative sum over
d gives ``hits[s, m-1]``.

Each stack slot holds one int64, ``key * E_PAD + id``: keys are distinct, so comparing packed values
compares keys, and moving a slot moves its id with it. The keys (smallest is evicted) are, with n the
reference's time and ``B`` a power of two above every time and next-use value:

    lru     n                       lfu     (f + 1) * B + n       (f: earlier references of x)
    sch     (F - 1) * B + n         belady  2 * B - nu            (nu: next use, N_s + 1 + x if none)

A push-down of reference x at depth d is the prefix-min form of SPEC section 4: with ``excl[q]`` the
smallest value among lanes ``0..q-1`` (one ``tl.associative_scan``), lane 0 takes x, lanes ``1..d-1``
take ``max(P[q], excl[q])``, lane d takes ``excl[d]`` and deeper lanes keep their value.

Two kernels, picked by E:

* ``_cache_depth_register_kernel`` (``E_PAD <= REGISTER_STACK_MAX_LANES``): a program owns ``BLOCK_S``
  sequences and keeps their stacks, depth histograms and SCH look-ahead counts in registers, one lane per
  (sequence, stack slot or expert id). Token-start depths of a whole row come from one comparison of the
  row's ids with the stack lanes.
* ``_cache_depth_chunked_kernel`` (model-level streams, ``E`` up to ``n * E_layer``): one program per
  sequence; the stack, the expert -> slot map and the look-ahead counts live in global scratch memory. A
  push-down only touches lanes ``0..d``, so it runs over ``d // CHUNK + 1`` chunks of lanes, each one
  scan whose exclusive minimum is combined with the minimum carried from the chunks before it.

Belady's next-use times are computed by ``next_use_times`` (``next_use.py``) with torch (one backward pass
over tokens).
Packed values must stay below 2^62, so LFU and SCH need ``2*log2(B) + log2(E_PAD) <= 62`` (about 16M
references per sequence at E_PAD = 8192); :func:`lrc_kernels.triton.cache_key_bits` computes B and
``lrc_kernels.triton.supports`` declines larger inputs, which then run on the CPU backend.

Both kernels are tested under the Triton interpreter and compiled ahead of time for sm_90 in the tests;
they have not yet run on a GPU, and the chunked kernel's ``CHUNK`` and warp counts are untuned.

Inputs are validated by the public API layer (docs/architecture.md, "Backend contract"): ``topk`` is int32,
contiguous, ``[S, T, k]`` with ids in ``[-1, E)`` and no repeated valid id in a row; ``lengths`` is int64
``[S]`` with values in ``[0, T]``, on the same device. Every count is int64 (SPEC section 9).
"""

from typing import Optional, Sequence, Tuple

import torch
import triton
import triton.language as tl

from . import cache_key_bits
from .next_use import next_use_times

REGISTER_STACK_MAX_LANES = 256
_POLICY_CODES = {"lru": 0, "lfu": 1, "sch": 2, "belady": 3}
_LRU = tl.constexpr(0)
_LFU = tl.constexpr(1)
_SCH = tl.constexpr(2)
_BELADY = tl.constexpr(3)
# above every packed value (the launcher checks the key range); marks an empty stack slot
_EMPTY_SLOT = tl.constexpr(1 << 62)
_CHUNK_LANES = 1024


@triton.jit
def _exclusive_min_combine(excl_a, incl_a, excl_b, incl_b):
    # (minimum of all but the last element, minimum of all) of a run of lanes: joining two runs
    return tl.minimum(incl_a, excl_b), tl.minimum(incl_a, incl_b)


@triton.jit
def _pushed_down(stack, excl, lanes, depth, top_value):
    """Prefix-min push-down of the lanes ``lanes`` (broadcastable to ``stack``) for x at ``depth``."""
    deeper = tl.where(lanes == depth, excl, stack)
    moved = tl.where(lanes < depth, tl.maximum(stack, excl), deeper)
    return tl.where(lanes == 0, top_value, moved)


@triton.jit
def _packed_value(policy: tl.constexpr, time, count, next_use, expert, log_b, LOG_E_PAD: tl.constexpr):
    """Stack value of a just-referenced expert; ``count`` is f before (lfu) or F before (sch) this use."""
    if policy == _LRU:
        key = time
    elif policy == _LFU:
        key = ((count + 1) << log_b) + time
    elif policy == _SCH:
        key = ((count - 1) << log_b) + time
    else:
        key = ((next_use * 0 + 2) << log_b) - next_use
    return (key << LOG_E_PAD) + expert


@triton.jit
def _cache_depth_register_kernel(
    topk_ptr,                    # int32 [S, T, k] expert ids, -1 = no expert
    lengths_ptr,                 # int64 [S] valid tokens per sequence
    next_use_ptr,                # int64 [S, T, k] next-use times (belady; any valid pointer otherwise)
    at_depth_ptr,                # int64 [S, E] out: references found at each stack depth
    num_sequences,               # S
    max_tokens,                  # T
    num_slots,                   # k
    num_experts,                 # E (n * E for a model-level stream)
    seg_len,                     # SCH look-ahead L (0 for other policies)
    log_b,                       # log2(B): B exceeds every time and next-use value
    POLICY: tl.constexpr,        # _LRU, _LFU, _SCH or _BELADY
    TOKEN_LOOKUP: tl.constexpr,  # classify a row against the stack at token start (else sequentially)
    FREE_SLOT_HITS: tl.constexpr,  # a first reference counts at depth |P| (+ earlier first refs of its row)
    BLOCK_S: tl.constexpr,       # sequences per program
    K_PAD: tl.constexpr,         # next_power_of_2(k)
    E_PAD: tl.constexpr,         # next_power_of_2(E): stack lanes per sequence
    LOG_E_PAD: tl.constexpr,     # log2(E_PAD): expert-id bits of a packed stack value
):
    sequences = tl.program_id(0) * BLOCK_S + tl.arange(0, BLOCK_S)
    sequence_ok = sequences < num_sequences
    sequences = sequences.to(tl.int64)
    lengths = tl.load(lengths_ptr + sequences, mask=sequence_ok, other=0).to(tl.int32)
    row_ptrs = topk_ptr + sequences * max_tokens * num_slots
    slots = tl.arange(0, K_PAD)
    lanes = tl.arange(0, E_PAD)
    lanes_2d = lanes[None, :]
    lanes_3d = lanes[None, None, :]

    stack = tl.full([BLOCK_S, E_PAD], _EMPTY_SLOT, tl.int64)
    all_empty = tl.full([BLOCK_S, E_PAD], _EMPTY_SLOT, tl.int64)
    at_depth = tl.zeros([BLOCK_S, E_PAD], dtype=tl.int64)
    # SCH: F per expert id (lane = id), the stack slots carry the same F inside their keys
    lookahead = tl.zeros([BLOCK_S, E_PAD], dtype=tl.int64)
    size = tl.zeros([BLOCK_S], dtype=tl.int32)
    time = tl.zeros([BLOCK_S], dtype=tl.int64)

    if POLICY == _SCH:
        for t in range(0, tl.minimum(seg_len, tl.max(lengths, axis=0))):
            row = tl.load(row_ptrs[:, None] + t * num_slots + slots[None, :],
                          mask=((t < lengths) & sequence_ok)[:, None] & (slots < num_slots)[None, :], other=-1)
            lookahead += tl.sum((lanes_3d == row[:, :, None]).to(tl.int32), axis=1).to(tl.int64)

    for t in range(0, tl.max(lengths, axis=0)):
        active = (t < lengths) & sequence_ok
        if TOKEN_LOOKUP:
            row = tl.load(row_ptrs[:, None] + t * num_slots + slots[None, :],
                          mask=active[:, None] & (slots < num_slots)[None, :], other=-1)
            row_in_stack = (lanes_3d < size[:, None, None]) & (
                (stack & (E_PAD - 1)).to(tl.int32)[:, None, :] == row[:, :, None])
            row_slot = tl.min(tl.where(row_in_stack, lanes_3d, E_PAD), axis=2)
            row_found = row_slot < E_PAD
            row_new = ((row >= 0) & ~row_found).to(tl.int32)
            # free-slot rule: a first reference also counts the first references before it in its row
            row_depth = tl.where(row_found, row_slot, size[:, None] + tl.cumsum(row_new, axis=1) - row_new)
            row_counted = (row >= 0) & (row_found | FREE_SLOT_HITS)
            at_depth += tl.sum(((lanes_3d == row_depth[:, :, None]) & row_counted[:, :, None]).to(tl.int32),
                               axis=1).to(tl.int64)

        for j in range(0, num_slots):
            slot_offset = t * num_slots + j
            expert = tl.load(row_ptrs + slot_offset, mask=active, other=-1)
            valid = expert >= 0
            stack_ids = (stack & (E_PAD - 1)).to(tl.int32)
            match = (stack_ids == expert[:, None]) & (lanes_2d < size[:, None])
            found_depth = tl.min(tl.where(match, lanes_2d, E_PAD), axis=1)
            found = found_depth < E_PAD
            depth = tl.where(found, found_depth, size)
            count = tl.zeros([BLOCK_S], dtype=tl.int64)
            next_use = tl.zeros([BLOCK_S], dtype=tl.int64)
            if POLICY == _LFU:
                old_value = tl.sum(tl.where(match, stack, 0), axis=1)
                count = tl.where(found, (old_value >> LOG_E_PAD) >> log_b, 0)
            if POLICY == _SCH:
                is_expert = (lanes_2d == expert[:, None]) & valid[:, None]
                count = tl.sum(tl.where(is_expert, lookahead, 0), axis=1)
                lookahead -= is_expert.to(tl.int64)
            if POLICY == _BELADY:
                next_use = tl.load(next_use_ptr + sequences * max_tokens * num_slots + slot_offset, mask=valid,
                                   other=0)
            top_value = _packed_value(POLICY, time, count, next_use, expert.to(tl.int64), log_b, LOG_E_PAD)
            if not TOKEN_LOOKUP:
                counted = valid & (found | FREE_SLOT_HITS)
                at_depth += ((lanes_2d == depth[:, None]) & counted[:, None]).to(tl.int64)
            excl, _ = tl.associative_scan((all_empty, stack), 1, _exclusive_min_combine)
            pushed = _pushed_down(stack, excl, lanes_2d, depth[:, None], top_value[:, None])
            stack = tl.where(valid[:, None], pushed, stack)
            size += (valid & ~found).to(tl.int32)
            time += valid.to(tl.int64)

        if POLICY == _SCH:
            ahead = t + seg_len
            row = tl.load(row_ptrs[:, None] + ahead * num_slots + slots[None, :],
                          mask=((ahead < lengths) & sequence_ok)[:, None] & (slots < num_slots)[None, :], other=-1)
            lookahead += tl.sum((lanes_3d == row[:, :, None]).to(tl.int32), axis=1).to(tl.int64)
            stack_ids = (stack & (E_PAD - 1)).to(tl.int32)
            in_stack = (lanes_3d < size[:, None, None]) & (stack_ids[:, None, :] == row[:, :, None])
            stack += tl.sum(in_stack.to(tl.int32), axis=1).to(tl.int64) << (log_b + LOG_E_PAD)

    tl.store(at_depth_ptr + sequences[:, None] * num_experts + lanes_2d, at_depth,
             mask=sequence_ok[:, None] & (lanes_2d < num_experts))


@triton.jit
def _cache_depth_chunked_kernel(
    topk_ptr,                    # int32 [S, T, k] expert ids, -1 = no expert
    lengths_ptr,                 # int64 [S] valid tokens per sequence
    next_use_ptr,                # int64 [S, T, k] next-use times (belady; any valid pointer otherwise)
    stack_ptr,                   # int64 [S, E_PAD] scratch: the priority stack, all _EMPTY_SLOT on entry
    slot_of_ptr,                 # int32 [S, E] scratch: expert -> stack slot, all -1 on entry
    lookahead_ptr,               # int64 [S, E] scratch (sch; [1] otherwise): look-ahead uses F, zeros on entry
    at_depth_ptr,                # int64 [S, E] out: references found at each stack depth
    # the scalars and flags below mean what they mean in _cache_depth_register_kernel
    max_tokens,
    num_slots,
    num_experts,
    seg_len,
    log_b,
    POLICY: tl.constexpr,
    TOKEN_LOOKUP: tl.constexpr,
    FREE_SLOT_HITS: tl.constexpr,
    K_PAD: tl.constexpr,
    E_PAD: tl.constexpr,
    LOG_E_PAD: tl.constexpr,
    CHUNK: tl.constexpr,         # stack lanes per scan (power of two, <= E_PAD)
):
    # Scratch (per sequence): stack [E_PAD] int64 all _EMPTY_SLOT, slot_of [E] int32 all -1 (expert -> stack
    # slot, -1 = never seen), lookahead [E] int64 zeros. Threads read slots other threads wrote, so every
    # step that writes scratch ends with a barrier.
    sequence = tl.program_id(0).to(tl.int64)
    length = tl.load(lengths_ptr + sequence).to(tl.int32)
    row_ptr = topk_ptr + sequence * max_tokens * num_slots
    stack_ptr += sequence * E_PAD
    slot_of_ptr += sequence * num_experts
    lookahead_ptr += sequence * num_experts
    at_depth_ptr += sequence * num_experts
    slots = tl.arange(0, K_PAD)
    chunk_lanes = tl.arange(0, CHUNK)
    all_empty = tl.full([CHUNK], _EMPTY_SLOT, tl.int64)
    size = length * 0
    time = sequence * 0

    if POLICY == _SCH:
        for t in range(0, tl.minimum(seg_len, length)):
            row = tl.load(row_ptr + t * num_slots + slots, mask=slots < num_slots, other=-1)
            uses = tl.load(lookahead_ptr + row, mask=row >= 0, other=0)
            tl.store(lookahead_ptr + row, uses + 1, mask=row >= 0)
        tl.debug_barrier()

    for t in range(0, length):
        row = tl.load(row_ptr + t * num_slots + slots, mask=slots < num_slots, other=-1)
        row_valid = row >= 0
        if TOKEN_LOOKUP:
            start_slot = tl.load(slot_of_ptr + row, mask=row_valid, other=-1)
            is_new = (row_valid & (start_slot < 0)).to(tl.int32)
            depths = tl.where(start_slot >= 0, start_slot, size + tl.cumsum(is_new, axis=0) - is_new)
            # int64 0/1 rather than bool: the interpreter turns tl.where over bools into int32 masks
            counted = (row_valid & ((start_slot >= 0) | FREE_SLOT_HITS)).to(tl.int64)
        else:
            depths = slots * 0
            counted = tl.zeros([K_PAD], dtype=tl.int64)

        for j in range(0, num_slots):
            expert = tl.load(row_ptr + t * num_slots + j)
            valid = expert >= 0
            current_slot = tl.load(slot_of_ptr + expert, mask=valid, other=-1)
            found = current_slot >= 0
            depth = tl.where(found, current_slot, size)
            count = time * 0
            next_use = time * 0
            if POLICY == _LFU:
                old_value = tl.load(stack_ptr + current_slot, mask=found, other=0)
                count = tl.where(found, (old_value >> LOG_E_PAD) >> log_b, 0)
            if POLICY == _SCH:
                count = tl.load(lookahead_ptr + expert, mask=valid, other=0)
                tl.store(lookahead_ptr + expert, count - 1, mask=valid)
            if POLICY == _BELADY:
                next_use = tl.load(next_use_ptr + sequence * max_tokens * num_slots + t * num_slots + j,
                                   mask=valid, other=0)
            top_value = _packed_value(POLICY, time, count, next_use, expert.to(tl.int64), log_b, LOG_E_PAD)
            if not TOKEN_LOOKUP:
                depths = tl.where(slots == j, depth, depths)
                counted = tl.where(slots == j, (valid & (found | FREE_SLOT_HITS)).to(tl.int64), counted)

            carried_min = time * 0 + _EMPTY_SLOT
            for chunk in range(0, tl.where(valid, depth // CHUNK + 1, 0)):
                chunk_slots = chunk * CHUNK + chunk_lanes
                stack = tl.load(stack_ptr + chunk_slots)
                excl, _ = tl.associative_scan((all_empty, stack), 0, _exclusive_min_combine)
                excl = tl.minimum(excl, carried_min)
                pushed = _pushed_down(stack, excl, chunk_slots, depth, top_value)
                written = chunk_slots <= depth
                tl.store(stack_ptr + chunk_slots, pushed, mask=written)
                tl.store(slot_of_ptr + (pushed & (E_PAD - 1)).to(tl.int32), chunk_slots, mask=written)
                carried_min = tl.minimum(carried_min, tl.min(stack, axis=0))
            size += (valid & ~found).to(tl.int32)
            time += valid.to(tl.int64)
            tl.debug_barrier()

        # sequential depths of one row may repeat, hence the atomic add
        tl.atomic_add(at_depth_ptr + depths, counted, mask=counted > 0)

        if POLICY == _SCH:
            ahead = t + seg_len
            # the interpreter rejects a mask that mixes a scalar comparison in unbroadcast
            ahead_ok = (slots < num_slots) & (slots * 0 + ahead < length)
            row = tl.load(row_ptr + ahead * num_slots + slots, mask=ahead_ok, other=-1)
            row_valid = row >= 0
            uses = tl.load(lookahead_ptr + row, mask=row_valid, other=0)
            tl.store(lookahead_ptr + row, uses + 1, mask=row_valid)
            ahead_slot = tl.load(slot_of_ptr + row, mask=row_valid, other=-1)
            cached = row_valid & (ahead_slot >= 0)
            value = tl.load(stack_ptr + ahead_slot, mask=cached, other=0)
            tl.store(stack_ptr + ahead_slot, value + ((time * 0 + 1) << (log_b + LOG_E_PAD)), mask=cached)
            tl.debug_barrier()


def _at_depth_register(topk, lengths, next_use, num_experts, policy, seg_len, free_slot_hits, token_lookup,
                       log_b, e_pad, block_s=None):
    num_sequences, max_tokens, num_slots = topk.shape
    k_pad = triton.next_power_of_2(num_slots)
    if block_s is None:
        block_s = max(1, min(128 // e_pad, triton.next_power_of_2(num_sequences)))
    at_depth = torch.zeros((num_sequences, num_experts), dtype=torch.int64, device=topk.device)
    grid = (triton.cdiv(num_sequences, block_s),)
    _cache_depth_register_kernel[grid](
        topk, lengths, next_use, at_depth, num_sequences, max_tokens, num_slots, num_experts, seg_len or 0, log_b,
        POLICY=_POLICY_CODES[policy], TOKEN_LOOKUP=token_lookup, FREE_SLOT_HITS=free_slot_hits,
        BLOCK_S=block_s, K_PAD=k_pad, E_PAD=e_pad, LOG_E_PAD=e_pad.bit_length() - 1,
        num_warps=max(1, min(4, block_s * e_pad // 128)))
    return at_depth


def _at_depth_chunked(topk, lengths, next_use, num_experts, policy, seg_len, free_slot_hits, token_lookup,
                      log_b, e_pad, chunk=None):
    num_sequences, max_tokens, num_slots = topk.shape
    chunk = min(chunk or _CHUNK_LANES, e_pad)
    device = topk.device
    stack = torch.full((num_sequences, e_pad), 1 << 62, dtype=torch.int64, device=device)
    slot_of = torch.full((num_sequences, num_experts), -1, dtype=torch.int32, device=device)
    lookahead = torch.zeros((num_sequences, num_experts) if policy == "sch" else (1,), dtype=torch.int64,
                            device=device)
    at_depth = torch.zeros((num_sequences, num_experts), dtype=torch.int64, device=device)
    _cache_depth_chunked_kernel[(num_sequences,)](
        topk, lengths, next_use, stack, slot_of, lookahead, at_depth, max_tokens, num_slots, num_experts,
        seg_len or 0, log_b, POLICY=_POLICY_CODES[policy], TOKEN_LOOKUP=token_lookup,
        FREE_SLOT_HITS=free_slot_hits, K_PAD=triton.next_power_of_2(num_slots), E_PAD=e_pad,
        LOG_E_PAD=e_pad.bit_length() - 1, CHUNK=chunk, num_warps=max(1, min(8, chunk // 128)))
    return at_depth


def cache_hits(topk: torch.Tensor, lengths: torch.Tensor, num_experts: int, policy: str, seg_len, free_slot_hits: bool,
               lookup: str, *, stack: str = "auto", chunk=None) -> torch.Tensor:
    """Hits of every cache size m = 1..E for each sequence (SPEC section 4).

    Args:
        topk: int32 ``[S, T, k]``, contiguous, ids in ``[-1, E)``, on CUDA (CPU under ``TRITON_INTERPRET=1``).
        lengths: int64 ``[S]``, values in ``[0, T]``, same device.
        num_experts: E (``n * E`` for a model-level stream).
        policy: ``"lru"``, ``"lfu"``, ``"sch"`` or ``"belady"``.
        seg_len: SCH look-ahead L (int) for ``"sch"``, None otherwise.
        free_slot_hits: whether a first reference can hit a free slot.
        lookup: ``"token"`` (classify at token start) or ``"sequential"``.
        stack: ``"auto"`` (registers when ``next_power_of_2(E) <= REGISTER_STACK_MAX_LANES``),
            ``"registers"`` or ``"chunked"`` (global-memory stack, any E).
        chunk: lanes per chunk of the chunked kernel (power of two), default 1024.

    Returns:
        int64 ``[S, E]``: entry ``[s, m - 1]`` is ``hits_s(m)``.

    Example:
        >>> topk = torch.tensor([[[0], [0], [1], [2], [0], [3], [2], [1]]], dtype=torch.int32)
        >>> cache_hits(topk, torch.tensor([8]), 4, "lru", None, True, "token")  # SPEC Example A
        tensor([[2, 3, 6, 8]])
    """
    num_sequences, max_tokens, num_slots = topk.shape
    e_pad = triton.next_power_of_2(num_experts)
    if num_sequences == 0 or max_tokens == 0 or num_slots == 0:
        return torch.zeros((num_sequences, num_experts), dtype=torch.int64, device=topk.device)
    log_b = cache_key_bits(max_tokens * num_slots, num_experts, policy)  # not None: the dispatcher checked it
    next_use = next_use_times(topk, lengths, num_experts) if policy == "belady" else topk
    if stack == "auto":
        stack = "registers" if e_pad <= REGISTER_STACK_MAX_LANES else "chunked"
    args = (topk, lengths, next_use, num_experts, policy, seg_len, free_slot_hits, lookup == "token", log_b, e_pad)
    if stack == "registers":
        at_depth = _at_depth_register(*args)
    else:
        at_depth = _at_depth_chunked(*args, chunk=chunk)
    return at_depth.cumsum(1)


def cache_hits_many(topk: torch.Tensor, lengths: torch.Tensor, num_experts: int,
                    caches: Sequence[Tuple[str, Optional[int]]], free_slot_hits: bool, lookup: str) -> torch.Tensor:
    """:func:`cache_hits` of each ``(policy, seg_len)`` in ``caches``, one launch each.

    Args:
        topk, lengths, num_experts, free_slot_hits, lookup: as in :func:`cache_hits`.
        caches: ``(policy, seg_len)`` pairs, at least one: ``"sch"`` with its look-ahead, the others with None.

    Returns:
        int64 ``[S, C, E]``: entry ``[s, c, m-1]`` is the hits of cache c at size m.

    Example (SPEC §8 A, LRU and SCH(2)):
        >>> topk = torch.tensor([[[0], [0], [1], [2], [0], [3], [2], [1]]], dtype=torch.int32)
        >>> cache_hits_many(topk, torch.tensor([8]), 4, [("lru", None), ("sch", 2)], True, "token")
        tensor([[[2, 3, 6, 8],
                 [2, 5, 6, 8]]])
    """
    return torch.stack([cache_hits(topk, lengths, num_experts, policy, seg_len, free_slot_hits, lookup)
                        for policy, seg_len in caches], dim=1)
