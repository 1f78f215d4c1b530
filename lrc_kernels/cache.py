"""Cache hit counts for every cache size at once: SCH, LRU, LFU and Belady (SPEC §4, §6).

All four eviction keys are independent of the cache size, so each policy is a stack algorithm: one pass
over a sequence gives the hits of every cache size m = 1..E.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from . import dispatch
from ._checks import check_allocation, check_choice, check_int, check_topk
from ._reduce import int_sum
from .bootstrap import basic_interval, bootstrap_weights, check_bootstrap_options

POLICIES = ("sch", "lru", "lfu", "belady")
LOOKUPS = ("token", "sequential")


@dataclass(frozen=True)
class CacheCurve:
    """Hit-rate curve of one policy over cache sizes m = 1..E.

    Attributes:
        hit_rate: float64 ``[E]``, mean over sequences with references of ``hits_s(m) / N_s`` (NaN if none).
        references: total valid references ``Σ_s N_s``.
        hits: int64 ``[S, E]`` per-sequence hits, entry m-1 for cache size m.
        num_references: int64 ``[S]``, ``N_s``.
        ci_low, ci_high: float64 ``[E]`` basic-bootstrap bounds (``None`` without bootstrap).

    Example (SPEC §8 A, as :func:`cache_hits`):
        >>> curve = cache_curve(torch.tensor([[0], [0], [1], [2], [0], [3], [2], [1]]), 4, "belady")
        >>> curve.hits.tolist(), curve.references, curve.hit_rate.tolist(), curve.ci_low
        ([[2, 5, 7, 8]], 8, [0.25, 0.625, 0.875, 1.0], None)
    """

    hit_rate: torch.Tensor
    references: int
    hits: torch.Tensor
    num_references: torch.Tensor
    ci_low: Optional[torch.Tensor] = None
    ci_high: Optional[torch.Tensor] = None


def check_cache_options(policy, seg_len, free_slot_hits, lookup) -> Optional[int]:
    """Validate the cache options of :func:`cache_hits`; -> the look-ahead (an int for ``"sch"``, else None)."""
    check_choice(policy, "policy", POLICIES)
    check_choice(lookup, "lookup", LOOKUPS)
    if not isinstance(free_slot_hits, bool):
        raise TypeError(f"free_slot_hits: expected a bool, received {type(free_slot_hits).__name__}")
    if policy == "sch":
        if seg_len is None:
            raise ValueError("seg_len: policy 'sch' needs a look-ahead seg_len >= 1, received None")
        return check_int(seg_len, "seg_len", minimum=1)
    if seg_len is not None:
        raise ValueError(f"seg_len: only policy 'sch' takes a look-ahead, received seg_len={seg_len!r} "
                         f"with policy={policy!r}")
    return None


def _hits(topk, num_experts, policy, seg_len, lengths, free_slot_hits, lookup, backend):
    """``(ids, hits int64 [S, E], unbatched)`` of routing validated here, with options checked by the caller."""
    dispatch.check_backend(backend)
    ids, lengths, unbatched = check_topk(topk, num_experts, lengths=lengths)
    check_allocation((ids.shape[0], num_experts), "num_experts", "hits [S, E]")
    hits = dispatch.run("cache_hits", backend, ids, lengths, num_experts, policy, seg_len, free_slot_hits, lookup)
    return ids, hits, unbatched


def cache_hits(topk: torch.Tensor, num_experts: int, policy: str, *, seg_len: Optional[int] = None,
               lengths: Optional[torch.Tensor] = None, free_slot_hits: bool = True, lookup: str = "token",
               backend: str = "auto") -> torch.Tensor:
    """Hits of an expert cache of every size m = 1..E, per sequence, under one policy.

    Args:
        topk: int ``[S, T, k]`` expert ids in processing order (``-1`` = no expert), or ``[T, k]``.
            For a whole model pass ``concat_layers(...)`` and ``n_layers * E`` as ``num_experts``.
        num_experts: E, the number of cacheable experts.
        policy: ``"sch"`` (look-ahead of ``seg_len`` tokens), ``"lru"``, ``"lfu"`` or ``"belady"``.
        seg_len: look-ahead L >= 1, required for ``"sch"`` and rejected for the other policies.
        lengths: optional int ``[S]`` valid prefix lengths.
        free_slot_hits: a first reference hits while the cache has a free slot (SPEC §4); False = cold cache.
        lookup: ``"token"`` (classify a token's references against the cache at token start) or
            ``"sequential"`` (each reference just before its own update).
        backend: ``"auto"``, ``"cpu"`` or ``"triton"``.

    Returns:
        int64 ``[S, E]`` (``[E]`` for 2-D input): entry m-1 = hits of a size-m cache.

    Example (SPEC §8 A):
        >>> cache_hits(torch.tensor([[0], [0], [1], [2], [0], [3], [2], [1]]), 4, "belady").tolist()
        [2, 5, 7, 8]
    """
    seg_len = check_cache_options(policy, seg_len, free_slot_hits, lookup)
    _, hits, unbatched = _hits(topk, num_experts, policy, seg_len, lengths, free_slot_hits, lookup, backend)
    return hits[0] if unbatched else hits


def cache_curve(topk: torch.Tensor, num_experts: int, policy: str, *, seg_len: Optional[int] = None,
                lengths: Optional[torch.Tensor] = None, free_slot_hits: bool = True, lookup: str = "token",
                num_bootstrap: int = 0, confidence: float = 0.95, generator: Optional[torch.Generator] = None,
                weights: Optional[torch.Tensor] = None, backend: str = "auto") -> CacheCurve:
    """Hit-rate curve over cache sizes with an optional basic bootstrap CI over sequences (SPEC §3, §4).

    Every sequence with references weighs equally: ``hit_rate[m-1]`` is the mean of ``hits_s(m) / N_s``.

    Args:
        topk, num_experts, policy, seg_len, lengths, free_slot_hits, lookup, backend: as in :func:`cache_hits`.
        num_bootstrap: B replicates (0 = no CI); needs ``round(B·(1-confidence)/2) >= 1``.
        confidence: CI level in (0, 1).
        generator: torch.Generator for the resampling weights.
        weights: explicit int ``[S, B]`` weight matrix (share it across policies for paired comparisons).
            Every column must draw at least one sequence and total below 2^52 (``ValueError`` naming ``weights``).

    Returns:
        :class:`CacheCurve`.

    Example (SPEC §8 C):
        >>> topk = torch.tensor([[[0, 1], [-1, 2], [-1, -1], [0, 2]], [[3, 2], [3, -1], [2, 3], [1, 0]]])
        >>> cache_curve(topk, 4, "lru", lengths=torch.tensor([4, 3])).hit_rate.tolist()
        [0.4, 0.8, 1.0, 1.0]
    """
    seg_len = check_cache_options(policy, seg_len, free_slot_hits, lookup)
    num_bootstrap, confidence = check_bootstrap_options(num_bootstrap, confidence, weights)
    ids, hits, _ = _hits(topk, num_experts, policy, seg_len, lengths, free_slot_hits, lookup, backend)
    num_references = count_references(ids)
    if num_bootstrap > 0 or weights is not None:
        weights = bootstrap_weights(ids.shape[0], num_bootstrap, confidence, generator, weights)
    return curve_from_hits(hits, num_references, weights, confidence)


def count_references(ids: torch.Tensor) -> torch.Tensor:
    """``N_s``, the valid references of each sequence of validated ids ``[S, T, k]``: int64 ``[S]``.

    Trusted internal of :func:`cache_curve`, :mod:`lrc_kernels.analyze` and the monitor (``check_topk`` has
    written -1 past each sequence's length).
    """
    return int_sum(ids >= 0, (1, 2))


def curve_from_hits(hits: torch.Tensor, num_references: torch.Tensor, weights: Optional[torch.Tensor] = None,
                    confidence: float = 0.95) -> CacheCurve:
    """The :class:`CacheCurve` of per-sequence hits, with the basic bootstrap CI of ``weights``.

    Trusted internal of :func:`cache_curve` and :func:`lrc_kernels.analyze` (inputs are not validated again).

    Args:
        hits: int64 ``[S, E]`` from :func:`cache_hits`.
        num_references: int64 ``[S]``, valid references ``N_s`` of each sequence.
        weights: int64 ``[S, B]`` bootstrap multiplicities, or ``None`` for no CI.
        confidence: CI level.
    """
    num_experts = hits.shape[-1]
    has_refs = num_references > 0
    rates = hits.to(torch.float64) / num_references.clamp_min(1).to(torch.float64)[:, None]
    rates = torch.where(has_refs[:, None], rates, 0.0)
    used = int(has_refs.sum())
    hit_rate = rates.sum(0) / used if used else torch.full((num_experts,), float("nan"), dtype=torch.float64,
                                                          device=hits.device)
    curve = CacheCurve(hit_rate=hit_rate, references=int(num_references.sum()), hits=hits,
                       num_references=num_references)
    if weights is None:
        return curve
    check_allocation((2, weights.shape[1], num_experts), "num_bootstrap", "replicates 2 x [B, E]")
    weights = weights.to(device=hits.device, dtype=torch.float64) * has_refs[:, None]
    replicates = (weights.T @ rates) / weights.sum(0)[:, None]          # [B, E]; 0/0 = NaN marks no draw
    low, high = basic_interval(hit_rate, replicates.T, confidence)
    return CacheCurve(hit_rate, curve.references, hits, num_references, low, high)
