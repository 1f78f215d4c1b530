"""Cache planning on the command line: the plan options, the printed plan block and ``lrc-kernels plan``.

``analyze``, ``trace`` and ``demo`` add a ``plan`` section to results.json; ``lrc-kernels plan RESULTS.json``
computes it again from a saved report (its integer hits per cache size) for another budget, expert size
or bandwidth, without the model (docs/planning.md).
"""

from __future__ import annotations

import argparse
import json
import math
import pathlib
from typing import Optional

from lrc_kernels.plan_bytes import DEFAULT_BANDWIDTH_GBS, expert_size
from lrc_kernels.plan_report import plan_section

from .errors import UsageError, require
from .report import strict_json

DEFAULT_PLAN_DIR = pathlib.Path("lrc_plan")
# the library's argument names and the options that set them, so an error names what the user typed
OPTION_OF_ARGUMENT = {"total_slots": "--cache-slots", "cache_gib": "--cache-gib", "min_slots": "--min-slots",
                      "expert_bytes": "--expert-bytes"}


def _number(kind, minimum: float, *, strict: bool = False):
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {'an integer' if kind is int else 'a number'}, got {text!r}")
        if not math.isfinite(value) or value < minimum or (strict and value == minimum):
            raise argparse.ArgumentTypeError(f"expected a finite number {'>' if strict else '>='} {minimum}, "
                                             f"got {text}")
        return value
    return parse


def add_plan_options(parser: argparse.ArgumentParser, *, config_option: bool = True) -> None:
    """The budget, expert-size and bandwidth options shared by analyze, trace and plan."""
    group = parser.add_argument_group("cache plan (docs/planning.md of the lrc_kernels source repository)")
    budget = group.add_mutually_exclusive_group()
    budget.add_argument("--cache-gib", type=_number(float, 0.0), metavar="G",
                        help="expert-cache budget in GiB over all layers (needs the expert size)")
    budget.add_argument("--cache-slots", type=_number(int, 0), metavar="N",
                        help="expert-cache budget in experts over all layers (default: 2k per layer)")
    size = group.add_mutually_exclusive_group()
    size.add_argument("--expert-bytes", type=_number(int, 1), metavar="B",
                      help="bytes of one routed expert (default: from the model config)")
    if config_option:
        size.add_argument("--config", type=pathlib.Path, metavar="FILE",
                          help="model config.json (or its directory) giving the expert size")
    group.add_argument("--bandwidth-gbs", type=_number(float, 0.0, strict=True), default=DEFAULT_BANDWIDTH_GBS,
                       metavar="GBS", help="host-to-device bandwidth in GB/s for the transfer-bound ceiling "
                                           "(default: %(default)s)")
    group.add_argument("--min-slots", type=_number(int, 0), default=0, metavar="M",
                       help="fewest cache slots of any layer (default: %(default)s)")


def expert_size_for(args, model_config=None, saved: Optional[dict] = None) -> tuple[Optional[int], Optional[str]]:
    """(bytes, how they were found) of one expert: --expert-bytes, --config, the model's config, a saved plan.

    Called before any routing is analysed, so that a GiB budget without an expert size fails at once.
    """
    if args.expert_bytes is not None:
        return args.expert_bytes, "--expert-bytes"
    config_file = getattr(args, "config", None)
    if config_file is not None or model_config is not None:
        try:
            size = expert_size(config_file if config_file is not None else model_config)
        except ValueError:
            if args.cache_gib is not None or config_file is not None:
                raise
            return None, None  # a model of a family without a size rule: plan in slots only
        return size.bytes, size.rule
    if saved and saved.get("expert_bytes") is not None:
        return saved["expert_bytes"], saved.get("expert_size_rule")
    if args.cache_gib is not None:
        raise UsageError(f"--cache-gib: a budget of {args.cache_gib:g} GiB needs the size of one expert; give "
                         "--expert-bytes or --config")
    return None, None


def add_plan(results: dict, args, expert: tuple[Optional[int], Optional[str]]) -> dict:
    """Set ``results["plan"]`` from the command-line options and ``expert`` (:func:`expert_size_for`)."""
    expert_bytes, rule = expert
    try:
        results["plan"] = plan_section(results, total_slots=args.cache_slots, cache_gib=args.cache_gib,
                                       expert_bytes=expert_bytes, expert_rule=rule, min_slots=args.min_slots,
                                       bandwidth_gbs=args.bandwidth_gbs)
    except ValueError as error:
        argument, _, problem = str(error).partition(": ")
        if argument in OPTION_OF_ARGUMENT:
            raise UsageError(f"{OPTION_OF_ARGUMENT[argument]}: {problem}") from None
        raise
    return results["plan"]


def _size(num_bytes: Optional[float]) -> str:
    if num_bytes is None or math.isnan(num_bytes):
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if num_bytes < 1024 or unit == "GiB":
            return f"{num_bytes:.4g} {unit}"
        num_bytes /= 1024


def _per_layer(values: list) -> str:
    """Short per-layer list: every value up to 8 layers, else min..max; '-' marks -1 (none)."""
    if len(values) > 8:
        known = [v for v in values if v >= 0]
        span = f"{min(known)}..{max(known)}" if known else "-"
        return span + (f" ({len(values) - len(known)} -)" if len(known) < len(values) else "")
    return " ".join("-" if v < 0 else str(v) for v in values)


def _policy_table(streams_plan: dict) -> list[str]:
    header = ["policy", "knee/layer", "m@0.9/layer", "optimal split", "hit", "uniform", "vs belady",
              "misses/token", "bytes/token", "tokens/s ceiling"]
    rows = []
    belady = streams_plan["policies"].get("belady", {}).get("optimal", {}).get("hit_rate")
    for key, entry in streams_plan["policies"].items():
        optimal, uniform = entry["optimal"], entry["uniform"]
        ceiling = optimal["tokens_per_s_ceiling"]
        rows.append([key, _per_layer(entry["knee"]), _per_layer(entry["size_for_target"].get("0.9", [])),
                     _per_layer(optimal["sizes"]), _rate(optimal["hit_rate"]), _rate(uniform["hit_rate"]),
                     "-" if belady is None else _rate(optimal["hit_rate"] - belady, "+.3f"),
                     _rate(optimal["misses_per_token"], ".3g"), _size(optimal["bytes_per_token"]),
                     "-" if ceiling is None else f"{ceiling:,.0f}" if ceiling >= 100 else f"{ceiling:.3g}"])
    widths = [max(len(header[i]), *(len(row[i]) for row in rows)) for i in range(len(header))]
    return ["  ".join(cell.rjust(width) for cell, width in zip(line, widths)) for line in [header] + rows]


def _rate(value, spec: str = ".3f") -> str:
    return "-" if value is None or math.isnan(value) else format(value, spec)


def plan_block(plan: dict) -> str:
    """The printed plan: per policy, knee and sizes for 0.9 per layer, optimal vs uniform split at the budget."""
    budget = plan["budget"]
    size_note = "expert size unknown (give --expert-bytes or --config)"
    if plan["expert_bytes"] is not None:
        rule = plan["expert_size_rule"]
        size_note = f"one expert {_size(plan['expert_bytes'])}" + (f" ({rule})" if rule else "")
    lines = [f"plan: budget {budget['slots']} slots"
             + (f" = {_size(budget['gib'] * 2**30)}" if budget["gib"] is not None else "")
             + f" ({budget['source']}"
             + (", holds every expert" if budget["slots"] >= sum(plan["experts_per_layer"]) else "")
             + f"); {size_note}"]
    lines += _policy_table(plan)
    for name, part in plan.get("phases", {}).items():
        lines += [f"plan of the {name} tokens alone ({part['tokens']} tokens), same budget:"] + _policy_table(part)
    lines.append(f"pooled hit rates of one cache per layer on the traced tokens; 'vs belady' compares optimal "
                 f"splits; the ceiling is transfer-bound at {plan['bandwidth_gbs']:g} GB/s (each miss loads one "
                 "expert; compute and latency ignored), not a latency model")
    return "\n".join(lines)


def write_plan_plot(results: dict, out, title: str) -> list[pathlib.Path]:
    """Write ``plan.png`` of ``results["plan"]`` into ``out`` (an OutputDir); return its path in a list."""
    from .plan_plot import plot_plan

    with out.writing("plan.png") as path:
        plot_plan(results, path, title)
    return [out.path / "plan.png"]


def write_plan(results: dict, out, title: str, *, plots: bool) -> list[pathlib.Path]:
    """Write ``plan.json`` (the plan section) and, with ``plots``, ``plan.png`` into ``out``; return the paths."""
    path = out.write_text("plan.json", strict_json(results["plan"]))
    return [path] + (write_plan_plot(results, out, title) if plots else [])


def add_plan_command(commands) -> None:
    plan = commands.add_parser("plan", help="plan the expert cache again from a saved results.json",
                               description="Cache planning from a saved report: per-layer sizes, the optimal "
                                           "split of a budget, bytes and a transfer-bound decode-rate ceiling.")
    plan.add_argument("results", type=pathlib.Path, metavar="RESULTS", help="results.json of analyze/trace/demo")
    add_plan_options(plan)
    plan.add_argument("--out", type=pathlib.Path, default=DEFAULT_PLAN_DIR, metavar="DIR",
                      help="output directory for plan.json and plan.png (default: %(default)s)")
    plan.add_argument("--overwrite", action="store_true", help="write into a non-empty --out")
    plan.add_argument("--no-plots", action="store_true", help="skip plan.png")
    plan.add_argument("--quiet", action="store_true", help="no plan block")


def run_plan_command(args) -> int:
    from .output import OutputDir

    if not args.no_plots:
        require("matplotlib", "cli", "the plots (or pass --no-plots)")
    out = OutputDir(args.out, overwrite=args.overwrite)
    try:
        results = json.loads(args.results.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        reason = getattr(error, "strerror", None) or error  # an OSError without its repeated file name
        raise UsageError(f"{args.results}: cannot read a results.json: {reason}") from None
    if not isinstance(results, dict) or not {"layers", "model", "meta"} <= set(results) or not results["layers"]:
        raise UsageError(f"{args.results}: expected a results.json of lrc-kernels analyze/trace/demo "
                         "(with 'layers', 'model' and 'meta')")
    try:
        add_plan(results, args, expert_size_for(args, saved=results.get("plan")))
    except (KeyError, IndexError, TypeError, AttributeError) as error:  # a hand-edited or foreign file
        raise UsageError(f"{args.results}: not a results.json this lrc-kernels can plan from "
                         f"({type(error).__name__}: {error})") from None
    paths = write_plan(results, out, results["meta"].get("title", ""), plots=not args.no_plots)
    if not args.quiet:
        print(plan_block(results["plan"]))
        print(f"wrote {', '.join(str(p) for p in paths)}")
    return 0
