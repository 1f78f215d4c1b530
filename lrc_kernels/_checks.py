"""Input validation shared by every public entry point.

Each check raises ``TypeError`` (wrong kind of object or dtype) or ``ValueError`` (wrong shape, range or
option) with a message that names the argument, the expected value and the received value (SPEC §1, §9).
"""

from __future__ import annotations

import importlib
import math
import os
from typing import Optional, Sequence, Tuple

import torch

BACKENDS = ("auto", "cpu", "triton")

_SIGNED_INT_DTYPES = (torch.int8, torch.int16, torch.int32, torch.int64)


def check_int(value, name: str, *, minimum: Optional[int] = None) -> int:
    """Return ``value`` as a Python int; reject bools, floats and values below ``minimum``."""
    if isinstance(value, bool) or not isinstance(value, int):
        if isinstance(value, torch.Tensor) and value.ndim == 0 and value.dtype in _SIGNED_INT_DTYPES:
            value = int(value)
        else:
            raise TypeError(f"{name}: expected an int, received {type(value).__name__} {value!r}")
    if minimum is not None and value < minimum:
        raise ValueError(f"{name}: expected an int >= {minimum}, received {value}")
    return value


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
    """A tensor with a signed integer dtype (bool, unsigned and floating dtypes are rejected)."""
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor of a signed integer dtype, "
                        f"received {type(tensor).__name__}")
    if tensor.dtype not in _SIGNED_INT_DTYPES:
        raise TypeError(f"{name}: expected a signed integer dtype (int8/16/32/64), received {tensor.dtype}")
    return tensor


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
    num_experts = check_int(num_experts, "num_experts", minimum=1)
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


def resolve_backend(backend: str, device: torch.device) -> str:
    """Map ``"auto"`` to ``"triton"`` for CUDA tensors and ``"cpu"`` otherwise; check triton is usable."""
    check_choice(backend, "backend", BACKENDS)
    if backend == "auto":
        return "triton" if device.type == "cuda" else "cpu"
    if backend == "triton" and device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError("backend: 'triton' needs CUDA tensors, or TRITON_INTERPRET=1 set before triton is "
                         f"imported to run the kernels on the CPU; received tensors on {device}")
    return backend


def check_weights(weights, num_seqs: int, num_bootstrap: int) -> torch.Tensor:
    """An explicit bootstrap weight matrix: non-negative integers ``[S, B]``."""
    check_int_tensor(weights, "weights")
    if weights.ndim != 2 or weights.shape[0] != num_seqs:
        raise ValueError(f"weights: expected shape [S, B] with S = {num_seqs}, received {tuple(weights.shape)}")
    if num_bootstrap not in (0, weights.shape[1]):
        raise ValueError(f"num_bootstrap: expected 0 or weights.shape[1] = {weights.shape[1]} when weights are "
                         f"given, received {num_bootstrap}")
    if bool((weights < 0).any()):
        raise ValueError("weights: expected non-negative multiplicities, received a negative entry")
    return weights.to(torch.int64)


def run_backend(family: str, function: str, backend: str, topk: torch.Tensor, lengths: torch.Tensor,
                *args) -> torch.Tensor:
    """Call ``lrc_kernels.<backend>.<family>.<function>(topk, lengths, *args)`` on validated inputs.

    The backend module is imported on first use, so ``import lrc_kernels`` neither imports triton nor
    compiles anything. The CPU path runs on host copies of CUDA tensors and returns to the input device.
    """
    backend = resolve_backend(backend, topk.device)
    module = importlib.import_module(f"lrc_kernels.{backend}.{family}")
    if backend == "cpu" and topk.device.type != "cpu":
        return getattr(module, function)(topk.cpu(), lengths.cpu(), *args).to(topk.device)
    return getattr(module, function)(topk, lengths, *args)
