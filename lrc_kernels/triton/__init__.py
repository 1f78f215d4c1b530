"""Triton backends (CUDA tensors, or CPU tensors under ``TRITON_INTERPRET=1``).

The modules here import triton; this package file does not, so the public API imports them only when the
Triton backend is chosen. It declares what the kernels can run (:func:`supports`, consulted by
:mod:`lrc_kernels.dispatch`), so checking a limit never imports triton.
"""

from __future__ import annotations

import functools
import importlib.util
import os
from typing import Optional, Tuple

# segment_coverage keeps a sorted count vector of all E experts per sequence in one program's registers.
MAX_COVERAGE_EXPERTS = 4096
# The cache kernels pack (key, expert) into an int64 below 2^62; the empty-slot marker is 2^62.
MAX_PACKED_KEY_BITS = 62


def _next_power_of_2(value: int) -> int:
    return 1 << max(value - 1, 0).bit_length()


def cache_key_bits(num_references: int, num_experts: int, policy: str) -> Optional[int]:
    """``log2(B)`` of the cache kernels' packed keys, or None when the keys would not fit in 62 bits.

    ``B = 2**log_b`` exceeds every time and next-use value (at most ``T*k + E``); keys stay below ``B**2``
    (lfu, sch) or ``2*B`` (lru, belady), next to ``log2(E_PAD)`` bits of expert id.
    """
    log_b = max(1, (num_references + num_experts + 1).bit_length())
    log_e_pad = _next_power_of_2(num_experts).bit_length() - 1
    top_bits = (2 * log_b if policy in ("lfu", "sch") else log_b + 1) + log_e_pad
    return log_b if top_bits <= MAX_PACKED_KEY_BITS else None


@functools.lru_cache(maxsize=None)
def _triton_installed() -> bool:
    return importlib.util.find_spec("triton") is not None


def supports(op: str, *, device, num_experts: int, num_tokens: int, num_slots: int,
             policy: Optional[str] = None) -> Tuple[bool, str]:
    """Whether the Triton kernel of ``op`` can run this input: ``(True, "")`` or ``(False, reason)``.

    Args:
        op: ``"srp_counts"``, ``"segment_coverage"`` or ``"cache_hits"``.
        device: the device of the (validated) routing tensor.
        num_experts, num_tokens, num_slots: E, T and k of the ``[S, T, k]`` routing tensor.
        policy: the cache policy (``"cache_hits"`` only).
    """
    if not _triton_installed():
        return False, "needs the `triton` package, which is not installed"
    if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        return False, ("needs CUDA tensors, or TRITON_INTERPRET=1 set before triton is imported to run the "
                       f"kernels on the CPU; received tensors on {device}")
    if op == "segment_coverage" and num_experts > MAX_COVERAGE_EXPERTS:
        return False, (f"runs segment_coverage for at most {MAX_COVERAGE_EXPERTS} experts (a sorted count "
                       f"vector per sequence lives in registers), received num_experts = {num_experts}")
    if op == "cache_hits" and cache_key_bits(num_tokens * num_slots, num_experts, policy) is None:
        return False, (f"cannot pack T*k = {num_tokens * num_slots} references per sequence with num_experts = "
                       f"{num_experts} into the cache kernel's {MAX_PACKED_KEY_BITS}-bit keys")
    return True, ""
