"""The report shared by ``analyze``, ``trace`` and ``demo``: metrics of recorded routing, results.json and CSV.

Every layer, every segment length L and every cache policy is scored against one bootstrap weight matrix,
so a sequence has the same multiplicity everywhere and differences between layers, L and policies are
paired (SPEC §3, "Joint resampling").
"""

from __future__ import annotations

import csv
import json
import math
import pathlib
from dataclasses import dataclass, field
from typing import Optional, Sequence

import torch

import lrc_kernels
from lrc_kernels.bootstrap import resample_weights

SRP_FIELDS = ("best_f1", "threshold", "best_m", "act_r", "support", "ci_low", "ci_high")
CURVE_FIELDS = ("hit_rate", "ci_low", "ci_high")
DYNAMIC_POLICIES = ("lru", "lfu", "belady")


class UsageError(ValueError):
    """A problem with the user's input (file, option, data); the command line prints it as one line."""


@dataclass
class Routing:
    """Recorded routing of one stack of MoE layers.

    Attributes:
        topk: int64 ``[n_layers, S, T, k]`` expert ids in processing order, ``-1`` = no expert.
        num_experts: E, routed experts of every layer.
        layers: the layer number of each entry of the first axis (as the model or the trace numbers them).
        lengths: int64 ``[S]`` valid tokens of each sequence, or ``None`` when every sequence has T tokens.
        names: a display name per layer (router module path or ``"layer <i>"``).
    """

    topk: torch.Tensor
    num_experts: int
    layers: list
    lengths: Optional[torch.Tensor] = None
    names: list = field(default_factory=list)


def _score_dict(score) -> dict:
    values = {}
    for name in SRP_FIELDS:
        value = getattr(score, name)
        values[name] = None if value is None else value.item()
    return values


def _curve_dict(curve) -> dict:
    return {name: (None if getattr(curve, name) is None else getattr(curve, name).tolist()) for name in CURVE_FIELDS}


def _stream_report(topk: torch.Tensor, num_experts: int, seg_lens: Sequence[int], lengths, weights,
                   confidence: float, srp_topk=None, srp_num_experts=None, srp_level: str = "layer") -> dict:
    """SRP, cache curves and coverage of one reference stream ``topk [S, T, k]`` with ``num_experts`` slots.

    ``srp_topk``/``srp_num_experts``/``srp_level`` let the model level pool the per-layer histograms
    (``[n, S, T, k]`` with E experts each, level ``"model"``) while its cache curves and coverage run on the
    concatenated stream of ``n·E`` slots.
    """
    srp_input = topk if srp_topk is None else srp_topk
    srp_experts = num_experts if srp_num_experts is None else srp_num_experts
    bootstrap = {"weights": weights, "confidence": confidence} if weights is not None else {}
    srp_scores, cache, coverage = {}, {}, {}
    for seg_len in seg_lens:
        score = lrc_kernels.srp(srp_input, srp_experts, seg_len, level=srp_level, lengths=lengths, **bootstrap)
        srp_scores[str(seg_len)] = _score_dict(score)
        curve = lrc_kernels.cache_curve(topk, num_experts, "sch", seg_len=seg_len, lengths=lengths, **bootstrap)
        cache[f"sch@{seg_len}"] = _curve_dict(curve)
        counts = lrc_kernels.segment_coverage(topk, num_experts, seg_len, lengths=lengths)
        coverage[str(seg_len)] = lrc_kernels.coverage_ratio(counts).tolist()
    for policy in DYNAMIC_POLICIES:
        cache[policy] = _curve_dict(lrc_kernels.cache_curve(topk, num_experts, policy, lengths=lengths, **bootstrap))
    return {"srp": srp_scores, "cache": cache, "coverage": coverage}


def compute_report(routing: Routing, seg_lens: Sequence[int], *, num_bootstrap: int = 0, confidence: float = 0.95,
                   seed: int = 0, progress=None) -> dict:
    """Per-layer and model-level SRP, cache curves (SCH at every L, LRU, LFU, Belady) and segment coverage.

    Args:
        routing: the recorded routing.
        seg_lens: segment lengths L (each >= 1).
        num_bootstrap: B bootstrap replicates over sequences (0 = no CI).
        confidence: CI level.
        seed: seed of the one weight matrix ``[S, B]`` shared by every layer, L and policy.
        progress: optional callable ``(done, total)`` called after each layer and after the model level.

    Returns:
        ``{"layers": [...], "model": {...}}`` in the results.json layout (NaN still float NaN).
    """
    topk, num_experts, lengths = routing.topk, routing.num_experts, routing.lengths
    num_layers, num_seqs = topk.shape[0], topk.shape[1]
    weights = None
    if num_bootstrap > 0:
        lrc_kernels.bootstrap_indices(num_bootstrap, confidence)
        weights = resample_weights(num_seqs, num_bootstrap, torch.Generator().manual_seed(seed))
    layers = []
    for index in range(num_layers):
        entry = {"layer": routing.layers[index]}
        entry.update(_stream_report(topk[index], num_experts, seg_lens, lengths, weights, confidence))
        layers.append(entry)
        if progress is not None:
            progress(index + 1, num_layers + 1)
    stream = lrc_kernels.concat_layers(topk, num_experts)
    model = _stream_report(stream, num_layers * num_experts, seg_lens, lengths, weights, confidence,
                           srp_topk=topk, srp_num_experts=num_experts, srp_level="model")
    if progress is not None:
        progress(num_layers + 1, num_layers + 1)
    return {"layers": layers, "model": model}


def _nan_to_null(value):
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, dict):
        return {key: _nan_to_null(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_nan_to_null(item) for item in value]
    return value


def write_results(results: dict, out_dir: pathlib.Path) -> list[pathlib.Path]:
    """Write ``results.json`` (NaN as null), ``srp.csv``, ``cache.csv`` and ``coverage.csv``; return the paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path = out_dir / "results.json"
    json_path.write_text(json.dumps(_nan_to_null(results), indent=1, allow_nan=False) + "\n")

    streams = [(str(entry["layer"]), entry) for entry in results["layers"]] + [("model", results["model"])]
    srp_path, cache_path, coverage_path = out_dir / "srp.csv", out_dir / "cache.csv", out_dir / "coverage.csv"
    with srp_path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(("layer", "seg_len") + SRP_FIELDS)
        for name, entry in streams:
            for seg_len, score in entry["srp"].items():
                writer.writerow([name, seg_len] + [_csv_value(score[f]) for f in SRP_FIELDS])
    with cache_path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(("layer", "policy", "cache_size") + CURVE_FIELDS)
        for name, entry in streams:
            for policy, curve in entry["cache"].items():
                for size, rate in enumerate(curve["hit_rate"], start=1):
                    bounds = [_csv_value(None if curve[f] is None else curve[f][size - 1]) for f in CURVE_FIELDS[1:]]
                    writer.writerow([name, policy, size, _csv_value(rate)] + bounds)
    with coverage_path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(("layer", "seg_len", "cache_size", "coverage"))
        for name, entry in streams:
            for seg_len, values in entry["coverage"].items():
                for size, value in enumerate(values, start=1):
                    writer.writerow([name, seg_len, size, _csv_value(value)])
    return [json_path, srp_path, cache_path, coverage_path]


def _csv_value(value) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    return repr(value) if isinstance(value, float) else str(value)


def _format(value: Optional[float], digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:.{digits}f}"


def summary_table(results: dict, top_k: int) -> str:
    """A compact text table: SRP (with CI) per layer and L, and hit rates at a cache of 2k experts."""
    seg_lens = list(results["model"]["srp"].keys())
    policies = list(results["model"]["cache"].keys())
    size = 2 * top_k
    header = ["layer"] + [f"SRP@{seg_len}" for seg_len in seg_lens] + list(policies)
    rows = []
    streams = [(str(entry["layer"]), entry, size) for entry in results["layers"]]
    streams.append(("model", results["model"], size * len(results["layers"])))
    for name, entry, cache_size in streams:
        row = [name]
        for seg_len in seg_lens:
            score = entry["srp"][seg_len]
            cell = _format(score["best_f1"])
            if score["ci_low"] is not None or score["ci_high"] is not None:
                cell += f" [{_format(score['ci_low'])},{_format(score['ci_high'])}]"
            row.append(cell)
        for policy in policies:
            rates = entry["cache"][policy]["hit_rate"]
            row.append(_format(rates[min(cache_size, len(rates)) - 1]))
        rows.append(row)
    widths = [max(len(header[i]), *(len(row[i]) for row in rows)) for i in range(len(header))]
    lines = ["  ".join(cell.rjust(width) for cell, width in zip(line, widths)) for line in [header] + rows]
    note = (f"hit rates at m = 2k = {size} experts per layer, at most E (model: {size * len(results['layers'])} "
            f"of the {len(results['layers'])}-layer stream); SRP = best F1 with its basic bootstrap CI")
    return "\n".join(lines + [note])
