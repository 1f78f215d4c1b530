"""Input validation shared by every public entry point.

Each check raises ``TypeError`` (wrong kind of object or dtype) or ``ValueError`` (wrong shape, range or
option) with a message that names the argument, the expected value and the received value (SPEC §1, §9).
"""

from __future__ import annotations

import math
import os
from typing import Optional, Sequence, Tuple

import torch

_SIGNED_INT_DTYPES = (torch.int8, torch.int16, torch.int32, torch.int64)
INT64_MAX = (1 << 63) - 1

# Ids index per-expert tables (validation stamps, counts, cache ranks), so E bounds memory per sequence.
# 2^24 covers a model-level stream of 16384 layers x 1024 experts with 128 MiB per int64 table.
MAX_EXPERTS = 1 << 24


def check_int(value, name: str, *, minimum: Optional[int] = None, maximum: int = INT64_MAX) -> int:
    """Return ``value`` as a Python int; reject bools, floats and values outside ``[minimum, maximum]``.

    Every int argument ends up in int64 arithmetic, so ``maximum`` is at most 2^63 - 1 by default.
    """
    if isinstance(value, bool) or not isinstance(value, int):
        if isinstance(value, torch.Tensor) and value.ndim == 0 and value.dtype in _SIGNED_INT_DTYPES:
            value = int(value)
        else:
            raise TypeError(f"{name}: expected an int, received {type(value).__name__} {_short(value)}")
    if minimum is not None and value < minimum:
        raise ValueError(f"{name}: expected an int >= {minimum}, received {_short(value)}")
    if value > maximum:
        raise ValueError(f"{name}: expected an int <= {maximum}, received {_short(value)}")
    return value


def _short(value) -> str:
    """``repr`` cut to 60 characters: a 5000-digit int or a huge tensor stays a one-line message."""
    text = repr(value) if not isinstance(value, int) or value.bit_length() < 190 else f"an int of {value.bit_length()} bits"
    return text if len(text) <= 60 else text[:57] + "..."


def check_num_experts(num_experts) -> int:
    """E in ``[1, MAX_EXPERTS]``."""
    return check_int(num_experts, "num_experts", minimum=1, maximum=MAX_EXPERTS)


def _memory_budget() -> int:
    """Memory available to a new array now, in bytes: Linux's MemAvailable, else the physical memory, else
    64 GiB where the OS says neither."""
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 64 << 30


def check_allocation(shape: Sequence[int], name: str, what: str, *, bytes_per_item: int = 8) -> None:
    """Refuse, before any work, an array that the arguments imply but this machine cannot hold.

    ``name`` is the argument to blame, ``what`` describes the array (e.g. ``"histograms [S, E, L+1]"``).
    """
    num_bytes = math.prod(int(n) for n in shape) * bytes_per_item
    budget = _memory_budget()
    if num_bytes > budget:
        raise ValueError(f"{name}: {what} of shape {list(shape)} would need {num_bytes / 2**30:.3g} GiB, "
                         f"more than the {budget / 2**30:.3g} GiB of memory available")


def check_confidence(confidence) -> float:
    if isinstance(confidence, bool) or not isinstance(confidence, (int, float)):
        raise TypeError(f"confidence: expected a float in (0, 1), received {type(confidence).__name__}")
    if not 0.0 < float(confidence) < 1.0 or math.isnan(confidence):
        raise ValueError(f"confidence: expected a float in (0, 1), received {confidence}")
    return float(confidence)


def check_choice(value, name: str, choices: Sequence[str]) -> str:
    if value not in choices:
        raise ValueError(f"{name}: expected one of {tuple(choices)}, received {value!r}")
    return value


def check_int_tensor(tensor, name: str) -> torch.Tensor:
    """A dense tensor with data and a signed integer dtype (bool, unsigned, floating, sparse, meta rejected)."""
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor of a signed integer dtype, "
                        f"received {type(tensor).__name__}")
    if tensor.layout != torch.strided:
        raise TypeError(f"{name}: expected a dense (strided) tensor, received layout {tensor.layout}; "
                        "call .to_dense() first")
    if tensor.device.type == "meta":
        raise TypeError(f"{name}: expected a tensor with data, received a tensor on the meta device")
    if tensor.dtype not in _SIGNED_INT_DTYPES:
        raise TypeError(f"{name}: expected a signed integer dtype (int8/16/32/64), received {tensor.dtype}")
    return tensor


def stack_layers(topk_layers, name: str) -> torch.Tensor:
    """A ``[n_layers, ...]`` tensor, or a non-empty list/tuple of equally shaped tensors stacked into one."""
    if not isinstance(topk_layers, (list, tuple)):
        return topk_layers
    if len(topk_layers) == 0:
        raise ValueError(f"{name}: expected at least one layer, received an empty {type(topk_layers).__name__}")
    for index, layer in enumerate(topk_layers):
        check_int_tensor(layer, f"{name}[{index}]")
    shapes = [tuple(layer.shape) for layer in topk_layers]
    if len(set(shapes)) != 1:
        raise ValueError(f"{name}: expected tensors of equal shape (equal S, T and k in every layer), "
                         f"received shapes {shapes[:8]}{' ...' if len(shapes) > 8 else ''}")
    devices = {layer.device for layer in topk_layers}
    if len(devices) != 1:
        raise ValueError(f"{name}: expected every layer on one device, received {sorted(map(str, devices))}")
    return torch.stack(list(topk_layers))


def _first_index(mask: torch.Tensor) -> Tuple[int, ...]:
    return tuple(int(i) for i in mask.nonzero()[0])


def check_topk(topk, num_experts: int, *, name: str = "topk", batched_rank: int = 3,
               lengths=None) -> Tuple[torch.Tensor, torch.Tensor, bool]:
    """Validate a routing tensor and normalise it for the backends.

    Args:
        topk: ``[S, T, k]`` (or ``[T, k]``, one sequence) signed integer expert ids, ``-1`` = no expert.
        num_experts: E; valid ids lie in ``[0, E)``.
        batched_rank: 3 for ``[S, T, k]``; 4 for ``[n_layers, S, T, k]`` (model level).
        lengths: optional int ``[S]``; entries of sequence s at or beyond ``lengths[s]`` are neither read
            nor validated (SPEC §1) and come back as ``-1``.

    Returns:
        ``(topk, lengths, was_unbatched)``: ``topk`` int32 contiguous with ``batched_rank`` dims, ``lengths``
        int64 contiguous ``[S]`` on the same device. ``topk`` may share memory with the input (a CPU input
        that is already int32, contiguous and full length is not copied), so callers only read it.
    """
    num_experts = check_num_experts(num_experts)
    check_int_tensor(topk, name)
    if topk.ndim not in (batched_rank - 1, batched_rank):
        dims = "[n_layers, S, T, k]" if batched_rank == 4 else "[S, T, k]"
        raise ValueError(f"{name}: expected a {batched_rank}-D tensor {dims} or a {batched_rank - 1}-D tensor "
                         f"(one sequence), received {topk.ndim}-D with shape {tuple(topk.shape)}")
    unbatched = topk.ndim == batched_rank - 1
    if unbatched:
        topk = topk.unsqueeze(-3)
    num_slots = topk.shape[-1]
    if num_slots > num_experts:
        raise ValueError(f"{name}: expected k <= num_experts = {num_experts} slots per token, "
                         f"received k = {num_slots} (shape {tuple(topk.shape)})")
    num_seqs, num_tokens = topk.shape[-3], topk.shape[-2]
    lengths = check_lengths(lengths, num_seqs, num_tokens, topk.device)

    if topk.device.type == "cpu":
        ids = _normalise_on_cpu(topk, lengths, num_experts, name)
    else:
        ids = _normalise_with_torch(topk, lengths, num_experts, name)
    return ids, lengths, unbatched


def _normalise_on_cpu(topk: torch.Tensor, lengths: torch.Tensor, num_experts: int, name: str) -> torch.Tensor:
    from lrc_kernels.cpu.validate import normalise_topk

    leading = topk.shape[:-2]
    num_layers = math.prod(leading[:-1])
    rows = topk.reshape(num_layers * leading[-1], *topk.shape[-2:])
    ids, problem = normalise_topk(rows, lengths.repeat(num_layers), num_experts)
    if problem is None:
        return ids.reshape(topk.shape)
    kind, (sequence, token, slot) = problem
    where = (*torch.unravel_index(torch.tensor(sequence), leading), token)
    where = tuple(int(i) for i in where)
    if kind == "range":
        raise _id_range_error(name, num_experts, topk, where + (slot,))
    raise _repeated_id_error(name, topk, where)


def _id_range_error(name: str, num_experts: int, topk: torch.Tensor, index: Tuple[int, ...]) -> ValueError:
    return ValueError(f"{name}: expected expert ids in [-1, {num_experts}) (num_experts = {num_experts}), "
                      f"received {int(topk[index])} at index {index}")


def _repeated_id_error(name: str, ids: torch.Tensor, row: Tuple[int, ...]) -> ValueError:
    return ValueError(f"{name}: expected distinct expert ids within a token's row (-1 may repeat), "
                      f"received {ids[row].tolist()} at row {row}")


def _normalise_with_torch(topk: torch.Tensor, lengths: torch.Tensor, num_experts: int,
                          name: str) -> torch.Tensor:
    num_tokens = topk.shape[-2]
    valid_token = torch.arange(num_tokens, device=topk.device) < lengths[:, None]  # [S, T]
    ids = torch.where(valid_token[..., None], topk.to(torch.int32), -1).contiguous()
    bad = (topk < -1) | (topk >= num_experts)
    bad &= valid_token[..., None]
    if bool(bad.any()):
        raise _id_range_error(name, num_experts, topk, _first_index(bad))
    if topk.shape[-1] > 1:
        _check_distinct_rows(ids, name)
    return ids


def _check_distinct_rows(ids: torch.Tensor, name: str, rows_per_chunk: int = 1 << 16) -> None:
    """Reject a valid id repeated within one row; sorting in chunks bounds the temporary memory."""
    rows = ids.reshape(-1, ids.shape[-1])
    for start in range(0, rows.shape[0], rows_per_chunk):
        ordered = rows[start:start + rows_per_chunk].sort(dim=-1).values
        repeated = ((ordered[:, 1:] == ordered[:, :-1]) & (ordered[:, 1:] >= 0)).any(dim=-1)
        if bool(repeated.any()):
            flat_row = start + int(repeated.nonzero()[0, 0])
            row = tuple(int(i) for i in torch.unravel_index(torch.tensor(flat_row), ids.shape[:-1]))
            raise _repeated_id_error(name, ids, row)


def check_lengths(lengths, num_seqs: int, num_tokens: int, device, *, name: str = "lengths") -> torch.Tensor:
    """``lengths``: optional int ``[S]`` with values in ``[0, T]``; ``None`` means every sequence has T tokens."""
    if lengths is None:
        return torch.full((num_seqs,), num_tokens, dtype=torch.int64, device=device)
    check_int_tensor(lengths, name)
    if tuple(lengths.shape) != (num_seqs,):
        raise ValueError(f"{name}: expected shape [S] = [{num_seqs}], received {tuple(lengths.shape)}")
    lengths = lengths.to(device=device, dtype=torch.int64).contiguous()
    out_of_range = (lengths < 0) | (lengths > num_tokens)
    if bool(out_of_range.any()):
        s = _first_index(out_of_range)[0]
        raise ValueError(f"{name}: expected values in [0, T] = [0, {num_tokens}], "
                         f"received {int(lengths[s])} at index {s}")
    return lengths


# Bootstrap weights meet float64 (matrix products, replicate totals), which is exact below 2^53; half of
# that leaves room for the products with counts checked in srp.weighted_sum.
MAX_WEIGHT_TOTAL = 1 << 52


def check_weights(weights, num_seqs: int, num_bootstrap: int) -> torch.Tensor:
    """An explicit bootstrap weight matrix ``[S, B]``, the one rule of every bootstrap entry point.

    Entries are non-negative integers, every replicate (column) draws at least one sequence when S > 0,
    and every column total stays below 2^52 so that float64 sums of weights are exact.
    """
    check_int_tensor(weights, "weights")
    if weights.ndim != 2 or weights.shape[0] != num_seqs:
        raise ValueError(f"weights: expected shape [S, B] with S = {num_seqs}, received {tuple(weights.shape)}")
    if num_bootstrap not in (0, weights.shape[1]):
        raise ValueError(f"num_bootstrap: expected 0 or weights.shape[1] = {weights.shape[1]} when weights are "
                         f"given, received {num_bootstrap}")
    if bool((weights < 0).any()):
        raise ValueError("weights: expected non-negative multiplicities, received a negative entry")
    if num_seqs > 0 and weights.numel():
        totals = weights.to(torch.float64).sum(0)  # float64: an int64 sum of huge entries could wrap
        empty = totals == 0
        if bool(empty.any()):
            raise ValueError(f"weights: expected every replicate (column) to draw at least one sequence, "
                             f"received column {int(empty.nonzero()[0, 0])} of all zeros")
        if float(totals.max()) >= MAX_WEIGHT_TOTAL:
            raise ValueError(f"weights: expected column totals below 2^52 (exact in float64), "
                             f"received a column total of {float(totals.max()):.4g}")
    return weights.to(torch.int64)
