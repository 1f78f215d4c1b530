"""``torchrun --nproc-per-node N -m lrc_kernels.cli trace FILES...``: files sharded over ranks, statistics
all-reduced.

Rank r reads files r, r + N, r + 2N, ... and reduces each to :class:`lrc_kernels.analyze.Statistics`. These
are exact integers with one row per sequence (in file order), so the ranks place their rows at the files'
global offsets in zero tensors and one ``all_reduce(SUM)`` (``MAX`` for the longest row) assembles the
statistics of all files in file order, and the files' metas, gathered, merge in file order as ``+`` merges
them: the report of rank 0 is bit for bit the one-process report.
"""

from __future__ import annotations

import os
from dataclasses import replace
from typing import Iterator, List, Optional, Tuple

import torch

from lrc_kernels._meta import merged_meta
from lrc_kernels.analyze import Statistics, StreamStatistics

ROWS, SUM, MAX = "rows", "sum", "max"


def process_group() -> Tuple[int, int]:
    """``(rank, world size)``: a torchrun launch (``WORLD_SIZE`` > 1) joins a gloo group, else ``(0, 1)``."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return 0, 1
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group("gloo")
    return dist.get_rank(), dist.get_world_size()


def close() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def first_error(message: Optional[str]) -> Optional[str]:
    """The first rank's error message, on every rank (so no rank waits in a collective for a failed one)."""
    import torch.distributed as dist

    messages: List[Optional[str]] = [None] * dist.get_world_size()
    dist.all_gather_object(messages, message)
    return next((m for m in messages if m is not None), None)


def _nodes(statistics: Statistics) -> Iterator[Statistics]:
    yield statistics
    for part in statistics.phases.values():
        yield from _nodes(part)


def _numbers(statistics: Statistics) -> Iterator[Tuple[torch.Tensor, str]]:
    """Every number of ``statistics`` with how it combines over files, in a fixed order."""
    for node in _nodes(statistics):
        yield torch.tensor([node.num_tokens]), SUM
        yield torch.tensor([node.max_tokens]), MAX
        for stream in node.layers + (node.model,):
            yield from ((value, ROWS) for value in stream.srp.values())
            yield from ((value, ROWS) for value in stream.hits.values())
            yield stream.num_references, ROWS
            yield from ((value, SUM) for value in stream.coverage.values())


def _rebuild(template: Statistics, values: Iterator[torch.Tensor], num_sequences: int,
             metas: Iterator[dict]) -> Statistics:
    """``template`` with its numbers taken from ``values`` (in :func:`_numbers` order) and the metas of its
    nodes from ``metas`` (in :func:`_nodes` order)."""
    def stream(part: StreamStatistics) -> StreamStatistics:
        return StreamStatistics(srp={key: next(values) for key in part.srp},
                                hits={key: next(values) for key in part.hits},
                                num_references=next(values),
                                coverage={key: next(values) for key in part.coverage})

    def node(part: Statistics) -> Statistics:
        meta = next(metas)
        num_tokens, max_tokens = int(next(values)), int(next(values))
        layers = tuple(stream(layer) for layer in part.layers)
        model = stream(part.model)
        phases = {name: node(sub) for name, sub in part.phases.items()}
        return replace(part, num_sequences=num_sequences, num_tokens=num_tokens, max_tokens=max_tokens,
                       layers=layers, model=model, phases=phases, meta=meta)

    return node(template)


def all_reduce_statistics(parts: List[Tuple[int, Statistics]], files: List[str]) -> Statistics:
    """The statistics of all ``files`` in file order, on every rank, from each rank's ``(file index, statistics)``.

    Rank 0 holds file 0, whose statistics give the structure (layers, L, policies, meta) every rank fills; a
    file that does not fit it fails every rank with one message (before any rank waits in the reduction)."""
    import torch.distributed as dist

    counts = torch.zeros(len(files), dtype=torch.int64)
    for index, statistics in parts:
        counts[index] = statistics.num_sequences
    dist.all_reduce(counts)
    offsets = (torch.cumsum(counts, 0) - counts).tolist()
    total = int(counts.sum())
    shared = [None]
    if dist.get_rank() == 0:
        first = parts[0][1]
        shared[0] = _rebuild(first, iter([value[:0] if kind == ROWS else torch.zeros_like(value)
                                          for value, kind in _numbers(first)]), 0,
                             iter([node.meta for node in _nodes(first)]))
    dist.broadcast_object_list(shared, src=0)
    template = shared[0]
    mismatch = None
    for index, statistics in parts:
        try:
            template + statistics   # the checks of adding them in one process (layers, E, k, L, policies)
        except ValueError as error:
            mismatch = f"{files[index]}: does not fit the files before it: {error}"
            break
    mismatch = first_error(mismatch)
    if mismatch is not None:
        raise ValueError(mismatch)
    layout = list(_numbers(template))
    totals = [torch.zeros((total,) + tuple(value.shape[1:]), dtype=torch.int64) if kind == ROWS
              else torch.zeros(value.shape, dtype=torch.int64) for value, kind in layout]
    for index, statistics in parts:
        for total_value, (value, kind) in zip(totals, _numbers(statistics)):
            if kind == ROWS:
                total_value[offsets[index]: offsets[index] + value.shape[0]] = value
            elif kind == SUM:
                total_value += value
            else:
                torch.maximum(total_value, value.to(torch.int64), out=total_value)
    summed = [value for value, (_, kind) in zip(totals, layout) if kind != MAX]
    largest = [value for value, (_, kind) in zip(totals, layout) if kind == MAX]
    for group, operation in ((summed, dist.ReduceOp.SUM), (largest, dist.ReduceOp.MAX)):
        flat = torch.cat([value.reshape(-1) for value in group])
        dist.all_reduce(flat, op=operation)
        for value, piece in zip(group, flat.split([value.numel() for value in group])):
            value.copy_(piece.view(value.shape))
    values = iter(value.to(template_value.dtype) for value, (template_value, _) in zip(totals, layout))
    return _rebuild(template, values, total, _merged_metas(parts, len(files)))


def _merged_metas(parts: List[Tuple[int, Statistics]], num_files: int) -> Iterator[dict]:
    """Each node's meta (in :func:`_nodes` order) merged over all files in file order, on every rank."""
    import torch.distributed as dist

    gathered: List[Optional[list]] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, [(index, [node.meta for node in _nodes(statistics)])
                                      for index, statistics in parts])
    by_file = dict(pair for pairs in gathered for pair in pairs)
    per_node = zip(*(by_file[index] for index in range(num_files)))
    return iter([merged_meta(list(metas)) for metas in per_node])
