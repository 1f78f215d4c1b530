"""Deliberately naive reference implementations, written straight from the SPEC definitions.

Nothing here is shared with ``lrc_kernels``: every metric is recomputed from its definition with plain
Python loops over lists, so that a bug in the library's clever algorithms (sliding-window crediting, the
stack algorithm, Triton kernels) cannot be mirrored here. Speed is irrelevant; keep inputs small.

Inputs everywhere: ``topk`` is an integer tensor ``[S, T, k]`` of any signed integer dtype (``-1`` = no
expert) and ``lengths`` is an integer tensor ``[S]`` or ``None`` (every sequence uses all T tokens).
"""

from __future__ import annotations

from fractions import Fraction
from itertools import accumulate

import torch


def _sequences(topk, lengths):
    """Per sequence, the list of its rows ``0..T_s-1``; each row lists its valid ids in slot order.

    An all ``-1`` token stays as an empty row: it keeps its time position (SPEC §1).
    """
    assert topk.ndim == 3, "reference functions take [S, T, k]"
    table = topk.tolist()
    num_tokens = topk.shape[1]
    valid_lengths = [num_tokens] * len(table) if lengths is None else [int(v) for v in lengths.tolist()]
    return [
        [[expert for expert in row if expert != -1] for row in rows[:valid_length]]
        for rows, valid_length in zip(table, valid_lengths)
    ]


def _window_counts(rows, num_experts, seg_len):
    """``C[w][e]`` for each complete window w of one sequence (SPEC §2)."""
    num_windows = max(len(rows) - seg_len + 1, 0)
    counts = []
    for start in range(num_windows):
        window = [0] * num_experts
        for row in rows[start:start + seg_len]:
            for expert in row:
                window[expert] += 1
        counts.append(window)
    return counts


def ref_srp_counts(topk, lengths, num_experts, seg_len):
    """SRP histograms ``H[s, e, c] = #{w : C[s, w, e] = c}`` -> int64 ``[S, E, L+1]`` (SPEC §2)."""
    hists = []
    for rows in _sequences(topk, lengths):
        hist = [[0] * (seg_len + 1) for _ in range(num_experts)]
        for window in _window_counts(rows, num_experts, seg_len):
            for expert in range(num_experts):
                hist[expert][window[expert]] += 1
        hists.append(hist)
    return torch.tensor(hists, dtype=torch.int64).reshape(len(hists), num_experts, seg_len + 1)


def ref_segment_coverage(topk, lengths, num_experts, seg_len):
    """Static coverage ``cov[s, m-1] = Σ_w (sum of the m largest C[s, w, ·])`` -> int64 ``[S, E]`` (SPEC §5)."""
    coverage = []
    for rows in _sequences(topk, lengths):
        totals = [0] * num_experts
        for window in _window_counts(rows, num_experts, seg_len):
            largest_first = sorted(window, reverse=True)
            for size, top_sum in enumerate(accumulate(largest_first), start=1):
                totals[size - 1] += top_sum
        coverage.append(totals)
    return torch.tensor(coverage, dtype=torch.int64).reshape(len(coverage), num_experts)


def ref_srp_score(hist):
    """Score ONE pooled histogram ``H_G`` (length L+1) with exact fractions (SPEC §2).

    Returns a dict: ``best_f1``, ``best_m``, ``act_r`` (``Fraction``; ``act_r`` is ``None`` where the
    library gives NaN), ``threshold`` and ``support`` (int), and the per-θ lists ``f1``, ``matches``,
    ``preds`` plus the scalar ``acts``.
    """
    hist = [int(v) for v in (hist.tolist() if isinstance(hist, torch.Tensor) else hist)]
    seg_len = len(hist) - 1
    thresholds = range(seg_len + 1)
    matches = [sum(c * hist[c] for c in range(theta, seg_len + 1)) for theta in thresholds]
    preds = [seg_len * sum(hist[c] for c in range(theta, seg_len + 1)) for theta in thresholds]
    acts = sum(c * hist[c] for c in thresholds)
    f1 = [Fraction(2 * matches[theta], max(preds[theta] + acts, 1)) for theta in thresholds]
    best_f1 = max(f1)
    threshold = f1.index(best_f1)
    support = sum(hist)
    return {
        "best_f1": best_f1,
        "threshold": threshold,
        "best_m": Fraction(preds[threshold], acts) if acts > 0 else Fraction(0),
        "act_r": Fraction(acts, preds[0]) if support > 0 else None,
        "support": support,
        "f1": f1,
        "matches": matches,
        "preds": preds,
        "acts": acts,
    }


def ref_positionwise_hists(topk, lengths, num_experts, seg_len):
    """``H^p[e, c] = #{s : W_s > p, C[s, p, e] = c}`` -> int64 ``[P, E, L+1]``, P = max_s W_s (SPEC §7)."""
    per_sequence = [_window_counts(rows, num_experts, seg_len) for rows in _sequences(topk, lengths)]
    num_positions = max((len(windows) for windows in per_sequence), default=0)
    hists = [[[0] * (seg_len + 1) for _ in range(num_experts)] for _ in range(num_positions)]
    for windows in per_sequence:
        for position, window in enumerate(windows):
            for expert in range(num_experts):
                hists[position][expert][window[expert]] += 1
    return torch.tensor(hists, dtype=torch.int64).reshape(num_positions, num_experts, seg_len + 1)


def _simulate_cache(rows, cache_size, policy, seg_len, free_slot_hits, lookup):
    """Hits of ONE cache of ``cache_size`` experts on one sequence's rows (SPEC §4 protocol)."""
    num_references = sum(len(row) for row in rows)
    uses = {}  # expert -> [(time, token)] of all its references, in time order
    time = 0
    for token, row in enumerate(rows):
        for expert in row:
            uses.setdefault(expert, []).append((time, token))
            time += 1

    def key(other, time, token):
        """Eviction priority of cached ``other`` at reference ``time`` of ``token``; the smallest leaves."""
        if policy == "lru":
            return last_use[other]
        if policy == "lfu":
            return (frequency[other], last_use[other])
        if policy == "belady":
            later = [t for t, _ in uses[other] if t > time]
            return -(later[0] if later else num_references + 1 + other)
        if policy == "sch":
            horizon = min(token + seg_len - 1, len(rows) - 1)
            upcoming = [t for t, use_token in uses[other] if t > time and use_token <= horizon]
            return (len(upcoming), last_use[other])
        raise ValueError(f"unknown policy {policy!r}")

    last_use = {}  # τ(y): time of y's latest reference
    frequency = {}  # f(y): references to y so far, never reset on eviction
    cache = set()
    seen = set()
    hits = 0
    time = 0
    for token, row in enumerate(rows):
        cache_at_token_start = set(cache)
        seen_at_token_start = len(seen)
        first_references_in_row = 0
        for expert in row:
            # Classification (never affects the evolution).
            if lookup == "token":
                if expert in cache_at_token_start:
                    hits += 1
                elif expert not in seen:
                    if free_slot_hits and seen_at_token_start + first_references_in_row < cache_size:
                        hits += 1
                    first_references_in_row += 1
            else:
                if expert in cache:
                    hits += 1
                elif expert not in seen and free_slot_hits and len(seen) < cache_size:
                    hits += 1

            # Update in row order; the other cached experts' keys are evaluated now, before this bookkeeping.
            if expert not in cache:
                if len(cache) == cache_size:
                    cache.remove(min(cache, key=lambda other: key(other, time, token)))
                cache.add(expert)
            last_use[expert] = time
            frequency[expert] = frequency.get(expert, 0) + 1
            seen.add(expert)
            time += 1
    return hits


def ref_cache_hits(topk, lengths, num_experts, policy, seg_len=None, free_slot_hits=True, lookup="token"):
    """``hits[s, m-1]``, one cache simulated per size m = 1..E -> int64 ``[S, E]`` (SPEC §4).

    ``policy`` in {"lru", "lfu", "belady", "sch"}; ``seg_len`` is the SCH look-ahead L (ignored otherwise);
    ``lookup`` in {"token", "sequential"}.
    """
    assert policy != "sch" or seg_len is not None, "sch needs seg_len"
    assert lookup in ("token", "sequential")
    hits = [
        [_simulate_cache(rows, size, policy, seg_len, free_slot_hits, lookup) for size in range(1, num_experts + 1)]
        for rows in _sequences(topk, lengths)
    ]
    return torch.tensor(hits, dtype=torch.int64).reshape(len(hits), num_experts)


def ref_concat_layers(topk_layers, num_experts):
    """Model-level stream (SPEC §6): ``[n, S, T, k]`` -> ``[S, T, n*k]``, layer q's id e becomes q*E + e."""
    num_layers, num_sequences, num_tokens, num_slots = topk_layers.shape
    layers = topk_layers.tolist()
    stream = [
        [
            [q * num_experts + e if e != -1 else -1 for q in range(num_layers) for e in layers[q][s][t]]
            for t in range(num_tokens)
        ]
        for s in range(num_sequences)
    ]
    return torch.tensor(stream, dtype=torch.int64).reshape(num_sequences, num_tokens, num_layers * num_slots)


def ref_basic_interval(estimate, replicates, confidence):
    """Basic (pivotal) bootstrap interval ``(2·est − r_(up), 2·est − r_(lp))`` (SPEC §3).

    Works on any ordered numbers (``Fraction`` included). Raises ``ValueError`` when ``lp < 1``.
    """
    ordered = sorted(replicates)
    num_replicates = len(ordered)
    lower_index = round(num_replicates * ((1 - confidence) / 2))
    if lower_index < 1:
        raise ValueError(f"num_bootstrap: {num_replicates} replicates give lp = 0 at confidence {confidence}")
    upper_index = num_replicates - lower_index
    return 2 * estimate - ordered[upper_index], 2 * estimate - ordered[lower_index]
