"""CPU layout of validated routing: the model-level stream of several layers (SPEC §6) in one pass.

The torch formulation (``where`` with layer offsets, then a permuted copy whose innermost run is only k ids
long) costs several times this loop on the monitor's 4 x 8 x 256 x 2 batch (``bench_monitor.py --breakdown``,
bench/RESULTS.md).
"""

import numba
import numpy as np
import torch


@numba.njit(cache=True, nogil=True)
def _join_layers(ids, num_experts, stream):
    num_layers, num_sequences, num_tokens, num_slots = ids.shape
    for q in range(num_layers):
        offset = q * num_experts
        for s in range(num_sequences):
            for t in range(num_tokens):
                for j in range(num_slots):
                    e = ids[q, s, t, j]
                    stream[s, t, q * num_slots + j] = e + offset if e >= 0 else e


def join_layers(ids: torch.Tensor, num_experts: int) -> torch.Tensor:
    """:func:`lrc_kernels.routing.join_layers` on the CPU: validated int32 or int64 ``[n_layers, S, T, k]``
    -> contiguous ``[S, T, n_layers * k]`` of the same dtype (one numba signature per dtype)."""
    num_layers, num_sequences, num_tokens, num_slots = ids.shape
    stream = np.empty((num_sequences, num_tokens, num_layers * num_slots), dtype=ids.numpy().dtype)
    _join_layers(ids.contiguous().numpy(), num_experts, stream)
    return torch.from_numpy(stream)
