"""Integer reductions of small host tensors, shared by the cache API, ``analyze`` and the monitor."""

from __future__ import annotations

import numpy as np
import torch


def int_sum(tensor: torch.Tensor, dims) -> torch.Tensor:
    """``tensor.sum(dims)`` of an integer or bool tensor, as int64.

    On the CPU this is a numpy reduction: torch splits a reduction of a few 10^5 elements over its intra-op
    threads, and waking them cost ~10 ms per call on a busy 2-core machine, against ~0.05 ms in numpy.
    """
    if tensor.device.type == "cpu":
        return torch.from_numpy(tensor.numpy().sum(dims, dtype=np.int64))
    return tensor.sum(dims, dtype=torch.int64)
