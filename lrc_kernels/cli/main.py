"""lrc-kernels: local routing consistency reports of MoE models and of saved routing traces.

Documented in docs/cli.md of the lrc_kernels source repository.
"""

from __future__ import annotations

import argparse
import pathlib
import sys
import time
from typing import Optional, Sequence

from lrc_kernels.plan_bytes import DEFAULT_BANDWIDTH_GBS
from lrc_kernels.trace import PHASES

from .errors import Parser, UsageError, fraction_option, int_option, require, run_guarded, warn
from .plan import (add_plan, add_plan_command, add_plan_options, expert_size_for, plan_block, run_plan_command,
                   write_plan_plot)
from .trace import ReportedByRankZero, add_arguments as add_trace_arguments

PROG = "lrc-kernels"
DEFAULT_SEG_LENS = (4, 16, 64)
DEMO_SETTINGS = {"seq_len": 256, "max_tokens": 16384, "batch_size": 16, "num_bootstrap": 200}
_positive_int, _non_negative_int = int_option(1), int_option(0)


def _add_report_options(parser: argparse.ArgumentParser, *, num_bootstrap: int = 200) -> None:
    parser.add_argument("--seg-lens", type=_positive_int, nargs="+", default=list(DEFAULT_SEG_LENS), metavar="L",
                        help="segment lengths L for SRP, SCH look-ahead and coverage (default: %(default)s)")
    parser.add_argument("--num-bootstrap", type=_non_negative_int, default=num_bootstrap, metavar="B",
                        help="bootstrap replicates over sequences for the CIs, 0 = none (default: %(default)s)")
    parser.add_argument("--confidence", type=fraction_option, default=0.95,
                        help="CI level, in (0, 1) (default: %(default)s)")
    parser.add_argument("--seed", type=int_option(-(1 << 63)), default=0,
                        help="seed of the bootstrap weights (default: %(default)s)")
    parser.add_argument("--phase", choices=PHASES, default="all",
                        help="tokens to report: all, or only the prompt (prefill) or generated (decode) tokens of "
                             "each sequence; 'all' on a generated workload adds prefill and decode rows "
                             "(default: %(default)s)")
    parser.add_argument("--out", type=pathlib.Path, default=pathlib.Path("lrc_report"), metavar="DIR",
                        help="output directory (default: %(default)s)")
    _add_output_options(parser)


def _add_output_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--overwrite", action="store_true",
                        help="write into a non-empty --out, replacing the report files of an earlier run there")
    parser.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    parser.add_argument("--quiet", action="store_true", help="no progress bar and no table")


def _add_model_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--seq-len", type=_positive_int, default=256, metavar="T",
                        help="tokens per sequence (default: %(default)s)")
    parser.add_argument("--max-tokens", type=_positive_int, default=None, metavar="N",
                        help="use only the first N tokens of the text (default: all)")
    parser.add_argument("--batch-size", type=_positive_int, default=8, metavar="B",
                        help="sequences per forward pass (default: %(default)s)")
    parser.add_argument("--device", default="cpu", help="torch device for the model (default: %(default)s)")
    parser.add_argument("--dtype", choices=("fp32", "bf16", "fp16"), default="fp32",
                        help="weights' dtype (default: %(default)s); routing near ties can depend on it")
    parser.add_argument("--device-map", choices=("auto",), default=None,
                        help="'auto': shard a model larger than one device over the GPUs and the CPU "
                             "(accelerate; replaces --device)")
    parser.add_argument("--trust-remote-code", action="store_true",
                        help="run the Python code shipped in the model directory (off by default)")
    parser.add_argument("--stage", default=None,
                        help="stack to analyse when the routers span several (e.g. encoder, decoder)")


def build_parser() -> argparse.ArgumentParser:
    from lrc_kernels import __version__

    parser = Parser(prog=PROG, description=__doc__)
    parser.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    analyze = commands.add_parser("analyze", help="run a local Hugging Face MoE model over a text",
                                  description="Run a MoE model over a text, record its routing and report "
                                              "SRP, cache hit-rate curves and segment coverage.")
    analyze.add_argument("model", metavar="MODEL", help="local model directory, or 'default' for the built-in tiny MoE")
    analyze.add_argument("--text", type=pathlib.Path, required=True, metavar="FILE", help="UTF-8 text file")
    analyze.add_argument("--generate", type=_non_negative_int, default=0, metavar="N",
                         help="also generate up to N tokens (greedy) after each chunk of --seq-len tokens and "
                              "report prefill and decode separately (default: %(default)s, no generation)")
    analyze.add_argument("--save-trace", type=pathlib.Path, default=None, metavar="PATH",
                         help="also write the recorded RoutingTrace to PATH (.safetensors)")
    _add_model_options(analyze)
    _add_report_options(analyze)
    add_plan_options(analyze, config_option=False)

    trace = commands.add_parser("trace", help="report on saved routing: our files, vLLM, SGLang, Megatron-Core",
                                description="Report on saved routing, one file or many (summed); the formats are "
                                            "described in docs/formats.md of the lrc_kernels source repository. "
                                            "Under torchrun the files are sharded over ranks.")
    add_trace_arguments(trace, _positive_int)
    _add_report_options(trace)
    add_plan_options(trace, config_option=False)   # trace's --model-config (alias --config) gives the expert size

    demo = commands.add_parser("demo", help="analyze the built-in tiny MoE on its shipped sample text",
                               description="Same as 'analyze default --text <shipped sample>' with small settings "
                                           f"({', '.join(f'{k}={v}' for k, v in DEMO_SETTINGS.items())}).")
    demo.add_argument("--out", type=pathlib.Path, default=pathlib.Path("lrc_demo"), metavar="DIR",
                      help="output directory (default: %(default)s)")
    _add_output_options(demo)
    add_plan_command(commands)
    return parser


def _run_report(trace, args, meta: dict, started: float, expert=(None, None)) -> int:
    from lrc_kernels.analyze import analyze

    from .progress import step_progress

    results = analyze(trace, seg_lens=args.seg_lens, num_bootstrap=args.num_bootstrap,
                      confidence=args.confidence, seed=args.seed, phase=args.phase,
                      progress=step_progress("metrics", not args.quiet))
    results["meta"].update(meta)
    return _write_report(results, args, started, expert)


def _write_report(results: dict, args, started: float, expert=(None, None)) -> int:
    from .report import qualify, summary_table, write_results

    for message in qualify(results):
        warn(message)
    results["meta"]["seconds"] = round(time.perf_counter() - started, 2)
    add_plan(results, args, expert)
    top_k, title = results["meta"]["top_k"], results["meta"].get("title", "")
    args.output.remove_stale()
    paths = []
    if not args.no_plots:
        from .plots import write_plots

        paths += write_plots(results, top_k, args.output, title)
        paths += write_plan_plot(results, args.output, title)
    paths = write_results(results, args.output) + paths
    if results["meta"].get("saved_trace"):
        paths.append(results["meta"]["saved_trace"])
    if not args.quiet:
        print(summary_table(results, top_k))
        print(plan_block(results["plan"]))
        print(f"wrote {', '.join(str(p) for p in paths)}")
    return 0


def _analyze(args, started: float) -> int:
    from lrc_kernels.bootstrap import check_weights_fit

    from .analyze import check_inputs, generate_routing, load_model, record_routing, resolve_model_dir, tokenize_text

    model_dir = resolve_model_dir(args.model)
    if not args.text.is_file():
        problem = "is a directory, not a text file" if args.text.is_dir() else "no such file"
        raise UsageError(f"{args.text}: {problem}")
    model, tokenizer = load_model(model_dir, args.device, dtype=args.dtype, device_map=args.device_map,
                                  trust_remote_code=args.trust_remote_code)
    expert = expert_size_for(args, model.config)
    input_ids = tokenize_text(tokenizer, args.text, args.seq_len, args.max_tokens)
    for message in check_inputs(model, input_ids, args.seq_len, args.generate):
        warn(message)
    check_weights_fit(input_ids.shape[0], args.num_bootstrap)  # before the model runs, not after
    if args.generate:
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        trace = generate_routing(model, input_ids, args.batch_size, args.generate, pad_token_id=pad or 0,
                                 progress=not args.quiet)
    else:
        trace = record_routing(model, input_ids, args.batch_size, stage=args.stage, progress=not args.quiet)
    meta = {"command": "analyze", "model": str(model_dir), "model_type": model.config.model_type,
            "text": str(args.text), "tokens": int(input_ids.numel()), "generate": args.generate,
            "title": f"{model_dir.name} on {args.text.name}"}
    if args.save_trace is not None:
        # The expert size travels with the trace, so `trace FILE` plans in bytes as this run does.
        trace.meta.update(meta, expert_bytes=expert[0], expert_size_rule=expert[1])
        args.save_trace.parent.mkdir(parents=True, exist_ok=True)
        trace.save(args.save_trace)
        meta["saved_trace"] = str(args.save_trace)
    return _run_report(trace, args, meta, started, expert)


def _check_before_work(args) -> None:
    """Everything that can fail without reading a model or a trace fails here, in the first second."""
    from lrc_kernels.bootstrap import bootstrap_indices

    from .output import OutputDir

    args.seg_lens = sorted(set(args.seg_lens))
    if args.num_bootstrap > 0:
        bootstrap_indices(args.num_bootstrap, args.confidence)
    if args.command == "analyze":
        require("transformers", "cli", "analyze (a Hugging Face model)")
        if args.save_trace is not None and args.save_trace.is_dir():
            raise UsageError(f"--save-trace {args.save_trace}: is a directory; give a file path such as "
                             f"{args.save_trace / 'routing.safetensors'}")
    if not args.no_plots:
        require("matplotlib", "cli", "the plots (or pass --no-plots)")
    args.output = OutputDir(args.out, overwrite=args.overwrite)


def _run(args) -> int:
    started = time.perf_counter()
    if args.command == "demo":
        from .analyze import SAMPLE_TEXT

        args.model, args.text, args.device, args.stage = "default", SAMPLE_TEXT, "cpu", None
        args.dtype, args.device_map, args.trust_remote_code = "fp32", None, False
        args.generate, args.save_trace = 0, None
        args.seg_lens, args.confidence, args.seed, args.phase = list(DEFAULT_SEG_LENS), 0.95, 0, "all"
        args.cache_gib = args.cache_slots = args.expert_bytes = None
        args.bandwidth_gbs, args.min_slots = DEFAULT_BANDWIDTH_GBS, 0
        for name, value in DEMO_SETTINGS.items():
            setattr(args, name, value)
        args.command = "analyze"
    if args.command == "plan":
        return run_plan_command(args)
    _check_before_work(args)
    if args.command == "analyze":
        return _analyze(args, started)
    from .trace import run, saved_expert_size

    expert = expert_size_for(args, args.model_config, saved=saved_expert_size(args.files))

    try:
        results = run(args)
    except ReportedByRankZero:
        return 1
    return 0 if results is None else _write_report(results, args, started, expert)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of the ``lrc-kernels`` console script; returns the exit status (lrc_kernels.cli.errors)."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_request:  # argparse exits on --help, --version and (one line) usage errors
        return int(exit_request.code or 0)
    return run_guarded(lambda: _run(args))


if __name__ == "__main__":
    sys.exit(main())
