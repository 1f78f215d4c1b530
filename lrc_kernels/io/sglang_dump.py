"""SGLang's expert-distribution recorder in ``per_token`` mode (``--expert-distribution-recorder-mode
per_token``, then ``/start_expert_distribution_record``, ``/stop_...``, ``/dump_expert_distribution_record``).

The dump is a ``torch.save`` dict: ``records`` (one per forward pass, in order) and
``last_physical_to_logical_map`` ``[layers, physical experts]``. A record holds ``topk_ids_of_layer`` int32
``[layers, tokens, 8]`` (unused slots ``-1``), ``positions`` ``[tokens]``, ``extend_seq_lens`` (tokens of each
request of a prefill pass) and ``forward_mode`` (1 = extend/prefill, 2 = decode, 4 = idle).

Ids are *physical* (expert replicas) and go through ``last_physical_to_logical_map[layer]``. The dump has no
request ids, so token streams are stitched from positions: a prefill segment starting at position 0 opens a
request; the first segment of a prefill pass that starts at p > 0 continues the request the previous pass ended
with when that one was a full prefill pass (as many tokens as the largest one: the chunked-prefill budget) ending
at p - 1 (chunked prefill); any other segment starting at p > 0
opens a request whose first p tokens were prefix-cached (kept as ``-1``); a decode
pass holds one token per running request, in the order the requests were admitted, each at its request's last
position + 1, and a running request absent from it has finished. Where two requests fit one token the earlier
admitted one gets it, with a warning. Mixed (3) and speculative (5 and above) passes cannot be stitched this way and are an error.
"""

from __future__ import annotations

import pathlib
import warnings
from dataclasses import dataclass, field

import numpy as np
import torch

from ._common import ReadOptions, Sequences, TraceReadError, TraceReadWarning, assemble, integer_array

EXTEND, DECODE, MIXED, IDLE = 1, 2, 3, 4


@dataclass
class _Request:
    first: int                                   # first forwarded position
    last: int                                    # last forwarded position
    chunks: list = field(default_factory=list)   # (start position, rows [n, layers, k])
    first_decode: int = -1                       # position of the first decode token, -1 = none yet


def load(path: pathlib.Path) -> dict:
    try:
        dump = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises many unrelated types on corrupt or truncated input
        raise TraceReadError(f"{path}: cannot read as a torch.save file: "
                             f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}")
    if not isinstance(dump, dict) or not isinstance(dump.get("records"), list):
        raise TraceReadError(f"{path}: not an SGLang expert-distribution dump (no 'records' list)")
    return dump


def _logical_ids(record: dict, where: str, mapping) -> np.ndarray:
    """``[tokens, layers, 8]`` logical ids of one record (``-1`` stays ``-1``)."""
    if "topk_ids_of_layer" not in record:
        raise TraceReadError(f"{where}: missing field 'topk_ids_of_layer' (was the recorder in per_token mode?)")
    ids = integer_array(record["topk_ids_of_layer"], where, "topk_ids_of_layer").astype(np.int64)
    if ids.ndim != 3:
        raise TraceReadError(f"{where}: 'topk_ids_of_layer' must be [layers, tokens, slots], found {list(ids.shape)}")
    if ids.shape[0] != mapping.shape[0]:
        raise TraceReadError(f"{where}: 'topk_ids_of_layer' has {ids.shape[0]} layers, "
                             f"last_physical_to_logical_map {mapping.shape[0]}")
    if ids.size and int(ids.max()) >= mapping.shape[1]:
        raise TraceReadError(f"{where}: 'topk_ids_of_layer' holds physical id {int(ids.max())}, beyond the "
                             f"{mapping.shape[1]} physical experts of last_physical_to_logical_map")
    logical = mapping[np.arange(ids.shape[0])[:, None, None], np.clip(ids, 0, None)]
    return np.where(ids < 0, -1, logical).transpose(1, 0, 2)


def _positions(record: dict, where: str, num_tokens: int) -> np.ndarray:
    if "positions" not in record:
        raise TraceReadError(f"{where}: missing field 'positions'")
    positions = integer_array(record["positions"], where, "positions").reshape(-1)
    if positions.shape[0] != num_tokens:
        raise TraceReadError(f"{where}: 'positions' has {positions.shape[0]} entries for {num_tokens} tokens")
    return positions


def _num_tokens(record: dict) -> int:
    ids = record.get("topk_ids_of_layer")
    return int(ids.shape[1]) if isinstance(ids, torch.Tensor) and ids.ndim == 3 else -1


class _Stitcher:
    """Requests from passes, as SGLang's scheduler forms them: a prefill pass admits new requests (appended to
    the running batch) and, in its first segment, continues the request the previous prefill pass ended with
    (chunked prefill); a decode pass forwards one token of every running request
    in admission order, so a running request absent from it has finished."""

    def __init__(self, full_pass: int):
        self.full_pass = full_pass  # tokens of the largest prefill pass: the chunked-prefill budget, as far as seen
        self.requests: list = []   # every request, in admission order
        self.running: list = []    # indices into requests
        self.chunked = None        # the last request of the previous pass when that was a prefill pass
        self.warned = False

    def extend(self, where: str, record: dict, ids: np.ndarray, positions: np.ndarray) -> None:
        lengths = record.get("extend_seq_lens")
        lengths = [] if lengths is None else integer_array(lengths, where, "extend_seq_lens").reshape(-1).tolist()
        if sum(lengths) != ids.shape[0]:
            raise TraceReadError(f"{where}: 'extend_seq_lens' sum to {sum(lengths)}, the pass has "
                                 f"{ids.shape[0]} tokens")
        start, chunked, last = 0, self.chunked, None
        for length in lengths:
            segment = positions[start:start + length]
            if length and not np.array_equal(segment, np.arange(segment[0], segment[0] + length)):
                raise TraceReadError(f"{where}: 'positions' of a prefill segment are not consecutive")
            if length:
                last = self._prefill(int(segment[0]), ids[start:start + length], chunked)
                chunked = None   # only the first segment of a pass can continue a chunked request
            start += length
        # Only a pass that used the whole budget can have cut its last request short.
        self.chunked = last if ids.shape[0] == self.full_pass else None

    def _prefill(self, first: int, rows: np.ndarray, chunked) -> int:
        if chunked is not None and first > 0 and self.requests[chunked].last + 1 == first:
            index = chunked
        else:   # a new request; one starting at first > 0 had its first tokens prefix-cached
            self.requests.append(_Request(first=first, last=first - 1))
            index = len(self.requests) - 1
            self.running.append(index)
        request = self.requests[index]
        request.chunks.append((first, rows))
        request.last = first + rows.shape[0] - 1
        return index

    def decode(self, where: str, ids: np.ndarray, positions: np.ndarray) -> None:
        cursor, kept, matched_last = 0, [], None
        for token, position in enumerate(positions.tolist()):
            while cursor < len(self.running) and self.requests[self.running[cursor]].last + 1 != position:
                self._finish(where, self.running[cursor], matched_last)
                cursor += 1
            if cursor == len(self.running):
                raise TraceReadError(f"{where}: decode token {token} at position {position} continues no running "
                                     "request (tokens of this dump are missing or out of order)")
            index = self.running[cursor]
            request = self.requests[index]
            matched_last = request.last
            if request.first_decode < 0:
                request.first_decode = position
            request.chunks.append((position, ids[token:token + 1]))
            request.last = position
            kept.append(index)
            cursor += 1
        for index in self.running[cursor:]:
            self._finish(where, index, matched_last)
        self.running, self.chunked = kept, None

    def _finish(self, where: str, index: int, matched_last) -> None:
        if self.requests[index].last == matched_last:
            # It and the request just matched ended at the same position: either may be the one that finished.
            self._warn(f"{where}: two running requests end at position {matched_last} and one of them finished; "
                       "the decode token went to the earlier-admitted one")

    def _warn(self, message: str) -> None:
        if not self.warned:   # once per file: the first case says what to look at
            warnings.warn(message, TraceReadWarning, stacklevel=3)
            self.warned = True

    def sequences(self, num_layers: int, top_k: int) -> Sequences:
        rows, prompts = [], []
        for request in self.requests:
            row = np.full((request.last + 1, num_layers, top_k), -1, dtype=np.int64)
            for start, chunk in request.chunks:
                row[start:start + chunk.shape[0]] = chunk[:, :, :top_k]
            rows.append(row)
            prompts.append(request.first_decode if request.first_decode >= 0 else request.last + 1)
        return Sequences(rows, prompts)


def read(path: pathlib.Path, options: ReadOptions):
    """One sequence per stitched request of an SGLang ``per_token`` dump."""
    dump = load(path)
    mapping = dump.get("last_physical_to_logical_map")
    if mapping is None:
        raise TraceReadError(f"{path}: missing field 'last_physical_to_logical_map': the ids are physical and "
                             "cannot be mapped to experts without it")
    mapping = integer_array(mapping, str(path), "last_physical_to_logical_map").astype(np.int64)
    if mapping.ndim != 2:
        raise TraceReadError(f"{path}: 'last_physical_to_logical_map' must be [layers, physical experts], "
                             f"found {list(mapping.shape)}")
    records = dump["records"]
    stitcher = _Stitcher(max((_num_tokens(r) for r in records if isinstance(r, dict) and r.get("forward_mode") == EXTEND),
                             default=0))
    used_slots = 0
    for number, record in enumerate(records):
        where = f"{path}: records[{number}]"
        if not isinstance(record, dict):
            raise TraceReadError(f"{where}: expected a dict, found {type(record).__name__}")
        mode = record.get("forward_mode")
        ids = _logical_ids(record, where, mapping)
        if mode == IDLE or ids.shape[0] == 0:
            continue
        positions = _positions(record, where, ids.shape[0])
        valid = (ids >= 0).any(axis=(0, 1))
        used_slots = max(used_slots, int(np.flatnonzero(valid)[-1]) + 1 if valid.any() else 0)
        if mode == EXTEND:
            stitcher.extend(where, record, ids, positions)
        elif mode == DECODE:
            stitcher.decode(where, ids, positions)
        elif mode == MIXED:
            raise TraceReadError(f"{where}: 'forward_mode' 3 (mixed prefill and decode) cannot be split into "
                                 "requests without request ids; record without --enable-mixed-chunk")
        else:
            raise TraceReadError(f"{where}: 'forward_mode' {mode!r} (speculative or other passes) cannot be "
                                 "stitched into requests; record without speculative decoding")
    top_k = options.top_k if options.top_k is not None else max(used_slots, 1)
    experts = int(mapping.max()) + 1 if mapping.size else None
    return assemble(stitcher.sequences(mapping.shape[0], top_k), list(range(mapping.shape[0])), options,
                    str(path), num_experts=experts, meta={"format": "sglang-dump"})
