"""Arguments and routing input of :class:`lrc_kernels.monitor.RoutingMonitor`, parsed and checked once.

The checks of the library are reused (``check_int``; the cache and bootstrap option checks run in the
monitor's constructor), so a monitor argument fails with the message of the library function it feeds.
"""

from __future__ import annotations

from typing import List, Mapping, NamedTuple, Optional, Sequence, Tuple, Union

import torch

from ._checks import check_int
from .cache import POLICIES

Routing = Union[Mapping[str, torch.Tensor], Sequence[torch.Tensor]]


class CacheSpec(NamedTuple):
    """One monitored cache: its name in states and metrics, its policy, and SCH's look-ahead (else None)."""

    name: str
    policy: str
    seg_len: Optional[int]


def distinct_ints(values, name: str, minimum: int) -> Tuple[int, ...]:
    """``values`` as a tuple of distinct Python ints, each ``>= minimum``."""
    values = tuple(check_int(value, name, minimum=minimum) for value in values)
    if len(set(values)) != len(values):
        raise ValueError(f"{name}: expected distinct values, received {values}")
    return values


def _sch_look_ahead(policy: str) -> int:
    """L of a ``"sch@L"`` policy name."""
    digits = policy[len("sch@"):]
    if not digits.isdigit() or int(digits) < 1 or digits != str(int(digits)):
        raise ValueError(f"policies: expected 'sch@L' with an int L >= 1, received {policy!r}")
    return int(digits)


def cache_specs(policies: Sequence[str], seg_lens: Tuple[int, ...]) -> Tuple[CacheSpec, ...]:
    """The caches ``policies`` names; ``"sch"`` expands to ``"sch@L"`` for every L in ``seg_lens``."""
    specs = []
    for policy in policies:
        if policy == "sch":
            specs.extend(CacheSpec(f"sch@{L}", "sch", L) for L in seg_lens)
        elif isinstance(policy, str) and policy.startswith("sch@"):
            specs.append(CacheSpec(policy, "sch", _sch_look_ahead(policy)))
        elif policy in POLICIES:
            specs.append(CacheSpec(policy, policy, None))
        else:
            raise ValueError(f"policies: expected entries of {POLICIES} or 'sch@L' (an int L >= 1), "
                             f"received {policy!r}")
    names = [spec.name for spec in specs]
    if len(set(names)) != len(names):
        raise ValueError(f"policies: expected distinct caches, received {tuple(policies)} (caches {names})")
    return tuple(specs)


def per_layer(value, name: str, layer_names: Optional[List[str]]) -> Optional[Union[int, List[int]]]:
    """An int >= 1 (every layer; a list once the layer count is known) or one int >= 1 per layer."""
    if value is None:
        return None
    if not isinstance(value, (list, tuple)):
        value = check_int(value, name, minimum=1)
        return value if layer_names is None else [value] * len(layer_names)
    values = [check_int(entry, name, minimum=1) for entry in value]
    if layer_names is not None and len(values) != len(layer_names):
        raise ValueError(f"{name}: expected one value per layer ({len(layer_names)} layers), "
                         f"received {len(values)}")
    return values


def layers_in_order(routing: Routing, layer_names: Optional[List[str]],
                    num_layers: Optional[int]) -> Tuple[List[str], List[torch.Tensor]]:
    """``routing`` as (names, ``[B, T, k]`` tensors) in monitor layer order, with equal B and T in every layer.

    Args:
        routing: ``{name: [B, T, k]}`` or a list of tensors in monitor order; ``[T, k]`` is one sequence.
        layer_names: the monitor's layer names, None until the first update.
        num_layers: the layer count the per-layer ``num_experts`` fixes, None if open.
    """
    if isinstance(routing, Mapping):
        received = [str(name) for name in routing]
        if layer_names is None:
            names = received
        else:
            names = layer_names
            missing = [n for n in names if n not in routing]
            extra = [n for n in received if n not in set(names)]
            if missing or extra:
                raise ValueError(f"routing: expected the layers {names}, received {received} "
                                 f"(missing {missing}, unexpected {extra})")
        tensors = [routing[name] for name in names]
    elif isinstance(routing, (list, tuple)):
        tensors = list(routing)
        names = layer_names or [str(q) for q in range(len(tensors))]
        if len(tensors) != len(names):
            raise ValueError(f"routing: expected {len(names)} layers (number of layers of the first update "
                             f"or of layer_names), received {len(tensors)}")
    else:
        raise TypeError(f"routing: expected a dict {{layer_name: LongTensor [B, T, k]}} or a list of "
                        f"tensors, received {type(routing).__name__}")
    if not tensors:
        raise ValueError("routing: expected at least one layer, received none")
    if num_layers is not None and num_layers != len(tensors):
        raise ValueError(f"routing: expected {num_layers} layers (one per num_experts entry), "
                         f"received {len(tensors)}")
    shaped = []
    for name, topk in zip(names, tensors):
        if not isinstance(topk, torch.Tensor):
            raise TypeError(f"routing[{name!r}]: expected a torch.Tensor, received {type(topk).__name__}")
        if topk.ndim == 2:
            topk = topk.unsqueeze(0)
        if topk.ndim != 3:
            raise ValueError(f"routing[{name!r}]: expected a tensor [B, T, k] (or [T, k]), received shape "
                             f"{tuple(topk.shape)}")
        shaped.append(topk)
    batch_shape = tuple(shaped[0].shape[:2])
    for name, topk in zip(names, shaped):
        if tuple(topk.shape[:2]) != batch_shape:
            raise ValueError(f"routing[{name!r}]: expected batch shape [B, T] = {list(batch_shape)} like "
                             f"routing[{names[0]!r}], received {list(topk.shape[:2])}")
    return names, shaped
