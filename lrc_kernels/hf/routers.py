"""Find the MoE routers of a Hugging Face model and the module call that carries each router's selection.

Discovery. transformers (5.x) names each model's router class in ``_can_record_outputs["router_logits"]``
(an ``OutputRecorder(cls, index=i)``, a class, or a class-name suffix); every instance of that class in the
model is a router. Dense layers have no router and are skipped. Routers the declaration does not cover are
found by structure: a child with an int ``top_k`` attribute next to a module named ``experts`` outside every
declared router (DeepSeek-V4's hash-routed layers: a token-id table picks their experts, so they emit no
router logits and have no ``logits_topk`` capture; a model may have no other router).

Capture. In most families the MoE block calls ``experts(hidden, top_k_index, top_k_weights)`` with the
selection that actually runs, so the recorder reads it from a forward pre-hook on the router's sibling
``experts`` module. Families that differ are listed in ``_FAMILY_RULES``, the one table of special cases.
"""

from __future__ import annotations

import functools
import inspect
import re
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
from torch import nn

# How a site's selection is read from the call of its capture module (see ``selection.SELECTION_READERS``).
EXPERTS_ARGS = "experts_args"            # pre-hook: (hidden, indices [N, k], weights [N, k])
ONE_HOT_DISPATCH = "one_hot_dispatch"    # pre-hook: (hidden, dispatch mask [N, 1, E] after capacity, weights)
TOP1_MASK_AND_GATES = "top1_mask_and_gates"  # pre-hook: (hidden, top-1 mask [N, E], combine weights [N, E])
ROUTER_LOGITS_TOPK = "router_logits_topk"    # forward hook on the router: torch.topk of its own logits
INDEX_ARG = "index_arg"                  # pre-hook: (indices [N, k], ...) on an embedding of expert weights


@dataclass(frozen=True)
class _FamilyRule:
    """How one router class departs from the common ``experts(hidden, indices, weights)`` pattern."""

    kind: str = EXPERTS_ARGS
    capture: str = "experts"       # "experts": the router's sibling; "router": the router; else a router child
    top_k: Optional[int] = None    # fixed slots per token where the router has no ``top_k`` attribute
    order_by_weight: bool = True   # sort slots by descending routing weight (routers with unsorted top-k)
    zero_weight_is_skip: bool = False  # a slot passed with weight exactly 0 is a "skip" choice -> -1
    has_expert_logits: bool = True     # router output holds per-expert logits usable for "logits_topk"
    top_k_config: Optional[str] = None  # config field holding top-k where no module has a ``top_k``
    sizes_from: Optional[str] = None   # router child whose ``num_experts``/``top_k`` describe the site
    refuse: Optional[Callable[[nn.Module, nn.Module], Optional[str]]] = None  # (router, capture) -> reason
    other_modality_arg: Optional[int] = None  # router-call argument marking tokens routed past the capture


def _nllb_runs_two_experts_only(router: nn.Module, experts: nn.Module) -> Optional[str]:
    """Why NLLB-MoE's capture is refused, when its experts module ignores the router's choice.

    transformers 5.x's ``NllbMoeExperts.forward`` one-hot-encodes the router mask, which is already one-hot,
    so the "expert" it indexes is the mask's 0/1 value: ``expert_0`` and ``expert_1`` run whatever the router
    picked. Probed on the module itself (one token sent to the last expert) so that a fixed release passes.
    """
    import transformers

    expert_modules = {name: child for name, child in experts.named_children() if name.startswith("expert_")}
    num_experts = len(expert_modules)
    parameter = next(experts.parameters())
    hidden = torch.zeros(1, parameter.shape[-1], dtype=parameter.dtype, device=parameter.device)
    choice = torch.zeros(1, num_experts, dtype=torch.long, device=parameter.device)
    choice[0, -1] = 1
    ran = set()
    handles = [expert.register_forward_pre_hook(lambda module, args, name=name: ran.add(name))
               for name, expert in expert_modules.items()]
    try:
        with torch.no_grad():  # the class's forward: hooks on the experts module itself do not see the probe
            type(experts).forward(experts, hidden, choice, choice.to(parameter.dtype))
    except Exception as error:  # noqa: BLE001 -- a signature we do not know: refuse with what failed
        return f"probing its experts module failed ({type(error).__name__}: {error})"
    finally:
        for handle in handles:
            handle.remove()
    last = list(expert_modules)[-1]
    if ran == {last}:
        return None
    return (f"under transformers {transformers.__version__}, {type(experts).__name__}.forward one-hot-encodes "
            f"the router's mask, which is already one-hot, so only expert_0 and expert_1 run whatever the router "
            f"picked (a token sent to {last} ran {sorted(ran)}); the router's choice is not what ran")


# Special cases, keyed by router class name. Every other router class uses ``_FamilyRule()``.
_FAMILY_RULES: dict[str, _FamilyRule] = {
    # Two routers per layer (attention experts in self_attention.experts.router, MLP experts in mlp.router),
    # neither with an ``experts`` sibling: the expert inputs are grouped by ``torch.topk(logits, k)``, which
    # the hook repeats on the router's own logits (output 4) -- the same call on the same tensor.
    "JetMoeTopKGating": _FamilyRule(kind=ROUTER_LOGITS_TOPK, capture="router"),
    # The router returns dense sigmoid scores (all experts run, unselected ones scaled by sigmoid(-inf) = 0),
    # so the selection is re-derived from its logits (output 1) with its own torch.topk call.
    "Llama4Router": _FamilyRule(kind=ROUTER_LOGITS_TOPK, capture="router"),
    # Top-1 routing with per-sequence expert capacity: experts receive a one-hot dispatch mask whose dropped
    # tokens are all-zero rows -> -1.
    "SwitchTransformersTop1Router": _FamilyRule(kind=ONE_HOT_DISPATCH, top_k=1),
    # Top-2 routing with capacity: experts receive the surviving top-1 one-hot mask and the combine weights
    # of both slots (zero where dropped) -> slot 0 = top-1 or -1, slot 1 = second expert or -1.
    # Refused where the experts ignore the selection (transformers 5.x, see _nllb_runs_two_experts_only).
    "NllbMoeTop2Router": _FamilyRule(kind=TOP1_MASK_AND_GATES, top_k=2, refuse=_nllb_runs_two_experts_only),
    # Product-key experts: the MoE block is its own router; expert ids index the ``down_embed`` embedding.
    # Its router logits are per-key scores, not per-expert logits.
    "DogeCDMoE": _FamilyRule(kind=INDEX_ARG, capture="down_embed", order_by_weight=False,
                             has_expert_logits=False),
    # Sparsemixer: slot 0 is the argmax, slot 1 the argmax of the rest; the multipliers are not monotone in
    # that order, so the slots keep their order.
    "PhimoeTopKRouter": _FamilyRule(order_by_weight=False),
    # Zaya's router has an extra "skip" class; it passes a skip as expert 0 with weight 0.
    "ZayaRouter": _FamilyRule(zero_weight_is_skip=True),
    # Gemma-4 (and DiffusionGemma, built on it): top-k only in the config the router holds.
    "Gemma4TextRouter": _FamilyRule(top_k_config="top_k_experts"),
    "DiffusionGemmaTextRouter": _FamilyRule(top_k_config="top_k_experts"),
    # Ernie-4.5-VL declares its modality-split block, which routes text tokens through ``text_moe`` (a gate
    # and its experts) and image/video tokens through ``vision_moe``; text-only forwards run ``text_moe`` alone.
    # A forward with image/video tokens (nonzero ``moe_mm_token_type_ids``, argument 1) is refused.
    "Ernie4_5_VLMoeMoeBlock": _FamilyRule(capture="text_moe.experts", sizes_from="text_moe", other_modality_arg=1),
}


@dataclass(frozen=True)
class RouterSite:
    """One MoE router of a model: where its routing is captured and what it looks like.

    Attributes:
        name: qualified module name of the router (``model.named_modules()`` key).
        layer: transformer layer index (the first integer in ``name``).
        stage: ``"decoder"`` or ``"encoder"`` (the encoder stack of a seq2seq model).
        num_experts: routed experts E of this layer (shared experts excluded).
        top_k: slots per token k.

    Example:
        >>> from transformers import AutoModelForCausalLM
        >>> from lrc_kernels.cli.analyze import DEFAULT_MODEL_DIR            # the bundled tiny MoE
        >>> [(site.layer, site.num_experts, site.top_k) for site in find_routers(
        ...     AutoModelForCausalLM.from_pretrained(DEFAULT_MODEL_DIR))]
        [(0, 16, 2), (1, 16, 2), (2, 16, 2), (3, 16, 2)]
    """

    name: str
    layer: int
    stage: str
    num_experts: int
    top_k: int
    router: nn.Module = field(compare=False, repr=False)
    capture_module: nn.Module = field(compare=False, repr=False)
    kind: str = field(default=EXPERTS_ARGS, compare=False, repr=False)
    # (position, keyword) of the captured call's selection argument and weight argument.
    selection_arg: tuple[int, str] = field(default=(1, "top_k_index"), compare=False, repr=False)
    weight_arg: tuple[int, str] = field(default=(2, "top_k_weights"), compare=False, repr=False)
    order_by_weight: bool = field(default=True, compare=False, repr=False)
    zero_weight_is_skip: bool = field(default=False, compare=False, repr=False)
    logits_index: Optional[int] = field(default=None, compare=False, repr=False)
    # Position of the router call's argument whose nonzero entries mark tokens the capture does not see.
    other_modality_arg: Optional[int] = field(default=None, compare=False, repr=False)


def _router_specs(model: nn.Module) -> list[tuple[Optional[type], Optional[str], Optional[str], int]]:
    """(class, class-name suffix, layer name, logits index) of every declared router_logits recorder."""
    specs = []
    for module in model.modules():
        declared = getattr(type(module), "_can_record_outputs", None)
        if not isinstance(declared, dict) or "router_logits" not in declared:
            continue
        entries = declared["router_logits"]
        for entry in entries if isinstance(entries, list) else [entries]:
            if isinstance(entry, type):
                specs.append((entry, None, None, 1))  # transformers' default index for non-hidden-state keys
            elif isinstance(entry, str):
                specs.append((None, entry, None, 1))
            else:
                specs.append((getattr(entry, "target_class", None), getattr(entry, "class_name", None),
                              getattr(entry, "layer_name", None), int(getattr(entry, "index", 0))))
    return specs


def _matches(spec, name: str, module: nn.Module) -> bool:
    target_class, class_name, layer_name, _ = spec
    hit = (target_class is not None and isinstance(module, target_class)) or (
        class_name is not None and name.endswith(class_name))
    if hit and layer_name is not None:
        hit = "." + layer_name.strip(".") + "." in name + "."
    return hit


def _call_arguments(module: nn.Module, positions: tuple[int, int]) -> tuple[tuple[int, str], tuple[int, str]]:
    """(position, keyword) of the forward arguments at ``positions`` (keyword names differ per family)."""
    parameters = [p.name for p in inspect.signature(module.forward).parameters.values()
                  if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    return tuple((position, parameters[position] if position < len(parameters) else "") for position in positions)


def _first_int_attr(name: str, *modules: Optional[nn.Module]) -> Optional[int]:
    for module in modules:
        value = getattr(module, name, None) if module is not None else None
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    return None


def _layer_and_stage(name: str) -> tuple[int, str]:
    parts = name.split(".")
    layer = next((int(part) for part in parts if re.fullmatch(r"\d+", part)), None)
    if layer is None:
        raise ValueError(f"router {name!r}: cannot tell its layer index (no integer component in its name)")
    stage = "encoder" if any("encoder" in part for part in parts) else "decoder"
    return layer, stage


def _make_site(name: str, router: nn.Module, parent: Optional[nn.Module], logits_index: Optional[int]) -> RouterSite:
    rule = _FAMILY_RULES.get(type(router).__name__, _FamilyRule())
    if rule.capture == "router":
        capture_module = router
    elif rule.capture == "experts":
        capture_module = getattr(parent, "experts", None)
        if not isinstance(capture_module, nn.Module):
            raise ValueError(
                f"router {name!r} ({type(router).__name__}): no sibling `experts` module receives its selection "
                f"and lrc_kernels.hf.routers has no rule for this class; capture is not supported for it")
    else:
        capture_module = functools.reduce(getattr, rule.capture.split("."), router)
    if rule.refuse is not None:
        reason = rule.refuse(router, capture_module)
        if reason is not None:
            raise ValueError(f"router {name!r} ({type(router).__name__}): capture refused: {reason}")
    experts = getattr(parent, "experts", None)
    sized = getattr(router, rule.sizes_from) if rule.sizes_from else router
    num_experts = _first_int_attr("num_experts", sized, experts, parent)
    top_k = rule.top_k or _first_int_attr("top_k", sized, parent) or (
        _first_int_attr(rule.top_k_config, getattr(router, "config", None)) if rule.top_k_config else None)
    if num_experts is None or top_k is None:
        raise ValueError(f"router {name!r} ({type(router).__name__}): cannot tell its number of experts and top-k "
                         f"(no int `num_experts`/`top_k` on the router, its experts or its block)")
    layer, stage = _layer_and_stage(name)
    selection_arg, weight_arg = (1, ""), (2, "")
    if rule.kind in (EXPERTS_ARGS, ONE_HOT_DISPATCH, TOP1_MASK_AND_GATES):
        selection_arg, weight_arg = _call_arguments(capture_module, (1, 2))
    elif rule.kind == INDEX_ARG:
        selection_arg = (0, "input")
    return RouterSite(
        name=name, layer=layer, stage=stage, num_experts=num_experts, top_k=top_k, router=router,
        capture_module=capture_module, kind=rule.kind, selection_arg=selection_arg, weight_arg=weight_arg,
        order_by_weight=rule.order_by_weight and top_k > 1, zero_weight_is_skip=rule.zero_weight_is_skip,
        logits_index=logits_index if rule.has_expert_logits else None, other_modality_arg=rule.other_modality_arg)


def find_routers(model: nn.Module) -> list[RouterSite]:
    """The MoE routers of a Hugging Face transformers (5.x) model, in module order.

    Args:
        model: a ``transformers.PreTrainedModel`` (any head; composite models are searched throughout).

    Returns:
        one :class:`RouterSite` per router (JetMoE has two per layer: attention and MLP experts).

    Raises:
        ValueError: the model has no MoE router (names the model class), or a router whose selection
            cannot be captured.

    Example:
        >>> from transformers import AutoModelForCausalLM
        >>> from lrc_kernels.cli.analyze import DEFAULT_MODEL_DIR            # the bundled tiny MoE
        >>> find_routers(AutoModelForCausalLM.from_pretrained(DEFAULT_MODEL_DIR))[0]
        RouterSite(name='model.layers.0.mlp.gate', layer=0, stage='decoder', num_experts=16, top_k=2)
    """
    modules = dict(model.named_modules())
    specs = _router_specs(model)

    def parent_of(name: str) -> Optional[nn.Module]:
        return modules.get(name.rpartition(".")[0]) if "." in name else model

    sites: list[RouterSite] = []
    seen: set[int] = set()
    for name, module in modules.items():
        spec = next((spec for spec in specs if _matches(spec, name, module)), None)
        if spec is not None and id(module) not in seen:
            seen.add(id(module))
            sites.append(_make_site(name, module, parent_of(name), spec[3]))

    # Structural discovery: routers the declaration misses (DeepSeek-V4's hash routers, also in a model whose
    # every MoE layer is hash-routed) sit next to an ``experts`` module, outside every declared router.
    declared_names = [site.name + "." for site in sites]
    for name, module in modules.items() if specs else ():
        if name.rpartition(".")[2] != "experts" or any(name.startswith(prefix) for prefix in declared_names):
            continue
        parent = parent_of(name)
        for child_name, child in parent.named_children():
            if child is module or id(child) in seen or not isinstance(getattr(child, "top_k", None), int):
                continue
            seen.add(id(child))
            sites.append(_make_site(f"{name.rpartition('.')[0]}.{child_name}", child, parent, None))

    if not sites:
        raise ValueError(f"{type(model).__name__} has no Mixture-of-Experts router (no module declared in "
                         f"`_can_record_outputs['router_logits']`); routing capture needs an MoE model")
    order = {name: position for position, name in enumerate(modules)}
    return sorted(sites, key=lambda site: order[site.name])


__all__ = ["RouterSite", "find_routers"]
