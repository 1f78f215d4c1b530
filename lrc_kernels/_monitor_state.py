"""The state table of :class:`lrc_kernels.monitor.RoutingMonitor`: every accumulated integer, declared once.

Every monitored quantity is an additive per-sequence statistic (SPEC §3 "Streaming"): a batch adds its sum
over sequences and, under bootstrap, B Poisson-weighted sums. As torchmetrics' ``add_state(name, default,
dist_reduce_fx="sum")`` declares a metric's state, :func:`declare_statistics` declares the statistics and
:func:`state_table` lists every state tensor they need — key, shape and reduction — which ``reset``,
``update``, ``sync``, ``state_dict``/``load_state_dict`` and ``compute`` walk instead of building keys.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

import torch

from . import dispatch
from ._checks import check_topk
from ._monitor_inputs import CacheSpec
from ._reduce import int_sum
from .routing import join_layers
from .cache import count_references
from .srp import pooled_histograms, weighted_sum

KINDS = ("references", "srp", "hits")


@dataclass(frozen=True)
class Statistic:
    """One additive per-sequence statistic.

    Attributes:
        key: its state's name: ``"references"``, ``"srp@L"``, ``"hits/<cache>"`` or ``"model_hits/<cache>"``.
        kind: ``"references"`` (valid references N), ``"srp"`` (window count histogram, pooled over experts)
            or ``"hits"`` (hits of every cache size).
        width: entries per sequence (L+1 or the cache slots), None for the one count of ``"references"``.
        model_level: one row for the model-level stream instead of one row per layer.
        seg_len: L of an SRP histogram.
        cache: the cache of hit counts.
    """

    key: str
    kind: str
    width: Optional[int]
    model_level: bool = False
    seg_len: Optional[int] = None
    cache: Optional[CacheSpec] = None

    @property
    def boot_key(self) -> str:
        """The state of its B bootstrap replicates."""
        return f"{self.key}/boot"


@dataclass(frozen=True)
class State:
    """One int64 state tensor: its key, its shape and how ``sync`` combines the ranks' copies."""

    key: str
    shape: Tuple[int, ...]
    reduction: str = "sum"


_REDUCE_OPS = {"sum": "SUM"}  # State.reduction -> torch.distributed.ReduceOp


def declare_statistics(seg_lens: Sequence[int], caches: Sequence[CacheSpec], num_experts: List[int],
                       model_level: bool) -> Tuple[Statistic, ...]:
    """The monitor's statistics for its layout (``num_experts``: E per layer, in monitor order)."""
    statistics = [Statistic("references", "references", None)]
    statistics += [Statistic(f"srp@{L}", "srp", L + 1, seg_len=L) for L in seg_lens]
    statistics += [Statistic(f"hits/{cache.name}", "hits", max(num_experts), cache=cache) for cache in caches]
    if model_level:
        slots = len(num_experts) * num_experts[0]
        statistics += [Statistic(f"model_hits/{cache.name}", "hits", slots, model_level=True, cache=cache)
                       for cache in caches]
    return tuple(statistics)


def state_table(statistics: Sequence[Statistic], num_layers: int, num_bootstrap: int) -> Tuple[State, ...]:
    """Every state: ``[n, X]`` per layer (``[n]`` for references) or ``[X]`` at model level, and the
    replicates ``[n, B, X]`` / ``[B, X]`` when ``num_bootstrap > 0``."""
    table = []
    for statistic in statistics:
        rows = () if statistic.model_level else (num_layers,)
        entries = () if statistic.width is None else (statistic.width,)
        table.append(State(statistic.key, rows + entries))
        if num_bootstrap:
            table.append(State(statistic.boot_key, rows + (num_bootstrap,) + entries))
    return tuple(table)


def zero_state(table: Sequence[State], device) -> Dict[str, torch.Tensor]:
    return {state.key: torch.zeros(state.shape, dtype=torch.int64, device=device) for state in table}


def check_state(table: Sequence[State], tensors: Mapping[str, torch.Tensor]) -> None:
    """Loaded tensors must be exactly the table's states, with the table's shapes."""
    shapes = {state.key: state.shape for state in table}
    for key, tensor in tensors.items():
        if shapes.get(key) != tuple(tensor.shape):
            raise ValueError(f"state_dict: unexpected state {key!r} of shape {tuple(tensor.shape)}")
    missing = [key for key in shapes if key not in tensors]
    if missing:
        raise ValueError(f"state_dict: missing states {missing}")


def batch_deltas(statistics: Sequence[Statistic], per_sequence: Mapping[str, torch.Tensor],
                 weights: Optional[torch.Tensor]) -> Dict[str, torch.Tensor]:
    """State increments of one batch.

    Args:
        per_sequence: ``key -> int64 [n, S, X]`` per layer (``X = 1`` for references) or ``[S, X]`` at model
            level, one entry per statistic.
        weights: int64 ``[S, B]`` Poisson weights, or None without bootstrap.
    """
    deltas = {}
    for statistic in statistics:
        value = per_sequence[statistic.key]
        if statistic.model_level:
            deltas[statistic.key] = int_sum(value, 0)
            if weights is not None:
                deltas[statistic.boot_key] = weighted_sum(weights, value)                 # [B, X]
            continue
        squeeze = statistic.width is None
        total = int_sum(value, 1)
        deltas[statistic.key] = total.squeeze(-1) if squeeze else total
        if weights is not None:
            boot = weighted_sum(weights, value.movedim(1, 0)).movedim(0, 1)                # [n, B, X]
            deltas[statistic.boot_key] = boot.squeeze(-1) if squeeze else boot
    return deltas


def all_reduce(table: Sequence[State], tensors: Dict[str, torch.Tensor], process_group) -> Dict[str, torch.Tensor]:
    """The states combined over the ranks of ``process_group``: one ``all_reduce`` per reduction."""
    reduced = {}
    for reduction, op_name in _REDUCE_OPS.items():
        keys = [state.key for state in table if state.reduction == reduction]
        if not keys:
            continue
        flat = torch.cat([tensors[key].reshape(-1) for key in keys])
        torch.distributed.all_reduce(flat, op=getattr(torch.distributed.ReduceOp, op_name), group=process_group)
        for key, piece in zip(keys, flat.split([tensors[key].numel() for key in keys])):
            reduced[key] = piece.view_as(tensors[key])
    return reduced


def per_sequence_statistics(statistics: Sequence[Statistic], names: List[str], layers: List[torch.Tensor],
                            num_experts: List[int], lengths: Optional[torch.Tensor], backend: str,
                            free_slot_hits: bool, lookup: str) -> Dict[str, torch.Tensor]:
    """Every statistic of one batch per sequence: ``key -> int64 [n, S, X]`` per layer, ``[S, X]`` at model
    level (computed in full before anything is added to the state, so an error adds nothing).

    Args:
        names, layers: the batch's layers in monitor order, ``[B, T, k]`` each with equal B and T.
        num_experts: E per layer; lengths: optional int ``[B]``; backend, free_slot_hits, lookup: as in
            :func:`lrc_kernels.cache_hits`.
    """
    num_layers, num_seqs, num_tokens = len(layers), layers[0].shape[0], layers[0].shape[1]
    device = layers[0].device
    layer_statistics = [s for s in statistics if not s.model_level]

    def hits(caches: List[Statistic], ids: torch.Tensor, ids_lengths: torch.Tensor,
             slots: int) -> Dict[str, torch.Tensor]:
        """The hits of the cache statistics ``caches`` on one stream, by key (one call per backend)."""
        specs = [(statistic.cache.policy, statistic.cache.seg_len) for statistic in caches]
        values = dispatch.run_caches(backend, ids, ids_lengths, slots, specs, free_slot_hits, lookup)
        return {statistic.key: value for statistic, value in zip(caches, values)}

    # Layers with equal (E, k) run as one stacked batch of n·S sequences, validated once; then the SRP
    # histograms and the caches' hits are backend calls on the trusted ids instead of public calls that would
    # validate again.
    groups: Dict[tuple, List[int]] = {}
    for q, topk in enumerate(layers):
        groups.setdefault((num_experts[q], topk.shape[-1]), []).append(q)
    # With one group (equal E and k everywhere, the usual case) its results are the per-layer statistics as
    # they come; several groups are copied into zero-padded [n, S, width] tensors.
    per_seq: Dict[str, torch.Tensor] = {}
    seg_lens = tuple(statistic.seg_len for statistic in layer_statistics if statistic.kind == "srp")
    if len(groups) > 1:
        per_seq = {s.key: torch.zeros(num_layers, num_seqs, s.width or 1, dtype=torch.int64, device=device)
                   for s in layer_statistics}
    for (experts, _), members in groups.items():
        stacked = torch.cat([layers[q] for q in members]) if len(members) > 1 else layers[members[0]]
        label = f"routing[{names[members[0]]!r}]" if len(members) == 1 else \
            f"routing (layers {[names[q] for q in members]} stacked layer-major into [n*B, T, k])"
        try:
            ids, group_lengths, _ = check_topk(stacked, experts, name=label,
                                               lengths=None if lengths is None else lengths.repeat(len(members)))
        except ValueError:
            # Name the offending layer rather than a row of the stacked batch.
            for q in members:
                check_topk(layers[q], experts, name=f"routing[{names[q]!r}]", lengths=lengths)
            raise
        view = (len(members), num_seqs, -1)
        index = torch.tensor(members, device=device) if len(groups) > 1 else None
        srp_histograms = pooled_histograms(ids, group_lengths, experts, seg_lens, backend) if seg_lens else {}
        layer_hits = hits([s for s in layer_statistics if s.kind == "hits"], ids, group_lengths, experts)
        for statistic in layer_statistics:
            if statistic.kind == "srp":
                value = srp_histograms[statistic.seg_len]
            elif statistic.kind == "hits":
                value = layer_hits[statistic.key]
            else:
                value = count_references(ids)
            value = value.view(view)
            if index is None:
                per_seq[statistic.key] = value
            else:
                per_seq[statistic.key][..., :value.shape[-1]].index_copy_(0, index, value)
        stacked_ids, stacked_lengths = ids, group_lengths

    model_statistics = [s for s in statistics if s.model_level]
    if model_statistics:
        # Model level implies one group holding every layer in order (equal E and k), validated already.
        stream = join_layers(stacked_ids.view(num_layers, num_seqs, num_tokens, -1), num_experts[0])
        per_seq.update(hits(model_statistics, stream, stacked_lengths[:num_seqs], num_layers * num_experts[0]))
    return per_seq
