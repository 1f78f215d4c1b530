"""Tiny random-weight Hugging Face MoE models for tests (never downloads anything).

``build_tiny_model(family)`` returns an eval-mode float32 model with two or three layers, hidden size 16 and
4-8 experts, seeded so that every call gives the same weights. ``FAMILIES`` lists the supported families;
``ENCODER_DECODER`` those whose forward needs ``decoder_input_ids``; ``CAPACITY_DROP`` those whose router
drops tokens over an expert's capacity (their configs use a small capacity so that drops happen).
"""

from __future__ import annotations

import functools

import torch

HIDDEN = 16
VOCAB = 64

_COMMON = dict(vocab_size=VOCAB, hidden_size=HIDDEN, num_attention_heads=2, num_key_value_heads=2,
               max_position_embeddings=64, pad_token_id=0, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)

# family -> config overrides (besides _COMMON where the config accepts those names). Llama4 is its text model.
_CONFIGS: dict[str, dict] = {
    "mixtral": dict(num_hidden_layers=2, intermediate_size=24, num_local_experts=6, num_experts_per_tok=2),
    "qwen2_moe": dict(num_hidden_layers=2, intermediate_size=24, moe_intermediate_size=12,
                      shared_expert_intermediate_size=12, num_experts=8, num_experts_per_tok=2,
                      decoder_sparse_step=1, mlp_only_layers=[0]),
    "qwen3_moe": dict(num_hidden_layers=2, intermediate_size=24, moe_intermediate_size=12, num_experts=8,
                      num_experts_per_tok=2, head_dim=8, decoder_sparse_step=1),
    "olmoe": dict(num_hidden_layers=2, intermediate_size=12, num_experts=8, num_experts_per_tok=2),
    "deepseek_v3": dict(num_hidden_layers=3, intermediate_size=24, moe_intermediate_size=12, n_routed_experts=8,
                        num_experts_per_tok=2, n_group=2, topk_group=1, n_shared_experts=1, first_k_dense_replace=1,
                        kv_lora_rank=8, q_lora_rank=8, qk_rope_head_dim=4, qk_nope_head_dim=4, v_head_dim=8,
                        rope_scaling=None),
    "granitemoe": dict(num_hidden_layers=2, intermediate_size=12, num_local_experts=4, num_experts_per_tok=2),
    "phimoe": dict(num_hidden_layers=2, intermediate_size=12, num_local_experts=4, num_experts_per_tok=2,
                   rope_scaling=None),
    "jetmoe": dict(num_hidden_layers=2, intermediate_size=12, num_local_experts=4, num_experts_per_tok=2,
                   kv_channels=8),
    "gpt_oss": dict(num_hidden_layers=2, intermediate_size=12, num_local_experts=4, num_experts_per_tok=2,
                    head_dim=8, sliding_window=8, layer_types=["sliding_attention", "full_attention"]),
    "llama4": dict(num_hidden_layers=2, intermediate_size=12, intermediate_size_mlp=24, num_local_experts=4,
                        num_experts_per_tok=1, head_dim=8, interleave_moe_layer_step=1, no_rope_layers=[1, 1],
                        attention_chunk_size=16),
    "dbrx": dict(d_model=HIDDEN, n_heads=2, n_layers=2, max_seq_len=64, vocab_size=VOCAB,
                 attn_config=dict(kv_n_heads=2, rope_theta=10000.0, clip_qkv=8.0),
                 ffn_config=dict(ffn_hidden_size=12, moe_num_experts=4, moe_top_k=2)),
    "qwen3_next": dict(num_hidden_layers=2, intermediate_size=24, moe_intermediate_size=12,
                       shared_expert_intermediate_size=12, num_experts=8, num_experts_per_tok=2, head_dim=8,
                       linear_num_value_heads=2, linear_num_key_heads=2, linear_key_head_dim=8,
                       linear_value_head_dim=8, layer_types=["linear_attention", "full_attention"]),
    "glm4_moe": dict(num_hidden_layers=2, intermediate_size=24, moe_intermediate_size=12, n_routed_experts=8,
                     num_experts_per_tok=2, n_group=2, topk_group=1, n_shared_experts=1, first_k_dense_replace=1,
                     head_dim=8),
    "switch_transformers": dict(vocab_size=VOCAB, d_model=HIDDEN, d_kv=8, d_ff=24, num_layers=2,
                                num_decoder_layers=2, num_heads=2, num_experts=4, expert_capacity=1,
                                encoder_sparse_step=1, decoder_sparse_step=1, decoder_start_token_id=0,
                                pad_token_id=0, eos_token_id=1),
    "nllb_moe": dict(vocab_size=VOCAB, d_model=HIDDEN, encoder_layers=2, decoder_layers=2, encoder_ffn_dim=24,
                     decoder_ffn_dim=24, encoder_attention_heads=2, decoder_attention_heads=2, num_experts=4,
                     expert_capacity=3, encoder_sparse_step=1, decoder_sparse_step=1, max_position_embeddings=64,
                     decoder_start_token_id=2, pad_token_id=1, moe_eval_capacity_token_fraction=0.0),
    "doge": dict(num_hidden_layers=2, intermediate_size=12, is_moe=True, num_experts=16, num_experts_per_tok=2,
                 head_dim=8),
    "deepseek_v4": dict(num_hidden_layers=2, mlp_layer_types=["hash_moe", "moe"],
                        layer_types=["sliding_attention", "sliding_attention"], num_key_value_heads=1, head_dim=8,
                        q_lora_rank=8, moe_intermediate_size=12, n_routed_experts=4, num_experts_per_tok=2,
                        o_groups=2, o_lora_rank=8, index_n_heads=2, index_head_dim=8, index_topk=4,
                        sliding_window=8, hc_mult=2, hc_sinkhorn_iters=2, num_nextn_predict_layers=0),
    "zaya": dict(num_hidden_layers=2, num_key_value_heads=1, head_dim=8, moe_intermediate_size=12, num_experts=4,
                 num_experts_per_tok=1, router_hidden_size=8),
}

FAMILIES: tuple[str, ...] = tuple(_CONFIGS)
ENCODER_DECODER = frozenset({"switch_transformers", "nllb_moe"})
CAPACITY_DROP = frozenset({"switch_transformers", "nllb_moe"})
# transformers model_type of the families whose name differs from it.
_MODEL_TYPES = {"llama4": "llama4_text", "nllb_moe": "nllb-moe"}


def tiny_config(family: str):
    """The config of ``build_tiny_model(family)`` (a ``transformers.PretrainedConfig``)."""
    from transformers import AutoConfig

    overrides = dict(_CONFIGS[family])
    model_type = _MODEL_TYPES.get(family, family)
    config_class = type(AutoConfig.for_model(model_type))
    accepted = set(config_class.__init__.__code__.co_varnames) | set(getattr(config_class, "__annotations__", {}))
    for key, value in _COMMON.items():
        if key in accepted and key not in overrides and family not in ENCODER_DECODER and family != "dbrx":
            overrides[key] = value
    config = AutoConfig.for_model(model_type, **overrides)
    config._attn_implementation = "eager"
    config._experts_implementation = "eager"
    return config


def build_tiny_model(family: str) -> torch.nn.Module:
    """A seeded float32 eval-mode model of ``family`` (a key of ``FAMILIES``) with random weights."""
    from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM

    config = tiny_config(family)
    torch.manual_seed(0)
    auto = AutoModelForSeq2SeqLM if family in ENCODER_DECODER else AutoModelForCausalLM
    model = auto.from_config(config, dtype=torch.float32)
    if family == "nllb_moe":
        for module in model.modules():
            if type(module).__name__ == "NllbMoeExperts":
                module.__class__ = _routed_nllb_experts_class(type(module))
    return model.eval()


@functools.lru_cache(maxsize=None)
def _routed_nllb_experts_class(experts_class):
    """NLLB-MoE's experts running as the router chose: each token through every expert with a nonzero combine
    weight. transformers 5.x's own forward runs only expert_0 and expert_1 (lrc_kernels refuses that, see
    tests/test_hf_families.py); this subclass stands in for a fixed release so that NLLB's capture rule stays
    tested."""

    def forward(self, hidden_states, router_mask, router_probs):
        out = torch.zeros_like(hidden_states)
        for index in range(self.num_experts):
            expert = self[f"expert_{index}"]
            rows = (router_probs[:, index] != 0).nonzero().flatten()
            if rows.numel():
                out.index_add_(0, rows, expert(hidden_states[rows]) * router_probs[rows, index, None])
        return out

    return type("RoutedNllbMoeExperts", (experts_class,), {"forward": forward})
