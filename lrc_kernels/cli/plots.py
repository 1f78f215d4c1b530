"""PNG plots of a report (matplotlib, Agg backend): SRP vs L, hit-rate curves, a layer x L heat map.

docs/plots.md explains how to read them.
"""

from __future__ import annotations

import math
import pathlib

POLICY_STYLES = {"lru": ("tab:blue", "--"), "lfu": ("tab:orange", "--"), "belady": ("black", ":")}
SCH_COLORS = ("tab:green", "tab:red", "tab:purple", "tab:brown", "tab:pink", "tab:olive", "tab:cyan")


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _nan(value):
    return math.nan if value is None else value


def _style(policy: str, sch_index: int):
    if policy.startswith("sch@"):
        return SCH_COLORS[sch_index % len(SCH_COLORS)], "-"
    return POLICY_STYLES.get(policy, ("gray", "-."))


def plot_srp_vs_seg_len(results: dict, path: pathlib.Path, title: str) -> None:
    """SRP (best F1) against L on a log axis: one line per layer, the model level bold, CI as error bars."""
    plt = _pyplot()
    figure, axes = plt.subplots(figsize=(6.4, 4.2))
    colormap = plt.get_cmap("viridis")
    streams = [(f"layer {entry['layer']}", entry) for entry in results["layers"]]
    for index, (label, entry) in enumerate(streams + [("model", results["model"])]):
        seg_lens = [int(L) for L in entry["srp"]]
        values = [_nan(entry["srp"][str(L)]["best_f1"]) for L in seg_lens]
        lows = [_nan(entry["srp"][str(L)]["ci_low"]) for L in seg_lens]
        highs = [_nan(entry["srp"][str(L)]["ci_high"]) for L in seg_lens]
        is_model = label == "model"
        color = "black" if is_model else colormap(index / max(len(streams) - 1, 1))
        errors = None
        if not all(math.isnan(v) for v in lows):
            errors = [[max(v - lo, 0.0) for v, lo in zip(values, lows)],
                      [max(hi - v, 0.0) for v, hi in zip(values, highs)]]
        axes.errorbar(seg_lens, values, yerr=errors, label=label, color=color, marker="o", markersize=3,
                      linewidth=2.2 if is_model else 1.0, capsize=2)
    axes.set_xscale("log", base=2)
    axes.set_xlabel("segment length L (tokens)")
    axes.set_ylabel("SRP (best F1)")
    axes.set_title(title)
    axes.grid(alpha=0.3)
    axes.legend(fontsize="small", ncol=2 if len(streams) > 8 else 1)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def _draw_curves(axes, entry: dict, top_k: int, title: str) -> None:
    sch_index = 0
    for policy, curve in entry["cache"].items():
        color, line = _style(policy, sch_index)
        sch_index += policy.startswith("sch@")
        rates = [_nan(v) for v in curve["hit_rate"]]
        sizes = [(m + 1) / top_k for m in range(len(rates))]
        axes.plot(sizes, rates, color=color, linestyle=line, linewidth=1.2, label=policy)
        if curve["ci_low"] is not None:
            axes.fill_between(sizes, [_nan(v) for v in curve["ci_low"]], [_nan(v) for v in curve["ci_high"]],
                              color=color, alpha=0.15, linewidth=0)
    axes.set_title(title, fontsize="medium")
    axes.set_ylim(0.0, 1.02)
    axes.grid(alpha=0.3)


def plot_cache_curves(results: dict, top_k: int, path: pathlib.Path, title: str) -> None:
    """Hit rate against cache size in token working sets (m / k, model: m / (n·k)): model panel, then layers."""
    plt = _pyplot()
    panels = [("model (all layers)", results["model"], top_k * len(results["layers"]))]
    panels += [(f"layer {entry['layer']}", entry, top_k) for entry in results["layers"]]
    columns = min(len(panels), 4)
    rows = math.ceil(len(panels) / columns)
    figure, grid = plt.subplots(rows, columns, figsize=(3.4 * columns, 2.9 * rows), squeeze=False, sharey=True)
    for axes, (label, entry, slots) in zip(grid.flat, panels):
        _draw_curves(axes, entry, slots, label)
    for axes in list(grid.flat)[len(panels):]:
        axes.set_visible(False)
    grid.flat[0].set_xlabel(f"cache size / {len(results['layers'])}k (token working sets)")
    for axes in list(grid.flat)[1:len(panels)]:
        axes.set_xlabel("cache size / k (token working sets)")
    for axes in grid[:, 0]:
        axes.set_ylabel("hit rate")
    handles, labels = grid.flat[0].get_legend_handles_labels()
    figure.legend(handles, labels, loc="lower center", ncol=len(labels), fontsize="small", frameon=False)
    figure.suptitle(title)
    figure.tight_layout(rect=(0, 0.05, 1, 1))
    figure.savefig(path, dpi=110)
    plt.close(figure)


def plot_srp_heatmap(results: dict, path: pathlib.Path, title: str) -> None:
    """Layer x L heat map of SRP (best F1), with the value written in every cell."""
    plt = _pyplot()
    layers = [entry["layer"] for entry in results["layers"]]
    seg_lens = list(results["model"]["srp"].keys())
    values = [[_nan(entry["srp"][L]["best_f1"]) for L in seg_lens] for entry in results["layers"]]
    figure, axes = plt.subplots(figsize=(1.2 + 0.9 * len(seg_lens), 1.2 + 0.35 * len(layers)))
    image = axes.imshow(values, aspect="auto", cmap="magma", vmin=0.0, vmax=1.0)
    axes.set_xticks(range(len(seg_lens)), seg_lens)
    axes.set_yticks(range(len(layers)), [str(layer) for layer in layers])
    axes.set_xlabel("segment length L")
    axes.set_ylabel("layer")
    if len(layers) * len(seg_lens) <= 400:
        for row, line in enumerate(values):
            for column, value in enumerate(line):
                if not math.isnan(value):
                    axes.text(column, row, f"{value:.2f}", ha="center", va="center", fontsize=7,
                              color="white" if value < 0.6 else "black")
    figure.colorbar(image, ax=axes, label="SRP (best F1)")
    axes.set_title(title, fontsize="medium")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def write_plots(results: dict, top_k: int, out, title: str) -> list[pathlib.Path]:
    """Write ``srp_vs_L.png``, ``cache_curves.png`` and ``srp_heatmap.png`` into ``out`` (an
    :class:`~lrc_kernels.cli.output.OutputDir`); return the paths."""
    with out.writing("srp_vs_L.png") as path:
        plot_srp_vs_seg_len(results, path, title)
    with out.writing("cache_curves.png") as path:
        plot_cache_curves(results, top_k, path, title)
    with out.writing("srp_heatmap.png") as path:
        plot_srp_heatmap(results, path, title)
    return [out.path / name for name in ("srp_vs_L.png", "cache_curves.png", "srp_heatmap.png")]
