"""Which backend runs an operation, and running it on validated input.

Each backend package declares what it can run, ``supports(op, **sizes) -> (ok, reason)``
(:func:`lrc_kernels.cpu.supports`, :func:`lrc_kernels.triton.supports`); this module is the one place that
consults them. ``backend="auto"`` tries Triton first for CUDA tensors and the CPU loops otherwise, and falls
back to the next backend when one declines (the reason goes to the ``lrc_kernels.dispatch`` debug log and is
returned by :func:`choose_backend`); an explicit backend that declines raises ``ValueError`` with its reason.

Backend modules ``lrc_kernels.<backend>.<family>`` are imported on first use, so ``import lrc_kernels``
neither imports triton nor numba nor compiles anything.
"""

from __future__ import annotations

import importlib
import logging
from typing import List, NamedTuple, Optional, Sequence, Tuple

import torch

from . import cpu as cpu_backend
from . import triton as triton_backend
from ._checks import check_choice

BACKENDS = ("auto", "cpu", "triton")
# op -> the family module lrc_kernels.<backend>.<family> that implements it
OPS = {"srp_counts": "srp", "srp_pooled_counts": "srp", "segment_coverage": "srp", "cache_hits": "cache",
       "cache_hits_many": "cache"}
_SUPPORTS = {"cpu": cpu_backend.supports, "triton": triton_backend.supports}

_log = logging.getLogger(__name__)


class BackendChoice(NamedTuple):
    """The backend that runs an operation and why the ones tried before it declined."""

    backend: str
    declined: Tuple[Tuple[str, str], ...] = ()  # (backend, reason) in the order tried


def check_backend(backend) -> str:
    """``backend`` is one of :data:`BACKENDS` (checked before any work, so a typo fails fast)."""
    return check_choice(backend, "backend", BACKENDS)


def choose_backend(op: str, backend: str, topk: torch.Tensor, num_experts: int,
                   policy: Optional[str] = None) -> BackendChoice:
    """The backend that runs ``op`` on a validated ``[S, T, k]`` routing tensor.

    Args:
        op: a key of :data:`OPS` (for ``cache_hits_many``, ask per cache as ``cache_hits``).
        backend: ``"auto"``, ``"cpu"`` or ``"triton"``.
        topk: the validated routing tensor (its device and shape are what backends decide on).
        num_experts: E (``n * E`` for a model-level stream).
        policy: the cache policy for ``"cache_hits"``.

    Raises:
        ValueError: an unknown backend, or an explicit backend that cannot run this input (with its reason).

    Example:
        >>> choose_backend("srp_counts", "auto", torch.zeros(1, 4, 1, dtype=torch.int32), 4).backend
        'cpu'
    """
    check_backend(backend)
    sizes = dict(device=topk.device, num_experts=num_experts, num_tokens=topk.shape[-2],
                 num_slots=topk.shape[-1], policy=policy)
    if backend != "auto":
        ok, reason = _SUPPORTS[backend](op, **sizes)
        if not ok:
            raise ValueError(f"backend: {backend!r} {reason}; use backend='auto' to fall back")
        return BackendChoice(backend)
    candidates = ("triton", "cpu") if topk.device.type == "cuda" else ("cpu",)
    declined = []
    for candidate in candidates:
        ok, reason = _SUPPORTS[candidate](op, **sizes)
        if ok:
            if declined:
                _log.debug("%s: backend 'auto' runs %r; declined: %s", op, candidate,
                           "; ".join(f"{name!r} {why}" for name, why in declined))
            return BackendChoice(candidate, tuple(declined))
        declined.append((candidate, reason))
    raise ValueError(f"backend: no backend can run {op} on this input: "
                     + "; ".join(f"{name!r} {why}" for name, why in declined))


def run(op: str, backend: str, topk: torch.Tensor, lengths: torch.Tensor, num_experts: int, *options):
    """``lrc_kernels.<chosen backend>.<family>.<op>(topk, lengths, num_experts, *options)`` on validated input.

    ``topk`` int32 contiguous ``[S, T, k]`` and ``lengths`` int64 ``[S]`` as :func:`lrc_kernels._checks.check_topk`
    returns them; ``options`` are the op's remaining backend arguments (for ``"cache_hits"`` the first is the
    policy). The CPU path runs on host copies of CUDA tensors and returns to the input device.
    """
    policy = options[0] if op == "cache_hits" else None
    chosen = choose_backend(op, backend, topk, num_experts, policy).backend
    return _call(chosen, op, topk, lengths, num_experts, *options)


def run_caches(backend: str, topk: torch.Tensor, lengths: torch.Tensor, num_experts: int,
               caches: Sequence[Tuple[str, Optional[int]]], free_slot_hits: bool, lookup: str) -> List[torch.Tensor]:
    """``cache_hits`` of each ``(policy, seg_len)`` in ``caches`` on one validated stream: int64 ``[S, E]`` each.

    The backend is chosen per cache as :func:`run` chooses it; the caches one backend runs go to its
    ``cache_hits_many`` in one call, whose slices of sequences run all of them on the CPU. The results are
    views of that call's ``[S, C, E]`` tensor.

    Example (SPEC §8 A, LRU and SCH(2)):
        >>> topk = torch.tensor([[[0], [0], [1], [2], [0], [3], [2], [1]]], dtype=torch.int32)
        >>> [hits.tolist() for hits in run_caches("cpu", topk, torch.tensor([8]), 4, [("lru", None), ("sch", 2)],
        ...                                        True, "token")]
        [[[2, 3, 6, 8]], [[2, 5, 6, 8]]]
    """
    chosen = [choose_backend("cache_hits", backend, topk, num_experts, policy).backend for policy, _ in caches]
    hits: List[Optional[torch.Tensor]] = [None] * len(caches)
    for name in dict.fromkeys(chosen):
        members = [c for c, member_backend in enumerate(chosen) if member_backend == name]
        many = _call(name, "cache_hits_many", topk, lengths, num_experts, [caches[c] for c in members],
                     free_slot_hits, lookup)                                                   # [S, C, E]
        for position, c in enumerate(members):
            hits[c] = many[:, position]
    return hits


def _call(chosen: str, op: str, topk: torch.Tensor, lengths: torch.Tensor, num_experts: int, *options):
    function = getattr(importlib.import_module(f"lrc_kernels.{chosen}.{OPS[op]}"), op)
    if chosen == "cpu" and topk.device.type != "cpu":
        return function(topk.cpu(), lengths.cpu(), num_experts, *options).to(topk.device)
    return function(topk, lengths, num_experts, *options)
