"""The built-in demo model (lrc_kernels/data/tiny_moe): loads offline, is trained, and its routing is learned.

Numbers below were measured with the shipped weights on the shipped sample text at the demo's settings
(T = 128, the first 8192 tokens: 64 sequences) and are recorded in lrc_kernels/data/README.md.
"""

import math

import pytest
import torch

import lrc_kernels as lk
from lrc_kernels.cli.analyze import DEFAULT_MODEL_DIR, SAMPLE_TEXT

transformers = pytest.importorskip("transformers")

SEQ_LEN, MAX_TOKENS = 128, 8192


@pytest.fixture(scope="module")
def demo():
    tokenizer = transformers.AutoTokenizer.from_pretrained(DEFAULT_MODEL_DIR, local_files_only=True)
    model = transformers.AutoModelForCausalLM.from_pretrained(DEFAULT_MODEL_DIR, local_files_only=True).eval()
    ids = tokenizer(SAMPLE_TEXT.read_text(encoding="utf-8"), add_special_tokens=False, verbose=False)["input_ids"]
    ids = torch.tensor(ids[:MAX_TOKENS]).view(-1, SEQ_LEN)
    return model, tokenizer, ids


def routing_and_loss(model, input_ids):
    """Top-k of every Mixtral router (``mlp.gate`` returns logits, weights, indices) -> ``[n, S, T, k]``, loss."""
    recorded = []
    hooks = [layer.mlp.gate.register_forward_hook(lambda module, args, output: recorded.append(output[2]))
             for layer in model.model.layers]
    try:
        with torch.no_grad():
            loss = model(input_ids=input_ids, labels=input_ids).loss.item()
    finally:
        for hook in hooks:
            hook.remove()
    return torch.stack([topk.view(*input_ids.shape, -1) for topk in recorded]), loss


def random_model(config, seed):
    torch.manual_seed(seed)
    return transformers.MixtralForCausalLM(config).eval()


def test_shipped_files_and_offline_loading(demo):
    model, tokenizer, ids = demo
    config = model.config
    assert config.model_type == "mixtral"
    assert (config.num_local_experts, config.num_experts_per_tok, config.num_hidden_layers) == (16, 2, 4)
    assert 1_000_000 <= sum(p.numel() for p in model.parameters()) <= 10_000_000
    assert (DEFAULT_MODEL_DIR / "model.safetensors").stat().st_size <= 20 * 2**20
    assert ids.shape == (MAX_TOKENS // SEQ_LEN, SEQ_LEN)
    text = SAMPLE_TEXT.read_text(encoding="utf-8")[:2000]
    assert tokenizer.decode(tokenizer(text, add_special_tokens=False)["input_ids"]) == text  # byte-level BPE


def test_weights_are_trained(demo):
    """An untrained model predicts nearly uniformly: loss ≈ ln(vocab) = ln 2048 ≈ 7.62 nats per token.

    Measured on the held-out sample: 3.82 trained against 7.62 for seeds 0-2 of the random model.
    """
    model, _, ids = demo
    _, trained_loss = routing_and_loss(model, ids)
    _, random_loss = routing_and_loss(random_model(model.config, 0), ids)
    assert abs(random_loss - math.log(model.config.vocab_size)) < 0.1
    assert trained_loss < random_loss - 2.5


def test_first_layer_routing_is_learned(demo):
    """SRP (layer level, L = 16) of the first MoE layer, trained against the same architecture at random init.

    Measured: trained 0.455, CI [0.451, 0.459] (B = 200, seed 0); random seeds 0, 1, 2: 0.393, 0.395, 0.403.
    The test asks the trained CI's lower end to clear the best random seed by 0.03 (the measured gap is 0.047).
    Only the first layer is compared: deeper layers of a randomly initialised model route the tokens of a
    sequence to nearly the same experts (SRP 0.7-0.8 at layers 2-3), an artefact of the random residual
    stream rather than a learned consistency, so there the comparison says nothing about training.
    """
    model, _, ids = demo
    trained, _ = routing_and_loss(model, ids)
    score = lk.srp(trained[0], 16, 16, num_bootstrap=200, generator=torch.Generator().manual_seed(0))
    random_scores = [lk.srp(routing_and_loss(random_model(model.config, seed), ids)[0][0], 16, 16).best_f1.item()
                     for seed in range(3)]
    assert score.ci_low.item() > max(random_scores) + 0.03, (score, random_scores)
    # The recorded routing has no -1 slot: act_r is exactly k/E.
    assert score.act_r.item() == 2 / 16
