"""Every Mixture-of-Experts family of the installed transformers, as tiny random-weight models.

Enumeration (``moe_families()``): a *family* is a transformers ``model_type`` whose config class has no
sub-configs (a single text stack, not a multimodal wrapper), whose modeling module mentions
``router_logits``, whose model type does not name a vision/audio/speech tower, and whose modeling module declares a class's
``_can_record_outputs["router_logits"]`` (how transformers itself marks its MoE routers; the test checks that
the built model holds a module of such a class). Nothing is listed by hand, so a new transformers release's
families are enumerated, built and checked, not assumed.

Building (``build_family_model(model_type)``): the config class's defaults shrunk by generic name rules
(``_shrink``: 2 layers, width 32, 8 routed experts, top-2, tiny heads and ranks, every layer sparse), then the
few family-specific overrides of ``_OVERRIDES`` (each says why), float32, eager attention and experts.
"""

from __future__ import annotations

import functools
import importlib
import inspect
import os
import re
import warnings

import torch

NUM_EXPERTS, TOP_K = 8, 2
_TOWER = re.compile(r"vision|audio|speech|sam_|encoder|code_predictor")
_DECLARATION = re.compile(r"_can_record_outputs\s*=\s*\{[^}]*[\"']router_logits[\"']\s*:", re.S)

# model_type -> config overrides the generic rules cannot guess (validators, fields without defaults).
_OVERRIDES: dict[str, dict] = {
    "deepseek_ocr2_text": dict(mlp_layer_types=["sparse", "sparse"]),  # default None: no layer pattern
    "deepseek_v2": dict(num_experts_per_tok=TOP_K),                      # default None
    "diffusion_gemma_text": dict(num_experts=NUM_EXPERTS, top_k_experts=TOP_K, moe_intermediate_size=16),
    "ernie4_5_vl_moe_text": dict(moe_intermediate_size=[16, 16],    # 3-D rope sections sum to head_dim / 2
                                 rope_parameters=dict(rope_type="default", rope_theta=1e4, mrope_section=[3, 3, 2])),
    "gemma4_text": dict(num_experts=NUM_EXPERTS, top_k_experts=TOP_K, moe_intermediate_size=16),
    "glm5_next_text": dict(index_kpool=2),                                # index_topk must divide by it
    "granitemoehybrid": dict(mamba_n_heads=4, mamba_d_head=16, mamba_d_state=8, mamba_chunk_size=8,
                             layer_types=["mamba", "attention"]),
    "hunyuan_v1_moe": dict(head_dim=16),                                  # default None
    "hy_v4": dict(indexer_types=["full", "full"]),                        # a shared indexer needs a full one
    "hy_v4_vl_text": dict(indexer_types=["full", "full"],
                          rope_parameters=dict(rope_theta=1e4, rope_type="default", mrope_section=[2, 1, 1])),
    "glm4v_moe_text": dict(rope_parameters=dict(rope_theta=1e4, rope_type="default", mrope_section=[2, 3, 3],
                                                partial_rotary_factor=1.0)),
    "jamba": dict(attn_layer_period=2, attn_layer_offset=1, expert_layer_period=1, expert_layer_offset=0),
    "step3p5": dict(sliding_window=8),
    "mimo_v2_flash": dict(num_key_value_heads=1),                        # its sliding layers double them
    "lfm2_moe": dict(layer_types=["conv", "full_attention"], num_dense_layers=0),
    "qwen3_omni_moe_talker_text": dict(shared_expert_intermediate_size=16),
    "qwen4_exp_text": dict(indexer_n_heads=2, indexer_kv_heads=1, indexer_head_dim=16, indexer_budget=4,
                           indexer_compress_ratio=2),
    "zaya": dict(num_experts_per_tok=1),                                  # the config accepts top-1 only
}

# Configurations a family's defaults do not reach, tested as families of their own: name -> (model_type,
# overrides).
VARIANTS: dict[str, tuple[str, dict]] = {
    "deepseek_v4-all-hash": ("deepseek_v4", dict(mlp_layer_types=["hash_moe", "hash_moe"])),
    "deepseek_v4-hash-then-topk": ("deepseek_v4", dict(mlp_layer_types=["hash_moe", "moe"])),
}

_KEY_RULES: tuple[tuple[str, object], ...] = (
    (r"num_hidden_layers|num_layers|n_layers|(en|de)coder_layers|num_decoder_layers", 2),
    (r"hidden_size|d_model|n_embd", 32),
    (r".*intermediate_size.*|.*ffn_dim|d_ff|.*expert_dim|ffn_hidden_size|share_expert_dim", 16),
    (r"(expert|moe)_(ffn_)?hidden_size|expert_ffn_hidden_size", 16),
    (r"(.*_)?num_key_value_heads|.*kv_heads", 2),
    (r"qk_rope_head_dim|qk_nope_head_dim|v_head_dim|index_head_dim", 8),
    (r"(.*_)?head_dim|d_kv|kv_channels|qk_head_dim|query_pre_attn_scalar", 16),
    (r"(.*_)?(num_attention_heads|num_heads|n_heads)|num_.*_heads", 2),
    (r"(unpadded_)?vocab_size.*", 128),
    (r"zero_expert_num", 2),
    (r"num_experts|num_local_experts|n_routed_experts|moe_num_experts", NUM_EXPERTS),
    (r"num_experts_per_tok|top_k|moe_k|moe_top_k|moe_topk|top_k_experts|num_selected_experts", TOP_K),
    (r"n_group|num_expert_group", 2),
    (r"n_groups|mamba_n_groups", 1),
    (r"topk_group", 1),
    (r"first_k_dense_replace|first_k_dense|num_dense_layers|n_dense_layers", 0),
    (r".*sparse_step|moe_layer_freq|interleave_moe_layer_step|expert_interval|moe_layer_interval", 1),
    (r"(kv|q|o)_lora_rank", 8),

    (r"index_topk", 4),
    (r"max_position_embeddings", 64),
    (r"sliding_window", 8),
    (r"num_nextn_predict_layers", 0),
    (r"n_shared_experts|moe_num_shared_experts", 1),
)


def _shrink(defaults: dict) -> dict:
    """Tiny values for the size fields of a config's defaults, by field name."""
    num_layers = next((defaults[key] for key in ("num_hidden_layers", "num_layers", "n_layers", "encoder_layers")
                       if isinstance(defaults.get(key), int)), None)
    out = {}
    for key, value in defaults.items():
        if key in ("enable_moe_block", "is_moe", "use_moe"):
            out[key] = True
        elif isinstance(value, bool):
            continue
        elif key in ("mlp_only_layers", "dense_layers") and isinstance(value, list):
            out[key] = []                                 # every layer sparse
        elif key == "moe_layers":
            out[key] = [0, 1]
        elif isinstance(value, list) and num_layers and len(value) == num_layers:
            # Per-layer lists: a list of layer indices keeps its first two; a per-layer pattern keeps the last
            # two entries (dense layers come first in every default).
            out[key] = [0, 1] if value == list(range(num_layers)) else value[-2:]
        elif re.fullmatch(r"(pad|bos|eos|decoder_start)_token_id", key) and isinstance(value, int):
            out[key] = min(value, 3)
        elif isinstance(value, int) or value is None:
            rule = next((size for pattern, size in _KEY_RULES if re.fullmatch(pattern, key)), None)
            # 0 stays 0 (a disabled feature, e.g. NoPE attention); None only for expert fields (no default).
            if rule is not None and (value != 0 if value is not None else "expert" in key):
                out[key] = rule
    if defaults.get("head_dim") and defaults.get("head_dim") == defaults.get("qk_rope_head_dim"):
        out["head_dim"] = out["qk_rope_head_dim"]  # the rotary embedding's width is the rope part of a head
    return out


def _modeling_module(config_class):
    return importlib.import_module(config_class.__module__.replace(".configuration_", ".modeling_"))


def _model_class(config_class):
    """The causal-LM (else seq2seq, else base) model class of a config class."""
    from transformers.models.auto import modeling_auto

    model_type = config_class.model_type
    for names in (modeling_auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
                  modeling_auto.MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES, modeling_auto.MODEL_MAPPING_NAMES):
        if model_type in names:
            return getattr(importlib.import_module("transformers"), names[model_type])
    module = _modeling_module(config_class)
    classes = [cls for _, cls in inspect.getmembers(module, inspect.isclass)
               if cls.__module__ == module.__name__ and getattr(cls, "config_class", None) is config_class]
    return next((cls for suffix in ("ForCausalLM", "Model") for cls in classes if cls.__name__.endswith(suffix)),
                None)


def tiny_family_config(family: str):
    """The tiny config of a family (a model_type, or a key of ``VARIANTS``)."""
    from transformers import CONFIG_MAPPING

    model_type, variant = VARIANTS.get(family, (family, {}))
    config_class = CONFIG_MAPPING[model_type]
    overrides = _shrink(config_class().to_dict())
    overrides.update(_OVERRIDES.get(model_type, {}))
    overrides.update(variant)
    config = config_class(**overrides)
    config._attn_implementation = "eager"
    config._experts_implementation = "eager"
    return config


def build_family_model(family: str) -> torch.nn.Module:
    """A seeded float32 eval-mode tiny model of a family (a model_type, or a key of ``VARIANTS``)."""
    config = tiny_family_config(family)
    model_class = _model_class(type(config))
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = model_class._from_config(config, dtype=torch.float32).eval()
    # Every parameter redrawn from one seeded generator: some classes leave parameters as torch.empty (whatever
    # the allocator returns) or zeros (a router, a score-correction bias), so that routing would depend on
    # memory contents or be tied. Norm weights stay near 1.
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            noise = torch.randn(parameter.shape, generator=generator)
            parameter.copy_(1 + 0.1 * noise if "norm" in name and parameter.ndim == 1 else 0.2 * noise)
    return model


def declares_router_logits(cls) -> bool:
    declared = getattr(cls, "_can_record_outputs", None)
    return isinstance(declared, dict) and "router_logits" in declared


@functools.lru_cache(maxsize=None)
def moe_families() -> tuple[str, ...]:
    """The MoE families of the installed transformers (see the module docstring), sorted."""
    import transformers
    from transformers import CONFIG_MAPPING
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES, model_type_to_module_name

    transformers.logging.set_verbosity_error()
    families = []
    for model_type in CONFIG_MAPPING_NAMES:
        if _TOWER.search(model_type):
            continue
        module_name = model_type_to_module_name(model_type)
        path = os.path.join(os.path.dirname(transformers.__file__), "models", module_name,
                            f"modeling_{module_name}.py")
        # The declaration is a `"router_logits": ...` entry of a class's `_can_record_outputs` dict, read from
        # the source so that collecting the tests imports no modeling module (the test checks the class).
        if os.path.exists(path) and _DECLARATION.search(open(path, encoding="utf-8").read()) \
                and not getattr(CONFIG_MAPPING[model_type], "sub_configs", None):
            families.append(model_type)
    return tuple(sorted(families))


def routing_kinds(family: str, model: torch.nn.Module) -> str:
    """The routing kinds of a family, read from its default config and its tiny model's router and block code.

    softmax top-k unless one of: hash (a HashRouter module), capacity-dropped (``expert_capacity``), group-
    limited (more than one expert group), bias-corrected (a per-expert bias in the router), sigmoid,
    sparsemixer, skip/zero-compute (zero experts or a router skip class). A heuristic over source text, used
    to label docs/monitoring.md's table; the capture check itself does not depend on it.
    """
    from transformers import CONFIG_MAPPING

    defaults = CONFIG_MAPPING[VARIANTS.get(family, (family, {}))[0]]().to_dict()
    modules = dict(model.named_modules())
    routers = [(name, module) for name, module in modules.items() if declares_router_logits(type(module))
               or type(module).__name__.endswith(("Router", "Gate", "Gating"))]
    source = ""
    for name, module in routers:
        for owner in (module, modules.get(name.rpartition(".")[0])):
            try:
                source += inspect.getsource(type(owner))
            except (TypeError, OSError):
                pass
    kinds = []
    if any("HashRouter" in type(module).__name__ for module in modules.values()):
        kinds.append("hash")
    if defaults.get("expert_capacity"):
        kinds.append("capacity-dropped")
    if max(defaults.get("n_group") or 1, defaults.get("num_expert_group") or 1) > 1:
        kinds.append("group-limited")
    if re.search(r"e_score_correction_bias|expert_bias", source):
        kinds.append("bias-corrected")
    if "sparsemixer" in source:
        kinds.append("sparsemixer")
    elif re.search(r"^(?!.*shared_expert).*sigmoid", source, re.M):  # not the shared expert's sigmoid gate
        kinds.append("sigmoid")
    if defaults.get("zero_expert_num") or re.search(r"skip", source, re.I) and "Zaya" in source:
        kinds.append("skip/zero-compute")
    return ", ".join(kinds) or "softmax top-k"


if __name__ == "__main__":  # prints docs/monitoring.md's family table
    from test_hf_families import REFUSED

    print("| model_type | routing | capture |\n|---|---|---|")
    for name in moe_families() + tuple(VARIANTS):
        capture = "refused" if name in REFUSED else "exact"
        print(f"| `{name}` | {routing_kinds(name, build_family_model(name))} | {capture} |")
