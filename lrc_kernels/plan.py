"""Cache planning: from hit counts per cache size to a per-layer split of a slot budget (docs/planning.md).

Each MoE layer has its own expert cache of ``m_i`` slots (a partitioned cache), so a split of a budget is
scored by the sum of the layers' hits at their sizes. The inputs are the exact integer curves of
:func:`lrc_kernels.cache_hits` summed over sequences, which is why the split can be optimal exactly:
dynamic programming over layers needs no concavity, and LRU, LFU and SCH curves are often not concave.
"""

from __future__ import annotations

from typing import Mapping, Sequence, Union

import torch

from ._checks import check_int

HitCurves = Union[torch.Tensor, Sequence[torch.Tensor]]

_INFEASIBLE = -(1 << 62)  # below any sum of hits; adding one hit count to it stays negative


def _as_layer_list(curves, name: str, *, allow_single: bool) -> tuple[list[torch.Tensor], bool]:
    """A ``[n, E]`` tensor or a list of 1-D tensors -> a list of 1-D tensors; also "was it one 1-D curve"."""
    if isinstance(curves, torch.Tensor):
        if curves.ndim == 1 and allow_single:
            return [curves], True
        if curves.ndim != 2:
            single = " or [E] (one layer)" if allow_single else ""
            raise ValueError(f"{name}: expected a 2-D tensor [n_layers, E]{single} or a list of 1-D tensors, "
                             f"received shape {tuple(curves.shape)}")
        layers = list(curves)
    elif isinstance(curves, (list, tuple)):
        layers = list(curves)
        for index, layer in enumerate(layers):
            if not isinstance(layer, torch.Tensor) or layer.ndim != 1:
                received = tuple(layer.shape) if isinstance(layer, torch.Tensor) else type(layer).__name__
                raise TypeError(f"{name}: expected a list of 1-D tensors, received {received} at index {index}")
    else:
        raise TypeError(f"{name}: expected a torch.Tensor or a list of 1-D tensors, "
                        f"received {type(curves).__name__}")
    if not layers:
        raise ValueError(f"{name}: expected at least one layer, received none")
    for index, layer in enumerate(layers):
        if layer.numel() == 0:
            raise ValueError(f"{name}: expected E >= 1 cache sizes per layer, received none at layer {index}")
    return layers, False


def _check_non_decreasing(layer: torch.Tensor, name: str, index: int) -> None:
    drops = layer[1:] < layer[:-1]
    if bool(drops.any()):
        m = int(drops.nonzero()[0, 0]) + 1
        raise ValueError(f"{name}: expected values non-decreasing in the cache size, received "
                         f"{layer[m - 1].item()} at m = {m} then {layer[m].item()} at m = {m + 1} in layer {index} "
                         "(a sign of a wrong input: pass hits or hit rates per cache size m = 1..E)")


def check_hit_counts(hits, name: str = "hits") -> list[torch.Tensor]:
    """Integer hit counts per cache size, one curve per layer -> a list of int64 CPU ``[E_i]`` tensors."""
    layers, _ = _as_layer_list(hits, name, allow_single=False)
    checked = []
    for index, layer in enumerate(layers):
        if layer.dtype.is_floating_point or layer.dtype.is_complex or layer.dtype == torch.bool:
            raise TypeError(f"{name}: expected integer hit counts (e.g. cache_hits(...).sum(0)), received dtype "
                            f"{layer.dtype} in layer {index}")
        layer = layer.detach().to("cpu", torch.int64)
        if bool((layer < 0).any()):
            raise ValueError(f"{name}: expected non-negative hit counts, received {int(layer.min())} "
                             f"in layer {index}")
        _check_non_decreasing(layer, name, index)
        checked.append(layer)
    return checked


def _check_min_slots(layers: list[torch.Tensor], min_slots) -> int:
    min_slots = check_int(min_slots, "min_slots", minimum=0)
    smallest = min(layer.numel() for layer in layers)
    if min_slots > smallest:
        raise ValueError(f"min_slots: expected at most the smallest layer's E = {smallest}, received {min_slots}")
    return min_slots


def _check_budget(layers: list[torch.Tensor], total_slots, min_slots) -> tuple[int, int]:
    min_slots = _check_min_slots(layers, min_slots)
    total_slots = check_int(total_slots, "total_slots", minimum=0)
    if total_slots < len(layers) * min_slots:
        raise ValueError(f"total_slots: expected at least n_layers * min_slots = {len(layers)} * {min_slots} = "
                         f"{len(layers) * min_slots}, received {total_slots}")
    return total_slots, min_slots


def _suffix_tables(layers: list[torch.Tensor], max_slots: int, min_slots: int) -> list[torch.Tensor]:
    """``tables[i][b]``: the most hits layers ``i..n-1`` reach with exactly ``b`` slots (``_INFEASIBLE`` if none)."""
    best = torch.full((max_slots + 1,), _INFEASIBLE, dtype=torch.int64)
    best[0] = 0
    tables = [best]
    for layer in reversed(layers):
        gains = torch.cat([layer.new_zeros(1), layer])  # gains[m] = hits of a size-m cache, m = 0..E
        previous, best = best, torch.full_like(best, _INFEASIBLE)
        for size in range(min_slots, min(layer.numel(), max_slots) + 1):
            shifted = previous[:max_slots + 1 - size] + gains[size]
            best[size:] = torch.maximum(best[size:], shifted)
        best[best < 0] = _INFEASIBLE
        tables.append(best)
    return tables[::-1]


def allocate_cache(hits: HitCurves, total_slots: int, *, min_slots: int = 0) -> torch.Tensor:
    """The per-layer cache sizes that maximise the total hits of a slot budget, exactly.

    Dynamic programming over layers on the integer curves (no concavity needed): O(n_layers · B · E).
    **Tie rule**: among the splits with the most hits, the one using the fewest slots in total, and among
    those the lexicographically smallest ``(m_0, m_1, ...)`` (earlier layers get the smaller sizes). Slots
    that add no hit are left unused, so ``sizes.sum()`` may be below ``total_slots``.

    Args:
        hits: int ``[n_layers, E]`` with entry m-1 = hits of a size-m cache of that layer (for example
            ``torch.stack([cache_hits(topk[i], E, "lru").sum(0) for i in range(n_layers)])``), or a list of
            1-D int tensors when layers have different E. Non-negative and non-decreasing in m.
        total_slots: the budget B >= ``n_layers * min_slots`` (experts held at once over all layers).
        min_slots: the fewest slots of any layer (each layer's ``m_i >= min_slots``, at most its E).

    Returns:
        int64 CPU ``[n_layers]`` sizes ``m_i`` in ``[min_slots, E_i]`` with ``Σ m_i <= total_slots``.

    Example:
        >>> hits = torch.tensor([[5, 6, 6, 6], [1, 2, 8, 9]])
        >>> allocate_cache(hits, 4).tolist()
        [1, 3]
    """
    layers = check_hit_counts(hits)
    total_slots, min_slots = _check_budget(layers, total_slots, min_slots)
    max_slots = min(total_slots, sum(layer.numel() for layer in layers))
    tables = _suffix_tables(layers, max_slots, min_slots)
    remaining = int(torch.argmax(tables[0]))  # argmax returns the first maximum: the fewest slots
    sizes = []
    for index, layer in enumerate(layers):
        gains = torch.cat([layer.new_zeros(1), layer])
        candidates = torch.arange(min_slots, min(layer.numel(), remaining) + 1)
        totals = gains[candidates] + tables[index + 1][remaining - candidates]
        size = int(candidates[int(torch.argmax(totals))])
        sizes.append(size)
        remaining -= size
    return torch.tensor(sizes, dtype=torch.int64)


def best_hits_by_budget(hits: HitCurves, *, min_slots: int = 0) -> torch.Tensor:
    """The most total hits of any split of every budget B = 0..ΣE_i at once (one dynamic program).

    Args:
        hits, min_slots: as in :func:`allocate_cache`.

    Returns:
        int64 ``[ΣE_i + 1]``: entry B = total hits of ``allocate_cache(hits, B, min_slots=min_slots)``, and
        -1 for budgets below ``n_layers * min_slots``. Non-decreasing from there on.

    Example:
        >>> best_hits_by_budget(torch.tensor([[5, 6, 6, 6], [1, 2, 8, 9]])).tolist()
        [0, 5, 6, 8, 13, 14, 15, 15, 15]
    """
    layers = check_hit_counts(hits)
    min_slots = _check_min_slots(layers, min_slots)
    best = torch.cummax(_suffix_tables(layers, sum(layer.numel() for layer in layers), min_slots)[0], 0).values
    return torch.where(best < 0, -1, best)


def uniform_split(hits: HitCurves, total_slots: int, *, min_slots: int = 0) -> torch.Tensor:
    """The same size ``total_slots // n_layers`` for every layer (capped at each layer's E): the usual baseline.

    Args:
        hits, total_slots, min_slots: as in :func:`allocate_cache` (the curves give each layer's E).

    Returns:
        int64 ``[n_layers]``.

    Example:
        >>> uniform_split(torch.tensor([[5, 6, 6, 6], [1, 2, 8, 9]]), 5).tolist()
        [2, 2]
    """
    layers = check_hit_counts(hits)
    total_slots, _ = _check_budget(layers, total_slots, min_slots)
    share = total_slots // len(layers)
    return torch.tensor([min(share, layer.numel()) for layer in layers], dtype=torch.int64)


def split_hits(hits: HitCurves, sizes: torch.Tensor) -> int:
    """Total hits of a split: ``Σ_i hits_i(m_i)`` with ``hits_i(0) = 0``.

    Example:
        >>> split_hits(torch.tensor([[5, 6, 6, 6], [1, 2, 8, 9]]), torch.tensor([1, 3]))
        13
    """
    layers = check_hit_counts(hits)
    if not isinstance(sizes, torch.Tensor) or tuple(sizes.shape) != (len(layers),):
        received = tuple(sizes.shape) if isinstance(sizes, torch.Tensor) else type(sizes).__name__
        raise ValueError(f"sizes: expected an int tensor [n_layers] = [{len(layers)}], received {received}")
    total = 0
    for index, (layer, size) in enumerate(zip(layers, sizes.tolist())):
        if not 0 <= size <= layer.numel():
            raise ValueError(f"sizes: expected layer {index}'s size in [0, {layer.numel()}], received {size}")
        total += int(layer[size - 1]) if size else 0
    return total


def _check_rate_curves(curve, name: str) -> tuple[list[torch.Tensor], bool]:
    layers, single = _as_layer_list(curve, name, allow_single=True)
    checked = []
    for index, layer in enumerate(layers):
        if not layer.dtype.is_floating_point:
            raise TypeError(f"{name}: expected float hit rates in [0, 1] (e.g. cache_curve(...).hit_rate), "
                            f"received dtype {layer.dtype} in layer {index}")
        layer = layer.detach().to("cpu", torch.float64)
        known = layer[~torch.isnan(layer)]
        if 0 < known.numel() < layer.numel():
            raise ValueError(f"{name}: expected a curve either all NaN (no references) or without NaN, "
                             f"received a partly NaN curve in layer {index}")
        if bool(((known < 0) | (known > 1)).any()):
            raise ValueError(f"{name}: expected hit rates in [0, 1], received a value outside in layer {index}")
        _check_non_decreasing(known, name, index)
        checked.append(layer)
    return checked, single


def _check_target(target) -> float:
    if isinstance(target, bool) or not isinstance(target, (int, float)):
        raise TypeError(f"target: expected a float hit rate in (0, 1], received {type(target).__name__} {target!r}")
    if not 0.0 < float(target) <= 1.0:  # NaN fails this comparison too
        raise ValueError(f"target: expected a hit rate in (0, 1], received {target}")
    return float(target)


def cache_size_for(curve, target: float) -> torch.Tensor:
    """The smallest cache size whose hit rate reaches ``target``, per layer; -1 where no size does.

    Args:
        curve: float64 hit rates ``[E]`` (one curve), ``[n_layers, E]``, or a list of 1-D tensors; entry m-1 =
            hit rate of a size-m cache, non-decreasing in m (``cache_curve(...).hit_rate``). An all-NaN curve
            (no references) reaches nothing.
        target: hit rate in (0, 1]; reached when ``curve[m-1] >= target``.

    Returns:
        int64 scalar tensor for a 1-D ``curve``, else ``[n_layers]``: sizes m in 1..E, or -1.

    Example:
        >>> cache_size_for(torch.tensor([[0.5, 0.8, 0.9, 1.0], [0.2, 0.3, 0.6, 0.7]]), 0.8).tolist()
        [2, -1]
    """
    layers, single = _check_rate_curves(curve, "curve")
    target = _check_target(target)
    sizes = []
    for layer in layers:
        reached = (layer >= target).nonzero()
        sizes.append(int(reached[0, 0]) + 1 if reached.numel() else -1)
    result = torch.tensor(sizes, dtype=torch.int64)
    return result[0] if single else result


def cache_knee(curve) -> torch.Tensor:
    """The knee of each hit-rate curve: the size where the curve rises furthest above the straight line.

    With ``h(0) = 0``, the knee is the smallest m in 1..E maximising ``h(m) - h(E) · m / E``, the gap between
    the curve and the chord from the empty to the full cache (the Kneedle rule of Satopää et al., 2011). Up
    to the knee an extra slot earns at least an average slot's share ``h(E) / E`` of the hits (exactly so
    for concave curves); beyond it, less. The rule is scale-free: it is unchanged when hits are scaled
    (counts or rates, more or less data) and it depends on the size only through m / E, so the same curve
    shape has the same relative knee at any E. -1 where the curve never rises above the chord (no locality
    to exploit: uniform routing gives a straight line) or has no hits.

    Args:
        curve: hit rates (float) or hit counts (int), ``[E]``, ``[n_layers, E]`` or a list of 1-D tensors,
            non-decreasing in m.

    Returns:
        int64 scalar tensor for a 1-D ``curve``, else ``[n_layers]``.

    Example:
        >>> cache_knee(torch.tensor([[0.5, 0.8, 0.9, 1.0], [0.25, 0.5, 0.75, 1.0]])).tolist()
        [2, -1]
    """
    layers, single = _as_layer_list(curve, "curve", allow_single=True)
    if layers[0].dtype.is_floating_point:
        layers, single = _check_rate_curves(curve, "curve")
    else:
        layers = check_hit_counts(layers, "curve")
    knees = []
    for layer in layers:
        size = layer.numel()
        # size · gap, exact in int64 for counts; NaN curves give NaN gaps, which never exceed 0
        gaps = size * layer - torch.arange(1, size + 1, dtype=layer.dtype) * layer[-1]
        best = int(torch.argmax(torch.nan_to_num(gaps, nan=0.0)))
        knees.append(best + 1 if bool(gaps[best] > 0) else -1)
    result = torch.tensor(knees, dtype=torch.int64)
    return result[0] if single else result


def cache_regret(curves: Mapping[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    """Every policy's hit-rate gap to Belady and to SCH at each look-ahead, per cache size.

    ``regret[reference][policy] = curves[reference] - curves[policy]``: positive where the policy hits less
    than the reference. A small gap to Belady means the working set, not the policy, limits the hit rate.
    Under token-start lookup (the default) Belady is not an upper bound (SPEC §4), so gaps can be negative.

    Args:
        curves: policy name (``"lru"``, ``"lfu"``, ``"belady"``, ``"sch@<L>"``) -> float hit rates of equal shape.

    Returns:
        ``{reference: {policy: float64 tensor}}`` for reference ``"belady"`` and every ``"sch@<L>"`` present,
        over every other policy.

    Example:
        >>> r = cache_regret({"lru": torch.tensor([0.5, 0.9]), "belady": torch.tensor([0.6, 1.0])})
        >>> [round(v, 6) for v in r["belady"]["lru"].tolist()]
        [0.1, 0.1]
    """
    if not isinstance(curves, Mapping) or not curves:
        raise TypeError(f"curves: expected a non-empty mapping policy -> hit-rate tensor, "
                        f"received {type(curves).__name__}")
    shapes = {name: tuple(rates.shape) for name, rates in curves.items() if isinstance(rates, torch.Tensor)}
    if len(shapes) != len(curves) or len(set(shapes.values())) != 1:
        raise ValueError(f"curves: expected tensors of one shape, received {shapes or 'no tensors'}")
    references = [name for name in curves if name == "belady" or name.startswith("sch@")]
    return {reference: {policy: curves[reference].to(torch.float64) - rates.to(torch.float64)
                        for policy, rates in curves.items() if policy != reference}
            for reference in references}
