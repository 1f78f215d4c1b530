"""The ``plan`` section of a report: from the per-layer integer hits in results.json to cache decisions.

Works on the results.json structure alone (``layers[i]["cache"][policy]["hits"]`` and ``["references"]``,
``meta["num_tokens"]``), so ``lrc-kernels plan RESULTS.json`` re-plans a saved report without the model.
Every hit rate here is pooled, ``Σ hits / Σ references``, the quantity a split of a budget adds up; it
equals the per-sequence mean of the curves when every sequence has the same number of references. The one
exception is the regret, a gap between the report's own curves (``hit_rate``, per-sequence means).
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import torch

from ._checks import check_int
from .plan import (allocate_cache, best_hits_by_budget, cache_knee, cache_regret, cache_size_for,
                   check_hit_counts, split_hits, uniform_split)
from .plan_bytes import DEFAULT_BANDWIDTH_GBS, GIB, slots_for_gib, split_cost

DEFAULT_TARGETS = (0.5, 0.8, 0.9, 0.95, 0.99)


def _layer_hits(results: dict, key: str) -> tuple[list[torch.Tensor], int]:
    """Per-layer int64 hits of one policy and the total references over layers."""
    hits, references = [], 0
    for entry in results["layers"]:
        curve = entry["cache"][key]
        if "hits" not in curve or "references" not in curve:
            raise ValueError(f"results: layer {entry['layer']} policy {key!r} has no integer 'hits' and "
                             "'references' per cache size (a report of an older lrc-kernels); run the "
                             "analyze or trace command again to plan from it")
        hits.append(torch.tensor(curve["hits"], dtype=torch.int64))
        references += int(curve["references"])
    return check_hit_counts(hits, f"results[{key!r}] hits"), references


def policy_keys(results: dict) -> list[str]:
    """The cache curves of a report, in its order (``sch@<L>`` ..., ``lru``, ``lfu``, ``belady``)."""
    return list(results["layers"][0]["cache"])


def resolve_budget(results: dict, *, total_slots: Optional[int] = None, cache_gib: Optional[float] = None,
                   expert_bytes: Optional[int] = None) -> dict:
    """``{"slots", "gib", "source"}``: a budget in experts, in GiB (needs the expert size), or 2k per layer.

    ``gib`` is the size of the slots in GiB (None without an expert size); a GiB budget rounds down to
    whole experts.
    """
    if total_slots is not None and cache_gib is not None:
        raise ValueError(f"total_slots: give a budget in slots or in GiB, not both (received total_slots="
                         f"{total_slots} and cache_gib={cache_gib})")
    if cache_gib is not None:
        if expert_bytes is None:
            raise ValueError(f"cache_gib: a budget of {cache_gib} GiB needs the size of one expert; give "
                             "expert_bytes (--expert-bytes) or a model config (--config)")
        total_slots, source = slots_for_gib(cache_gib, expert_bytes), f"{cache_gib:g} GiB"
    elif total_slots is None:
        per_layer = 2 * int(results["meta"]["top_k"])
        total_slots, source = per_layer * len(results["layers"]), f"default: 2k = {per_layer} slots per layer"
    else:
        total_slots = check_int(total_slots, "total_slots", minimum=0)
        source = f"{total_slots} slots"
    gib = None if expert_bytes is None else total_slots * expert_bytes / GIB
    return {"slots": total_slots, "gib": gib, "source": source}


def _cost_dict(hits, sizes, references, tokens, expert_bytes, bandwidth_gbs) -> dict:
    cost = split_cost(hits, sizes, references, tokens, expert_bytes=expert_bytes, bandwidth_gbs=bandwidth_gbs)
    return {"sizes": cost.sizes, "slots": cost.slots, "hits": cost.hits, "hit_rate": cost.hit_rate,
            "misses_per_token": cost.misses_per_token, "bytes_per_token": cost.bytes_per_token,
            "tokens_per_s_ceiling": cost.tokens_per_s_ceiling}


def _rates(values) -> torch.Tensor:
    return torch.tensor([math.nan if value is None else value for value in values], dtype=torch.float64)


def _regret(results: dict, keys: Sequence[str]) -> dict:
    """``{reference: {policy: {"model": [...], "layers": [[...], ...]}}}`` from the curves' hit rates."""
    streams = [results["model"]] + list(results["layers"])
    per_stream = [cache_regret({key: _rates(stream["cache"][key]["hit_rate"]) for key in keys})
                  for stream in streams]
    return {reference: {policy: {"model": per_stream[0][reference][policy].tolist(),
                                 "layers": [gaps[reference][policy].tolist() for gaps in per_stream[1:]]}
                        for policy in per_stream[0][reference]}
            for reference in per_stream[0]}


def plan_section(results: dict, *, total_slots: Optional[int] = None, cache_gib: Optional[float] = None,
                 expert_bytes: Optional[int] = None, expert_rule: Optional[str] = None, min_slots: int = 0,
                 bandwidth_gbs: float = DEFAULT_BANDWIDTH_GBS, targets: Sequence[float] = DEFAULT_TARGETS) -> dict:
    """The ``plan`` section of ``results`` (schema in docs/cli.md, meaning in docs/planning.md).

    Per policy: the size of each layer's cache for every target hit rate (-1 = unreachable), the knee per
    layer, and for the budget the optimal split (:func:`lrc_kernels.allocate_cache`) against the uniform
    one with hit rate, misses and bytes per token and the transfer-bound decode-rate ceiling. Plus every
    policy's hit-rate regret to Belady and to SCH at each look-ahead, per cache size.

    Args:
        results: a report (results.json structure) whose curves carry ``hits`` and ``references``.
        total_slots, cache_gib: the budget in experts or in GiB (at most one; default 2k slots per layer).
        expert_bytes, expert_rule: bytes of one expert and how they were found (None = no bytes or times).
        min_slots, bandwidth_gbs, targets: as in :func:`lrc_kernels.allocate_cache`, :func:`split_cost`,
            :func:`lrc_kernels.cache_size_for`.
    """
    budget = resolve_budget(results, total_slots=total_slots, cache_gib=cache_gib, expert_bytes=expert_bytes)
    options = {"budget": budget, "expert_bytes": expert_bytes, "min_slots": min_slots,
               "bandwidth_gbs": bandwidth_gbs, "targets": targets}
    section = {"targets": list(targets), "min_slots": min_slots, "expert_bytes": expert_bytes,
               "expert_size_rule": expert_rule, "bandwidth_gbs": float(bandwidth_gbs), "budget": budget,
               **_streams_plan(results, int(results["meta"]["num_tokens"]), **options)}
    if results.get("phases"):  # the same budget on the prompt tokens alone and on the generated ones alone
        section["phases"] = {name: _streams_plan(part, int(part["num_tokens"]), **options)
                             for name, part in results["phases"].items()}
    return section


def _streams_plan(streams: dict, tokens: int, *, budget, expert_bytes, min_slots, bandwidth_gbs, targets) -> dict:
    """Per-policy plan and regret of one set of streams (``{"layers", "model"}``) over ``tokens`` tokens."""
    keys = policy_keys(streams)
    policies = {}
    for key in keys:
        hits, references = _layer_hits(streams, key)
        layer_references = [int(entry["cache"][key]["references"]) for entry in streams["layers"]]
        rates = [layer.to(torch.float64) / count if count else torch.full_like(layer, math.nan, dtype=torch.float64)
                 for layer, count in zip(hits, layer_references)]
        optimal = allocate_cache(hits, budget["slots"], min_slots=min_slots)
        uniform = uniform_split(hits, budget["slots"], min_slots=min_slots)
        policies[key] = {
            "size_for_target": {f"{target:g}": cache_size_for(rates, target).tolist() for target in targets},
            "knee": cache_knee(hits).tolist(),
            "optimal": _cost_dict(hits, optimal, references, tokens, expert_bytes, bandwidth_gbs),
            "uniform": _cost_dict(hits, uniform, references, tokens, expert_bytes, bandwidth_gbs),
        }
    return {"tokens": tokens,
            "experts_per_layer": [len(entry["cache"][keys[0]]["hits"]) for entry in streams["layers"]],
            "references": [int(entry["cache"][keys[0]]["references"]) for entry in streams["layers"]],
            "policies": policies, "regret": _regret(streams, keys)}


def hit_rate_by_budget(results: dict, key: str, *, min_slots: int = 0) -> dict:
    """Model-level pooled hit rate of one policy against the budget, for the plot.

    Returns:
        ``{"optimal": (budgets, rates), "uniform": (budgets, rates)}``: the optimal split at every budget from
        ``n_layers·min_slots`` to ΣE, the uniform split at the budgets ``n_layers·m`` (m slots per layer).
    """
    hits, references = _layer_hits(results, key)
    best = best_hits_by_budget(hits, min_slots=min_slots)
    floor = len(hits) * min_slots
    references = references or math.nan  # no references: NaN rates, not a division error
    optimal = (list(range(floor, best.numel())), [b / references for b in best[floor:].tolist()])
    widest = max(layer.numel() for layer in hits)
    budgets = [len(hits) * m for m in range(min_slots, widest + 1)]
    uniform = [split_hits(hits, uniform_split(hits, b, min_slots=min_slots)) / references for b in budgets]
    return {"optimal": optimal, "uniform": (budgets, uniform)}
