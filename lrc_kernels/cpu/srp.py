"""CPU backend for SRP count histograms and static segment coverage (SPEC sections 2 and 5).

Both metrics are functions of the stride-1 window counts ``C[s, w, e]``. Instead of materialising them, each
sequence is swept: the window slides one token at a time, which changes at most ``2k`` counts. Work per
sequence and L is O(T_s·k + E + L) beyond zeroing the output; extra memory is O(E + L). Sequences run in
parallel slices (``parallel.run_sliced``).

* Per expert (``srp_counts``, ``segment_coverage``): a quantity that changes at window ``w`` is credited with
  the number of windows it held its old value (``w - since``).
* Pooled over experts (``srp_pooled_counts``): the histogram comes from the number of (window, expert) pairs
  with count >= c, which adds the index of every window where a count rises to c or falls below it. That is
  one add per count change into an ``[L+1]`` array (no ``since``), 1.5x-1.7x faster than crediting
  (bench/RESULTS.md); the ``[S, E, L+1]`` histograms never exist.

Inputs are validated by the public API layer (docs/architecture.md, "Backend contract"): ``topk`` is int32,
contiguous, ``[S, T, k]`` with ids in ``[-1, E)`` and no repeated valid id in a row; ``lengths`` is int64
``[S]`` with values in ``[0, T]``. Arrays cross into numba through ``Tensor.numpy()`` without copies; the
dtypes are fixed so each kernel compiles exactly one signature.
"""

from typing import Sequence, Tuple

import numba
import numpy as np
import torch

from .parallel import run_sliced


@numba.njit(inline="always")
def _count_first_window(topk, s, seg_len, count):
    """``count[e]`` = rows of tokens ``0..L-1`` of sequence s holding e (``count`` zeroed first)."""
    count[:] = 0
    for t in range(seg_len):
        for j in range(topk.shape[2]):
            e = topk[s, t, j]
            if e >= 0:
                count[np.uint32(e)] += 1


@numba.njit(cache=True, nogil=True)
def _expert_histograms(topk, lengths, histograms, num_experts, seg_len):
    # histograms[s, e * (L+1) + c]: each count change credits the windows the old count held (w - since)
    num_sequences, _, num_slots = topk.shape
    width = seg_len + 1
    count = np.empty(num_experts, np.int64)
    since = np.zeros(num_experts, np.int64)  # window index from which each expert has held its count
    for s in range(num_sequences):
        num_tokens = lengths[s]
        if seg_len > num_tokens:
            continue
        _count_first_window(topk, s, seg_len, count)
        since[:] = 0
        for w in range(1, num_tokens - seg_len + 1):
            for j in range(num_slots):
                signed_e = topk[s, w - 1, j]
                if signed_e >= 0:
                    e = np.uint32(signed_e)  # unsigned indices need no negative-index wraparound
                    histograms[s, np.uint64(e * width + count[e])] += w - since[e]
                    since[e] = w
                    count[e] -= 1
            for j in range(num_slots):
                signed_e = topk[s, w + seg_len - 1, j]
                if signed_e >= 0:
                    e = np.uint32(signed_e)
                    histograms[s, np.uint64(e * width + count[e])] += w - since[e]
                    since[e] = w
                    count[e] += 1
        num_windows = num_tokens - seg_len + 1
        for e in range(num_experts):
            histograms[s, e * width + count[e]] += num_windows - since[e]


@numba.njit(inline="always")
def _add_crossings(topk, s, num_tokens, seg_len, count, falls, rises):
    """Slide the window of length L over sequence s, adding each count crossing's window index to its level."""
    num_slots = topk.shape[2]
    for w in range(1, num_tokens - seg_len + 1):
        for j in range(num_slots):
            signed_e = topk[s, w - 1, j]
            if signed_e >= 0:
                e = np.uint32(signed_e)
                level = count[e]
                falls[np.uint64(level)] += w
                count[e] = level - 1
        for j in range(num_slots):
            signed_e = topk[s, w + seg_len - 1, j]
            if signed_e >= 0:
                e = np.uint32(signed_e)
                level = count[e] + 1
                rises[np.uint64(level)] += w
                count[e] = level


@numba.njit(cache=True, nogil=True)
def _pooled_histograms(topk, lengths, histograms, num_experts, seg_lens, offsets):
    # histograms[s, offsets[i] + c] for window length seg_lens[i] (ascending), pooled over experts, from
    # G[c] = #(window, expert) pairs with count >= c. An expert's count is >= c from a window where it rises to c
    # (window 0 for the first window's counts) until one where it falls below c (or W), so G[c] = Σ falls at c
    # - Σ rises at c, plus W per expert whose count is still >= c in the last window; then H[c] = G[c] - G[c+1].
    # Each crossing is one add to a per-level sum, and pooling makes those sums [L+1] per sequence.
    num_sequences = topk.shape[0]
    longest = seg_lens[seg_lens.shape[0] - 1]
    count = np.empty(num_experts, np.int64)
    falls = np.zeros(longest + 1, np.int64)
    rises = np.zeros(longest + 1, np.int64)
    last_window = np.zeros(longest + 1, np.int64)  # experts by their count in the last window
    for s in range(num_sequences):
        num_tokens = lengths[s]
        for i in range(seg_lens.shape[0]):
            seg_len = seg_lens[i]
            num_windows = num_tokens - seg_len + 1
            if num_windows <= 0:
                break
            _count_first_window(topk, s, seg_len, count)
            falls[:seg_len + 1] = 0
            rises[:seg_len + 1] = 0
            last_window[:seg_len + 1] = 0
            _add_crossings(topk, s, num_tokens, seg_len, count, falls, rises)
            for e in range(num_experts):
                last_window[count[e]] += 1
            row = offsets[i]
            still_at_least = 0  # experts whose last-window count is >= c
            at_least_above = 0  # G[c + 1]
            for c in range(seg_len, 0, -1):
                still_at_least += last_window[c]
                at_least = falls[c] - rises[c] + num_windows * still_at_least
                histograms[s, row + c] = at_least - at_least_above
                at_least_above = at_least
            histograms[s, row] = num_windows * num_experts - at_least_above


@numba.njit(cache=True, nogil=True)
def _coverage(topk, lengths, coverage, num_experts, seg_len):
    # The sum of the m largest counts of a window equals sum_{c=1..L} min(n_c, m), where n_c is the number
    # of experts with count >= c. So cov[m-1] = sum_{j<m} #{(w, c) : n_c(w) > j}, which only needs
    # windows_with[v] = #{(w, c) : n_c(w) = v}. A count moving a -> a+1 raises n_{a+1}, a -> a-1 lowers n_a:
    # one n_c per count change, credited over time like the SRP histograms.
    num_sequences, _, num_slots = topk.shape
    count = np.zeros(num_experts, np.int64)
    experts_at_least = np.zeros(seg_len + 1, np.int64)
    since = np.zeros(seg_len + 1, np.int64)
    windows_with = np.zeros(num_experts + 1, np.int64)
    for s in range(num_sequences):
        num_windows = lengths[s] - seg_len + 1
        if num_windows <= 0:
            continue
        count[:] = 0
        experts_at_least[:] = 0
        since[:] = 0
        windows_with[:] = 0
        for t in range(seg_len):
            for j in range(num_slots):
                e = topk[s, t, j]
                if e >= 0:
                    count[e] += 1
                    experts_at_least[count[e]] += 1
        for w in range(1, num_windows):
            for j in range(num_slots):
                e = topk[s, w - 1, j]
                if e >= 0:
                    c = count[e]
                    windows_with[experts_at_least[c]] += w - since[c]
                    since[c] = w
                    experts_at_least[c] -= 1
                    count[e] = c - 1
            for j in range(num_slots):
                e = topk[s, w + seg_len - 1, j]
                if e >= 0:
                    c = count[e] + 1
                    windows_with[experts_at_least[c]] += w - since[c]
                    since[c] = w
                    experts_at_least[c] += 1
                    count[e] = c
        for c in range(1, seg_len + 1):
            windows_with[experts_at_least[c]] += num_windows - since[c]
        pairs_above = 0  # #{(w, c) : n_c(w) > m-1}, updated as m grows
        for v in range(1, num_experts + 1):
            pairs_above += windows_with[v]
        total = 0
        for m in range(1, num_experts + 1):
            total += pairs_above
            coverage[s, m - 1] = total
            pairs_above -= windows_with[m]


def _work(topk: torch.Tensor) -> int:
    return topk.shape[0] * topk.shape[1] * topk.shape[2]


def srp_counts(topk: torch.Tensor, lengths: torch.Tensor, num_experts: int, seg_len: int) -> torch.Tensor:
    """Per-sequence, per-expert histograms of window counts.

    Args:
        topk: int32 ``[S, T, k]``, contiguous, CPU; ids in ``[-1, num_experts)``, -1 = no expert.
        lengths: int64 ``[S]``, CPU; sequence s uses tokens ``0..lengths[s]-1``.
        num_experts: E >= 1.
        seg_len: window length L >= 1.

    Returns:
        int64 ``[S, E, L+1]``: entry ``[s, e, c]`` is the number of complete windows of sequence s in which
        expert e occurs in exactly c rows. Each ``[s, e]`` row sums to ``max(lengths[s] - L + 1, 0)``.

    Example:
        >>> topk = torch.tensor([[[0], [0], [1], [2], [0], [3], [2], [1]]], dtype=torch.int32)
        >>> srp_counts(topk, torch.tensor([8]), 4, 2)[0].tolist()
        [[3, 3, 1], [4, 3, 0], [3, 4, 0], [5, 2, 0]]
    """
    # np.zeros gets pre-zeroed pages from the OS on demand; for large L most of [S, E, L+1] is never
    # written, and torch.zeros would spend more time clearing it than the sweep takes.
    histograms = np.zeros((topk.shape[0], num_experts * (seg_len + 1)), dtype=np.int64)
    run_sliced(_expert_histograms, (topk.numpy(), lengths.numpy(), histograms), (num_experts, seg_len), _work(topk))
    return torch.from_numpy(histograms).view(topk.shape[0], num_experts, seg_len + 1)


def srp_pooled_counts(topk: torch.Tensor, lengths: torch.Tensor, num_experts: int,
                      seg_lens: Sequence[int]) -> Tuple[torch.Tensor, ...]:
    """Per-sequence histograms of window counts pooled over experts, for several L in one call.

    Args:
        topk, lengths, num_experts: as in :func:`srp_counts`.
        seg_lens: distinct window lengths L >= 1, in any order.

    Returns:
        one int64 ``[S, L+1]`` per entry of ``seg_lens``, in its order, equal to ``srp_counts(..., L).sum(1)``:
        entry ``[s, c]`` is the number of (complete window, expert) pairs of sequence s where the expert
        occurs in exactly c rows. The per-expert histograms never exist.

    Example:
        >>> topk = torch.tensor([[[0], [0], [1], [2], [0], [3], [2], [1]]], dtype=torch.int32)
        >>> [h.tolist() for h in srp_pooled_counts(topk, torch.tensor([8]), 4, (2, 1))]
        [[[15, 12, 1]], [[24, 8]]]
    """
    ascending = np.array(sorted(seg_lens), dtype=np.int64)
    offsets = np.concatenate([[0], np.cumsum(ascending + 1)[:-1]]).astype(np.int64)
    histograms = np.zeros((topk.shape[0], int((ascending + 1).sum())), dtype=np.int64)
    # sliced by slots, not slots x lengths: the monitor's batch (16 K slots, four L) took 0.89-1.03 ms on two
    # threads against 0.53-0.55 ms on one (its update, bench/RESULTS.md)
    run_sliced(_pooled_histograms, (topk.numpy(), lengths.numpy(), histograms), (num_experts, ascending, offsets),
               _work(topk))
    by_length = dict(zip(ascending.tolist(), torch.from_numpy(histograms).split((ascending + 1).tolist(), dim=1)))
    return tuple(by_length[seg_len] for seg_len in seg_lens)


def segment_coverage(topk: torch.Tensor, lengths: torch.Tensor, num_experts: int, seg_len: int) -> torch.Tensor:
    """Per-sequence activations covered by each window's m most-used experts, summed over windows.

    Args:
        topk: int32 ``[S, T, k]``, contiguous, CPU; ids in ``[-1, num_experts)``, -1 = no expert.
        lengths: int64 ``[S]``, CPU; sequence s uses tokens ``0..lengths[s]-1``.
        num_experts: E >= 1.
        seg_len: window length L >= 1.

    Returns:
        int64 ``[S, E]``: entry ``[s, m-1]`` is the sum over complete windows of sequence s of the m largest
        window counts; ``[s, E-1]`` is the number of activations in those windows.

    Example:
        >>> topk = torch.tensor([[[0], [0], [1], [2], [0], [3], [2], [1]]], dtype=torch.int32)
        >>> segment_coverage(topk, torch.tensor([8]), 4, 2).tolist()
        [[8, 14, 14, 14]]
    """
    coverage = torch.zeros((topk.shape[0], num_experts), dtype=torch.int64)
    run_sliced(_coverage, (topk.numpy(), lengths.numpy(), coverage.numpy()), (num_experts, seg_len), _work(topk))
    return coverage
