"""Load saved routing (``lrc-kernels trace``): tensor files and JSON-lines logs, see docs/formats.md.

Every loader returns a :class:`~lrc_kernels.cli.report.Routing` or raises
:class:`~lrc_kernels.cli.report.UsageError` with a one-line message naming the file and the problem.
"""

from __future__ import annotations

import json
import pathlib
from typing import Optional

import torch

from .report import Routing, UsageError

TENSOR_SUFFIXES = (".npz", ".safetensors", ".pt", ".pth")
JSONL_SUFFIXES = (".jsonl", ".ndjson")


def _as_int_tensor(value, path: pathlib.Path, key: str) -> torch.Tensor:
    tensor = torch.as_tensor(value)
    if tensor.is_floating_point() or tensor.is_complex() or tensor.dtype == torch.bool:
        raise UsageError(f"{path}: '{key}' must hold integers, found dtype {tensor.dtype}")
    if tensor.dtype == torch.uint8:
        tensor = tensor.to(torch.int64)
    return tensor.to(torch.int64)


def _read_tensors(path: pathlib.Path) -> dict:
    suffix = path.suffix.lower()
    try:
        if suffix == ".npz":
            import numpy as np

            with np.load(path, allow_pickle=False) as archive:
                return {key: archive[key] for key in archive.files}
        if suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path))
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    except UsageError:
        raise
    except Exception as error:  # the readers raise many unrelated types on corrupt input
        raise UsageError(f"{path}: cannot read as {suffix[1:]}: {type(error).__name__}: {error}".splitlines()[0])
    if isinstance(loaded, torch.Tensor):
        return {"topk": loaded}
    if isinstance(loaded, dict):
        return loaded
    raise UsageError(f"{path}: expected a tensor or a dict with a 'topk' tensor, found {type(loaded).__name__}")


def load_tensor_trace(path: pathlib.Path, num_experts: int) -> Routing:
    """``topk`` ``[S, T, k]`` (one layer) or ``[layers, S, T, k]``, optional ``lengths [S]`` and ``layers [n]``."""
    tensors = _read_tensors(path)
    if "topk" not in tensors:
        raise UsageError(f"{path}: no tensor named 'topk' (found: {', '.join(sorted(map(str, tensors))) or 'none'})")
    topk = _as_int_tensor(tensors["topk"], path, "topk")
    if topk.ndim not in (3, 4):
        raise UsageError(f"{path}: 'topk' must have shape [S, T, k] or [layers, S, T, k], "
                         f"found shape {list(topk.shape)}")
    if 0 in topk.shape:
        raise UsageError(f"{path}: 'topk' of shape {list(topk.shape)} holds no routing (a zero-sized dimension)")
    if topk.ndim == 3:
        topk = topk.unsqueeze(0)
    lengths = None
    if "lengths" in tensors:
        lengths = _as_int_tensor(tensors["lengths"], path, "lengths")
        if list(lengths.shape) != [topk.shape[1]]:
            raise UsageError(f"{path}: 'lengths' must have shape [S] = [{topk.shape[1]}], found {list(lengths.shape)}")
        bad = (lengths < 0) | (lengths > topk.shape[2])
        if bool(bad.any()):
            s = int(bad.nonzero()[0, 0])
            raise UsageError(f"{path}: lengths[{s}] = {int(lengths[s])} is outside [0, T] = [0, {topk.shape[2]}]")
    layers = list(range(topk.shape[0]))
    if "layers" in tensors:
        numbers = _as_int_tensor(tensors["layers"], path, "layers")
        if list(numbers.shape) != [topk.shape[0]]:
            raise UsageError(f"{path}: 'layers' must have one entry per layer ({topk.shape[0]}), "
                             f"found shape {list(numbers.shape)}")
        layers = numbers.tolist()
    _check_ids(topk, lengths, num_experts, path)
    return Routing(topk=topk, num_experts=num_experts, layers=layers, lengths=lengths,
                   names=[f"layer {layer}" for layer in layers])


def _check_ids(topk: torch.Tensor, lengths: Optional[torch.Tensor], num_experts: int, path: pathlib.Path) -> None:
    """Ids in [-1, E) and no valid id twice in a row, for the tokens inside ``lengths``."""
    valid = torch.ones(topk.shape[1:3], dtype=torch.bool)
    if lengths is not None:
        valid = torch.arange(topk.shape[2]) < lengths[:, None]
    valid = valid.expand(topk.shape[0], -1, -1)[..., None]
    bad = ((topk < -1) | (topk >= num_experts)) & valid
    if bool(bad.any()):
        layer, seq, pos, slot = (int(i) for i in bad.nonzero()[0])
        value = int(topk[layer, seq, pos, slot])
        reason = f">= --num-experts {num_experts}" if value >= num_experts else "< -1"
        raise UsageError(f"{path}: expert id {value} at [layer {layer}, seq {seq}, pos {pos}, slot {slot}] is {reason}")
    ordered = topk.sort(dim=-1).values
    repeated = ((ordered[..., 1:] == ordered[..., :-1]) & (ordered[..., 1:] >= 0)).any(-1) & valid[..., 0]
    if bool(repeated.any()):
        layer, seq, pos = (int(i) for i in repeated.nonzero()[0])
        raise UsageError(f"{path}: expert ids {topk[layer, seq, pos].tolist()} at [layer {layer}, seq {seq}, "
                         f"pos {pos}] repeat an id")


def _field(record: dict, name: str, path: pathlib.Path, line: int, *, required: bool = True, default=None):
    if name not in record:
        if required:
            raise UsageError(f"{path}:{line}: missing field '{name}'")
        return default
    return record[name]


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def load_jsonl_trace(path: pathlib.Path, num_experts: int) -> Routing:
    """One JSON object per line: ``{"layer": 0, "seq": "req-17", "pos": 5, "experts": [3, 7]}``.

    ``layer`` defaults to 0; ``seq`` is any string or integer; ``pos`` is the token position (>= 0);
    ``experts`` lists the token's experts in processing order (``-1`` = no expert). Sequences keep the
    order of their first record. A sequence's length is its largest ``pos`` + 1 over all layers;
    positions without a record, and rows shorter than the longest, are filled with ``-1``.
    """
    records = []
    try:
        handle = path.open("r", encoding="utf-8")
    except OSError as error:
        raise UsageError(f"{path}: cannot open: {error.strerror}")
    with handle:
        for line_number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise UsageError(f"{path}:{line_number}: invalid JSON: {error.msg} (column {error.colno})")
            if not isinstance(record, dict):
                raise UsageError(f"{path}:{line_number}: expected a JSON object, found {type(record).__name__}")
            layer = _field(record, "layer", path, line_number, required=False, default=0)
            seq = _field(record, "seq", path, line_number)
            pos = _field(record, "pos", path, line_number)
            experts = _field(record, "experts", path, line_number)
            if not _is_int(layer) or layer < 0:
                raise UsageError(f"{path}:{line_number}: 'layer' must be an integer >= 0, found {layer!r}")
            if not (isinstance(seq, str) or _is_int(seq)):
                raise UsageError(f"{path}:{line_number}: 'seq' must be a string or an integer, found {seq!r}")
            if not _is_int(pos) or pos < 0:
                raise UsageError(f"{path}:{line_number}: 'pos' must be an integer >= 0, found {pos!r}")
            if not isinstance(experts, list) or not all(_is_int(e) for e in experts):
                raise UsageError(f"{path}:{line_number}: 'experts' must be a list of integers, found {experts!r}")
            for expert in experts:
                if expert < -1 or expert >= num_experts:
                    raise UsageError(f"{path}:{line_number}: expert id {expert} is outside [-1, --num-experts) "
                                     f"= [-1, {num_experts})")
            valid = [e for e in experts if e >= 0]
            if len(set(valid)) != len(valid):
                raise UsageError(f"{path}:{line_number}: 'experts' {experts} repeats an id")
            records.append((line_number, layer, seq, pos, experts))
    if not records:
        raise UsageError(f"{path}: no routing records")

    layer_numbers = sorted({layer for _, layer, _, _, _ in records})
    layer_index = {layer: i for i, layer in enumerate(layer_numbers)}
    seq_index: dict = {}
    for _, _, seq, _, _ in records:
        seq_index.setdefault((type(seq).__name__, seq), len(seq_index))
    num_slots = max(len(experts) for *_, experts in records)
    if num_slots == 0:
        raise UsageError(f"{path}: every record has an empty 'experts' list")
    lengths = torch.zeros(len(seq_index), dtype=torch.int64)
    for _, _, seq, pos, _ in records:
        s = seq_index[(type(seq).__name__, seq)]
        lengths[s] = max(int(lengths[s]), pos + 1)
    topk = torch.full((len(layer_numbers), len(seq_index), int(lengths.max()), num_slots), -1, dtype=torch.int64)
    seen: dict = {}
    for line_number, layer, seq, pos, experts in records:
        key = (layer_index[layer], seq_index[(type(seq).__name__, seq)], pos)
        if key in seen:
            raise UsageError(f"{path}:{line_number}: duplicate record for layer {layer}, seq {seq!r}, pos {pos} "
                             f"(first on line {seen[key]})")
        seen[key] = line_number
        topk[key][: len(experts)] = torch.tensor(experts, dtype=torch.int64)
    return Routing(topk=topk, num_experts=num_experts, layers=layer_numbers, lengths=lengths,
                   names=[f"layer {layer}" for layer in layer_numbers])


def load_trace(path: pathlib.Path, num_experts: int) -> Routing:
    """Dispatch on the file suffix (see :data:`TENSOR_SUFFIXES` and :data:`JSONL_SUFFIXES`)."""
    if num_experts < 1:
        raise UsageError(f"--num-experts must be >= 1, got {num_experts}")
    if not path.exists():
        raise UsageError(f"{path}: no such file")
    if not path.is_file():
        raise UsageError(f"{path}: not a regular file")
    suffix = path.suffix.lower()
    if suffix in JSONL_SUFFIXES:
        routing = load_jsonl_trace(path, num_experts)
    elif suffix in TENSOR_SUFFIXES:
        routing = load_tensor_trace(path, num_experts)
    else:
        accepted = ", ".join(TENSOR_SUFFIXES + JSONL_SUFFIXES)
        raise UsageError(f"{path}: unknown trace format '{suffix or '(no suffix)'}', expected one of {accepted}")
    if routing.topk.shape[-1] > num_experts:
        raise UsageError(f"{path}: k = {routing.topk.shape[-1]} expert slots per token exceed "
                         f"--num-experts {num_experts}")
    return routing
