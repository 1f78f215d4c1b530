"""Routing tensors: top-k from router logits, and the model-level stream of several layers (SPEC §1, §6)."""

from __future__ import annotations

from typing import Optional, Sequence, Union

import torch

from ._checks import check_int, check_topk, stack_layers


def topk_from_logits(logits: torch.Tensor, k: int) -> torch.Tensor:
    """Top-k experts of router logits: descending logit, the lower expert id first on ties.

    Args:
        logits: floating ``[..., E]`` router scores (any leading shape).
        k: experts per token, ``0 <= k <= E``.

    Returns:
        int64 ``[..., k]`` expert ids in processing order (descending score).

    Raises:
        TypeError: ``logits`` is not a floating tensor.
        ValueError: NaN logits, ``k > E`` or a 0-D ``logits``.

    Example:
        >>> topk_from_logits(torch.tensor([1.0, 3.0, 3.0, 0.0]), 3)
        tensor([1, 2, 0])
    """
    if not isinstance(logits, torch.Tensor) or not logits.is_floating_point():
        kind = logits.dtype if isinstance(logits, torch.Tensor) else type(logits).__name__
        raise TypeError(f"logits: expected a floating torch.Tensor [..., E], received {kind}")
    if logits.ndim == 0:
        raise ValueError("logits: expected shape [..., E] with at least one dimension, received a 0-D tensor")
    num_experts = logits.shape[-1]
    k = check_int(k, "k", minimum=0)
    if k > num_experts:
        raise ValueError(f"k: expected k <= E = {num_experts} (last dimension of logits), received {k}")
    if bool(torch.isnan(logits).any()):
        raise ValueError(f"logits: expected no NaN values, received {int(torch.isnan(logits).sum())} NaN "
                         f"entries in a tensor of shape {tuple(logits.shape)}")
    # A stable descending sort keeps equal logits in id order, which is the tie rule.
    order = torch.sort(logits, dim=-1, descending=True, stable=True).indices
    return order[..., :k].contiguous()


def concat_layers(topk_layers: Union[torch.Tensor, Sequence[torch.Tensor]], num_experts: int, *,
                  lengths: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Join the MoE layers of one stack into the model-level stream (SPEC §6).

    Layer q's expert e becomes ``q * num_experts + e`` (``-1`` stays ``-1``); each token's row lists layer 0's
    k slots, then layer 1's, and so on. The stream has ``n * k`` slots per token and ``n * num_experts``
    cache slots.

    Args:
        topk_layers: int ``[n_layers, S, T, k]`` (or ``[n_layers, T, k]``), or a sequence of ``n_layers``
            tensors ``[S, T, k]`` (or ``[T, k]``) with equal shapes.
        num_experts: E of every layer.
        lengths: optional int ``[S]`` valid prefix lengths shared by all layers; later entries are neither
            read nor validated and come back as ``-1``.

    Returns:
        int64 ``[S, T, n_layers * k]`` (``[T, n_layers * k]`` for unbatched input).

    Example:
        >>> a = torch.tensor([[0], [1], [0], [1]]); b = torch.tensor([[1], [1], [0], [0]])
        >>> concat_layers([a, b], 2).tolist()
        [[0, 3], [1, 3], [0, 2], [1, 2]]
    """
    topk_layers = stack_layers(topk_layers, "topk_layers")
    stacked, _, unbatched = check_topk(topk_layers, num_experts, name="topk_layers", batched_rank=4,
                                       lengths=lengths)
    stream = join_layers(stacked.to(torch.int64), num_experts)
    return stream[0] if unbatched else stream


def join_layers(ids: torch.Tensor, num_experts: int) -> torch.Tensor:
    """:func:`concat_layers` of validated ids ``[n_layers, S, T, k]`` -> contiguous ``[S, T, n_layers * k]``.

    Computes in the dtype of ``ids`` (int32 ids need ``n_layers * num_experts < 2^31``). CPU tensors take the
    numba loop of :mod:`lrc_kernels.cpu.layout` (faster on small k, bench_monitor.py --breakdown), others
    :func:`join_layers_with_torch`; both equal the reference (tested).
    """
    if ids.device.type == "cpu":
        from lrc_kernels.cpu.layout import join_layers as join_on_cpu

        return join_on_cpu(ids, num_experts)
    return join_layers_with_torch(ids, num_experts)


def join_layers_with_torch(ids: torch.Tensor, num_experts: int) -> torch.Tensor:
    """:func:`join_layers` in torch operations, for any device."""
    num_layers, num_seqs, num_tokens = ids.shape[:3]
    offsets = torch.arange(num_layers, device=ids.device, dtype=ids.dtype).view(-1, 1, 1, 1) * num_experts
    stream = torch.where(ids >= 0, ids + offsets, ids)
    # Explicit sizes: reshape cannot infer -1 for an empty trace (T = 0).
    return stream.permute(1, 2, 0, 3).reshape(num_seqs, num_tokens, num_layers * ids.shape[3]).contiguous()
