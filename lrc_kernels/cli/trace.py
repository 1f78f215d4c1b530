"""``lrc-kernels trace FILE [FILE ...]``: saved routing of our files and of vLLM, SGLang and Megatron-Core dumps.

Files are read one at a time (:mod:`lrc_kernels.io`) and reduced to exact additive statistics
(:func:`lrc_kernels.analyze.collect_statistics`), which are summed in file order, so memory holds one file's
routing plus per-sequence integers, never the whole workload. Under ``torchrun`` the files are sharded over the
ranks and the statistics all-reduced (:mod:`lrc_kernels.cli.distributed`).
"""

from __future__ import annotations

import argparse
import pathlib
import sys
import warnings
from dataclasses import replace
from typing import Optional

from lrc_kernels.io import (FORMATS, ReadOptions, TraceReadError, TraceReadWarning, expand_paths,
                            options_from_model_config, read_trace)

from lrc_kernels._checks import MAX_EXPERTS

from .errors import UsageError, int_option
from .progress import step_progress


def add_arguments(parser: argparse.ArgumentParser, positive_int) -> None:
    parser.add_argument("files", nargs="+", metavar="FILE",
                        help="trace files, directories (their files) or quoted globs")
    parser.add_argument("--format", choices=FORMATS, default="auto",
                        help="file format (docs/formats.md of the lrc_kernels source repository); 'auto' "
                             "recognises it from the content (default: %(default)s)")
    parser.add_argument("--num-experts", type=int_option(1, MAX_EXPERTS), default=None, metavar="E",
                        help="routed experts per layer; ids must lie in [-1, E) (not needed for trace files "
                             "written by RoutingTrace.save or SGLang dumps)")
    parser.add_argument("--layers", default=None, metavar="SPEC",
                        help="keep these layer numbers, e.g. 1-47 or 1,3,5 (vLLM/SGLang dumps count dense "
                             "layers too)")
    parser.add_argument("--num-layers", type=positive_int, default=None, metavar="N",
                        help="layers of SGLang's raw routed_experts bytes (or: layers of the model)")
    parser.add_argument("--top-k", type=positive_int, default=None, metavar="K",
                        help="experts per token of SGLang's raw routed_experts bytes")
    parser.add_argument("--model-config", "--config", type=pathlib.Path, default=None, metavar="CONFIG",
                        help="a model's config.json giving --num-layers, --top-k, --num-experts and the expert "
                             "size of the cache plan")
    parser.add_argument("--micro-batch-size", type=positive_int, default=None, metavar="B",
                        help="Megatron: sequences per micro-batch, to split its [s, b] token order")


def saved_expert_size(specs) -> Optional[dict]:
    """The expert size that ``lrc-kernels analyze --save-trace`` stored in trace files, when all of them agree.

    Reads only the headers of files written by ``RoutingTrace.save``; ``None`` when any file is of another
    format or the files disagree, so that the size is never taken from part of a workload.
    """
    from lrc_kernels.trace import RoutingTrace

    try:
        metas = [RoutingTrace.read_meta(path) for path in expand_paths(specs)]
    except (TraceReadError, ValueError):
        return None  # reading the files reports the problem itself, with its context
    sizes = {(m.get("expert_bytes"), m.get("expert_size_rule")) if isinstance(m, dict) else None for m in metas}
    if len(sizes) != 1 or None in sizes:
        return None
    ((expert_bytes, rule),) = sizes
    return {"expert_bytes": expert_bytes, "expert_size_rule": rule}


def read_options(args) -> ReadOptions:
    options = ReadOptions(num_experts=args.num_experts, layers=args.layers, num_layers=args.num_layers,
                          top_k=args.top_k, micro_batch_size=args.micro_batch_size)
    if args.model_config is not None:
        options = options_from_model_config(args.model_config, options)
    return options


class _Progress:
    """A bar over the bytes of this rank's files, moved every few MB of a JSON-lines file and at each file's end
    (on a terminal, unless --quiet; only rank 0)."""

    def __init__(self, files, enabled: bool):
        self.bar, self.read = None, 0
        if enabled and sys.stderr.isatty():   # a log file gets no bar
            try:
                from tqdm import tqdm
            except ImportError:
                return
            size = sum(path.stat().st_size for path in files if path.is_file())   # a missing file fails later
            self.bar = tqdm(total=size, desc="trace files", unit="B",
                            unit_scale=True, file=sys.stderr, leave=False)

    def on_bytes(self, count: int) -> None:
        self.read += count
        self.bar.update(count)

    def file_done(self, path: pathlib.Path, number: int, total: int) -> None:
        if self.bar is not None:
            self.bar.update(max(path.stat().st_size - self.read, 0))
            self.bar.set_postfix_str(f"{number}/{total} files")
        self.read = 0

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _file_statistics(path: pathlib.Path, args, options: ReadOptions):
    from lrc_kernels.analyze import collect_statistics

    trace = read_trace(path, args.format, options)
    try:
        return collect_statistics(trace, seg_lens=args.seg_lens, phase=args.phase,
                                  progress=step_progress(f"metrics of {path.name}", not args.quiet))
    except (ValueError, TypeError) as error:   # the API's message names the field; add the file
        raise UsageError(f"{path}: {str(error).splitlines()[0]}")


class ReportedByRankZero(UsageError):
    """A torchrun run's error, already printed by rank 0: every rank exits 1 without repeating it."""


def _warn_on_one_line(message, category, filename, lineno, file=None, line=None) -> None:
    prefix = "lrc-kernels: warning" if issubclass(category, TraceReadWarning) else category.__name__
    print(f"{prefix}: {str(message).splitlines()[0]}", file=sys.stderr)


def collect(args, rank: int = 0, world_size: int = 1):
    """``(statistics of every file in file order, the files)``; under torchrun on every rank, and every rank
    raises the first failed rank's error (none waits in a collective for a failed one)."""
    files = expand_paths(args.files)
    if world_size > len(files):
        raise UsageError(f"{len(files)} files for {world_size} ranks: torchrun needs at least one file per rank")
    mine = list(range(rank, len(files), world_size))
    progress = _Progress([files[index] for index in mine], not args.quiet and rank == 0)
    options = read_options(args)
    if progress.bar is not None:
        options = replace(options, on_bytes=progress.on_bytes)
    parts, error = [], None
    with warnings.catch_warnings():
        warnings.showwarning = _warn_on_one_line
        try:
            for number, index in enumerate(mine, start=1):
                parts.append((index, _file_statistics(files[index], args, options)))
                progress.file_done(files[index], number, len(mine))
        except (ValueError, TypeError, OSError) as failure:
            error = str(failure).splitlines()[0] if str(failure) else type(failure).__name__
        finally:
            progress.close()
    if world_size > 1:
        from .distributed import all_reduce_statistics, first_error

        try:
            error = first_error(error)
            if error is None:
                return all_reduce_statistics(parts, [str(path) for path in files]), files
        except ValueError as mismatch:
            error = str(mismatch)
        # Rank 0 prints before any rank exits: torchrun stops the other ranks when one exits non-zero.
        if rank == 0:
            print(f"lrc-kernels: error: {error}", file=sys.stderr, flush=True)
        import torch.distributed as dist

        dist.barrier()
        raise ReportedByRankZero(error)
    if error is not None:
        raise UsageError(error)
    total = parts[0][1]
    for index, statistics in parts[1:]:
        try:
            total = total + statistics
        except ValueError as mismatch:
            raise UsageError(f"{files[index]}: does not fit the files before it: {mismatch}")
    return total, files


def run(args) -> Optional[dict]:
    """The report of ``args.files`` (rank 0), or None on the other ranks of a torchrun launch."""
    from lrc_kernels.analyze import report

    from .distributed import close, process_group

    rank, world_size = process_group()
    try:
        statistics, files = collect(args, rank, world_size)
    finally:
        close()
    if rank != 0:
        return None
    results = report(statistics, num_bootstrap=args.num_bootstrap, confidence=args.confidence, seed=args.seed)
    results["meta"].update({"command": "trace", "files": [str(path) for path in files],
                            "title": files[0].name if len(files) == 1 else f"{len(files)} files"})
    if len(files) > 1:
        results["meta"]["source"] = [str(path) for path in files]
    return results
