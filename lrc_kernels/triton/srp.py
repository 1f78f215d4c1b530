"""Triton kernels for SRP count histograms and static segment coverage (SPEC sections 2 and 5).

Both metrics are functions of the stride-1 window counts ``C[s, w, e]``, which are never materialised. A
program owns a block of ``BLOCK_S`` sequences and keeps their current window counts in registers, one lane
per (sequence, expert). It steps through the tokens once, in lockstep over its sequences: at token t row t
enters the window and row t-L leaves it, so the window ending at t is ``w = t - L + 1``. A row touches at
most k lanes; its one-hot over the expert lanes is built by comparing the lanes with the row's k ids, in
chunks of ``BLOCK_K`` slots. Work per token is a fixed number of vector operations, independent of L.

``srp_counts``: a count that changes at window w held its old value for windows ``since..w-1``, so that many
windows are credited to ``H[s, e, old]`` with an int64 atomic add (only changed lanes with a non-zero
credit issue one), and a final pass credits every expert's last count up to ``W_s``. ``srp_pooled_counts``
runs the same kernel with expert stride 0, so every expert of a sequence credits one ``[L+1]`` row. Experts are split
across a second grid axis in chunks of at most ``_MAX_SRP_EXPERT_LANES`` lanes, so any E is supported.

``segment_coverage``: the program keeps, per sequence, ``top[m-1]`` = sum of the m largest counts of the
current window and adds it to ``cov`` once per window. Think of a window's counts sorted in descending
order: ``top`` is their running sum. A count rising a -> a+1 turns the first entry equal to a, at sorted
position ``#{count > a}``, into a+1, so ``top[j] += 1`` for ``j >= #{count > a}``; a count falling
a -> a-1 turns the last entry equal to a, at position ``#{count >= a} - 1``, into a-1. A row's moves are
applied one after another (leaving row first), so each one sees the counts left by the previous ones;
within a chunk of slots the earlier slots with the same old count shift those positions by their rank,
which makes the chunk one vectorised step. The counts of all E experts must share a program, so E is
limited to ``MAX_COVERAGE_EXPERTS`` (declared in :mod:`lrc_kernels.triton`, whose ``supports`` the dispatcher
consults); larger E (long model-level streams) runs on the CPU backend.

Inputs are validated by the public API layer (docs/architecture.md, "Backend contract"): ``topk`` is int32,
contiguous, ``[S, T, k]`` with ids in ``[-1, E)`` and no repeated valid id in a row; ``lengths`` is int64
``[S]`` with values in ``[0, T]``, on the same device. All accumulators are int64 (SPEC section 9).
"""

from typing import Sequence, Tuple

import torch
import triton
import triton.language as tl

_MAX_SRP_EXPERT_LANES = 256
# register budget per program: state lanes (sequences x experts) and one-hot lanes (x slots in a chunk)
_MAX_STATE_LANES = 1024
_MAX_ONE_HOT_LANES = 4096


@triton.jit
def _srp_counts_kernel(
    topk_ptr,               # int32 [S, T, k] expert ids, -1 = no expert
    lengths_ptr,            # int64 [S] valid tokens per sequence
    counts_ptr,             # int64 out: [S, E, L+1] per expert, or [S, L+1] pooled over experts (zeros)
    num_sequences,          # S
    max_tokens,             # T
    num_slots,              # k
    num_experts,            # E
    seg_len,                # window length L
    row_stride,             # elements between sequences of counts: E * (L+1), or L+1 pooled
    expert_stride,          # elements between experts of counts: L+1, or 0 pooled
    BLOCK_S: tl.constexpr,  # sequences per program
    BLOCK_E: tl.constexpr,  # expert lanes per program (second grid axis: chunks of experts)
    BLOCK_K: tl.constexpr,  # slots compared per step of a row's one-hot
):
    sequences = tl.program_id(0) * BLOCK_S + tl.arange(0, BLOCK_S)
    sequence_ok = sequences < num_sequences
    sequences = sequences.to(tl.int64)
    experts = tl.program_id(1) * BLOCK_E + tl.arange(0, BLOCK_E)
    expert_ok = experts < num_experts
    slots = tl.arange(0, BLOCK_K)

    lengths = tl.load(lengths_ptr + sequences, mask=sequence_ok, other=0).to(tl.int32)
    # a sequence without a complete window takes no step and credits nothing
    lengths = tl.where(lengths >= seg_len, lengths, 0)
    num_windows = lengths - seg_len + 1

    # strides (E·(L+1), L+1): one histogram per expert, [S, E, L+1]; (L+1, 0): pooled over experts, [S, L+1]
    hist_rows = counts_ptr + sequences[:, None] * row_stride + experts[None, :] * expert_stride
    count = tl.zeros([BLOCK_S, BLOCK_E], dtype=tl.int32)
    since = tl.zeros([BLOCK_S, BLOCK_E], dtype=tl.int64)
    for t in range(0, tl.max(lengths, axis=0)):
        # t as a vector: under the interpreter the loop index is a Python int
        step = tl.zeros([BLOCK_S], dtype=tl.int32) + t
        entering = step < lengths
        leaving = entering & (step >= seg_len)
        enter_rows = topk_ptr + (sequences * max_tokens + t) * num_slots
        leave_rows = topk_ptr + (sequences * max_tokens + tl.maximum(step - seg_len, 0)) * num_slots
        delta = tl.zeros([BLOCK_S, BLOCK_E], dtype=tl.int32)
        for first_slot in range(0, num_slots, BLOCK_K):
            slot_ok = (first_slot + slots < num_slots)[None, :]
            offsets = first_slot + slots[None, :]
            ids_in = tl.load(enter_rows[:, None] + offsets, mask=entering[:, None] & slot_ok, other=-1)
            ids_out = tl.load(leave_rows[:, None] + offsets, mask=leaving[:, None] & slot_ok, other=-1)
            delta += tl.sum((ids_in[:, :, None] == experts[None, None, :]).to(tl.int32), axis=1)
            delta -= tl.sum((ids_out[:, :, None] == experts[None, None, :]).to(tl.int32), axis=1)
        changed = delta != 0
        # windows before the first one (t < L - 1) hold partial counts and earn no credit
        window = tl.maximum(step - seg_len + 1, 0)[:, None]
        credit = window - since
        tl.atomic_add(hist_rows + count, credit, mask=changed & (credit > 0), sem="relaxed")
        count += delta
        since = tl.where(changed, window, since)
    credit = num_windows[:, None] - since
    final_ok = (credit > 0) & sequence_ok[:, None] & expert_ok[None, :]
    tl.atomic_add(hist_rows + count, credit, mask=final_ok, sem="relaxed")


@triton.jit
def _move_counts(ids, count, top_sums, lanes, slots, DIRECTION: tl.constexpr):
    """Apply one chunk of a row's count moves (+1 entering, -1 leaving) to ``count`` and ``top_sums``.

    ids ``[BLOCK_S, BLOCK_K]`` (-1 = no move); count int32 and top_sums int64 ``[BLOCK_S, BLOCK_E]``;
    lanes ``[BLOCK_E]`` index both experts and sorted positions; slots ``[BLOCK_K]`` order the moves.
    """
    valid = ids >= 0
    one_hot = ids[:, :, None] == lanes[None, None, :]
    old = tl.sum(tl.where(one_hot, count[:, None, :], 0), axis=2)
    # [s, j, i]: earlier valid slot i of the chunk with the same old count as slot j
    same_earlier = (old[:, :, None] == old[:, None, :]) & valid[:, None, :] & \
        (slots[None, None, :] < slots[None, :, None])
    rank = tl.sum(same_earlier.to(tl.int32), axis=2)
    if DIRECTION > 0:
        above = tl.sum((count[:, None, :] > old[:, :, None]).to(tl.int32), axis=2)
        moved_position = above + rank
    else:
        at_least = tl.sum((count[:, None, :] >= old[:, :, None]).to(tl.int32), axis=2)
        moved_position = at_least - rank - 1
    shifted = valid[:, :, None] & (lanes[None, None, :] >= moved_position[:, :, None])
    top_sums += DIRECTION * tl.sum(shifted.to(tl.int32), axis=1).to(tl.int64)
    count += DIRECTION * tl.sum(one_hot.to(tl.int32), axis=1)
    return count, top_sums


@triton.jit
def _segment_coverage_kernel(
    topk_ptr,               # int32 [S, T, k] expert ids, -1 = no expert
    lengths_ptr,            # int64 [S] valid tokens per sequence
    coverage_ptr,           # int64 [S, E] out (zeros): Σ over windows of the m largest counts, entry m-1
    num_sequences,          # S
    max_tokens,             # T
    num_slots,              # k
    num_experts,            # E <= MAX_COVERAGE_EXPERTS
    seg_len,                # window length L
    BLOCK_S: tl.constexpr,  # sequences per program
    BLOCK_E: tl.constexpr,  # next_power_of_2(E): every expert of a sequence in one program
    BLOCK_K: tl.constexpr,  # slots compared per step of a row's one-hot
):
    sequences = tl.program_id(0) * BLOCK_S + tl.arange(0, BLOCK_S)
    sequence_ok = sequences < num_sequences
    sequences = sequences.to(tl.int64)
    lanes = tl.arange(0, BLOCK_E)
    slots = tl.arange(0, BLOCK_K)

    lengths = tl.load(lengths_ptr + sequences, mask=sequence_ok, other=0).to(tl.int32)
    lengths = tl.where(lengths >= seg_len, lengths, 0)

    count = tl.zeros([BLOCK_S, BLOCK_E], dtype=tl.int32)
    top_sums = tl.zeros([BLOCK_S, BLOCK_E], dtype=tl.int64)
    coverage = tl.zeros([BLOCK_S, BLOCK_E], dtype=tl.int64)
    for t in range(0, tl.max(lengths, axis=0)):
        # t as a vector: under the interpreter the loop index is a Python int
        step = tl.zeros([BLOCK_S], dtype=tl.int32) + t
        entering = step < lengths
        leaving = entering & (step >= seg_len)
        enter_rows = topk_ptr + (sequences * max_tokens + t) * num_slots
        leave_rows = topk_ptr + (sequences * max_tokens + tl.maximum(step - seg_len, 0)) * num_slots
        for first_slot in range(0, num_slots, BLOCK_K):
            slot_ok = (first_slot + slots < num_slots)[None, :]
            ids_out = tl.load(leave_rows[:, None] + first_slot + slots[None, :], mask=leaving[:, None] & slot_ok,
                              other=-1)
            count, top_sums = _move_counts(ids_out, count, top_sums, lanes, slots, -1)
        for first_slot in range(0, num_slots, BLOCK_K):
            slot_ok = (first_slot + slots < num_slots)[None, :]
            ids_in = tl.load(enter_rows[:, None] + first_slot + slots[None, :], mask=entering[:, None] & slot_ok,
                             other=-1)
            count, top_sums = _move_counts(ids_in, count, top_sums, lanes, slots, 1)
        window_complete = entering & (step >= seg_len - 1)
        coverage += tl.where(window_complete[:, None], top_sums, 0)
    out = coverage_ptr + sequences[:, None] * num_experts + lanes[None, :]
    tl.store(out, coverage, mask=sequence_ok[:, None] & (lanes < num_experts)[None, :])


def _sequence_block(num_sequences: int, expert_lanes: int, programs_per_block: int, device: torch.device) -> int:
    """Sequences per program: fill the state lanes, but keep about two programs per SM on a GPU."""
    block = min(triton.next_power_of_2(num_sequences), max(1, _MAX_STATE_LANES // expert_lanes))
    if device.type == "cuda":
        min_programs = 2 * torch.cuda.get_device_properties(device).multi_processor_count
        while block > 1 and triton.cdiv(num_sequences, block) * programs_per_block < min_programs:
            block //= 2
    return block


def _slot_block(num_slots: int, state_lanes: int) -> int:
    return max(1, min(triton.next_power_of_2(max(num_slots, 1)), _MAX_ONE_HOT_LANES // state_lanes))


def _num_warps(state_lanes: int) -> int:
    return 4 if state_lanes <= 512 else 8


def _launch_srp_counts(topk: torch.Tensor, lengths: torch.Tensor, num_experts: int, seg_len: int,
                       counts: torch.Tensor, expert_stride: int) -> torch.Tensor:
    num_sequences, max_tokens, num_slots = topk.shape
    if num_sequences == 0 or max_tokens < seg_len:
        return counts
    if num_slots == 0:
        # every window counts 0 for every expert; an empty topk may have no storage to hand to a kernel
        windows = (lengths - seg_len + 1).clamp(min=0)
        counts[..., 0] = windows[:, None] if expert_stride else windows * num_experts
        return counts
    block_e = min(triton.next_power_of_2(num_experts), _MAX_SRP_EXPERT_LANES)
    expert_blocks = triton.cdiv(num_experts, block_e)
    block_s = _sequence_block(num_sequences, block_e, expert_blocks, topk.device)
    block_k = _slot_block(num_slots, block_s * block_e)
    grid = (triton.cdiv(num_sequences, block_s), expert_blocks)
    _srp_counts_kernel[grid](topk, lengths, counts, num_sequences, max_tokens, num_slots, num_experts, seg_len,
                             counts.stride(0), expert_stride, BLOCK_S=block_s, BLOCK_E=block_e, BLOCK_K=block_k,
                             num_warps=_num_warps(block_s * block_e))
    return counts


def srp_counts(topk: torch.Tensor, lengths: torch.Tensor, num_experts: int, seg_len: int) -> torch.Tensor:
    """Per-sequence, per-expert histograms of window counts (SPEC section 2).

    Args:
        topk: int32 ``[S, T, k]``, contiguous, CUDA (or CPU under ``TRITON_INTERPRET=1``); ids in
            ``[-1, num_experts)``, -1 = no expert.
        lengths: int64 ``[S]``, same device; sequence s uses tokens ``0..lengths[s]-1``.
        num_experts: E >= 1, any size.
        seg_len: window length L >= 1.

    Returns:
        int64 ``[S, E, L+1]`` on topk's device: entry ``[s, e, c]`` is the number of complete windows of
        sequence s in which expert e occurs in exactly c rows. Each ``[s, e]`` row sums to
        ``max(lengths[s] - L + 1, 0)``.
    """
    counts = torch.zeros((topk.shape[0], num_experts, seg_len + 1), dtype=torch.int64, device=topk.device)
    return _launch_srp_counts(topk, lengths, num_experts, seg_len, counts, seg_len + 1)


def srp_pooled_counts(topk: torch.Tensor, lengths: torch.Tensor, num_experts: int,
                      seg_lens: Sequence[int]) -> Tuple[torch.Tensor, ...]:
    """Per-sequence histograms of window counts pooled over experts; the per-expert ones never exist.

    Args:
        topk, lengths, num_experts: as in :func:`srp_counts`.
        seg_lens: distinct window lengths L >= 1.

    Returns:
        one int64 ``[S, L+1]`` on topk's device per entry of ``seg_lens``, in its order, equal to
        ``srp_counts(..., L).sum(1)`` (one launch per L).
    """
    return tuple(_launch_srp_counts(topk, lengths, num_experts, seg_len,
                                    torch.zeros((topk.shape[0], seg_len + 1), dtype=torch.int64, device=topk.device),
                                    0)
                 for seg_len in seg_lens)


def segment_coverage(topk: torch.Tensor, lengths: torch.Tensor, num_experts: int, seg_len: int) -> torch.Tensor:
    """Static segment coverage: per sequence, the sum over windows of the m largest counts (SPEC section 5).

    Args:
        topk: int32 ``[S, T, k]``, contiguous, CUDA (or CPU under ``TRITON_INTERPRET=1``); ids in
            ``[-1, num_experts)``, -1 = no expert.
        lengths: int64 ``[S]``, same device; sequence s uses tokens ``0..lengths[s]-1``.
        num_experts: E, 1 <= E <= ``MAX_COVERAGE_EXPERTS`` (4096; the dispatcher checks it).
        seg_len: window length L >= 1.

    Returns:
        int64 ``[S, E]`` on topk's device: entry ``[s, m-1]`` is the sum over the complete windows of sequence
        s of the m largest expert counts; ``[s, E-1]`` is the number of activations in those windows.
    """
    num_sequences, max_tokens, num_slots = topk.shape
    coverage = torch.zeros((num_sequences, num_experts), dtype=torch.int64, device=topk.device)
    if num_sequences == 0 or max_tokens < seg_len or num_slots == 0:
        return coverage
    block_e = triton.next_power_of_2(num_experts)
    block_s = _sequence_block(num_sequences, block_e, 1, topk.device)
    block_k = _slot_block(num_slots, block_s * block_e)
    grid = (triton.cdiv(num_sequences, block_s),)
    _segment_coverage_kernel[grid](topk, lengths, coverage, num_sequences, max_tokens, num_slots, num_experts,
                                   seg_len, BLOCK_S=block_s, BLOCK_E=block_e, BLOCK_K=block_k,
                                   num_warps=_num_warps(block_s * block_e))
    return coverage
