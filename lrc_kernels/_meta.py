"""Merging the metadata of consecutive parts of one workload (traces that are concatenated, statistics that
are added), so that both give the same ``meta`` however the parts are grouped."""

from __future__ import annotations

from typing import Sequence


def merged_meta(metas: Sequence[dict]) -> dict:
    """The meta of consecutive parts of a workload (:meth:`lrc_kernels.RoutingTrace.concat`, ``Statistics +
    Statistics``).

    Equal metas give that meta. Otherwise: the entries every part has with the same value, and ``"parts"``,
    each different meta in order of first appearance. A meta that was merged before stands for its
    ``"parts"`` (each updated with the meta's other entries, e.g. the ``"phase"`` of
    :meth:`lrc_kernels.RoutingTrace.select`), so merging is associative: merging pairs one after another gives the merge
    of all.

    Example:
        >>> a, b = {"model": "m", "source": "a.jsonl"}, {"model": "m", "source": "b.jsonl"}
        >>> merged_meta([merged_meta([a, b]), a]) == merged_meta([a, b, a]) == {"model": "m", "parts": [a, b]}
        True
    """
    distinct: list = []
    for meta in metas:
        parts = meta.get("parts")
        merged_before = isinstance(parts, list) and parts and all(isinstance(part, dict) for part in parts)
        others = {key: value for key, value in meta.items() if key != "parts"}
        for part in [{**part, **others} for part in parts] if merged_before else [meta]:
            if part not in distinct:
                distinct.append(part)
    if len(distinct) <= 1:
        return dict(distinct[0]) if distinct else {}
    first = distinct[0]
    shared = {key: value for key, value in first.items()
              if all(key in part and part[key] == value for part in distinct[1:])}
    return {**shared, "parts": distinct}
