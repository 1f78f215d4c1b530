"""Cache planning: the exact split against brute force, sizes for a target and the knee against scans, bytes."""

import itertools
import math
from fractions import Fraction

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import lrc_kernels as lk
from lrc_kernels.plan import best_hits_by_budget, split_hits, uniform_split
from lrc_kernels.plan_bytes import expert_size, slots_for_gib, split_cost

from conftest import TRACE_KINDS, generate_trace

POLICY_ARGS = [("sch", 1), ("sch", 3), ("lru", None), ("lfu", None), ("belady", None)]


def brute_force_split(layers, total_slots, min_slots):
    """Every split in the box, ordered by (most hits, fewest slots, lexicographically smallest sizes)."""
    best_key, best_sizes = None, None
    for sizes in itertools.product(*[range(min_slots, len(layer) + 1) for layer in layers]):
        if sum(sizes) > total_slots:
            continue
        hits = sum(int(layer[m - 1]) for layer, m in zip(layers, sizes) if m)
        key = (-hits, sum(sizes), sizes)
        if best_key is None or key < best_key:
            best_key, best_sizes = key, list(sizes)
    return best_sizes


def _layer_hits(kind, policy, seg_len, num_layers, num_experts, seed):
    """Per-layer hits of one policy summed over sequences: int64 [n_layers, E]."""
    k = 1 + seed % min(2, num_experts)
    return torch.stack([
        lk.cache_hits(generate_trace(kind, 2, 12, k, num_experts, drop_prob=0.1, seed=seed + layer), num_experts,
                      policy, seg_len=seg_len).sum(0)
        for layer in range(num_layers)])


@given(kind=st.sampled_from(TRACE_KINDS), policy=st.sampled_from(POLICY_ARGS), num_layers=st.integers(1, 3),
       num_experts=st.integers(1, 5), seed=st.integers(0, 10_000), min_slots=st.integers(0, 1), data=st.data())
def test_allocation_is_the_brute_force_optimum_for_every_policy(kind, policy, num_layers, num_experts, seed,
                                                                min_slots, data):
    hits = _layer_hits(kind, *policy, num_layers, num_experts, seed)
    budget = data.draw(st.integers(num_layers * min_slots, num_layers * num_experts + 2), label="budget")
    sizes = lk.allocate_cache(hits, budget, min_slots=min_slots)
    assert sizes.dtype == torch.int64
    assert sizes.tolist() == brute_force_split(hits.tolist(), budget, min_slots)


curves = st.lists(st.integers(0, 6), min_size=1, max_size=5).map(lambda steps: list(itertools.accumulate(steps)))


@given(layers=st.lists(curves, min_size=1, max_size=4), min_slots=st.integers(0, 1), data=st.data())
def test_allocation_of_non_concave_curves_with_different_e_is_the_brute_force_optimum(layers, min_slots, data):
    min_slots = min(min_slots, min(len(layer) for layer in layers))
    total = sum(len(layer) for layer in layers)
    budget = data.draw(st.integers(len(layers) * min_slots, total + 1), label="budget")
    hits = [torch.tensor(layer) for layer in layers]
    assert lk.allocate_cache(hits, budget, min_slots=min_slots).tolist() == brute_force_split(layers, budget,
                                                                                                min_slots)


@given(layers=st.lists(curves, min_size=1, max_size=4), min_slots=st.integers(0, 1))
def test_best_hits_by_budget_is_monotone_and_matches_every_allocation(layers, min_slots):
    min_slots = min(min_slots, min(len(layer) for layer in layers))
    hits = [torch.tensor(layer) for layer in layers]
    by_budget = best_hits_by_budget(hits, min_slots=min_slots)
    assert by_budget.shape == (sum(len(layer) for layer in layers) + 1,)
    floor = len(layers) * min_slots
    assert (by_budget[:floor] == -1).all()
    for budget in range(floor, by_budget.numel()):
        sizes = lk.allocate_cache(hits, budget, min_slots=min_slots)
        assert split_hits(hits, sizes) == by_budget[budget]
        assert split_hits(hits, uniform_split(hits, budget, min_slots=min_slots)) <= by_budget[budget]
        assert int(sizes.sum()) <= budget and all(min_slots <= m <= len(h) for m, h in zip(sizes.tolist(), layers))
    assert (by_budget[floor + 1:] >= by_budget[floor:-1]).all()


def test_allocation_tie_rule_fewest_slots_then_earliest_layers_smallest():
    flat = torch.tensor([[3, 3, 3], [3, 3, 3]])                 # every split with >= 1 slot each: 6 hits
    assert lk.allocate_cache(flat, 6).tolist() == [1, 1]         # fewest slots, the rest left unused
    linear = torch.tensor([[1, 2, 3], [1, 2, 3]])                # every split of 3 slots gives 3 hits
    assert lk.allocate_cache(linear, 3).tolist() == [0, 3]
    assert lk.allocate_cache(linear, 3, min_slots=1).tolist() == [1, 2]
    assert lk.allocate_cache(linear, 0).tolist() == [0, 0]


def test_allocation_beats_greedy_on_a_non_concave_curve():
    # Layer 1 pays only at its third slot: greedy by marginal gain takes layer 0's slots first.
    hits = torch.tensor([[4, 5, 6], [0, 0, 9]])
    assert lk.allocate_cache(hits, 3).tolist() == [0, 3]
    assert split_hits(hits, uniform_split(hits, 3)) == 4


@given(layers=st.lists(curves, min_size=1, max_size=3), target=st.floats(1e-6, 1.0))
def test_cache_size_for_matches_a_scan(layers, target):
    rates = [torch.tensor(layer, dtype=torch.float64) / max(layer[-1], 1) for layer in layers]
    expected = [next((m for m in range(1, len(r) + 1) if r[m - 1] >= target), -1) for r in rates]
    assert lk.cache_size_for(rates, target).tolist() == expected
    assert lk.cache_size_for(rates[0], target).item() == expected[0]


def test_cache_size_for_a_layer_without_references_is_unreachable():
    curve = torch.tensor([[0.5, 1.0], [math.nan, math.nan]], dtype=torch.float64)
    assert lk.cache_size_for(curve, 1.0).tolist() == [2, -1]


@given(layers=st.lists(curves, min_size=1, max_size=3), scale=st.integers(1, 7))
def test_cache_knee_matches_the_chord_rule_by_exact_scan_and_is_scale_free(layers, scale):
    expected = []
    for layer in layers:
        size = len(layer)
        gaps = [Fraction(layer[m - 1]) - Fraction(layer[-1] * m, size) for m in range(1, size + 1)]
        best = max(gaps)
        expected.append(gaps.index(best) + 1 if best > 0 else -1)
    hits = [torch.tensor(layer) for layer in layers]
    assert lk.cache_knee(hits).tolist() == expected
    assert lk.cache_knee([h * scale for h in hits]).tolist() == expected


@given(layer=curves.filter(lambda layer: len(layer) >= 2), stretch=st.integers(2, 4))
def test_cache_knee_scales_with_the_size_axis(layer, stretch):
    """Stretch m by c (linear in between, hits times c): the knee moves to c times the knee (m / E is kept)."""
    stretched = []
    previous = 0
    for value in layer:
        stretched += [stretch * previous + step * (value - previous) for step in range(1, stretch + 1)]
        previous = value
    knee = lk.cache_knee(torch.tensor(layer)).item()
    assert lk.cache_knee(torch.tensor(stretched)).item() == (stretch * knee if knee > 0 else -1)


def test_cache_knee_of_uniform_routing_is_minus_one_and_of_a_concave_curve_its_bend():
    assert lk.cache_knee(torch.arange(1, 9) * 10).item() == -1                   # a straight line: no knee
    # gaps to the chord 10·m: 5, 8, 9, 8, 5, 3, 1, 0 -> largest at m = 3
    assert lk.cache_knee(torch.tensor([15, 28, 39, 48, 55, 63, 71, 80])).item() == 3
    assert lk.cache_knee(torch.tensor([15, 28, 39, 48, 55, 63, 71, 80], dtype=torch.float64) / 80).item() == 3


def test_cache_regret_is_the_gap_to_belady_and_to_every_sch():
    curves = {"sch@4": torch.tensor([0.5, 1.0]), "lru": torch.tensor([0.25, 0.75]),
              "belady": torch.tensor([0.75, 1.0])}
    regret = lk.cache_regret(curves)
    assert sorted(regret) == ["belady", "sch@4"]
    assert regret["belady"]["lru"].tolist() == [0.5, 0.25] and regret["belady"]["sch@4"].tolist() == [0.25, 0.0]
    assert regret["sch@4"]["belady"].tolist() == [-0.25, 0.0]


# ---------------------------------------------------------------------------------------- bytes and time

def test_mixtral_expert_bytes_by_hand():
    # 3 matrices of hidden x intermediate = 3 · 4096 · 14336 = 176_160_768 parameters; bfloat16 = 2 bytes.
    config = {"model_type": "mixtral", "hidden_size": 4096, "intermediate_size": 14336, "num_local_experts": 8,
              "torch_dtype": "bfloat16"}
    size = expert_size(config)
    assert size.parameters == 3 * 4096 * 14336 == 176_160_768
    assert size.bytes == 2 * 176_160_768
    assert expert_size(config, dtype_bytes=4).bytes == 4 * 176_160_768
    # 24 GiB = 24 · 1024 MiB; one expert is 336 MiB -> 73 whole experts (73 · 336 = 24528 <= 24576 < 74 · 336)
    assert size.bytes == 336 * 2**20 and slots_for_gib(24, size.bytes) == 73


def test_family_fields_and_quantised_checkpoints_by_hand():
    qwen = {"model_type": "qwen3_moe", "hidden_size": 64, "intermediate_size": 999, "moe_intermediate_size": 32,
            "dtype": "bfloat16"}
    assert expert_size(qwen).bytes == 2 * 3 * 64 * 32
    olmoe = {"model_type": "olmoe", "hidden_size": 64, "intermediate_size": 16, "dtype": "float32"}
    assert expert_size(olmoe).bytes == 4 * 3 * 64 * 16
    # GPT-OSS MXFP4: 3·64·32 = 6144 weights at 0.5 B = 3072 B, one 1 B scale per 32 inputs: gate_up 64 rows ·
    # (64/32) + down 64 rows · (32/32) = 192 B; biases 2·32 + 64 = 128 at 2 B = 256 B.
    gpt_oss = {"model_type": "gpt_oss", "hidden_size": 64, "intermediate_size": 32, "torch_dtype": "bfloat16",
               "quantization_config": {"quant_method": "mxfp4"}}
    assert expert_size(gpt_oss).parameters == 6144 + 128
    assert expert_size(gpt_oss).bytes == 3072 + 192 + 256
    # DeepSeek-V3 FP8 with 128 x 128 blocks: gate_up 512 x 256 -> 4 · 2 blocks, down 256 x 256 -> 2 · 2 blocks.
    deepseek = {"model_type": "deepseek_v3", "hidden_size": 256, "moe_intermediate_size": 256,
                "n_routed_experts": 8, "torch_dtype": "bfloat16",
                "quantization_config": {"quant_method": "fp8", "weight_block_size": [128, 128]}}
    assert expert_size(deepseek).bytes == 3 * 256 * 256 + 4 * (8 + 4)


FAMILY_CONFIGS = {
    "mixtral": {"num_local_experts": 4, "intermediate_size": 24},
    "qwen2_moe": {"num_experts": 4, "moe_intermediate_size": 24, "intermediate_size": 40,
                  "shared_expert_intermediate_size": 40},
    "qwen3_moe": {"num_experts": 4, "moe_intermediate_size": 24, "intermediate_size": 40},
    "deepseek_v2": {"n_routed_experts": 4, "moe_intermediate_size": 24, "intermediate_size": 40,
                    "first_k_dense_replace": 0, "n_shared_experts": 1},
    "deepseek_v3": {"n_routed_experts": 4, "moe_intermediate_size": 24, "intermediate_size": 40,
                    "first_k_dense_replace": 0, "n_shared_experts": 1, "n_group": 1, "topk_group": 1},
    "olmoe": {"num_experts": 4, "intermediate_size": 24},
    "gpt_oss": {"num_local_experts": 4, "intermediate_size": 24},
}


@pytest.mark.parametrize("model_type", sorted(FAMILY_CONFIGS))
def test_expert_parameters_match_the_transformers_module(model_type):
    """The parameter count of one routed expert equals that of the family's experts module divided by E."""
    transformers = pytest.importorskip("transformers")
    fields = {"model_type": model_type, "hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2,
              "num_key_value_heads": 2, "vocab_size": 64, "num_experts_per_tok": 2, "dtype": "float32",
              **FAMILY_CONFIGS[model_type]}
    config = transformers.AutoConfig.for_model(**fields)
    model = transformers.AutoModelForCausalLM.from_config(config)
    experts = [module for module in model.modules() if type(module).__name__.endswith("Experts")]
    assert len(experts) == 1
    parameters = sum(p.numel() for p in experts[0].parameters())
    assert parameters % 4 == 0
    assert expert_size(config).parameters == parameters // 4
    assert expert_size(fields).bytes == 4 * parameters // 4


def test_split_cost_arithmetic():
    hits = torch.tensor([[5, 6, 6, 6], [1, 2, 8, 9]])
    # sizes [1, 3]: 5 + 8 = 13 hits of 20 references over 10 tokens -> 0.7 misses per token, 700 B per token
    cost = split_cost(hits, torch.tensor([1, 3]), 20, 10, expert_bytes=1000, bandwidth_gbs=25.0)
    assert (cost.slots, cost.hits, cost.hit_rate) == (4, 13, 0.65)
    assert cost.misses_per_token == 0.7 and cost.bytes_per_token == 700.0
    assert cost.tokens_per_s_ceiling == 25e9 / 700.0
    unsized = split_cost(hits, torch.tensor([1, 3]), 20, 10)
    assert unsized.bytes_per_token is None and unsized.tokens_per_s_ceiling is None
    assert split_cost(hits, torch.tensor([4, 4]), 15, 10, expert_bytes=1).tokens_per_s_ceiling is None


# ----------------------------------------------------------------------------------------------- bad input

HITS = torch.tensor([[1, 2, 3], [1, 2, 3]])


@pytest.mark.parametrize("call,error,message", [
    (lambda: lk.allocate_cache(HITS, -1), ValueError, "total_slots: expected an int >= 0"),
    (lambda: lk.allocate_cache(HITS, 2.5), TypeError, "total_slots: expected an int"),
    (lambda: lk.allocate_cache(HITS, 3, min_slots=2), ValueError, "total_slots: expected at least n_layers"),
    (lambda: lk.allocate_cache(HITS, 3, min_slots=4), ValueError, "min_slots: expected at most"),
    (lambda: lk.allocate_cache(HITS, 3, min_slots=-1), ValueError, "min_slots: expected an int >= 0"),
    (lambda: lk.allocate_cache(HITS.double(), 3), TypeError, "hits: expected integer hit counts"),
    (lambda: lk.allocate_cache(torch.tensor([[1, 3, 2]]), 3), ValueError, "hits: expected values non-decreasing"),
    (lambda: lk.allocate_cache(torch.tensor([[-1, 3]]), 3), ValueError, "hits: expected non-negative"),
    (lambda: lk.allocate_cache(torch.tensor([1, 2]), 3), ValueError, "hits: expected a 2-D tensor"),
    (lambda: lk.allocate_cache([torch.tensor([1]), [2]], 3), TypeError, "hits: expected a list of 1-D tensors"),
    (lambda: lk.allocate_cache([], 3), ValueError, "hits: expected at least one layer"),
    (lambda: lk.cache_size_for(torch.tensor([0.5, 1.0]), 0.0), ValueError, "target: expected a hit rate in (0, 1]"),
    (lambda: lk.cache_size_for(torch.tensor([0.5, 1.0]), 1.5), ValueError, "target: expected a hit rate in (0, 1]"),
    (lambda: lk.cache_size_for(torch.tensor([0.5, 1.0]), math.nan), ValueError, "target: expected"),
    (lambda: lk.cache_size_for(torch.tensor([0.5, 1.0]), "0.5"), TypeError, "target: expected a float"),
    (lambda: lk.cache_size_for(torch.tensor([1, 2]), 0.5), TypeError, "curve: expected float hit rates"),
    (lambda: lk.cache_size_for(torch.tensor([0.9, 0.5]), 0.5), ValueError, "curve: expected values non-decreasing"),
    (lambda: lk.cache_size_for(torch.tensor([0.5, 2.0]), 0.5), ValueError, "curve: expected hit rates in [0, 1]"),
    (lambda: lk.cache_knee(torch.tensor([3, 1])), ValueError, "curve: expected values non-decreasing"),
    (lambda: expert_size({"model_type": "llama", "hidden_size": 8}), ValueError, "config: model_type 'llama'"),
    (lambda: expert_size({"model_type": "mixtral", "hidden_size": 8, "dtype": "float32"}), ValueError,
     "config: a 'mixtral' config needs a positive integer 'intermediate_size'"),
    (lambda: expert_size({"model_type": "mixtral", "hidden_size": 8, "intermediate_size": 8}), ValueError,
     "config: expected a 'dtype' or 'torch_dtype'"),
    (lambda: expert_size({"model_type": "mixtral", "hidden_size": 8, "intermediate_size": 8, "dtype": "float16",
                          "quantization_config": {"quant_method": "awq"}}), ValueError, "config: quantization"),
    (lambda: expert_size("/nonexistent/config.json"), ValueError, "config: cannot read"),
    (lambda: slots_for_gib(-1.0, 10), ValueError, "cache_gib: expected a finite number >= 0"),
    (lambda: slots_for_gib(1.0, 0), ValueError, "expert_bytes: expected an int >= 1"),
    (lambda: split_cost(HITS, torch.tensor([1, 1]), 1, 1), ValueError, "references: expected at least"),
    (lambda: split_cost(HITS, torch.tensor([1, 1]), 9, 1, bandwidth_gbs=0), ValueError, "bandwidth_gbs"),
    (lambda: split_cost(HITS, torch.tensor([1, 4]), 9, 1), ValueError, "sizes: expected layer 1's size"),
])
def test_bad_input_names_the_argument(call, error, message):
    with pytest.raises(error) as raised:
        call()
    assert str(raised.value).startswith(message)
