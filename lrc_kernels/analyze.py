"""The whole report of a routing trace: ``analyze(trace) = report(collect_statistics(trace))``.

:func:`collect_statistics` reduces a :class:`~lrc_kernels.trace.RoutingTrace` to exact integer
:class:`Statistics`; :func:`report` turns them into the ``results.json`` structure (per-layer and model-level
SRP with bootstrap CIs, cache hit-rate curves, segment coverage, meta). Statistics are additive: ``a + b`` is
the statistics of a's sequences followed by b's, so a workload split over files or ``torchrun`` ranks is
reported by summing the parts in sequence order. (``lrc_kernels.analyze`` is the function; take this
module's other names with ``from lrc_kernels.analyze import report``.)

Why per-sequence statistics: the basic bootstrap resamples *sequences* with one multinomial weight matrix
``[S, B]`` shared by every layer, L and policy (SPEC §3 "Joint resampling"). Keeping each sequence's
statistics (SRP histograms ``[S, L+1]``, cache hits ``[S, E]``, references ``[S]``) until :func:`report`
draws that matrix once over all S sequences makes the sum of split statistics give exactly, bit for bit, the
report of one pass, CIs included, and the very numbers of :func:`lrc_kernels.srp` and
:func:`lrc_kernels.cache_curve` called with that matrix. The cost is memory per sequence, not per token:
``S·(ΣL + |L| + |policies|·E)`` int64 per stream. (Per-sequence pseudo-random weights would need only ``B``
sums per statistic, but float hit rates summed in a different order differ in the last bits.)
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Callable, Optional, Sequence

import torch

from . import dispatch
from ._checks import check_allocation, check_choice, check_int, check_topk
from ._meta import merged_meta
from .bootstrap import check_bootstrap_options, resample_weights
from .cache import POLICIES, count_references, curve_from_hits
from .routing import concat_layers
from .srp import coverage_counts, coverage_ratio, pooled_histograms, score_sequences
from .trace import PHASES, RoutingTrace

CURVE_FIELDS = ("hit_rate", "ci_low", "ci_high")


@dataclass(frozen=True)
class StreamStatistics:
    """Exact statistics of one reference stream (one layer, or the model-level stream of all layers).

    Attributes:
        srp: ``{L: int64 [S, L+1]}`` window count histograms of each sequence, pooled over experts.
        hits: ``{cache key: int64 [S, E]}`` hits of every cache size; keys ``"sch@L"``, ``"lru"``, ...
        num_references: int64 ``[S]``, valid references of each sequence.
        coverage: ``{L: int64 [E]}`` segment coverage counts summed over sequences.

    Example (:func:`collect_statistics`'s trace, its model-level stream):
        >>> from lrc_kernels import RoutingTrace
        >>> trace = RoutingTrace(torch.tensor([[[[0], [0], [1], [0]]]]), num_experts=2)
        >>> stream = collect_statistics(trace, seg_lens=(2,), policies=("lru",)).model
        >>> stream.srp[2].tolist(), stream.hits["lru"].tolist(), stream.num_references.tolist()
        ([[1, 4, 1]], [[2, 4]], [4])
    """

    srp: dict
    hits: dict
    num_references: torch.Tensor
    coverage: dict

    def __add__(self, other: "StreamStatistics") -> "StreamStatistics":
        return StreamStatistics(
            srp={key: torch.cat([value, other.srp[key]]) for key, value in self.srp.items()},
            hits={key: torch.cat([value, other.hits[key]]) for key, value in self.hits.items()},
            num_references=torch.cat([self.num_references, other.num_references]),
            coverage={key: value + other.coverage[key] for key, value in self.coverage.items()})


@dataclass(frozen=True)
class Statistics:
    """What :func:`report` needs from a trace; ``a + b`` appends b's sequences after a's.

    ``a + b`` is the statistics of ``RoutingTrace.concat([trace_a, trace_b])``: counts add, per-sequence
    statistics are appended, ``max_tokens`` is the larger and ``meta`` is merged as the traces' metas are
    (:func:`lrc_kernels._meta.merged_meta`: the entries both share, and ``meta["parts"]`` listing the
    different metas, e.g. each file's ``source``). Statistics of different models or options do not add:
    ``layer_names``, ``num_experts``, ``top_k``, ``seg_lens``, ``policies``, ``phase`` and the phase parts
    must be equal, else ValueError names the field and both values.

    Attributes:
        layers: one :class:`StreamStatistics` per layer; ``model``: the model-level stream (layers joined with
            :func:`lrc_kernels.concat_layers`, SRP histograms summed over layers).
        phases: for a trace with phase marks analysed as ``"all"``: ``{"prefill": Statistics, "decode": ...}``
            of the same sequences; else empty.
        meta: the trace's meta.
        the other fields describe the trace.

    Example:
        >>> from lrc_kernels import RoutingTrace
        >>> def part(source):
        ...     trace = RoutingTrace(torch.tensor([[[[0], [1]]]]), num_experts=2, meta={"model": "m", "source": source})
        ...     return collect_statistics(trace, seg_lens=(2,), policies=("lru",))
        >>> both = part("a.jsonl") + part("b.jsonl")
        >>> both.num_sequences, both.meta["model"], [meta["source"] for meta in both.meta["parts"]]
        (2, 'm', ['a.jsonl', 'b.jsonl'])
    """

    layer_names: tuple
    num_experts: int
    top_k: int
    seg_lens: tuple
    policies: tuple
    phase: str
    num_sequences: int
    num_tokens: int
    max_tokens: int
    layers: tuple
    model: StreamStatistics
    phases: dict = field(default_factory=dict)
    meta: dict = field(default_factory=dict)

    def __add__(self, other: "Statistics") -> "Statistics":
        if not isinstance(other, Statistics):
            return NotImplemented
        for name in ("layer_names", "num_experts", "top_k", "seg_lens", "policies", "phase"):
            if getattr(self, name) != getattr(other, name):
                raise ValueError(f"Statistics.{name}: expected equal values to add statistics, received "
                                 f"{getattr(self, name)!r} and {getattr(other, name)!r}")
        if set(self.phases) != set(other.phases):
            raise ValueError(f"Statistics.phases: expected the same phases to add statistics, received "
                             f"{sorted(self.phases)} and {sorted(other.phases)}")
        return replace(self, num_sequences=self.num_sequences + other.num_sequences,
                       num_tokens=self.num_tokens + other.num_tokens,
                       max_tokens=max(self.max_tokens, other.max_tokens),
                       layers=tuple(a + b for a, b in zip(self.layers, other.layers)),
                       model=self.model + other.model,
                       phases={key: value + other.phases[key] for key, value in self.phases.items()},
                       meta=merged_meta([self.meta, other.meta]))


def _cache_keys(seg_lens: Sequence[int], policies: Sequence[str]) -> list:
    """(results key, policy, look-ahead) of every curve: SCH once per L, the other policies once."""
    keys = []
    for policy in policies:
        if policy == "sch":
            keys += [(f"sch@{seg_len}", "sch", seg_len) for seg_len in seg_lens]
        else:
            keys.append((policy, policy, None))
    return keys


def _stream_statistics(topk, num_experts, lengths, seg_lens, cache_keys, srp_histograms, backend):
    """One stream's statistics, validated once: the statistics are then backend calls on the trusted ids.

    ``srp_histograms`` is ``{L: [S, L+1]}`` for the model-level stream (the layers' sums); ``None`` for a
    layer, whose histograms are computed here.
    """
    ids, lengths, _ = check_topk(topk, num_experts, lengths=lengths)
    num_seqs = ids.shape[0]
    check_allocation((num_seqs, num_experts), "num_experts", "hits [S, E]")
    if srp_histograms is None:
        check_allocation((num_seqs, sum(seg_len + 1 for seg_len in seg_lens)), "seg_len", "histograms [S, L+1]")
        srp_histograms = pooled_histograms(ids, lengths, num_experts, seg_lens, backend)
    # the defaults of cache_curve: free-slot hits, token lookup
    values = dispatch.run_caches(backend, ids, lengths, num_experts,
                                 [(policy, look_ahead) for _, policy, look_ahead in cache_keys], True, "token")
    hits = {key: value for (key, _, _), value in zip(cache_keys, values)}
    num_references = count_references(ids)
    coverage = {seg_len: coverage_counts(ids, lengths, num_experts, seg_len, backend).sum(0) for seg_len in seg_lens}
    return StreamStatistics(srp=srp_histograms, hits=hits, num_references=num_references, coverage=coverage)


def _check_options(trace, seg_lens, policies, phase, backend):
    if not isinstance(trace, RoutingTrace):
        raise TypeError(f"trace: expected a lrc_kernels.RoutingTrace, received {type(trace).__name__}")
    seg_lens = tuple(check_int(seg_len, "seg_lens", minimum=1) for seg_len in seg_lens)
    policies = tuple(check_choice(policy, "policies", POLICIES) for policy in policies)
    for name, values in (("seg_lens", seg_lens), ("policies", policies)):
        if not values or len(set(values)) != len(values):
            raise ValueError(f"{name}: expected a non-empty sequence without repeats, received {list(values)}")
    check_choice(phase, "phase", PHASES)
    dispatch.check_backend(backend)
    if len(set(trace.experts_per_layer)) != 1:
        raise ValueError(f"trace.num_experts: the model-level stream needs the same number of experts in every "
                         f"layer, received {list(trace.experts_per_layer)}")
    return seg_lens, policies


def collect_statistics(trace, *, seg_lens: Sequence[int] = (4, 16, 64, 256),
                       policies: Sequence[str] = ("sch", "lru", "lfu", "belady"), phase: str = "all",
                       backend: str = "auto", progress: Optional[Callable[[int, int], None]] = None) -> Statistics:
    """Exact additive statistics of a trace (see the module docstring for why they are per sequence).

    Args:
        trace: a :class:`lrc_kernels.RoutingTrace` (uniform E over layers).
        seg_lens: segment lengths L (each >= 1, no repeats) for SRP, SCH look-ahead and coverage.
        policies: cache policies among ``"sch"`` (one curve per L), ``"lru"``, ``"lfu"``, ``"belady"``.
        phase: ``"all"`` (whole rows; with phase marks, the prefill and decode parts too), ``"prefill"`` or
            ``"decode"`` (:meth:`RoutingTrace.select`).
        backend: ``"auto"``, ``"cpu"`` or ``"triton"``.
        progress: optional callable ``(done, total)`` called after each layer and the model-level stream.

    Returns:
        :class:`Statistics`.

    Example:
        >>> from lrc_kernels import RoutingTrace
        >>> trace = RoutingTrace(torch.tensor([[[[0], [0], [1], [0]]]]), num_experts=2)
        >>> collect_statistics(trace, seg_lens=(2,), policies=("lru",)).layers[0].srp[2].tolist()
        [[1, 4, 1]]
    """
    seg_lens, policies = _check_options(trace, seg_lens, policies, phase, backend)
    phases = {}
    if phase == "all" and trace.phase is not None:
        phases = {name: collect_statistics(trace, seg_lens=seg_lens, policies=policies, phase=name,
                                           backend=backend) for name in ("prefill", "decode")}
    elif phase != "all":
        trace = trace.select(phase)
    num_experts, num_layers = trace.experts(0), trace.n_layers
    lengths = trace.lengths.to(trace.topk.device)
    cache_keys = _cache_keys(seg_lens, policies)
    layers = []
    for index in range(num_layers):
        layers.append(_stream_statistics(trace.layer(index), num_experts, lengths, seg_lens, cache_keys, None,
                                         backend))
        if progress is not None:
            progress(index + 1, num_layers + 1)
    # Tokens past a row's length are never read (RoutingTrace): concat_layers writes -1 there.
    stream = concat_layers(trace.topk, num_experts, lengths=lengths)
    model_histograms = {seg_len: sum(layer.srp[seg_len] for layer in layers) for seg_len in seg_lens}
    model = _stream_statistics(stream, num_layers * num_experts, lengths, seg_lens, cache_keys,
                               model_histograms, backend)
    if progress is not None:
        progress(num_layers + 1, num_layers + 1)
    return Statistics(layer_names=tuple(trace.layer_names), num_experts=num_experts, top_k=trace.top_k,
                      seg_lens=seg_lens, policies=policies, phase=phase, num_sequences=trace.num_sequences,
                      num_tokens=trace.num_tokens, max_tokens=trace.max_tokens, layers=tuple(layers), model=model,
                      phases=phases, meta=dict(trace.meta))


def _stream_report(stream: StreamStatistics, weights, confidence: float) -> dict:
    srp_scores = {str(seg_len): score_sequences(per_sequence, weights, confidence).to_dict()
                  for seg_len, per_sequence in stream.srp.items()}
    cache = {}
    for key, hits in stream.hits.items():
        curve = curve_from_hits(hits, stream.num_references, weights, confidence)
        cache[key] = {name: (None if getattr(curve, name) is None else getattr(curve, name).tolist())
                      for name in CURVE_FIELDS}
        # integer hits summed over sequences: what cache planning (lrc_kernels.plan_report) adds up exactly
        cache[key].update(hits=hits.sum(0).tolist(), references=int(stream.num_references.sum()))
    coverage = {str(seg_len): coverage_ratio(counts).tolist() for seg_len, counts in stream.coverage.items()}
    return {"srp": srp_scores, "cache": cache, "coverage": coverage}


def _streams_report(statistics: Statistics, weights, confidence: float) -> dict:
    layers = [{"layer": index, "name": name, **_stream_report(stream, weights, confidence)}
              for index, (name, stream) in enumerate(zip(statistics.layer_names, statistics.layers))]
    return {"layers": layers, "model": _stream_report(statistics.model, weights, confidence)}


def report(statistics: Statistics, *, num_bootstrap: int = 200, confidence: float = 0.95, seed: int = 0) -> dict:
    """The results.json structure of :class:`Statistics`: ``{"layers", "model", ["phases"], "meta"}``.

    One multinomial weight matrix ``resample_weights(S, B, torch.Generator().manual_seed(seed))`` is shared by
    every layer, L, policy and phase, so their differences are paired (SPEC §3). NaN stays float NaN.

    Args:
        statistics: from :func:`collect_statistics` (or a sum of them).
        num_bootstrap: B replicates over sequences (0 = no CI); needs ``round(B·(1-confidence)/2) >= 1``.
        confidence: CI level in (0, 1), checked also when ``num_bootstrap`` is 0.
        seed: seed of the weight matrix.

    Example:
        >>> from lrc_kernels import RoutingTrace
        >>> trace = RoutingTrace(torch.tensor([[[[0], [0], [1], [0]]]]), num_experts=2)
        >>> results = report(collect_statistics(trace, seg_lens=(2,), policies=("lru",)), num_bootstrap=0)
        >>> sorted(results), results["model"]["cache"]["lru"]["hits"], results["model"]["srp"]["2"]["ci_low"]
        (['layers', 'meta', 'model'], [2, 4], None)
    """
    if not isinstance(statistics, Statistics):
        raise TypeError(f"statistics: expected lrc_kernels.analyze.Statistics, received "
                        f"{type(statistics).__name__}")
    num_bootstrap, confidence = check_bootstrap_options(num_bootstrap, confidence, weights=None)
    seed = check_int(seed, "seed")
    weights = None
    if num_bootstrap > 0:
        weights = resample_weights(statistics.num_sequences, num_bootstrap, torch.Generator().manual_seed(seed))
    results = _streams_report(statistics, weights, confidence)
    if statistics.phases:
        results["phases"] = {name: {**_streams_report(part, weights, confidence), "num_tokens": part.num_tokens}
                             for name, part in statistics.phases.items()}
    from . import __version__

    results["meta"] = {
        **statistics.meta,
        "lrc_kernels": __version__,
        "phase": statistics.phase,
        "num_layers": len(statistics.layers),
        "num_sequences": statistics.num_sequences,
        "seq_len": statistics.max_tokens,
        "num_tokens": statistics.num_tokens,
        "references": int(statistics.model.num_references.sum()),
        "num_experts": statistics.num_experts,
        "top_k": statistics.top_k,
        "layer_names": list(statistics.layer_names),
        "seg_lens": list(statistics.seg_lens),
        "policies": list(statistics.policies),
        "num_bootstrap": num_bootstrap,
        "confidence": confidence,
        "seed": seed,
    }
    return results


def analyze(trace, *, seg_lens: Sequence[int] = (4, 16, 64, 256),
            policies: Sequence[str] = ("sch", "lru", "lfu", "belady"), num_bootstrap: int = 200,
            confidence: float = 0.95, seed: int = 0, phase: str = "all", backend: str = "auto",
            progress: Optional[Callable[[int, int], None]] = None) -> dict:
    """The whole report of a trace: ``report(collect_statistics(trace, ...), ...)``.

    Args:
        trace: a :class:`lrc_kernels.RoutingTrace`; every layer has the same E.
        seg_lens, policies, phase, backend, progress: as in :func:`collect_statistics`.
        num_bootstrap, confidence, seed: as in :func:`report`.

    Returns:
        ``{"layers": [{"layer": i, "name": ..., "srp": {"L": SRPScore.to_dict()}, "cache": {"sch@L" | policy:
        {"hit_rate", "ci_low", "ci_high", "hits", "references"}}, "coverage": {"L": [E floats]}}], "model": {...},
        "meta": {...}}`` (``hits``: E ints summed over sequences) plus ``"phases": {"prefill": {"layers", "model",
        "num_tokens"}, "decode": {...}}`` for a trace with phase marks
        analysed with ``phase="all"``. Lists are plain Python floats; absent CIs are ``None``.

    Example:
        >>> from lrc_kernels import RoutingTrace
        >>> trace = RoutingTrace(torch.tensor([[[[0], [0], [1], [0]]]]), num_experts=2)
        >>> analyze(trace, seg_lens=(2,), num_bootstrap=0)["model"]["cache"]["lru"]["hit_rate"]
        [0.5, 1.0]
    """
    check_bootstrap_options(num_bootstrap, confidence, weights=None)  # before the metric work, not after it
    statistics = collect_statistics(trace, seg_lens=seg_lens, policies=policies, phase=phase, backend=backend,
                                    progress=progress)
    return report(statistics, num_bootstrap=num_bootstrap, confidence=confidence, seed=seed)


__all__ = ["Statistics", "StreamStatistics", "analyze", "collect_statistics", "report"]
