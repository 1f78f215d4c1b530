"""RoutingRecorder on every MoE family of the installed transformers, against a perturbation ground truth.

For each family of ``hf_families.moe_families()`` (enumerated from the installed transformers, not listed by
hand) a tiny model is built from its config. The ground truth does not look at routers at all: for every
routed expert e of every MoE layer, expert e's weights are perturbed and the model rerun; the tokens whose
MoE block output changes are exactly the tokens expert e processed (the
block's input is unchanged, so only expert e's contribution can differ). A token routed to e with combine weight 0, dropped by
capacity, or sent to a skip / zero-compute expert is not processed, and the recorder reports ``-1`` for it.
The recorder's per-token set of expert ids must equal that set for every token of every MoE layer.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")

from hf_families import (NUM_EXPERTS, VARIANTS, build_family_model, declares_router_logits,  # noqa: E402
                         moe_families, routing_kinds)

from lrc_kernels.hf import RoutingRecorder  # noqa: E402

BATCH, SEQ = 2, 6
ENCODER_DECODER = {"switch_transformers", "nllb-moe"}
# Families whose capture the library refuses, with the reason its error must give.
REFUSED = {
    "nllb-moe": r"transformers \d+\.\d+.*one-hot.*expert_0.*expert_1",
}

pytestmark = pytest.mark.usefixtures("one_torch_thread")

DOC = Path(__file__).resolve().parents[1] / "docs" / "monitoring.md"
# docs/monitoring.md's family table: | `model_type` | routing kinds | capture |
_ROW = re.compile(r"^\| `([^`]+)` \| ([^|]+) \| ([^|]+) \|$", re.M)


def _doc_rows():
    return {family: (kinds.strip(), capture.strip()) for family, kinds, capture in _ROW.findall(DOC.read_text())}


def test_docs_family_table_lists_exactly_the_enumerated_families():
    assert sorted(_doc_rows()) == sorted(moe_families() + tuple(VARIANTS))


def _inputs(model, model_type):
    generator = torch.Generator().manual_seed(0)
    inputs = dict(input_ids=torch.randint(4, 128, (BATCH, SEQ), generator=generator), use_cache=False)
    if not hasattr(getattr(model, "model", model), "embed_tokens"):  # Qwen3-Omni's talker: fed embeddings
        inputs = dict(inputs_embeds=torch.randn(BATCH, SEQ, model.config.hidden_size, generator=generator),
                      use_cache=False)
    if model_type in ENCODER_DECODER:
        inputs["decoder_input_ids"] = torch.randint(4, 128, (BATCH, SEQ - 1), generator=generator)
    return inputs


def _routed_experts(model):
    """{name: (MoE block name, [parameter slices of expert e for e in range(E)])} of every MoE layer.

    Routed experts are, by transformers' naming, a module named ``experts``: fused 3-D parameters with one
    leading row per expert, or a ModuleList/ModuleDict with one child per expert. A router living inside it
    (JetMoE's attention experts) is left alone. Doge's product-key experts are rows of ``down_embed`` and
    ``up_embed``.
    """
    found = {}
    for name, module in model.named_modules():
        if name.rpartition(".")[2] == "experts":
            children = list(module.children())
            if isinstance(module, (torch.nn.ModuleList, torch.nn.ModuleDict)) and len(children) == NUM_EXPERTS:
                found[name] = (name.rpartition(".")[0], [list(child.parameters()) for child in children])
            else:
                fused = [parameter for child_name, parameter in module.named_parameters()
                         if not child_name.startswith(("router.", "gate.")) and parameter.shape[0] == NUM_EXPERTS]
                found[name] = (name.rpartition(".")[0], [[parameter[e] for parameter in fused]
                                                         for e in range(NUM_EXPERTS)])
        elif any(type(child).__name__.endswith("ParallelExperts") for child in module.children()) \
                and ".experts." not in name + ".":
            # JetMoE's MLP: its experts are ParallelExperts children (input_linear, output_linear) of the block.
            fused = [parameter for child_name, parameter in module.named_parameters()
                     if not child_name.startswith("router.") and parameter.shape[0] == NUM_EXPERTS]
            found[name] = (name, [[parameter[e] for parameter in fused] for e in range(NUM_EXPERTS)])
        elif hasattr(module, "down_embed") and hasattr(module, "up_embed"):
            rows = module.down_embed.weight.shape[0]
            found[name] = (name, [[module.down_embed.weight[e], module.up_embed.weight[e]] for e in range(rows)])
    return found


def _block_outputs(model, blocks, inputs):
    """{MoE block name: its output of one forward pass as float [B, T, -1]}."""
    outputs, handles = {}, []
    modules = dict(model.named_modules())
    for block in blocks:
        def hook(module, args, output, block=block):
            tensor = output[0] if isinstance(output, (tuple, list)) else output
            # [B, T, ...] or flat [B*T, H] (or Ernie-4.5-VL's fully flat [B*T*H]): one row per token.
            outputs[block] = tensor.detach().reshape(BATCH, tensor.shape[1], -1).clone() if tensor.ndim >= 3 \
                else tensor.detach().reshape(BATCH, -1, model.config.hidden_size).clone()
        handles.append(modules[block].register_forward_hook(hook))
    try:
        with torch.no_grad():
            model(**inputs)
    finally:
        for handle in handles:
            handle.remove()
    return outputs


def perturbation_truth(model, inputs):
    """{experts-module name: bool [B, T, E]}: token (b, t) was processed by expert e of that module."""
    experts = _routed_experts(model)
    base = _block_outputs(model, {block for block, _ in experts.values()}, inputs)
    generator = torch.Generator().manual_seed(1)
    truth = {}
    for name, (block, per_expert) in experts.items():
        if block not in base:
            continue  # the block did not run (Ernie-4.5-VL's vision experts on text tokens)
        assert bool(base[block].isfinite().all()), f"{block}: non-finite output"
        changed = []
        for slices in per_expert:
            saved = [tensor.detach().clone() for tensor in slices]
            with torch.no_grad():
                for tensor in slices:
                    tensor.add_(torch.randn(tensor.shape, generator=generator))
            perturbed = _block_outputs(model, [block], inputs)[block]
            with torch.no_grad():
                for tensor, value in zip(slices, saved):
                    tensor.copy_(value)
            changed.append((perturbed != base[block]).any(dim=-1))
        truth[name] = torch.stack(changed, dim=-1)
    return truth


def _experts_of_router(router_name, experts_names):
    """The experts module a router feeds: the one whose parent module also holds the router (deepest)."""
    owners = [name for name in experts_names if router_name.startswith(name.rpartition(".")[0] + ".")
              or name.startswith(router_name + ".")]  # a declared block holding its experts (Ernie-4.5-VL)
    return max(owners, key=len)


@pytest.mark.parametrize("model_type", moe_families() + tuple(VARIANTS))
def test_capture_equals_the_experts_that_really_ran(model_type):
    model = build_family_model(model_type)
    assert any(declares_router_logits(type(module)) for module in model.modules()), \
        f"{model_type}: its tiny model has no module of a class declaring _can_record_outputs['router_logits']"
    inputs = _inputs(model, model_type)
    truth = perturbation_truth(model, inputs)
    assert truth, f"{model_type}: no routed experts found"

    capture = "refused" if model_type in REFUSED else "exact"
    assert _doc_rows().get(model_type) == (routing_kinds(model_type, model), capture), \
        f"docs/monitoring.md's row of {model_type} is stale: regenerate it with python tests/hf_families.py"
    if model_type in REFUSED:
        with pytest.raises(ValueError, match=REFUSED[model_type]):
            RoutingRecorder(model)
        return

    with RoutingRecorder(model) as recorder:
        with torch.no_grad():
            model(**inputs)
        routing = recorder.routing()
    covered = set()
    for router_name, ids in routing.items():
        experts_name = _experts_of_router(router_name, truth)
        covered.add(experts_name)
        expected = truth[experts_name]
        selected = torch.zeros(*ids.shape[:2], expected.shape[-1] + 1, dtype=torch.bool)
        selected.scatter_(-1, torch.where(ids >= 0, ids, expected.shape[-1]), True)
        assert ids.shape[:2] == expected.shape[:2], (router_name, ids.shape, expected.shape)
        mismatch = (selected[..., :-1] != expected).any(dim=-1)
        assert not mismatch.any(), (
            f"{model_type} {router_name}: recorded {ids[mismatch].tolist()} but the experts that changed the "
            f"output were {[row.nonzero().flatten().tolist() for row in expected[mismatch]]}")
    assert covered == set(truth), f"{model_type}: experts without a recorded router: {set(truth) - covered}"


def test_ernie_vl_forward_with_image_tokens_is_refused_text_only_is_captured():
    model = build_family_model("ernie4_5_vl_moe_text")
    inputs = _inputs(model, "ernie4_5_vl_moe_text")
    with RoutingRecorder(model) as recorder:
        with torch.no_grad():
            model(**inputs, moe_mm_token_type_ids=torch.zeros(BATCH, SEQ, dtype=torch.long))
        assert all(ids.shape == (BATCH, SEQ, 2) for ids in recorder.routing().values())
        token_types = torch.zeros(BATCH, SEQ, dtype=torch.long)
        token_types[0, 2:4] = 1  # two image tokens
        with torch.no_grad():
            model(**inputs, moe_mm_token_type_ids=token_types)
        with pytest.raises(ValueError, match="image/video tokens"):
            recorder.routing()
