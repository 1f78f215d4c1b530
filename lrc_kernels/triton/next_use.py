"""Belady's next-use times for the Triton cache kernels, computed with torch (one backward pass over tokens).

Kept apart from ``cache.py``: it holds no Triton code, only the per-slot input the Belady kernel reads.
"""

import torch


def next_use_times(topk: torch.Tensor, lengths: torch.Tensor, num_experts: int) -> torch.Tensor:
    """Belady's next-use time of every slot.

    Args:
        topk: int32 ``[S, T, k]``, ids in ``[-1, E)``.
        lengths: int64 ``[S]``.
        num_experts: E.

    Returns:
        int64 ``[S, T, k]``: for a reference x at time n (references numbered token-major within the first
        ``lengths[s]`` tokens), the time of x's next reference, or ``N_s + 1 + x`` if there is none.
        Entries of -1 slots and of tokens past the length are unspecified.

    Example (SPEC Example A: the last references of experts 0, 3, 2, 1 get N + 1 + x = 9, 12, 11, 10):
        >>> topk = torch.tensor([[[0], [0], [1], [2], [0], [3], [2], [1]]], dtype=torch.int32)
        >>> next_use_times(topk, torch.tensor([8]), 4)[0, :, 0].tolist()
        [1, 4, 7, 6, 9, 12, 11, 10]
    """
    num_sequences, max_tokens = topk.shape[:2]
    valid = (topk >= 0) & (torch.arange(max_tokens, device=topk.device)[None, :, None] < lengths[:, None, None])
    times = valid.reshape(num_sequences, -1).cumsum(1).reshape(valid.shape) - 1
    # column E collects the -1 slots
    experts = torch.where(valid, topk.long(), num_experts)
    later = valid.sum((1, 2))[:, None] + 1 + torch.arange(num_experts + 1, device=topk.device)[None, :]
    next_use = torch.empty(topk.shape, dtype=torch.int64, device=topk.device)
    for t in range(max_tokens - 1, -1, -1):
        next_use[:, t] = later.gather(1, experts[:, t])
        later.scatter_(1, experts[:, t], times[:, t])
    return next_use
