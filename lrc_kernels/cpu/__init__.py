"""Fast CPU backends: numba loops over sequences, one module per metric family.

This package file imports no numba; it declares what the loops can run (:func:`supports`, consulted by
:mod:`lrc_kernels.dispatch`).
"""

from __future__ import annotations

from typing import Optional, Tuple

# The cache loops pack pair keys (a, τ) as a·2^32 + τ, exact while a sequence holds fewer than 2^31 slots.
MAX_CACHE_SLOTS_PER_SEQUENCE = (1 << 31) - 1


def supports(op: str, *, device, num_experts: int, num_tokens: int, num_slots: int,
             policy: Optional[str] = None) -> Tuple[bool, str]:
    """Whether the CPU loop of ``op`` can run this input: ``(True, "")`` or ``(False, reason)``.

    Any device: routing on another device runs on a host copy. Arguments as in
    :func:`lrc_kernels.triton.supports`.
    """
    if op == "cache_hits" and num_tokens * num_slots > MAX_CACHE_SLOTS_PER_SEQUENCE:
        return False, (f"needs T*k < 2^31 slots per sequence in cache_hits, received T*k = "
                       f"{num_tokens * num_slots}")
    return True, ""
