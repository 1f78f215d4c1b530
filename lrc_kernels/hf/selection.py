"""How :class:`~lrc_kernels.hf.RoutingRecorder` reads the experts a router selected from the call of its capture
module, one reader per :data:`~lrc_kernels.hf.routers` site kind (``SELECTION_READERS``).

A reader runs inside the forward pass, so it only detaches, copies and runs device-side tensor ops. The
experts-call reader defers its ordering and -1 rules to a closure that the recorder calls after the pass.
"""

from __future__ import annotations

import functools
from typing import Callable, Optional

import numpy as np
import torch

from .routers import EXPERTS_ARGS, INDEX_ARG, ONE_HOT_DISPATCH, TOP1_MASK_AND_GATES, RouterSite


def _argument(args: tuple, kwargs: dict, spec: tuple[int, str]) -> torch.Tensor:
    position, keyword = spec
    return args[position] if len(args) > position else kwargs[keyword]


def _read_experts_args(site: RouterSite, args: tuple, kwargs: dict) -> Callable[[], torch.Tensor]:
    """Copies of the call's ids (and weights); the ordering and -1 rules run later, outside the forward pass."""
    indices = _argument(args, kwargs, site.selection_arg).detach()
    if indices.is_floating_point():
        raise RuntimeError(f"{site.name}: expected integer expert ids as argument {site.selection_arg} of "
                           f"{type(site.capture_module).__name__}, received dtype {indices.dtype}")
    indices = indices.reshape(-1, indices.shape[-1])
    weights = None
    if site.order_by_weight or site.zero_weight_is_skip:
        weights = _argument(args, kwargs, site.weight_arg).detach()
        if weights.numel() != indices.numel():
            raise RuntimeError(f"{site.name}: expected routing weights shaped like the ids {tuple(indices.shape)}, "
                               f"received {tuple(weights.shape)}")
        weights = weights.reshape(indices.shape).clone()
    return functools.partial(_experts_args_selection, site, indices.clone(), weights)


def _experts_args_selection(site: RouterSite, indices: torch.Tensor, weights: Optional[torch.Tensor]) -> torch.Tensor:
    """The int64 ``[N, k]`` selection of a captured experts call (ids and weights are the recorder's copies)."""
    if indices.device.type == "cpu":
        return _experts_args_selection_on_cpu(site, indices, weights)
    return _experts_args_selection_with_torch(site, indices, weights)


def _experts_args_selection_with_torch(site: RouterSite, indices: torch.Tensor,
                                       weights: Optional[torch.Tensor]) -> torch.Tensor:
    # Ids past the routed experts are zero-compute / skip experts (LongCat-Flash, Gemma-4's skip class): -1.
    indices = indices.masked_fill(indices >= site.num_experts, -1)
    if site.zero_weight_is_skip:
        indices = indices.masked_fill(weights == 0, -1)
    # Other devices sort always: checking first (the CPU path does) would be a host sync, which the recorder
    # never makes.
    if site.order_by_weight:
        order = torch.sort(weights, dim=-1, descending=True, stable=True).indices
        indices = indices.gather(-1, order)
    return indices.to(torch.int64)


def _experts_args_selection_on_cpu(site: RouterSite, indices: torch.Tensor,
                                   weights: Optional[torch.Tensor]) -> torch.Tensor:
    """:func:`_experts_args_selection` in numpy, in place on the recorder's own copies.

    Inside a training step each torch operation on these few thousand entries costs more than its numpy
    counterpart (bench/RESULTS.md, seventh session). Most routers hand over their top-k already in descending
    weight order, where the stable sort is the identity, so the rows are checked first and sorted only if one
    is out of order.
    """
    indices = indices.to(torch.int64)
    ids = indices.numpy()
    np.putmask(ids, ids >= site.num_experts, -1)
    if weights is None:
        return indices
    # float32 holds every bf16 / fp16 weight exactly, so comparisons are unchanged (numpy has no bf16)
    values = (weights if weights.dtype in (torch.float32, torch.float64) else weights.float()).numpy()
    if site.zero_weight_is_skip:
        np.putmask(ids, values == 0, -1)
    if site.order_by_weight and not (values[:, :-1] >= values[:, 1:]).all():
        indices = indices.gather(-1, torch.sort(weights, dim=-1, descending=True, stable=True).indices)
    return indices


def _read_one_hot_dispatch(site: RouterSite, args: tuple, kwargs: dict) -> torch.Tensor:
    dispatch = _argument(args, kwargs, site.selection_arg).detach()
    dispatch = dispatch.reshape(-1, dispatch.shape[-1]) != 0
    expert = dispatch.to(torch.int32).argmax(dim=-1)
    return torch.where(dispatch.any(dim=-1), expert, -1).to(torch.int64)[:, None]


def _read_top1_mask_and_gates(site: RouterSite, args: tuple, kwargs: dict) -> torch.Tensor:
    top1 = _argument(args, kwargs, site.selection_arg).detach()
    top1 = top1.reshape(-1, top1.shape[-1]) != 0
    gates = _argument(args, kwargs, site.weight_arg).detach().reshape(top1.shape)
    second = (gates != 0) & ~top1
    first_id = torch.where(top1.any(dim=-1), top1.to(torch.int32).argmax(dim=-1), -1)
    second_id = torch.where(second.any(dim=-1), second.to(torch.int32).argmax(dim=-1), -1)
    return torch.stack([first_id, second_id], dim=-1).to(torch.int64)


def _read_index_arg(site: RouterSite, args: tuple, kwargs: dict) -> torch.Tensor:
    indices = _argument(args, kwargs, site.selection_arg).detach()
    return indices.reshape(-1, indices.shape[-1]).to(torch.int64, copy=True)


SELECTION_READERS = {
    EXPERTS_ARGS: _read_experts_args,
    ONE_HOT_DISPATCH: _read_one_hot_dispatch,
    TOP1_MASK_AND_GATES: _read_top1_mask_and_gates,
    INDEX_ARG: _read_index_arg,
}
