"""``lrc-kernels analyze`` on real-model situations: dtypes, device maps, encoder-decoders, and checkpoints,
tokenizers or models that do not fit, each refused with one line before any forward pass."""

import json
import shutil

import pytest
import torch

from lrc_kernels.cli.analyze import DEFAULT_MODEL_DIR, SAMPLE_TEXT
from lrc_kernels.cli.main import main

from hf_models import tiny_config

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")


def _save(model, directory):
    model.save_pretrained(directory)
    for name in TOKENIZER_FILES:
        shutil.copyfile(DEFAULT_MODEL_DIR / name, directory / name)
    return directory


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """Model directories that share the shipped tokenizer (2048 ids)."""
    from transformers import AutoModelForSeq2SeqLM, LlamaConfig, LlamaForCausalLM

    root = tmp_path_factory.mktemp("models")
    torch.manual_seed(0)
    dense = LlamaForCausalLM(LlamaConfig(vocab_size=2048, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=256))
    switch_config = tiny_config("switch_transformers")
    switch_config.vocab_size = 2048
    switch = AutoModelForSeq2SeqLM.from_config(switch_config)
    small_vocab = tiny_config("mixtral")  # 64 ids: the shipped tokenizer's ids do not fit
    from transformers import AutoModelForCausalLM

    paths = {"dense": _save(dense, root / "dense"), "switch": _save(switch, root / "switch"),
             "small-vocab": _save(AutoModelForCausalLM.from_config(small_vocab), root / "small-vocab")}
    for name, change in (("mismatch", {"intermediate_size": 64}), ("short-context", {"max_position_embeddings": 32}),
                         ("remote-code", {"model_type": "custom_moe",  # a type only the directory's own code defines
                                         "auto_map": {"AutoConfig": "configuration_custom.CustomConfig",
                                                      "AutoModelForCausalLM": "modeling_custom.CustomMoE"}})):
        directory = root / name
        shutil.copytree(DEFAULT_MODEL_DIR, directory)
        config = json.loads((directory / "config.json").read_text())
        config.update(change)
        (directory / "config.json").write_text(json.dumps(config))
        paths[name] = directory
    return paths


def analyze(capsys, tmp_path, model, *extra):
    code = main(["analyze", str(model), "--text", str(SAMPLE_TEXT), "--seq-len", "64", "--max-tokens", "256",
                 "--num-bootstrap", "0", "--seg-lens", "4", "--out", str(tmp_path / "out"), "--no-plots", "--quiet",
                 *map(str, extra)])
    return code, capsys.readouterr().err.splitlines()


@pytest.mark.parametrize("name, fragment", [
    ("dense", "has no Mixture-of-Experts router"),
    ("small-vocab", "the tokenizer does not belong to this model"),
    ("mismatch", "of the wrong shape"),
    ("remote-code", "pass --trust-remote-code if you trust it"),
])
def test_models_that_do_not_fit_are_refused_in_one_line(capsys, tmp_path, models, name, fragment):
    code, lines = analyze(capsys, tmp_path, models[name])
    assert code == 1 and len(lines) == 1 and lines[0].startswith("lrc-kernels: error: "), lines
    assert fragment in lines[0]
    assert not (tmp_path / "out" / "results.json").exists()


def test_encoder_decoder_model_loads_and_reports_the_chosen_stack(capsys, tmp_path, models):
    code, lines = analyze(capsys, tmp_path, models["switch"])
    assert code == 1 and "choose one with --stage" in lines[0]
    code, lines = analyze(capsys, tmp_path, models["switch"], "--stage", "decoder", "--overwrite")
    assert code == 0, lines
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert results["meta"]["num_layers"] >= 1 and results["meta"]["model_type"] == "switch_transformers"


def test_context_beyond_max_position_embeddings_warns(capsys, tmp_path, models):
    code, lines = analyze(capsys, tmp_path, models["short-context"])
    assert code == 0
    assert lines == ["lrc-kernels: warning: --seq-len 64 exceeds the model's max_position_embeddings = 32: positions "
                     "beyond it are outside what the model was built for"]


@pytest.mark.parametrize("extra", [("--dtype", "bf16"), ("--device-map", "auto")], ids=["bf16", "device-map-auto"])
def test_dtype_and_device_map(capsys, tmp_path, extra):
    """bf16 weights and an accelerate device map (here: everything on the CPU) give a complete report."""
    code, lines = analyze(capsys, tmp_path, "default", *extra)
    assert code == 0, lines
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert results["meta"]["num_layers"] == 4 and 0.0 < results["model"]["srp"]["4"]["best_f1"] <= 1.0
