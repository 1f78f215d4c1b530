"""The baseline "paper's method" for SRP, written from its description in issue 16 (not from the paper's code).

One int16 mask ``M [T, S, E]`` (``M[t, s, e] = 1`` if token t of sequence s routes to e) is doubled in place:
after the step with width w, ``M[t]`` holds the counts of the window ``t .. t+2w-1``, so the window lengths
2, 4, 8, ... all come out of the same running mask, one pass for every L. At each wanted L (a power of two)
the histogram of ``M[0 .. T-L]`` is taken, and the bootstrap replicates are ``weights.T @ counts``.

In-place doubling adds row ``t + w`` to row ``t`` for ascending t; it runs in blocks of w rows, so every
source row is read before its own update. Full-length traces only (the paper-scale inputs have no padding);
-1 slots add nothing to the mask.

Scripts import it as ``from paper_method import ...`` (each puts ``bench/`` on ``sys.path``).
"""

from __future__ import annotations

from typing import Dict, Iterator, Sequence, Tuple

import torch

# windows per histogram block: bounds the int64 index temporaries (rows x S x E x 8 bytes)
_BLOCK_ROWS = 16


def onehot_mask(topk: torch.Tensor, num_experts: int) -> torch.Tensor:
    """int16 ``[T, S, E]`` from int ``[S, T, k]`` ids (-1 = no expert)."""
    num_seqs, num_tokens, _ = topk.shape
    mask = torch.zeros((num_tokens, num_seqs, num_experts), dtype=torch.int16)
    ids = topk.transpose(0, 1).to(torch.int64)
    mask.scatter_add_(2, ids.clamp_min(0), (ids >= 0).to(torch.int16))
    return mask


def doubled_window_counts(topk: torch.Tensor, num_experts: int,
                          seg_lens: Sequence[int]) -> Iterator[Tuple[int, torch.Tensor]]:
    """``(L, counts [T-L+1, S, E] int16 view)`` for each L of ``seg_lens`` (powers of two, ascending use)."""
    for seg_len in seg_lens:
        if seg_len & (seg_len - 1):
            raise ValueError(f"seg_lens: the doubling method needs powers of two, received {seg_len}")
    mask = onehot_mask(topk, num_experts)
    num_tokens = mask.shape[0]
    width = 1
    for seg_len in sorted(seg_lens):
        if seg_len > num_tokens:
            yield seg_len, mask[:0]
            continue
        while width < seg_len:
            last_start = num_tokens - 2 * width  # the last window of length 2w starts here
            for start in range(0, last_start + 1, width):
                stop = min(start + width, last_start + 1)
                mask[start:stop] += mask[start + width:stop + width]
            width *= 2
        yield seg_len, mask[:num_tokens - seg_len + 1]


def _histogram(counts: torch.Tensor, cell_index: torch.Tensor, num_cells: int, seg_len: int) -> torch.Tensor:
    """int64 ``[num_cells, L+1]``: ``cell_index [S, E]`` names each (s, e) column's histogram row."""
    hist = torch.zeros(num_cells * (seg_len + 1), dtype=torch.int64)
    base = cell_index * (seg_len + 1)
    for start in range(0, counts.shape[0], _BLOCK_ROWS):
        index = (base + counts[start:start + _BLOCK_ROWS].to(torch.int64)).reshape(-1)
        if hist.numel() <= index.numel():
            hist += torch.bincount(index, minlength=hist.numel())
        else:  # a bincount would zero and add more bins than this block has windows
            hist.index_add_(0, index, torch.ones_like(index))
    return hist.view(num_cells, seg_len + 1)


def layer_histograms(topk: torch.Tensor, num_experts: int, seg_lens: Sequence[int]) -> Dict[int, torch.Tensor]:
    """``{L: int64 [S, L+1]}``: per sequence, (window, expert) pairs with each count, pooled over experts."""
    num_seqs = topk.shape[0]
    cell = torch.arange(num_seqs)[:, None].expand(num_seqs, num_experts)
    return {seg_len: _histogram(counts, cell, num_seqs, seg_len)
            for seg_len, counts in doubled_window_counts(topk, num_experts, seg_lens)}


def expert_histograms(topk: torch.Tensor, num_experts: int, seg_lens: Sequence[int]) -> Dict[int, torch.Tensor]:
    """``{L: int64 [S, E, L+1]}``: the per-expert histograms (what ``srp_counts`` returns)."""
    num_seqs = topk.shape[0]
    cell = torch.arange(num_seqs * num_experts).view(num_seqs, num_experts)
    return {seg_len: _histogram(counts, cell, num_seqs * num_experts, seg_len).view(num_seqs, num_experts, -1)
            for seg_len, counts in doubled_window_counts(topk, num_experts, seg_lens)}


def bootstrap_replicates(per_sequence: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """``counts @ bootstrap weights``: int64 ``[B, L+1]`` from ``[S, L+1]`` and int ``[S, B]`` (exact in float64)."""
    return (weights.to(torch.float64).T @ per_sequence.to(torch.float64)).round().to(torch.int64)
