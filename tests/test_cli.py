"""The ``lrc-kernels`` command line end to end: trace formats, the default model, errors and the docs' commands."""

import json
import math
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

import lrc_kernels as lk
from lrc_kernels.bootstrap import resample_weights
from lrc_kernels.cli.analyze import DEFAULT_MODEL_DIR, SAMPLE_TEXT
from lrc_kernels.cli.main import main

from conftest import EXAMPLE_A, EXAMPLE_C, EXAMPLE_C_LENGTHS, generate_trace

ROOT = Path(__file__).resolve().parents[1]
DOCS_WITH_COMMANDS = ("cli.md", "quickstart.md", "formats.md")


def run_cli(*argv):
    return main([str(a) for a in argv])


def read_results(out_dir):
    return json.loads((Path(out_dir) / "results.json").read_text())


def write_jsonl(path, topk, lengths=None, seq_names=None):
    """One record per valid (layer, seq, pos); ``topk`` is ``[layers, S, T, k]``; -1 slots are left out."""
    with open(path, "w") as log:
        for layer, s, t in np.ndindex(*topk.shape[:3]):
            if lengths is not None and t >= lengths[s]:
                continue
            experts = [int(e) for e in topk[layer, s, t] if e >= 0]
            seq = seq_names[s] if seq_names else s
            log.write(json.dumps({"layer": layer, "seq": seq, "pos": int(t), "experts": experts}) + "\n")


# --------------------------------------------------------------------------- SPEC §8 examples via traces

def test_trace_jsonl_reproduces_spec_example_a(tmp_path):
    path = tmp_path / "a.jsonl"
    write_jsonl(path, EXAMPLE_A[None])
    assert run_cli("trace", path, "--num-experts", 4, "--seg-lens", 2, "--num-bootstrap", 0,
                   "--out", tmp_path / "out", "--no-plots", "--quiet") == 0
    layer = read_results(tmp_path / "out")["layers"][0]
    assert layer["layer"] == 0
    # SPEC §8 A, layer row at L = 2: F1 7/10 at θ* = 1, best_m 13/7, act_r 1/4, support 28.
    assert layer["srp"]["2"] == {"best_f1": 7 / 10, "threshold": 1, "best_m": 13 / 7, "act_r": 1 / 4,
                                 "support": 28, "ci_low": None, "ci_high": None}
    # SPEC §8 A hit lists (N = 8) and coverage [4/7, 1, 1, 1].
    expected_hits = {"sch@2": [2, 5, 6, 8], "lru": [2, 3, 6, 8], "lfu": [2, 4, 6, 8], "belady": [2, 5, 7, 8]}
    for policy, hits in expected_hits.items():
        assert layer["cache"][policy]["hit_rate"] == [h / 8 for h in hits]
    assert layer["coverage"]["2"] == [4 / 7, 1.0, 1.0, 1.0]


def test_trace_jsonl_fills_gaps_with_minus_one_and_keeps_lengths(tmp_path):
    """SPEC §8 C as a log: seq 0's token 2 has no record, -1 slots are omitted, seq 1 stops at pos 2."""
    path = tmp_path / "c.jsonl"
    write_jsonl(path, EXAMPLE_C[None], lengths=EXAMPLE_C_LENGTHS.tolist(), seq_names=["req-a", "req-b"])
    assert "\"pos\": 2, \"experts\": []" in path.read_text()      # all -1 token logged with no experts
    lines = [line for line in path.read_text().splitlines() if "\"experts\": []" not in line]
    path.write_text("\n".join(lines) + "\n")                      # ... and now not logged at all
    assert run_cli("trace", path, "--num-experts", 4, "--seg-lens", 2, "--num-bootstrap", 0,
                   "--out", tmp_path / "out", "--no-plots", "--quiet") == 0
    results = read_results(tmp_path / "out")
    assert results["meta"]["num_tokens"] == 4 + 3 and results["meta"]["seq_len"] == 4
    layer = results["layers"][0]
    assert layer["srp"]["2"]["best_f1"] == 3 / 4 and layer["srp"]["2"]["act_r"] == 0.3
    assert layer["cache"]["lru"]["hit_rate"] == [0.4, 0.8, 1.0, 1.0]
    assert layer["cache"]["belady"]["hit_rate"] == [0.4, 0.9, 1.0, 1.0]
    assert layer["coverage"]["2"] == [7 / 12, 11 / 12, 1.0, 1.0]


# ------------------------------------------------------------------------ every format, same report

@pytest.fixture(scope="module")
def multilayer_trace():
    """[3 layers, S = 6, T = 40, k = 2] sticky routing, E = 8, with -1 slots and lengths."""
    topk = torch.stack([generate_trace("sticky", 6, 40, 2, 8, drop_prob=0.1, seed=layer) for layer in range(3)])
    return topk, torch.tensor([40, 40, 33, 40, 12, 40])


def _write_all_formats(directory, topk, lengths):
    paths = {
        "npz": directory / "t.npz", "safetensors": directory / "t.safetensors",
        "pt_dict": directory / "t.pt", "jsonl": directory / "t.jsonl",
    }
    np.savez(paths["npz"], topk=topk.numpy(), lengths=lengths.numpy())
    save_file({"topk": topk.to(torch.int32), "lengths": lengths}, str(paths["safetensors"]))
    torch.save({"topk": topk.to(torch.int16), "lengths": lengths}, paths["pt_dict"])
    write_jsonl(paths["jsonl"], topk, lengths=lengths.tolist())
    return paths


def test_every_format_gives_the_library_numbers(tmp_path, multilayer_trace):
    topk, lengths = multilayer_trace
    E, seg_lens, B = 8, (3, 8), 40
    reports = {}
    for name, path in _write_all_formats(tmp_path, topk, lengths).items():
        out = tmp_path / f"out-{name}"
        assert run_cli("trace", path, "--num-experts", E, "--seg-lens", *seg_lens, "--num-bootstrap", B,
                       "--seed", 7, "--out", out, "--quiet", *(["--no-plots"] if name != "npz" else [])) == 0
        results = read_results(out)
        results.pop("meta")
        reports[name] = results
    assert reports["npz"] == reports["safetensors"] == reports["pt_dict"] == reports["jsonl"]
    assert sorted(p.name for p in (tmp_path / "out-npz").iterdir()) == [
        "cache.csv", "cache_curves.png", "coverage.csv", "plan.png", "results.json", "srp.csv", "srp_heatmap.png",
        "srp_vs_L.png"]

    # The same numbers straight from the library, with the one shared weight matrix the CLI draws.
    weights = resample_weights(topk.shape[1], B, torch.Generator().manual_seed(7))
    results = reports["npz"]
    assert [entry["layer"] for entry in results["layers"]] == [0, 1, 2]
    for layer, entry in enumerate(results["layers"]):
        for seg_len in seg_lens:
            score = lk.srp(topk[layer], E, seg_len, lengths=lengths, weights=weights)
            assert entry["srp"][str(seg_len)]["best_f1"] == score.best_f1.item()
            assert entry["srp"][str(seg_len)]["ci_low"] == score.ci_low.item()
            curve = lk.cache_curve(topk[layer], E, "sch", seg_len=seg_len, lengths=lengths, weights=weights)
            assert entry["cache"][f"sch@{seg_len}"]["ci_high"] == curve.ci_high.tolist()
        belady = lk.cache_curve(topk[layer], E, "belady", lengths=lengths, weights=weights)
        assert entry["cache"]["belady"]["hit_rate"] == belady.hit_rate.tolist()
    model = lk.srp(topk, E, 8, level="model", lengths=lengths, weights=weights)
    assert results["model"]["srp"]["8"]["best_f1"] == model.best_f1.item()
    assert results["model"]["srp"]["8"]["ci_high"] == model.ci_high.item()
    assert results["model"]["srp"]["8"]["act_r"] == model.act_r.item()
    assert results["model"]["srp"]["8"]["support"] == model.support.item()
    stream = lk.concat_layers(topk, E)
    lru = lk.cache_curve(stream, 3 * E, "lru", lengths=lengths, weights=weights)
    assert results["model"]["cache"]["lru"]["hit_rate"] == lru.hit_rate.tolist()
    assert len(results["model"]["coverage"]["3"]) == 3 * E


def test_single_layer_tensor_and_csv_rows(tmp_path):
    topk = generate_trace("zipf", 4, 30, 2, 6, seed=3)
    path = tmp_path / "one.pt"
    torch.save(topk, path)                                     # a bare tensor [S, T, k] = one layer
    assert run_cli("trace", path, "--num-experts", 6, "--seg-lens", 4, "--num-bootstrap", 0, "--out",
                   tmp_path / "out", "--no-plots", "--quiet") == 0
    srp_rows = (tmp_path / "out" / "srp.csv").read_text().splitlines()
    assert srp_rows[0] == "layer,seg_len,best_f1,threshold,best_m,act_r,support,ci_low,ci_high"
    assert [row.split(",")[0] for row in srp_rows[1:]] == ["0", "model"]
    expected = lk.srp(topk, 6, 4)
    assert float(srp_rows[1].split(",")[2]) == expected.best_f1.item()
    cache_rows = (tmp_path / "out" / "cache.csv").read_text().splitlines()
    assert len(cache_rows) == 1 + 2 * 4 * 6                    # (layer + model) x 4 policies x E sizes


def test_nan_is_written_as_null(tmp_path):
    """Sequences shorter than L have no window: act_r and coverage are NaN (SPEC §9) -> null."""
    path = tmp_path / "short.npz"
    np.savez(path, topk=generate_trace("uniform", 3, 5, 1, 4, seed=0).numpy())
    assert run_cli("trace", path, "--num-experts", 4, "--seg-lens", 8, "--num-bootstrap", 0, "--out",
                   tmp_path / "out", "--no-plots", "--quiet") == 0
    text = (tmp_path / "out" / "results.json").read_text()
    assert "NaN" not in text
    layer = json.loads(text)["layers"][0]
    assert layer["srp"]["8"]["act_r"] is None and layer["srp"]["8"]["support"] == 0
    assert layer["coverage"]["8"] == [None] * 4


# ------------------------------------------------------------------------------------ malformed input

def _bad_inputs(directory):
    """(name, argv) pairs that must fail with one line on stderr, and the text that line must contain."""
    good = directory / "good.npz"
    np.savez(good, topk=generate_trace("uniform", 2, 10, 2, 4, seed=0).numpy())
    np.savez(directory / "flat.npz", topk=np.zeros((10, 2), dtype=np.int64))
    np.savez(directory / "noseq.npz", topk=np.zeros((0, 10, 2), dtype=np.int64))
    np.savez(directory / "floats.npz", topk=np.zeros((2, 10, 2)))
    np.savez(directory / "nokey.npz", experts=np.zeros((2, 10, 2), dtype=np.int64))
    np.savez(directory / "badlen.npz", topk=np.zeros((2, 10, 1), dtype=np.int64), lengths=np.array([3, 11]))
    np.savez(directory / "dup.npz", topk=np.array([[[0, 1], [2, 2]]]))
    (directory / "garbage.safetensors").write_bytes(b"not a safetensors file")
    (directory / "trace.csv").write_text("0,1\n")
    (directory / "badline.jsonl").write_text('{"seq": 0, "pos": 0, "experts": [1]}\n{"seq": 0, "pos": 1,\n')
    (directory / "nofield.jsonl").write_text('{"seq": 0, "pos": 0, "experts": [1]}\n{"seq": 0, "experts": [2]}\n')
    (directory / "bigid.jsonl").write_text('{"seq": 0, "pos": 0, "experts": [1]}\n'
                                           '{"seq": 0, "pos": 1, "experts": [9]}\n')
    (directory / "empty.jsonl").write_text("\n")
    deeper = directory / "deeper-moe"                  # config asks for a 5th layer the weights lack
    deeper.mkdir()
    for source in DEFAULT_MODEL_DIR.iterdir():
        (deeper / source.name).symlink_to(source)
    config = json.loads((DEFAULT_MODEL_DIR / "config.json").read_text())
    (deeper / "config.json").unlink()
    (deeper / "config.json").write_text(json.dumps(dict(config, num_hidden_layers=config["num_hidden_layers"] + 1)))
    return [
        (["trace", directory / "missing.npz", "--num-experts", 4], "missing.npz: no such file"),
        (["trace", directory / "flat.npz", "--num-experts", 4], "shape [S, T, k] or [layers, S, T, k]"),
        (["trace", directory / "noseq.npz", "--num-experts", 4], "of shape [0, 10, 2] holds no routing"),
        (["trace", directory / "floats.npz", "--num-experts", 4], "'topk' must hold signed integers (int8/16/32/64, as the API accepts), found dtype float64"),
        (["trace", directory / "nokey.npz", "--num-experts", 4, "--format", "lrc"], "no tensor named 'topk' (found: experts)"),
        (["trace", directory / "badlen.npz", "--num-experts", 4], "lengths[1] = 11 is outside [0, T] = [0, 10]"),
        (["trace", directory / "dup.npz", "--num-experts", 4], "dup.npz: RoutingTrace.topk: expected distinct expert ids within a token's row (-1 may repeat), "
                                                           "received [2, 2] at row (0, 0, 1)"),
        (["trace", good, "--num-experts", 3], "good.npz: RoutingTrace.topk: expected expert ids in [-1, 3)"),
        (["trace", directory / "garbage.safetensors", "--num-experts", 4], "cannot read as safetensors"),
        (["trace", directory / "trace.csv", "--num-experts", 4], "trace.csv: cannot recognise the format"),
        (["trace", directory / "badline.jsonl", "--num-experts", 4], "badline.jsonl:2: invalid JSON"),
        (["trace", directory / "nofield.jsonl", "--num-experts", 4], "nofield.jsonl:2: missing field 'pos'"),
        (["trace", directory / "bigid.jsonl", "--num-experts", 4], "bigid.jsonl: RoutingTrace.topk: expected expert ids in [-1, 4) "
                                                                           "(num_experts = 4), received 9 at index (0, 0, 1, 0)"),
        (["trace", directory / "empty.jsonl", "--num-experts", 4], "no routing records"),
        (["trace", good, "--num-experts", 4, "--num-bootstrap", 5], "num_bootstrap"),
        (["analyze", directory / "no-model", "--text", good], "is not a local model directory"),
        (["analyze", "default", "--text", directory / "missing.txt"], "missing.txt: no such file"),
        (["analyze", "default", "--text", SAMPLE_TEXT, "--device", "nonsense"], "--device 'nonsense'"),
        (["analyze", deeper, "--text", SAMPLE_TEXT], "weights missing from the checkpoint"),
    ]


def test_malformed_inputs_give_one_line_and_exit_1(tmp_path, capsys):
    for argv, message in _bad_inputs(tmp_path):
        assert run_cli(*argv, "--out", tmp_path / "out", "--quiet") == 1, argv
        captured = capsys.readouterr()
        assert captured.out == ""
        assert captured.err.count("\n") == 1 and captured.err.startswith("lrc-kernels: error: "), captured.err
        assert message in captured.err, (message, captured.err)


def test_bad_command_line_exits_2(capsys):
    assert main(["trace"]) == 2                               # FILE missing
    assert "FILE" in capsys.readouterr().err
    assert main(["trace", "x.npz", "--num-experts", "0"]) == 2
    assert main(["--help"]) == 0


def test_help_texts_name_no_file_an_installed_package_lacks():
    """An installed package has no docs/ folder: a --help text that cites one says it is in the repository."""
    import argparse
    import re

    from lrc_kernels.cli.main import build_parser

    parser = build_parser()
    parsers = [parser] + [sub for action in parser._actions if isinstance(action, argparse._SubParsersAction)
                          for sub in action.choices.values()]
    for command in parsers:
        text = " ".join(command.format_help().split())
        for citation in re.finditer(r"\S*\.md\b", text):
            assert "source repository" in text[citation.end():citation.end() + 60], (command.prog, citation[0])


def test_subprocess_module_entry_point(tmp_path):
    path = tmp_path / "t.npz"
    np.savez(path, topk=generate_trace("phased", 3, 24, 2, 6, seed=1).numpy())
    command = [sys.executable, "-m", "lrc_kernels.cli.main", "trace", str(path), "--num-experts", "6",
               "--seg-lens", "4", "--num-bootstrap", "20", "--no-plots", "--out", str(tmp_path / "out")]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[0].split() == ["layer", "SRP@4", "sch@4", "lru", "lfu", "belady"]
    assert read_results(tmp_path / "out")["meta"]["num_sequences"] == 3

    bad = subprocess.run(command[:4] + [str(tmp_path / "nope.jsonl"), "--num-experts", "6"],
                         capture_output=True, text=True, timeout=300)
    assert bad.returncode == 1
    assert bad.stderr.strip().splitlines() == [f"lrc-kernels: error: {tmp_path / 'nope.jsonl'}: no such file"]


# ------------------------------------------------------------------------------------ the default model

def test_analyze_default_model(tmp_path, capsys):
    out = tmp_path / "out"
    assert run_cli("analyze", "default", "--text", SAMPLE_TEXT, "--seq-len", 32, "--max-tokens", 200,
                   "--batch-size", 3, "--seg-lens", 4, 16, "--num-bootstrap", 0, "--out", out, "--no-plots") == 0
    table = capsys.readouterr().out
    assert table.splitlines()[0].split() == ["layer", "SRP@4", "SRP@16", "sch@4", "sch@16", "lru", "lfu", "belady"]
    results = read_results(out)
    meta = results["meta"]
    config = json.loads((DEFAULT_MODEL_DIR / "config.json").read_text())
    E, k, n = config["num_local_experts"], config["num_experts_per_tok"], config["num_hidden_layers"]
    # 200 tokens cut into 32-token sequences: 6 sequences, the last 8 tokens dropped.
    assert (meta["num_sequences"], meta["seq_len"], meta["tokens"]) == (6, 32, 192)
    assert (meta["num_experts"], meta["top_k"], meta["num_layers"]) == (E, k, n)
    assert meta["references"] == n * 192 * k
    assert [entry["layer"] for entry in results["layers"]] == list(range(n))
    for entry in results["layers"] + [results["model"]]:
        # Recorded routing has no -1 slot, so the activation density is exactly k/E (SPEC §2).
        assert entry["srp"]["16"]["act_r"] == k / E
        assert entry["cache"]["lru"]["hit_rate"][-1] == 1.0
    assert len(results["model"]["cache"]["belady"]["hit_rate"]) == n * E


# ------------------------------------------------------------------------------- commands in the docs

def doc_commands():
    commands = []
    for name in DOCS_WITH_COMMANDS:
        for block in re.findall(r"```console\n(.*?)```", (ROOT / "docs" / name).read_text(), flags=re.S):
            commands += [(name, line[2:]) for line in block.splitlines() if line.startswith("$ ")]
    return commands


TORCHRUN = "torchrun --standalone --nproc-per-node 2 -m lrc_kernels.cli "


def cli_argv(command):
    """The lrc-kernels arguments of a docs command (``lrc-kernels ...`` or ``torchrun ... -m lrc_kernels.cli ...``)."""
    if command.startswith(TORCHRUN):
        return shlex.split(command[len(TORCHRUN):])
    argv = shlex.split(command)
    assert argv[0] == "lrc-kernels", command
    return argv[1:]


def test_docs_show_commands_of_every_kind():
    programs = {cli_argv(command)[0] for _, command in doc_commands()}
    assert programs == {"analyze", "trace", "demo"}
    assert {name for name, _ in doc_commands()} == set(DOCS_WITH_COMMANDS)
    assert any(command.startswith(TORCHRUN) for _, command in doc_commands())


@pytest.fixture(scope="module")
def docs_workspace(tmp_path_factory):
    """A directory with the files the docs' commands name: formats.md's snippets write the traces."""
    directory = tmp_path_factory.mktemp("docs")
    blocks = re.findall(r"```python\n(.*?)```", (ROOT / "docs" / "formats.md").read_text(), flags=re.S)
    assert len(blocks) == 5   # our formats, vLLM, SGLang, SGLang's dump, Megatron-Core
    previous = Path.cwd()
    try:
        import os

        os.chdir(directory)
        for block in blocks:
            exec(compile(block, "docs/formats.md", "exec"), {})
    finally:
        os.chdir(previous)
    shutil.copyfile(SAMPLE_TEXT, directory / "my_text.txt")
    (directory / "my-moe").symlink_to(DEFAULT_MODEL_DIR, target_is_directory=True)
    return directory


@pytest.mark.parametrize("doc,command", doc_commands(), ids=lambda value: str(value)[:60])
def test_doc_command_runs(doc, command, docs_workspace, monkeypatch):
    argv = cli_argv(command)
    monkeypatch.chdir(docs_workspace)
    assert main(argv + ["--quiet"]) == 0
    out_dir = docs_workspace / argv[argv.index("--out") + 1] if "--out" in argv else docs_workspace / (
        "lrc_demo" if argv[0] == "demo" else "lrc_report")
    results = read_results(out_dir)
    assert results["meta"]["command"] == ("trace" if argv[0] == "trace" else "analyze")
    assert all(math.isfinite(entry["srp"]["4"]["best_f1"]) for entry in results["layers"])
    if argv[0] == "trace":
        assert results["meta"]["num_experts"] == 16
        assert results["meta"]["num_sequences"] == (12 if "megatron" in command else 8)
    if command.startswith(TORCHRUN):
        # 3 files over 2 gloo ranks: rank 0 reads files 0 and 2, rank 1 file 1; rank 0 writes the report,
        # which must be the one-process report just written by main() (wall time aside).
        one = read_results(out_dir)
        torchrun = [sys.executable, "-m", "torch.distributed.run"] + shlex.split(command)[1:]
        torchrun[torchrun.index("--out") + 1] += "-ranks"
        environment = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
        done = subprocess.run(torchrun + ["--quiet"], capture_output=True, text=True, timeout=600, env=environment)
        assert done.returncode == 0, done.stderr[-3000:]
        two = read_results(docs_workspace / (argv[argv.index("--out") + 1] + "-ranks"))
        for report in (one, two):
            del report["meta"]["seconds"]
        assert two == one


def test_quickstart_python_snippet_runs():
    (block,) = re.findall(r"```python\n(.*?)```", (ROOT / "docs" / "quickstart.md").read_text(), flags=re.S)
    exec(compile(block, "docs/quickstart.md", "exec"), {})


def test_plots_doc_images_exist_and_match_the_plot_files():
    text = (ROOT / "docs" / "plots.md").read_text()
    images = re.findall(r"!\[[^\]]*\]\((img/[^)]+)\)", text)
    assert [Path(image).name for image in images] == ["demo_srp_vs_L.png", "demo_cache_curves.png",
                                                      "demo_srp_heatmap.png", "layers24_srp_vs_L.png",
                                                      "layers24_cache_curves.png", "layers24_srp_heatmap.png"]
    for image in images:
        assert (ROOT / "docs" / image).read_bytes().startswith(b"\x89PNG")
