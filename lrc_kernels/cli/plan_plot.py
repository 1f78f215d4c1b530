"""plan.png: model-level hit rate against the cache budget, per policy, under the optimal and uniform splits.

docs/planning.md explains how to read it.
"""

from __future__ import annotations

import pathlib

from lrc_kernels.plan_bytes import GIB
from lrc_kernels.plan_report import hit_rate_by_budget, policy_keys

from .plots import _pyplot, _style


def plot_plan(results: dict, path: pathlib.Path, title: str) -> None:
    """One colour per policy: solid = optimal split (allocate_cache), dashed with dots = the same size per layer."""
    plan = results["plan"]
    plt = _pyplot()
    from matplotlib.lines import Line2D

    keys = policy_keys(results)
    num_layers = len(results["layers"])
    total_slots = sum(len(entry["cache"][keys[0]]["hits"]) for entry in results["layers"])
    expert_bytes = plan["expert_bytes"]
    if expert_bytes is None:
        scale, label = 1.0, "cache budget (experts held over all layers)"
    else:
        unit, size = ("GiB", GIB) if total_slots * expert_bytes >= GIB else ("MiB", 2**20)
        scale, label = expert_bytes / size, f"cache budget ({unit}; one expert = {expert_bytes / 2**20:.4g} MiB)"
    figure, axes = plt.subplots(figsize=(7.0, 4.6))
    handles, sch_index = [], 0
    for key in keys:
        color, _ = _style(key, sch_index)
        sch_index += key.startswith("sch@")
        curves = hit_rate_by_budget(results, key, min_slots=plan["min_slots"])
        budgets, rates = curves["optimal"]
        axes.plot([b * scale for b in budgets], rates, color=color, linewidth=1.4)
        budgets, rates = curves["uniform"]
        axes.plot([b * scale for b in budgets], rates, color=color, linewidth=1.0, linestyle="--", marker=".",
                  markersize=4)
        handles.append(Line2D([], [], color=color, linewidth=1.4, label=key))
    handles += [Line2D([], [], color="gray", linewidth=1.4, label="optimal split"),
                Line2D([], [], color="gray", linewidth=1.0, linestyle="--", marker=".", label="same size per layer")]
    budget = plan["budget"]["slots"] * scale
    axes.axvline(budget, color="gray", linewidth=0.8, linestyle=":")
    axes.text(budget, 1.0, f" budget ({plan['budget']['source']})", fontsize="x-small", color="gray", ha="left",
              va="top")
    axes.set_xlabel(label)
    axes.set_ylabel("model hit rate (pooled over layers)")
    axes.set_ylim(0.0, 1.02)
    axes.set_xlim(0, total_slots * scale * 1.01)
    top = axes.secondary_xaxis("top", functions=(lambda x: x / (scale * num_layers), lambda m: m * scale * num_layers))
    top.set_xlabel("slots per layer (budget / number of layers)", fontsize="small")
    axes.grid(alpha=0.3)
    axes.set_title(f"{title}: one expert cache per layer", fontsize="medium")
    axes.legend(handles=handles, fontsize="x-small", ncol=2, loc="lower right")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
