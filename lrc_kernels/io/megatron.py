"""Megatron-Core's router trace (``--moe-routing-trace-path DIR``: files ``router_trace_rank{r}.jsonl``).

One JSON record per (step, layer) forward of a router: ``step``, ``layer``, ``num_tokens``, ``topk``,
``top_indices`` ``[num_tokens][topk]``, optionally ``block`` (only ``"decoder"`` is kept; ``"mtp"`` records
are skipped), ``stage`` (only the first stage seen is kept), ``rank``. Tokens are in Megatron's ``[s, b]``
order (token ``t = s·B + b``), so ``--micro-batch-size B`` splits them into B sequences of ``num_tokens / B``
tokens. A (step, layer) seen again within a step is the step's next micro-batch (gradient accumulation).
Layers keep their numbers (dense layers leave gaps).
"""

from __future__ import annotations

import pathlib

import numpy as np

from ._common import ReadOptions, Sequences, TraceReadError, assemble, int_field, is_int, json_lines


def _indices(record: dict, where: str, top_k: int) -> np.ndarray:
    num_tokens = int_field(record, "num_tokens", where)
    if "top_indices" not in record:
        raise TraceReadError(f"{where}: missing field 'top_indices'")
    try:
        indices = np.array(record["top_indices"], dtype=np.int64)
    except (ValueError, TypeError, OverflowError):
        raise TraceReadError(f"{where}: 'top_indices' is not a [num_tokens][topk] list of integers")
    if indices.size == 0 and num_tokens == 0:
        return np.zeros((0, top_k), np.int64)
    if indices.ndim != 2 or indices.shape != (num_tokens, top_k):
        raise TraceReadError(f"{where}: 'top_indices' has shape {list(indices.shape)}, expected "
                             f"[num_tokens, topk] = [{num_tokens}, {top_k}]")
    return indices


def read(path: pathlib.Path, options: ReadOptions):
    """The :class:`~lrc_kernels.RoutingTrace` of every micro-batch's B sequences in ``path``."""
    batch = options.micro_batch_size
    if batch is None:
        raise TraceReadError(f"{path}: Megatron's tokens are in [s, b] order: pass --micro-batch-size B")
    groups: dict = {}          # (step, micro-batch) -> {layer: (line, indices)}
    seen_in_step: dict = {}    # (step, layer) -> micro-batches seen
    stage = top_k = None
    for line, record in json_lines(path, on_bytes=options.on_bytes):
        where = f"{path}:{line}"
        if record.get("block", "decoder") != "decoder":
            continue
        stage = record.get("stage") if stage is None else stage
        if record.get("stage", stage) != stage:
            continue
        step = int_field(record, "step", where)
        layer = int_field(record, "layer", where)
        if options.num_layers is not None and layer >= options.num_layers:
            raise TraceReadError(f"{where}: 'layer' {layer}: unknown layer (the model has --num-layers "
                                 f"{options.num_layers})")
        record_k = int_field(record, "topk", where, minimum=1)
        if top_k is not None and record_k != top_k:
            raise TraceReadError(f"{where}: 'topk' {record_k}, but earlier records have {top_k}")
        top_k = record_k
        micro = seen_in_step.get((step, layer), 0)
        seen_in_step[(step, layer)] = micro + 1
        groups.setdefault((step, micro), {})[layer] = (line, _indices(record, where, top_k))
    layer_numbers = sorted({layer for group in groups.values() for layer in group})
    rows = []
    for (step, micro), group in groups.items():
        first_line = min(line for line, _ in group.values())
        missing = [layer for layer in layer_numbers if layer not in group]
        if missing:
            raise TraceReadError(f"{path}:{first_line}: step {step} (micro-batch {micro}) has no record for layer "
                                 f"{missing[0]}, which other steps route")
        tokens = {group[layer][1].shape[0] for layer in layer_numbers}
        if len(tokens) != 1:
            raise TraceReadError(f"{path}:{first_line}: step {step} (micro-batch {micro}): 'num_tokens' differs "
                                 f"between layers ({sorted(tokens)})")
        num_tokens = tokens.pop()
        if num_tokens % batch:
            raise TraceReadError(f"{path}:{first_line}: step {step}: 'num_tokens' {num_tokens} does not divide "
                                 f"by --micro-batch-size {batch}")
        stacked = np.stack([group[layer][1] for layer in layer_numbers], axis=1)   # [s·B, layers, k]
        by_sequence = stacked.reshape(num_tokens // batch, batch, len(layer_numbers), top_k)
        rows.extend(by_sequence[:, b] for b in range(batch))
    meta = {"format": "megatron", "micro_batch_size": batch}
    if stage is not None:
        meta["stage"] = stage
    return assemble(Sequences(rows), layer_numbers, options, str(path), meta=meta)


def looks_like(record: dict) -> bool:
    return "top_indices" in record and is_int(record.get("layer"))
