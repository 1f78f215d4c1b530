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


# Up to this many layers get a legend entry each; deeper models get a colour bar of the layer number.
MAX_LEGEND_LAYERS = 8


def _srp_series(entry: dict, seg_lens: list, field: str) -> list:
    return [_nan(entry["srp"][str(seg_len)][field]) for seg_len in seg_lens]


def _streams(results: dict) -> list:
    """``(label, entry, is_model)`` per layer, then the model level unless it repeats a single layer."""
    streams = [(f"layer {entry['layer']}", entry, False) for entry in results["layers"]]
    if len(results["layers"]) > 1:
        streams.append(("model", results["model"], True))
    return streams


def plot_srp_vs_seg_len(results: dict, path: pathlib.Path, title: str) -> None:
    """SRP (best F1) against L (log axis, ticks at the measured L): a line per layer coloured by depth, the
    model level bold black; CIs as shaded bands. SRP that is not defined (null) is left out."""
    plt = _pyplot()
    seg_lens = sorted(int(seg_len) for seg_len in results["model"]["srp"])
    streams = _streams(results)
    num_layers = len(results["layers"])
    many = num_layers > MAX_LEGEND_LAYERS
    figure, axes = plt.subplots(figsize=(7.6 if many else 7.0, 4.4), layout="constrained")
    colormap = plt.get_cmap("viridis")
    for index, (label, entry, is_model) in enumerate(streams):
        color = "black" if is_model else colormap(index / max(num_layers - 1, 1))
        values = _srp_series(entry, seg_lens, "best_f1")
        lows, highs = _srp_series(entry, seg_lens, "ci_low"), _srp_series(entry, seg_lens, "ci_high")
        axes.plot(seg_lens, values, color=color, marker="o", markersize=3.5 if is_model else 2.5,
                  linewidth=2.4 if is_model else 1.0, label=label if (is_model or not many) else None,
                  zorder=3 if is_model else 2)
        if not all(math.isnan(value) for value in lows):
            axes.fill_between(seg_lens, lows, highs, color=color, alpha=0.25 if is_model else 0.12, linewidth=0)
    axes.set_xscale("log", base=2)
    axes.set_xticks(seg_lens, [str(seg_len) for seg_len in seg_lens])
    axes.minorticks_off()
    axes.set_xlabel("segment length L (tokens)")
    axes.set_ylabel("SRP (best F1)")
    axes.set_title(title, fontsize="medium")
    axes.grid(alpha=0.3)
    if many:
        scale = plt.cm.ScalarMappable(cmap=colormap, norm=plt.Normalize(results["layers"][0]["layer"],
                                                                         results["layers"][-1]["layer"]))
        figure.colorbar(scale, ax=axes, label="layer", pad=0.02)
    handles, labels = axes.get_legend_handles_labels()
    if handles:
        figure.legend(handles, labels, loc="outside right upper", fontsize="small", frameon=False)
    figure.savefig(path, dpi=110)
    plt.close(figure)


def _draw_curves(axes, entry: dict, top_k: int, title: str) -> None:
    sch_index = 0
    for policy, curve in entry["cache"].items():
        color, line = _style(policy, sch_index)
        sch_index += policy.startswith("sch@")
        rates = [_nan(v) for v in curve["hit_rate"]]
        sizes = [(m + 1) / top_k for m in range(len(rates))]
        axes.plot(sizes, rates, color=color, linestyle=line, linewidth=1.1, label=policy)
        if curve["ci_low"] is not None:
            axes.fill_between(sizes, [_nan(v) for v in curve["ci_low"]], [_nan(v) for v in curve["ci_high"]],
                              color=color, alpha=0.2, linewidth=0)
    axes.set_title(title, fontsize="small", pad=3)
    axes.set_ylim(0.0, 1.02)
    axes.grid(alpha=0.3)


def _columns(num_panels: int, widest: int = 8) -> int:
    """Columns of the layer grid: a divisor of the panel count near its square root when there is one (no
    empty cells), else the width that leaves the fewest."""
    if num_panels <= 4:
        return num_panels
    candidates = range(min(widest, num_panels), 2, -1)
    return min(candidates, key=lambda c: ((-num_panels) % c, abs(c - math.sqrt(num_panels * 1.5))))


def plot_cache_curves(results: dict, top_k: int, path: pathlib.Path, title: str) -> None:
    """Hit rate against cache size in token working sets (m / k, model: m / (n·k)): the model level in a wide
    top panel, then a grid of the layers (shared axes, labels on the outer panels, one legend on top)."""
    plt = _pyplot()
    layers = results["layers"]
    num_layers = len(layers)
    columns = _columns(num_layers)
    rows = math.ceil(num_layers / columns)
    with_model = num_layers > 1
    height = 2.0 * rows + (2.6 if with_model else 0.0) + 0.9
    figure = plt.figure(figsize=(max(2.5 * columns, 7.0), height), layout="constrained")
    figure.suptitle(title, fontsize="medium")
    top, bottom = (figure.subfigures(2, 1, height_ratios=[2.6, 2.0 * rows]) if with_model else (None, figure))
    if with_model:
        model_axes = top.subplots()
        _draw_curves(model_axes, results["model"], top_k * num_layers, f"model: all {num_layers} layers, one cache")
        model_axes.set_xlabel(f"cache size / {num_layers}k (token working sets of the whole model)")
        model_axes.set_ylabel("hit rate")
        handles, labels = model_axes.get_legend_handles_labels()
    grid = bottom.subplots(rows, columns, squeeze=False, sharex=True, sharey=True)
    for axes, entry in zip(grid.flat, layers):
        _draw_curves(axes, entry, top_k, f"layer {entry['layer']}")
    for axes in list(grid.flat)[num_layers:]:
        axes.set_visible(False)
    for column in range(columns):
        last = max(row for row in range(rows) if row * columns + column < num_layers)
        grid[last, column].set_xlabel("cache size / k")
        grid[last, column].xaxis.set_tick_params(labelbottom=True)
    for row in range(rows):
        grid[row, 0].set_ylabel("hit rate")
    if not with_model:
        handles, labels = grid.flat[0].get_legend_handles_labels()
    figure.legend(handles, labels, loc="outside lower center", ncol=len(labels), fontsize="small", frameon=False)
    figure.savefig(path, dpi=100 if num_layers > 24 else 110)
    plt.close(figure)


def plot_srp_heatmap(results: dict, path: pathlib.Path, title: str) -> None:
    """Layer x L heat map of SRP (best F1); the colour range spans the values shown (not a fixed 0-1), values
    are written in the cells up to 400 cells, and SRP that is not defined is grey ``n/a``."""
    plt = _pyplot()
    layers = [entry["layer"] for entry in results["layers"]]
    seg_lens = sorted(results["model"]["srp"], key=int)
    values = [_srp_series(entry, seg_lens, "best_f1") for entry in results["layers"]]
    finite = [value for line in values for value in line if not math.isnan(value)]
    low, high = (min(finite), max(finite)) if finite else (0.0, 1.0)
    if high - low < 1e-3:  # one value: a small range around it instead of a division by zero
        low, high = low - 0.05, high + 0.05
    row_height = 0.3 if len(layers) <= 32 else 0.2
    figure, axes = plt.subplots(figsize=(2.6 + 0.9 * len(seg_lens), 1.6 + row_height * len(layers)),
                                layout="constrained")
    colormap = plt.get_cmap("magma").with_extremes(bad="0.85")
    image = axes.imshow(values, aspect="auto", cmap=colormap, vmin=low, vmax=high, interpolation="nearest")
    axes.set_xticks(range(len(seg_lens)), seg_lens)
    step = max(1, math.ceil(len(layers) / 32))  # at most ~32 row labels
    axes.set_yticks(range(0, len(layers), step), [str(layer) for layer in layers[::step]])
    axes.set_xlabel("segment length L")
    axes.set_ylabel("layer")
    if len(layers) * len(seg_lens) <= 400:
        middle = (low + high) / 2
        for row, line in enumerate(values):
            for column, value in enumerate(line):
                text = "n/a" if math.isnan(value) else f"{value:.2f}"
                colour = "black" if math.isnan(value) or value >= middle else "white"
                axes.text(column, row, text, ha="center", va="center", fontsize=7, color=colour)
    figure.colorbar(image, ax=axes, label="SRP (best F1)")
    axes.set_title(title, fontsize="medium")
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
