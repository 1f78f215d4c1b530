"""Live routing capture (lrc_kernels.hf): router discovery and RoutingRecorder on tiny random-weight models.

The expected routing is rebuilt by instrumentation written here, independently of the library: each layer's
experts module (or, where the experts do not receive ids, its router) gets a wrapped ``forward`` that
records what it was called with or returned, and the expected ids are derived from that record by rules
stated in this file.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import subprocess
import sys
import textwrap

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

pytest.importorskip("transformers")

import hf_models  # noqa: E402
from hf_models import CAPACITY_DROP, ENCODER_DECODER, FAMILIES, build_tiny_model  # noqa: E402

from lrc_kernels import topk_from_logits  # noqa: E402
from lrc_kernels.hf import RoutingRecorder, find_routers  # noqa: E402
from lrc_kernels.hf.selection import _experts_args_selection, _experts_args_selection_with_torch  # noqa: E402
from lrc_kernels.hf.routers import RouterSite  # noqa: E402

BATCH, SEQ, DEC_SEQ = 2, 7, 5
# Families whose router emits its top-k already in processing order (descending score); the others use
# torch.topk(sorted=False) and the recorder orders their slots by descending routing weight.
UNSORTED_TOPK = {"deepseek_v3", "glm4_moe", "deepseek_v4"}
# Softmax (or plain top-k) routers without bias or group limits: the selection is the top-k of the logits.
UNBIASED = {"mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "granitemoe", "gpt_oss", "dbrx", "qwen3_next",
            "jetmoe", "llama4", "phimoe"}
# MoE layers of each tiny config (dense layers have no router; JetMoE has two routers per layer; seq2seq
# models have an encoder and a decoder stack).
EXPECTED_SITES = {"qwen2_moe": 1, "glm4_moe": 1, "jetmoe": 4, "switch_transformers": 4, "nllb_moe": 4}


@functools.lru_cache(maxsize=None)
def cached_model(family):
    return build_tiny_model(family)


def _inputs(family, generator_seed=0):
    generator = torch.Generator().manual_seed(generator_seed)
    ids = torch.randint(3, hf_models.VOCAB, (BATCH, SEQ), generator=generator)
    mask = torch.ones(BATCH, SEQ, dtype=torch.long)
    mask[1, 5:] = 0  # right padding in row 1
    inputs = dict(input_ids=ids, attention_mask=mask)
    if family in ENCODER_DECODER:
        inputs["decoder_input_ids"] = torch.randint(3, hf_models.VOCAB, (BATCH, DEC_SEQ), generator=generator)
        decoder_mask = torch.ones(BATCH, DEC_SEQ, dtype=torch.long)
        decoder_mask[0, 4:] = 0
        inputs["decoder_attention_mask"] = decoder_mask
    return inputs


def _valid(family, name, inputs):
    if family in ENCODER_DECODER and "decoder" in name.split(".")[:2]:
        return inputs["decoder_attention_mask"].bool()
    return inputs["attention_mask"].bool()


def _wrap_forward(module, on_call):
    original = module.forward

    def forward(*args, **kwargs):
        output = original(*args, **kwargs)
        on_call(args, kwargs, output)
        return output

    module.forward = forward
    return original


def _expected_from_call(family, module, args, kwargs, output):
    """Expert ids [N, k] that this call shows were processed, by this test's own rules."""
    if family == "jetmoe":  # router: experts are fed in groups of expert_size after sorting the slots
        index_sorted, _, _, expert_size, _ = output
        experts_in_order = torch.repeat_interleave(torch.arange(len(expert_size)), torch.tensor(expert_size))
        flat = torch.empty_like(index_sorted)
        flat[index_sorted] = experts_in_order.to(flat.device)
        return flat.view(-1, module.top_k)
    if family == "llama4":  # router: dense sigmoid scores, exactly 0 outside the selected experts
        scores = output[0]
        return torch.sort(scores, dim=-1, descending=True, stable=True).indices[:, :module.top_k]
    if family == "doge":  # down_embed embedding: looked up with the selected ids
        return args[0].reshape(-1, args[0].shape[-1])
    if family == "switch_transformers":  # experts: one-hot dispatch [N, 1, E], zero row = dropped
        dispatch = args[1].reshape(-1, args[1].shape[-1])
        ids = (dispatch * torch.arange(dispatch.shape[-1], device=dispatch.device)).sum(-1)
        return torch.where(dispatch.sum(-1) == 1, ids, -1)[:, None]
    if family == "nllb_moe":  # experts: (hidden, surviving top-1 one-hot, combine weights of both slots)
        top1_mask, combine = args[1], args[2]
        logits = module.router_logits_seen[-1]
        top1 = logits.argmax(-1)
        top2 = logits.scatter(-1, top1[:, None], float("-inf")).argmax(-1)
        kept1 = top1_mask.gather(-1, top1[:, None])[:, 0] == 1
        kept2 = combine.gather(-1, top2[:, None])[:, 0] > 0
        return torch.stack([torch.where(kept1, top1, -1), torch.where(kept2, top2, -1)], dim=-1)
    ids, weights = args[1], args[2]
    if family == "zaya":  # skip choice arrives as expert 0 with weight 0
        ids = torch.where(weights == 0, -1, ids)
    return ids


def _instrument(family, model):
    """Wrap the modules that reveal the selection; returns (records in call order, restore function)."""
    records, restores = [], []
    for name, module in model.named_modules():
        leaf = name.rpartition(".")[2]
        if family == "jetmoe":
            wanted = type(module).__name__ == "JetMoeTopKGating"
        elif family == "llama4":
            wanted = type(module).__name__ == "Llama4Router"
        elif family == "doge":
            wanted = leaf == "down_embed"
        else:
            wanted = leaf == "experts" and isinstance(module, torch.nn.Module) and hasattr(module, "num_experts")
        if not wanted:
            continue
        if family == "nllb_moe":
            router = model.get_submodule(name.rpartition(".")[0] + ".router")
            module.router_logits_seen = []
            restores.append((router, _wrap_forward(
                router, lambda a, k, out, m=module: m.router_logits_seen.append(out[2].detach().reshape(
                    -1, out[2].shape[-1])))))

        def on_call(args, kwargs, output, name=name, module=module):
            ids = _expected_from_call(family, module, args, kwargs, output).detach().to(torch.int64).cpu()
            weights = args[2].detach().cpu() if len(args) > 2 and family not in CAPACITY_DROP else None
            records.append((name, ids, weights))

        restores.append((module, _wrap_forward(module, on_call)))

    def restore():
        for module, forward in restores:
            module.forward = forward
        for module, _ in restores:
            module.__dict__.pop("router_logits_seen", None)
    return records, restore


def _site_key(site_name, instrumented_names):
    parent = site_name.rpartition(".")[0]
    for candidate in (site_name, site_name + ".down_embed", parent + ".experts"):
        if candidate in instrumented_names:
            return candidate
    raise AssertionError(f"no instrumented module for {site_name}")


def _hook_snapshot(model):
    return {name: (tuple(m._forward_hooks), tuple(m._forward_pre_hooks), tuple(m._forward_hooks_with_kwargs),
                   tuple(m._forward_pre_hooks_with_kwargs), tuple(m._forward_hooks_always_called))
            for name, m in model.named_modules()}


@pytest.mark.parametrize("device", ["cpu", "cuda"])
@pytest.mark.parametrize("family", FAMILIES)
def test_recorded_selection_equals_what_experts_received(family, device):
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    model = cached_model(family) if device == "cpu" else copy.deepcopy(cached_model(family)).to(device)
    inputs = _inputs(family)
    records, restore = _instrument(family, model)
    try:
        with RoutingRecorder(model) as rec, torch.no_grad():
            outputs = model(**{name: value.to(device) for name, value in inputs.items()},
                            output_router_logits=family in UNBIASED)
            routing = {name: ids.cpu() for name, ids in rec.routing().items()}
            sites = rec.sites
    finally:
        restore()

    assert len(sites) == EXPECTED_SITES.get(family, 2) == len(records) == len(routing)
    by_name = {name: (ids, weights) for name, ids, weights in records}
    for site in sites:
        ids, weights = by_name[_site_key(site.name, by_name)]
        valid = _valid(family, site.name, inputs)
        batch, seq = valid.shape
        assert ids.shape == (batch * seq, site.top_k)
        got = routing[site.name]
        assert got.dtype == torch.int64 and got.shape == (batch, seq, site.top_k)
        assert torch.equal(got[~valid], torch.full_like(got[~valid], -1)), "padding must be -1"
        received = ids.view(batch, seq, -1)
        if family in UNSORTED_TOPK:
            # Same experts; order = descending routing weight of the call.
            assert torch.equal(got[valid].sort(-1).values, received[valid].sort(-1).values)
            match = got[..., :, None] == received[..., None, :]  # [B, T, k recorded, k received]
            ordered = (match * weights.view(batch, seq, 1, -1)).sum(-1)  # weight of each recorded slot
            assert bool((ordered[..., :-1] >= ordered[..., 1:])[valid].all())
        else:
            assert torch.equal(got[valid], received[valid])

    if family in UNBIASED:
        logits = outputs.router_logits
        assert len(logits) == len(records)
        for (name, _, _), layer_logits in zip(records, logits):
            site = next(s for s in sites if _site_key(s.name, by_name) == name)
            valid = _valid(family, site.name, inputs)
            expected = topk_from_logits(layer_logits.reshape(-1, site.num_experts).float().cpu(), site.top_k)
            expected = expected.view(*valid.shape, -1)
            assert torch.equal(routing[site.name][valid], expected[valid])


def test_unsorted_topk_is_ordered_by_routing_weight():
    """A router that emits its top-k unordered (torch.topk(sorted=False) on a GPU) is reported in descending
    weight order: here the DeepSeek-V3 routers' slots are reversed, and the recording must equal the order an
    unmodified run passes to the experts."""
    model = build_tiny_model("deepseek_v3")
    inputs = _inputs("deepseek_v3")
    reference, restore = _instrument("deepseek_v3", model)
    with torch.no_grad():
        model(**inputs)
    restore()
    gates = [module for name, module in model.named_modules() if name.endswith("mlp.gate")]
    for gate in gates:
        def reversed_forward(hidden, original=gate.forward):
            logits, weights, ids = original(hidden)
            return logits, weights.flip(-1), ids.flip(-1)
        gate.forward = reversed_forward
    received, restore = _instrument("deepseek_v3", model)
    try:
        with RoutingRecorder(model) as rec, torch.no_grad():
            model(**inputs)
            routing = rec.routing()
    finally:
        restore()
    valid = inputs["attention_mask"].bool()
    for site, (_, expected, _), (_, flipped, _) in zip(rec.sites, reference, received):
        assert torch.equal(flipped, expected.flip(-1))
        assert torch.equal(routing[site.name][valid], expected.view(BATCH, SEQ, -1)[valid])


@pytest.mark.parametrize("family", sorted(CAPACITY_DROP))
def test_capacity_drops_are_minus_one(family):
    model = cached_model(family)
    inputs = _inputs(family)
    with RoutingRecorder(model) as rec, torch.no_grad():
        model(**inputs)
        routing = rec.routing()
    capacity = model.config.expert_capacity
    for site in rec.sites:
        got = routing[site.name]
        valid = _valid(family, site.name, inputs)
        dropped = (got == -1) & valid[..., None]
        # Switch: 4 experts x capacity 1 per sequence < 5 valid tokens in some row of each stack. NLLB: 4 x 3
        # slots per batch < 2 slots x 10 valid tokens. So every layer must drop a valid token's slot.
        assert bool(dropped.any()), f"{site.name}: the tiny capacity must drop some tokens"
        kept = got[got >= 0]
        # No expert may hold more slots than its capacity (Switch counts per sequence, NLLB per batch).
        if family == "switch_transformers":
            per_sequence = torch.stack([torch.bincount(row[row >= 0], minlength=site.num_experts)
                                        for row in got.view(got.shape[0], -1)])
            assert int(per_sequence.max()) <= capacity
        else:
            assert int(torch.bincount(kept, minlength=site.num_experts).max()) <= capacity


def test_zaya_skip_choice_is_minus_one():
    model = build_tiny_model("zaya")
    for module in model.modules():
        if type(module).__name__ == "ZayaRouter":
            module.balancing_biases[-1] = 0.7  # make the extra "skip" class win for some tokens
    inputs = _inputs("zaya")
    records, restore = _instrument("zaya", model)
    try:
        with RoutingRecorder(model) as rec, torch.no_grad():
            model(**inputs)
            routing = rec.routing()
    finally:
        restore()
    valid = inputs["attention_mask"].bool()
    skipped = 0
    for site, (_, ids, _) in zip(rec.sites, records):
        assert torch.equal(routing[site.name][valid], ids.view(BATCH, SEQ, -1)[valid])
        skipped += int((routing[site.name][valid] == -1).sum())
    assert skipped > 0


def test_logits_topk_capture_matches_topk_from_logits():
    model = cached_model("deepseek_v3")  # biased, group-limited router: logits top-k is not the selection
    inputs = _inputs("deepseek_v3")
    with RoutingRecorder(model, capture="logits_topk") as rec, torch.no_grad():
        outputs = model(**inputs, output_router_logits=True)
        from_logits = rec.routing()
    with RoutingRecorder(model) as rec_selected, torch.no_grad():
        model(**inputs)
        selected = rec_selected.routing()
    valid = inputs["attention_mask"].bool()
    differs = False
    for site, logits in zip(rec.sites, outputs.router_logits):
        expected = topk_from_logits(logits.float(), site.top_k).view(BATCH, SEQ, -1)
        assert torch.equal(from_logits[site.name][valid], expected[valid])
        assert bool((from_logits[site.name][~valid] == -1).all())
        differs |= not torch.equal(from_logits[site.name], selected[site.name])
    assert differs, "group-limited biased routing should differ from logit top-k somewhere"


def test_logits_topk_skips_sites_without_expert_logits():
    model = cached_model("deepseek_v4")
    all_sites = find_routers(model)
    with RoutingRecorder(model, capture="logits_topk") as rec:
        pass
    assert [s.name for s in rec.sites] == [s.name for s in all_sites if s.name != "model.layers.0.mlp.gate"]
    with pytest.raises(ValueError, match="DogeForCausalLM"):
        RoutingRecorder(cached_model("doge"), capture="logits_topk")


def test_hooks_removed_on_exit_and_after_exception():
    model = cached_model("mixtral")
    before = _hook_snapshot(model)
    with RoutingRecorder(model):
        assert _hook_snapshot(model) != before
    assert _hook_snapshot(model) == before
    with pytest.raises(KeyError, match="inside"):
        with RoutingRecorder(model), torch.no_grad():
            model(**_inputs("mixtral"))
            raise KeyError("inside")
    assert _hook_snapshot(model) == before


def test_router_without_experts_call_is_an_error():
    model = build_tiny_model("mixtral")
    block = model.model.layers[1].mlp
    block.forward = lambda hidden: hidden + 0 * block.gate(hidden)[0].sum()  # a "fused" block skipping experts
    with RoutingRecorder(model) as rec, torch.no_grad():
        model(**_inputs("mixtral"))
        with pytest.raises(RuntimeError, match="model.layers.1.mlp.gate: the router ran but MixtralExperts"):
            rec.routing()


def test_recorder_is_single_use_and_checks_its_state():
    model = cached_model("olmoe")
    rec = RoutingRecorder(model)
    with pytest.raises(RuntimeError, match="before entering"):
        rec.routing()
    with rec:
        with pytest.raises(RuntimeError, match="no forward pass"):
            rec.routing()
    with pytest.raises(RuntimeError, match="no forward pass"):  # after the block: still the last pass
        rec.routing()
    with pytest.raises(RuntimeError, match="single-use"):
        with rec:
            pass
    with pytest.raises(ValueError, match="capture"):
        RoutingRecorder(model, capture="logits")


def test_packed_sequences_become_rows():
    model = cached_model("mixtral")
    ids = torch.randint(3, hf_models.VOCAB, (2, 6), generator=torch.Generator().manual_seed(1))
    mask = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0]])
    packed_positions = torch.tensor([[0, 1, 2, 0, 1, 2], [0, 1, 2, 3, 4, 5]])
    records, restore = _instrument("mixtral", model)
    try:
        with RoutingRecorder(model) as rec, torch.no_grad():
            model(input_ids=ids, attention_mask=mask, position_ids=packed_positions)
            packed, lengths = rec.routing(), rec.lengths()
            # Left padding with generate-style positions (first real token at 0) is not packing.
            model(input_ids=ids, attention_mask=mask.flip(1), position_ids=torch.tensor(
                [[0, 1, 2, 3, 4, 5], [1, 1, 0, 1, 2, 3]]))
            left_padded, left_lengths = rec.routing(), rec.lengths()
    finally:
        restore()
    for site, (_, ids_packed, _), (_, ids_left, _) in zip(rec.sites, records[:2], records[2:]):
        received = ids_packed.view(2, 6, -1)
        minus = torch.full((1, 2), -1)
        expected = torch.stack([torch.cat([received[0, :3], minus]), torch.cat([received[0, 3:], minus]),
                                received[1, :4]])
        assert torch.equal(packed[site.name], expected)
        assert lengths[site.name].tolist() == [3, 3, 4]
        received_left = ids_left.view(2, 6, -1).clone()
        received_left[1, :2] = -1
        assert torch.equal(left_padded[site.name], received_left)
        assert left_lengths[site.name].tolist() == [6, 6]


def test_generation_with_cache_uses_last_mask_columns():
    model = cached_model("qwen3_moe")
    ids = torch.randint(3, hf_models.VOCAB, (2, 4), generator=torch.Generator().manual_seed(2))
    mask = torch.tensor([[1, 1, 1, 1], [0, 1, 1, 1]])
    with RoutingRecorder(model) as rec, torch.no_grad():
        model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=2, do_sample=False, pad_token_id=0)
        routing = rec.routing()
    for site in rec.sites:
        got = routing[site.name]
        assert got.shape == (2, 1, site.top_k)
        assert bool((got >= 0).all()) and bool((got < site.num_experts).all())


def test_training_with_gradient_checkpointing_records_the_forward():
    model = build_tiny_model("mixtral")
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    inputs = _inputs("mixtral")
    records, restore = _instrument("mixtral", model)
    experts_calls = []
    counters = [module.register_forward_pre_hook(lambda *args: experts_calls.append(1))
                for name, module in model.named_modules() if name.endswith("mlp.experts")]
    try:
        with RoutingRecorder(model) as rec:
            loss = model(**inputs, labels=inputs["input_ids"]).loss
            routing_forward = rec.routing()
            loss.backward()  # recomputes the layers: router calls outside the model call are ignored
            routing_after_backward = rec.routing()
    finally:
        restore()
        for counter in counters:
            counter.remove()
    assert len(experts_calls) == 4  # two layers, each run in forward and again in backward
    valid = inputs["attention_mask"].bool()
    for site, (_, ids, _) in zip(rec.sites, records[:2]):
        assert not routing_forward[site.name].requires_grad
        assert torch.equal(routing_forward[site.name][valid], ids.view(BATCH, SEQ, -1)[valid])
        assert torch.equal(routing_after_backward[site.name], routing_forward[site.name])


@contextlib.contextmanager
def _no_sync(device):
    """On CUDA, any device synchronisation inside the block raises (sync-debug mode "error")."""
    if device == "cuda":
        torch.cuda.set_sync_debug_mode("error")
    try:
        yield
    finally:
        if device == "cuda":
            torch.cuda.set_sync_debug_mode("default")


@pytest.mark.parametrize("family", ["mixtral", "switch_transformers", "nllb_moe", "doge", "zaya", "llama4"])
@pytest.mark.parametrize("device", ["meta", "cuda"])
def test_hooks_never_read_tensor_values(family, device):
    """Hooks run on meta tensors (no values: any .item(), bool() or copy to host raises) and, on a GPU,
    under CUDA sync-debug mode "error"."""
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    model = cached_model(family)
    num_tokens = 6
    captures = ("selected", "logits_topk") if family != "doge" else ("selected",)
    accumulates = (False,) if family in ENCODER_DECODER else (False, True)
    for capture, accumulate in [(c, a) for c in captures for a in accumulates]:
        with RoutingRecorder(model, capture=capture, accumulate=accumulate) as rec, _no_sync(device):
            rec._on_model_call(model, (), {"input_ids": torch.zeros(2, 3, dtype=torch.long, device=device),
                                           "attention_mask": torch.ones(2, 5, dtype=torch.long, device=device)})
            for site in rec.sites:
                E, k = site.num_experts, site.top_k
                ids = torch.zeros(num_tokens, k, dtype=torch.long, device=device)
                weights = torch.zeros(num_tokens, k, device=device)
                one_hot = torch.zeros(num_tokens, E, dtype=torch.long, device=device)
                args = {"switch_transformers": (None, one_hot[:, None], weights),
                        "nllb_moe": (None, one_hot, one_hot.float()),
                        "doge": (ids,)}.get(family, (None, ids, weights))
                logits = torch.zeros(num_tokens, E + (family == "zaya"), device=device)
                output = {"llama4": (logits, logits)}.get(family, (logits, logits, logits))
                # The recorder's hooks are the kwargs-taking ones (transformers adds plain ones).
                pre, post = site.capture_module, site.router
                for key in pre._forward_pre_hooks_with_kwargs:
                    pre._forward_pre_hooks[key](pre, args, {})
                for key in post._forward_hooks_with_kwargs:
                    post._forward_hooks[key](post, (), {}, output)
                assert len(rec._captures[site.name]) == 1
                captured = rec._captures[site.name][0][0]  # some readers leave their work for after the pass
                assert (captured() if callable(captured) else captured).shape == (num_tokens, k)
            rec._on_model_return(model, (), object())  # with accumulate=True: keeps the pass, still no sync
            assert len(rec._groups) == accumulate


def test_model_without_moe_layers_is_rejected():
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=16, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=2)
    with pytest.raises(ValueError, match="LlamaForCausalLM"):
        find_routers(LlamaForCausalLM(config))


def test_site_fields():
    sites = find_routers(cached_model("switch_transformers"))
    assert [(s.stage, s.layer, s.num_experts, s.top_k) for s in sites] == [
        ("encoder", 0, 4, 1), ("encoder", 1, 4, 1), ("decoder", 0, 4, 1), ("decoder", 1, 4, 1)]
    jet = find_routers(cached_model("jetmoe"))
    assert [s.name for s in jet[:2]] == ["model.layers.0.mlp.router", "model.layers.0.self_attention.experts.router"]
    v4 = find_routers(cached_model("deepseek_v4"))
    assert [type(s.router).__name__ for s in v4] == ["DeepseekV4HashRouter", "DeepseekV4TopKRouter"]


def _run_python(code):
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=120)


def test_import_lrc_kernels_does_not_import_transformers():
    result = _run_python("""
        import sys, lrc_kernels
        assert 'transformers' not in sys.modules, 'transformers imported'
    """)
    assert result.returncode == 0, result.stderr


def test_missing_transformers_names_the_hf_extra_and_monitor_still_works():
    result = _run_python("""
        import sys
        sys.modules['transformers'] = None
        import torch
        from lrc_kernels.hf import RoutingMonitor
        monitor = RoutingMonitor(seg_lens=(2,), policies=("lru",), num_experts=4)
        monitor.update([torch.tensor([[[0], [1], [0]]])])
        print("monitor ok")
        try:
            from lrc_kernels.hf import find_routers
        except ImportError as error:
            print(error)
    """)
    assert result.returncode == 0, result.stderr
    assert "monitor ok" in result.stdout
    assert "pip install 'lrc-kernels[hf]'" in result.stdout


def test_lazy_exports():
    import lrc_kernels.hf as hf

    for name in ("RoutingMonitor", "RoutingRecorder", "find_routers", "RouterSite"):
        assert name in hf.__all__ and getattr(hf, name).__name__ == name
    with pytest.raises(AttributeError):
        hf.NoSuchName


def test_each_forward_pass_replaces_the_recorded_routing():
    model = hf_models.build_tiny_model("mixtral")
    first, second = _inputs("mixtral", 0), _inputs("mixtral", 1)
    second["attention_mask"][0, 3:] = 0
    with RoutingRecorder(model) as rec, torch.no_grad():
        model(**first)
        routing_first, lengths_first = rec.routing(), rec.lengths()
        assert rec.routing().keys() == routing_first.keys()
        model(input_ids=second["input_ids"][:1], attention_mask=second["attention_mask"][:1])
        routing_second, lengths_second = rec.routing(), rec.lengths()
    name = rec.sites[0].name
    assert routing_first[name].shape[0] == BATCH and routing_second[name].shape[0] == 1
    assert lengths_first[name].tolist() == [SEQ, 5] + [SEQ] * (BATCH - 2)
    assert lengths_second[name].tolist() == [3]
    assert (routing_second[name][0, 3:] == -1).all() and (routing_second[name][0, :3] >= 0).all()


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), rows=st.integers(0, 40), top_k=st.integers(1, 6),
       dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float16, torch.float64]),
       order_by_weight=st.booleans(), zero_weight_is_skip=st.booleans(), already_sorted=st.booleans())
def test_cpu_selection_equals_the_torch_formulation(seed, rows, top_k, dtype, order_by_weight, zero_weight_is_skip,
                                                    already_sorted):
    """The recorder's numpy path for CPU captures equals the torch one kept for other devices: ids past E
    become -1, zero weights too where they mean "skip", and unsorted rows are put in descending weight order
    (ties in weight keep slot order). Weights on a coarse grid make ties and exact zeros frequent."""
    generator = torch.Generator().manual_seed(seed)
    num_experts = 8
    ids = torch.randint(0, num_experts + 3, (rows, top_k), generator=generator)
    weights = (torch.randint(0, 4, (rows, top_k), generator=generator) / 4).to(dtype)
    if already_sorted:
        weights = weights.sort(dim=-1, descending=True).values
    site = RouterSite("layers.0.mlp.gate", 0, "decoder", num_experts, top_k, router=None, capture_module=None,
                      order_by_weight=order_by_weight, zero_weight_is_skip=zero_weight_is_skip)
    expected = _experts_args_selection_with_torch(site, ids.clone(), weights.clone())
    received = _experts_args_selection(site, ids.clone(), weights.clone())
    assert received.dtype == torch.int64
    assert torch.equal(received, expected)
