"""Our JSON-lines layout: one object per (layer, sequence, token), as a serving engine might log routing.

``{"layer": 0, "seq": "req-17", "pos": 5, "experts": [3, 7]}``: ``layer`` (default 0) is the layer number,
``seq`` any string or integer, ``pos`` the token position (>= 0), ``experts`` the token's experts in
processing order (``-1`` = no expert). Sequences keep the order of their first record; a sequence's length is
its largest ``pos`` + 1 over all layers; positions without a record and shorter ``experts`` lists are filled
with ``-1``; a second record for the same (layer, seq, pos) is an error.
"""

from __future__ import annotations

import pathlib

import numpy as np

from ._common import (ReadOptions, brief, Sequences, TraceReadError, assemble, check_size, int_field, is_int,
                      json_lines)


def read(path: pathlib.Path, options: ReadOptions):
    records = []
    for line, record in json_lines(path, on_bytes=options.on_bytes):
        where = f"{path}:{line}"
        layer = int_field(record, "layer", where, required=False) or 0
        if "seq" not in record:
            raise TraceReadError(f"{where}: missing field 'seq'")
        seq = record["seq"]
        if not (isinstance(seq, str) or is_int(seq)):
            raise TraceReadError(f"{where}: 'seq' must be a string or an integer, found {brief(seq)}")
        pos = int_field(record, "pos", where)
        experts = record.get("experts")
        if "experts" not in record:
            raise TraceReadError(f"{where}: missing field 'experts'")
        if not isinstance(experts, list) or not all(is_int(e) for e in experts):
            raise TraceReadError(f"{where}: 'experts' must be a list of integers, found {brief(experts)}")
        records.append((line, layer, (type(seq).__name__, seq), pos, experts))
    if not records:
        raise TraceReadError(f"{path}: no routing records")
    layer_numbers = sorted({layer for _, layer, _, _, _ in records})
    layer_index = {layer: i for i, layer in enumerate(layer_numbers)}
    seq_index: dict = {}
    lengths: list = []
    for _, _, seq, pos, _ in records:
        s = seq_index.setdefault(seq, len(seq_index))
        if s == len(lengths):
            lengths.append(0)
        lengths[s] = max(lengths[s], pos + 1)
    num_slots = max(len(experts) for *_, experts in records)
    if num_slots == 0:
        raise TraceReadError(f"{path}: every record has an empty 'experts' list")
    # A huge 'pos' implies rows of that many tokens: refuse it, naming its line, before allocating them.
    line, _, _, pos, _ = max(records, key=lambda record: record[3])
    check_size((sum(lengths), len(layer_numbers), num_slots), f"{path}:{line}", f"'pos' {pos}")
    rows = [np.full((length, len(layer_numbers), num_slots), -1, dtype=np.int64) for length in lengths]
    seen: dict = {}
    for line, layer, seq, pos, experts in records:
        key = (layer_index[layer], seq_index[seq], pos)
        if key in seen:
            raise TraceReadError(f"{path}:{line}: duplicate record for layer {layer}, seq {seq[1]!r}, pos {pos} "
                                 f"(first on line {seen[key]})")
        seen[key] = line
        rows[key[1]][pos, key[0], : len(experts)] = experts
    return assemble(Sequences(rows), layer_numbers, options, str(path), meta={"format": "jsonl"})
