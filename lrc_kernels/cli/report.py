"""The files and table shared by ``analyze``, ``trace`` and ``demo``: results.json, CSV and the text summary.

The numbers come from :func:`lrc_kernels.analyze`; this module only writes and prints them.
"""

from __future__ import annotations

import csv
import json
import math
import pathlib
from dataclasses import fields
from typing import Optional

from lrc_kernels.analyze import CURVE_FIELDS
from lrc_kernels.srp import SRPScore

SRP_FIELDS = tuple(f.name for f in fields(SRPScore))




def _nan_to_null(value):
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, dict):
        return {key: _nan_to_null(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_nan_to_null(item) for item in value]
    return value


def strict_json(value) -> str:
    """``value`` as indented strict JSON text (NaN as null), with a final newline."""
    return json.dumps(_nan_to_null(value), indent=1, allow_nan=False) + "\n"


def write_results(results: dict, out) -> list[pathlib.Path]:
    """Write ``srp.csv``, ``cache.csv``, ``coverage.csv`` and, last, ``results.json`` (NaN as null) into ``out``.

    ``out`` is the run's :class:`~lrc_kernels.cli.output.OutputDir`; ``results["meta"]["outputs"]`` becomes the
    list of every file it wrote (earlier ones, e.g. plots, included), which a later ``--overwrite`` removes.
    Returns the paths written here.
    """
    streams = [(str(entry["layer"]), entry) for entry in results["layers"]] + [("model", results["model"])]
    for phase, part in results.get("phases", {}).items():  # a generated workload: "prefill/0", "decode/model"
        streams += [(f"{phase}/{entry['layer']}", entry) for entry in part["layers"]]
        streams.append((f"{phase}/model", part["model"]))
    with out.writing("srp.csv") as srp_path, out.writing("cache.csv") as cache_path, \
            out.writing("coverage.csv") as coverage_path:
        _write_csvs(streams, srp_path, cache_path, coverage_path)
    results["meta"]["outputs"] = sorted({path.name for path in out.written} | {"results.json"})
    json_path = out.write_text("results.json", strict_json(results))
    return [json_path, out.path / "srp.csv", out.path / "cache.csv", out.path / "coverage.csv"]


def _write_csvs(streams, srp_path: pathlib.Path, cache_path: pathlib.Path, coverage_path: pathlib.Path) -> None:
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


def _csv_value(value) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    return repr(value) if isinstance(value, float) else str(value)


# Minimum sequences for a bootstrap over sequences to say much (basic intervals from fewer are erratic).
MIN_BOOTSTRAP_SEQUENCES = 20


def _streams(results: dict) -> list:
    """Every scored stream of a report: the layers, the model level, and those of each phase."""
    parts = [results] + list(results.get("phases", {}).values())
    return [entry for part in parts for entry in part["layers"] + [part["model"]]]


def qualify(results: dict) -> list[str]:
    """Mark what the numbers cannot say, and return the warnings to print.

    SRP at an L longer than every sequence has no window: SPEC §9 scores such a pool 0, which a table would
    show as a measurement, so its scores become null (``n/a`` in the table, skipped in the plots). Bootstrap
    intervals over fewer than :data:`MIN_BOOTSTRAP_SEQUENCES` sequences are flagged.
    """
    warnings = []
    undefined = [seg_len for seg_len, score in results["model"]["srp"].items() if score["support"] == 0]
    for entry in _streams(results):
        for seg_len in undefined:
            score = entry["srp"][seg_len]
            score.update({name: None for name in score if name != "support"})
    meta = results["meta"]
    if undefined:
        warnings.append(f"SRP@{', SRP@'.join(undefined)} not defined: no sequence has that many tokens "
                        f"(the longest has {meta['seq_len']}); reported as null (n/a)")
    if meta.get("num_bootstrap", 0) > 0 and meta.get("num_sequences", 0) < MIN_BOOTSTRAP_SEQUENCES:
        warnings.append(f"the bootstrap CIs rest on {meta['num_sequences']} sequences (fewer than "
                        f"{MIN_BOOTSTRAP_SEQUENCES}): treat them as rough")
    return warnings


def _format(value: Optional[float], digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:.{digits}f}"


def summary_table(results: dict, top_k: int) -> str:
    """A compact text table: SRP (with CI) per layer and L, and hit rates at a cache of 2k experts.

    With a ``"phases"`` section (a generated workload), rows ``prefill`` and ``decode`` follow the model row:
    the model level of each phase's tokens.
    """
    seg_lens = list(results["model"]["srp"].keys())
    policies = list(results["model"]["cache"].keys())
    num_layers = len(results["layers"])
    size = 2 * top_k
    header = ["layer"] + [f"SRP@{seg_len}" for seg_len in seg_lens] + list(policies)
    streams = [(str(entry["layer"]), entry, size) for entry in results["layers"]]
    if num_layers > 1:  # one layer: the model level is that layer again
        streams.append(("model", results["model"], size * num_layers))
    streams += [(name, part["model"], size * num_layers) for name, part in results.get("phases", {}).items()]
    rows = []
    for name, entry, cache_size in streams:
        row = [name]
        for seg_len in seg_lens:
            score = entry["srp"][seg_len]
            if score["support"] == 0:  # no complete window of L tokens: no score, not a score of 0
                row.append("n/a")
                continue
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
    note = (f"hit rates at m = 2k = {size} experts per layer, at most E (model: {size * num_layers} "
            f"of the {num_layers}-layer stream); SRP = best F1 with its basic bootstrap CI (n/a: no sequence has L tokens)")
    if "phases" in results:
        note += "; prefill/decode = the model level of the prompt / generated tokens"
    return "\n".join(lines + [note])
