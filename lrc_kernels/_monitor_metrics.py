"""Scores of a :class:`lrc_kernels.monitor.RoutingMonitor` state, and their flattening for a logger.

:func:`score_state` walks the state table's statistics (:mod:`lrc_kernels._monitor_state`): SRP histograms
are scored per layer and pooled over layers; hit counts become pooled hit rates Σhits/ΣN at the reported cache
sizes; bootstrap replicates give basic intervals (SPEC §2, §3 "Streaming", §4, §6).
"""

from __future__ import annotations

import math
from typing import Dict, List, Mapping, Sequence

import torch

from ._monitor_state import Statistic
from .bootstrap import basic_interval
from .srp import score_histograms


def score_state(state: Mapping[str, torch.Tensor], statistics: Sequence[Statistic], *, num_experts: List[int],
                top_k: List[int], cache_sizes_in_k: Sequence[int], model_level: bool,
                confidence: float) -> Dict[str, torch.Tensor]:
    """The metrics :meth:`RoutingMonitor.compute` documents, from the int64 states of ``statistics``."""
    out: Dict[str, torch.Tensor] = {}

    def add_interval(key: str, replicates: torch.Tensor) -> None:
        out[f"{key}/ci_low"], out[f"{key}/ci_high"] = basic_interval(out[key], replicates, confidence)

    references = state["references"]
    num_layers = references.shape[0]
    device = references.device
    model_references = references.sum()
    model_references_boot = state["references/boot"].sum(0) if "references/boot" in state else None
    # Per reported size c·k: which layers have that many experts and the hit column they read. The same for
    # every cache, so built once per call (a monitor's summary runs ~20 cache statistics through them).
    layer_index = torch.arange(num_layers, device=device)
    experts = torch.tensor(num_experts, device=device)
    layer_sizes = []
    for c in cache_sizes_in_k:
        sizes = c * torch.tensor(top_k, device=device)
        layer_sizes.append((c, sizes <= experts, torch.minimum(sizes, experts) - 1))
    for statistic in statistics:
        key, total, boot = statistic.key, state[statistic.key], state.get(statistic.boot_key)
        if statistic.kind == "references":
            out["references"] = total.clone()
            if model_level:
                out["model/references"] = model_references
        elif statistic.kind == "srp":
            # The layers' and the model's histograms in one scoring call: [n + 1, L+1] (last row pooled).
            rows = torch.cat([total, total.sum(0, keepdim=True)]) if model_level else total
            score = score_histograms(rows)
            out[key], out[f"{key}/support"] = score.best_f1[:num_layers], score.support[:num_layers]
            if model_level:
                out[f"model/{key}"], out[f"model/{key}/support"] = score.best_f1[-1], score.support[-1]
            if boot is not None:                                                              # [n, B, L+1]
                boot_rows = torch.cat([boot, boot.sum(0, keepdim=True)]) if model_level else boot
                replicates = score_histograms(boot_rows).best_f1
                add_interval(key, replicates[:num_layers])
                if model_level:
                    add_interval(f"model/{key}", replicates[-1])
        elif statistic.model_level:
            for c in cache_sizes_in_k:
                m = c * num_layers * top_k[0]
                if m > statistic.width:
                    continue
                rate_key = f"model/hit@{c}k/{statistic.cache.name}"
                out[rate_key] = total[m - 1].double() / model_references
                if boot is not None:
                    add_interval(rate_key, boot[:, m - 1].double() / model_references_boot)
        else:
            for c, reported, column in layer_sizes:
                rate_key = f"hit@{c}k/{statistic.cache.name}"
                out[rate_key] = torch.where(reported, total[layer_index, column].double() / references, math.nan)
                if boot is not None:
                    replicates = boot[layer_index, :, column].double() / state["references/boot"]  # [n, B]
                    add_interval(rate_key, torch.where(reported[:, None], replicates, math.nan))
    return out


def flatten_metrics(metrics: Mapping[str, torch.Tensor], layer_names: List[str], *, per_layer: bool,
                    prefix: str) -> Dict[str, float]:
    """The Python floats :meth:`RoutingMonitor.summary` documents."""
    flat: Dict[str, float] = {}
    for key, value in metrics.items():
        if key.endswith("/support") or key in ("references", "model/references"):
            continue
        scored_key = key.rsplit("/", 1)[0] if key.endswith(("/ci_low", "/ci_high")) else key
        support = metrics.get(f"{scored_key}/support")
        if support is not None:
            # SRP without a single window is 0 by definition, which a plot would misread as "no consistency".
            value = torch.where(support > 0, value, math.nan)
        if key.startswith("model/"):
            if not bool(value.isnan()):
                flat[prefix + key[len("model/"):]] = float(value)
        elif not key.endswith(("/ci_low", "/ci_high")):
            if not bool(value.isnan().all()):
                flat[f"{prefix}{key}/layer_mean"] = float(value.nanmean())
            if per_layer:
                for name, layer_value in zip(layer_names, value.tolist()):
                    if not math.isnan(layer_value):
                        flat[f"{prefix}{name}/{key}"] = layer_value
    return flat
