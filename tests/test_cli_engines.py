"""``lrc-kernels trace`` on engine dumps: the report equals lrc_kernels.analyze on the source routing, many files
sum, and every malformed input is one line naming file, line/record and field (torchrun: the docs command in
tests/test_cli.py)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import lrc_kernels
from lrc_kernels import RoutingTrace
from lrc_kernels.cli.main import main
from lrc_kernels.cli.report import qualify

from engine_dumps import (npy_base64, random_rows, write_megatron, write_sglang, write_sglang_dump, write_vllm,
                          write_vllm_021)

ROOT = Path(__file__).resolve().parents[1]
L, K, E = 3, 2, 8
SEG_LENS, B = (2, 5), 20
REPORT = ["--seg-lens", *map(str, SEG_LENS), "--num-bootstrap", str(B), "--no-plots", "--quiet"]


def source_trace(rows, prompt_lengths=None):
    """The RoutingTrace of per-sequence rows ``[T_s, layers, k]``, built here independently of the readers."""
    width = max(len(row) for row in rows)
    topk = torch.full((rows[0].shape[1], len(rows), width, rows[0].shape[2]), -1, dtype=torch.int64)
    for s, row in enumerate(rows):
        topk[:, s, : len(row)] = torch.from_numpy(row.astype(np.int64)).permute(1, 0, 2)
    phase = None
    if prompt_lengths is not None:
        phase = (torch.arange(width)[None] >= torch.tensor(prompt_lengths)[:, None]).to(torch.uint8)
    return RoutingTrace(topk, torch.tensor([len(row) for row in rows]), num_experts=E,
                        layer_names=[f"layer {i}" for i in range(topk.shape[0])], phase=phase)


def run_trace(tmp_path, *argv, out="out"):
    assert main(["trace", *map(str, argv), "--out", str(tmp_path / out), *REPORT]) == 0
    return json.loads((tmp_path / out / "results.json").read_text())


def expected_report(trace, **options):
    results = lrc_kernels.analyze(trace, seg_lens=SEG_LENS, num_bootstrap=B, **options)
    qualify(results)  # the CLI reports SRP at an L longer than every sequence as null (docs/cli.md)
    return json.loads(json.dumps({key: value for key, value in results.items() if key != "meta"}, allow_nan=True)
                      .replace("NaN", "null"))


def assert_same_numbers(results, expected):
    """The metrics equal; meta describes the run and the cache plan (docs/planning.md) is derived from them."""
    assert {key: value for key, value in results.items() if key not in ("meta", "plan")} == expected


@pytest.fixture
def rng():
    return np.random.default_rng(1)


def engine_files(directory, rng):
    """One file per format and the source trace each must give; some prompt and some generated part is at least
    max(SEG_LENS) = 5 tokens long, so every SRP of the prefill and decode reports is defined."""
    files = {}
    requests = [(4, random_rows(rng, [4 + 7 - 1, 4 + 2 - 1], L, K, E)), (6, random_rows(rng, [6 + 3 - 1], L, K, E))]
    write_vllm(directory / "vllm.jsonl", requests)
    files["vllm"] = (directory / "vllm.jsonl", [], source_trace([r for _, c in requests for r in c], [4, 4, 6]))
    shared = [(p, [c[0]] + [np.concatenate([c[0][:p], r[p:]]) for r in c[1:]]) for p, c in requests]
    write_vllm_021(directory / "v021.jsonl", shared)
    files["vllm-0.21"] = (directory / "v021.jsonl", [],
                          source_trace([r for _, c in shared for r in c], [4, 4, 6]))
    sgl = [(3, random_rows(rng, [3 + 7 - 1], L, K, E)[0]), (5, random_rows(rng, [5 + 2 - 1], L, K, E)[0])]
    write_sglang(directory / "sglang.jsonl", sgl)
    files["sglang"] = (directory / "sglang.jsonl", ["--num-layers", L, "--top-k", K],
                       source_trace([r for _, r in sgl], [3, 5]))
    batch = np.stack(random_rows(rng, [6, 6], L, K, E))
    write_megatron(directory / "router_trace_rank0.jsonl", [[batch]], [0, 1, 2], K)
    files["megatron"] = (directory / "router_trace_rank0.jsonl", ["--micro-batch-size", 2],
                         source_trace(list(batch)))
    one = random_rows(rng, [3, 5], L, K, E)   # two requests: prefill [3, 5] tokens, then 5 decode passes
    passes = [(1, [0, 1, 2, 0, 1, 2, 3, 4], [3, 5], np.concatenate([one[0], one[1]]))]
    decode = random_rows(rng, [5, 5], L, K, E)
    passes += [(2, [3 + j, 5 + j], None, np.stack([decode[0][j], decode[1][j]])) for j in range(5)]
    write_sglang_dump(directory / "dump.pt", passes, np.arange(E)[None].repeat(L, 0))
    files["sglang-dump"] = (directory / "dump.pt", [],
                            source_trace([np.concatenate([one[s], decode[s]]) for s in range(2)], [3, 5]))
    return files


@pytest.mark.parametrize("name", ["vllm", "vllm-0.21", "sglang", "megatron", "sglang-dump"])
def test_engine_file_report_equals_the_library_on_the_source_routing(tmp_path, rng, name):
    path, extra, trace = engine_files(tmp_path, rng)[name]
    if name != "sglang-dump":
        extra = [*extra, "--num-experts", E]
    results = run_trace(tmp_path, path, *extra)
    assert_same_numbers(results, expected_report(trace))
    assert results["meta"]["num_sequences"] == trace.num_sequences and results["meta"]["files"] == [str(path)]
    if trace.phase is not None:
        decode = run_trace(tmp_path, path, *extra, "--phase", "decode", out="decode")
        assert_same_numbers(decode, expected_report(trace, phase="decode"))
        assert decode["meta"]["phase"] == "decode"


def test_several_files_a_directory_and_a_glob_sum_in_file_order(tmp_path, rng):
    folder = tmp_path / "dumps"
    folder.mkdir()
    traces = []
    for index in range(3):
        requests = [(3, random_rows(rng, [3 + index + 2], L, K, E))]
        write_vllm(folder / f"part{index}.jsonl", requests)
        traces.append(source_trace(requests[0][1], [3]))
    expected = expected_report(RoutingTrace.concat(traces))
    assert_same_numbers(run_trace(tmp_path, folder, "--num-experts", E, out="dir"), expected)
    assert_same_numbers(run_trace(tmp_path, folder / "part*.jsonl", "--num-experts", E, out="glob"), expected)
    listed = run_trace(tmp_path, *(folder / f"part{i}.jsonl" for i in range(3)), "--num-experts", E, out="list")
    assert_same_numbers(listed, expected)
    assert listed["meta"]["files"] == [str(folder / f"part{i}.jsonl") for i in range(3)]
    # each file's own meta, in order (docs/cli.md), under what they share
    assert [part["source"] for part in listed["meta"]["parts"]] == listed["meta"]["files"]
    assert listed["meta"]["format"] == "vllm" and all(part["format"] == "vllm" for part in listed["meta"]["parts"])


def test_trace_file_saved_by_routing_trace_needs_no_num_experts(tmp_path, rng):
    trace = source_trace(random_rows(rng, [5, 7], L, K, E), [2, 3])
    trace.save(tmp_path / "t.safetensors")
    assert_same_numbers(run_trace(tmp_path, tmp_path / "t.safetensors"), expected_report(trace))


def _bad_files(directory, rng):
    """(argv, text the one-line error must contain)."""
    rows = random_rows(rng, [5], L, K, E)[0]
    good = {"choices": [{"index": 0, "routed_experts": npy_base64(rows.astype(np.uint8))}],
            "usage": {"prompt_tokens": 2}}
    lines = {
        "badb64": dict(good, choices=[{"index": 0, "routed_experts": "not base64!"}]),
        "nousage": {key: value for key, value in good.items() if key != "usage"},
        "notnpy": dict(good, choices=[{"index": 0, "routed_experts": "AAAA"}]),
    }
    for name, record in lines.items():
        (directory / f"{name}.jsonl").write_text(json.dumps(good) + "\n" + json.dumps(record) + "\n")
    (directory / "truncated.jsonl").write_text(json.dumps(good) + "\n" + json.dumps(good)[:50])
    (directory / "sgl.jsonl").write_text(json.dumps({"meta_info": {"prompt_tokens": 1, "routed_experts": "AAAAAAAA"}}) + "\n")
    (directory / "sglnull.jsonl").write_text(json.dumps({"meta_info": {"prompt_tokens": 1, "routed_experts": None}}) + "\n")
    record = {"step": 0, "block": "decoder", "layer": 0, "num_tokens": 3, "topk": 1, "top_indices": [[0], [1], [2]]}
    (directory / "meg.jsonl").write_text(json.dumps(record) + "\n")
    (directory / "meg_layer.jsonl").write_text(json.dumps(record) + "\n" + json.dumps(dict(record, layer=7)) + "\n")
    (directory / "meg_gap.jsonl").write_text(
        "\n".join(json.dumps(dict(record, step=step, layer=layer)) for step, layer in ((0, 0), (0, 1), (1, 0))) + "\n")
    write_sglang_dump(directory / "nomap.pt", [(1, [0, 1], [2], rows[:2])], None)
    write_sglang_dump(directory / "mixed.pt", [(3, [0, 1], [2], rows[:2])], np.arange(E)[None].repeat(L, 0))
    (directory / "cut.pt").write_bytes((directory / "mixed.pt").read_bytes()[:200])
    engine = ["--num-experts", E]
    return [
        (["badb64.jsonl", *engine], "badb64.jsonl:2: choices[0].routed_experts: invalid base64"),
        (["nousage.jsonl", *engine], "nousage.jsonl:2: missing field 'usage'"),
        (["notnpy.jsonl", *engine], "notnpy.jsonl:2: choices[0].routed_experts: not .npy bytes"),
        (["truncated.jsonl", *engine], "truncated.jsonl:2: invalid JSON (a truncated last line?)"),
        (["sgl.jsonl", *engine, "--num-layers", 2, "--top-k", 1],
         "sgl.jsonl:1: meta_info.routed_experts: 6 bytes do not divide into int32 [tokens, 2, 1] rows of 8 bytes"),
        (["sgl.jsonl", *engine], "sgl.jsonl: SGLang's routed_experts are raw int32 bytes without a shape"),
        (["sglnull.jsonl", *engine, "--num-layers", 2, "--top-k", 1], "sglnull.jsonl:1: meta_info.routed_experts is null"),
        (["meg.jsonl", *engine, "--micro-batch-size", 2],
         "meg.jsonl:1: step 0: 'num_tokens' 3 does not divide by --micro-batch-size 2"),
        (["meg.jsonl", *engine], "meg.jsonl: Megatron's tokens are in [s, b] order: pass --micro-batch-size B"),
        (["meg_layer.jsonl", *engine, "--micro-batch-size", 1, "--num-layers", 4],
         "meg_layer.jsonl:2: 'layer' 7: unknown layer (the model has --num-layers 4)"),
        (["meg_gap.jsonl", *engine, "--micro-batch-size", 1],
         "meg_gap.jsonl:3: step 1 (micro-batch 0) has no record for layer 1"),
        (["nomap.pt"], "nomap.pt: missing field 'last_physical_to_logical_map'"),
        (["mixed.pt"], "mixed.pt: records[0]: 'forward_mode' 3 (mixed prefill and decode)"),
        (["cut.pt", "--format", "sglang-dump"], "cut.pt: cannot read as a torch.save file"),
        (["vllm.jsonl", "--format", "megatron", *engine, "--micro-batch-size", 1], "vllm.jsonl:1: missing field 'step'"),
        (["vllm.jsonl", *engine, "--layers", "1-x"], "--layers '1-x': expected numbers and ranges"),
        (["vllm.jsonl", *engine, "--layers", "5"], "vllm.jsonl: --layers '5' names layer 5, not in the file (layers: 0-2)"),
        (["vllm.jsonl"], "vllm.jsonl: the file does not say how many experts each layer has; pass --num-experts"),
        (["meg.jsonl", *engine, "--micro-batch-size", 1, "--phase", "decode"],
         "meg.jsonl: phase: 'decode' needs a trace with per-token phases"),
    ]


def test_malformed_engine_inputs_give_one_line_naming_file_record_and_field(tmp_path, rng, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write_vllm(tmp_path / "vllm.jsonl", [(2, random_rows(rng, [4], L, K, E))])
    for argv, message in _bad_files(tmp_path, rng):
        code = main(["trace", *map(str, argv), "--out", str(tmp_path / "out"), "--quiet"])
        captured = capsys.readouterr()
        assert code == 1, argv
        assert captured.out == "" and captured.err.count("\n") == 1, captured.err
        assert captured.err.startswith("lrc-kernels: error: ") and message in captured.err, (message, captured.err)
    assert not (tmp_path / "out" / "results.json").exists()


def test_torchrun_rank_with_a_file_that_does_not_fit_fails_every_rank_with_one_line(tmp_path, rng):
    """Rank 1 reads a file with other layers: no rank may wait in the reduction, rank 0 prints one line."""
    write_vllm(tmp_path / "a.jsonl", [(2, random_rows(rng, [5], L, K, E))])
    write_vllm(tmp_path / "b.jsonl", [(2, random_rows(rng, [5], L + 1, K, E))])
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
               "-m", "lrc_kernels.cli", "trace", str(tmp_path / "a.jsonl"), str(tmp_path / "b.jsonl"),
               "--num-experts", str(E), "--out", str(tmp_path / "out"), *REPORT]
    environment = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, capture_output=True, text=True, timeout=300, env=environment)
    assert done.returncode != 0
    errors = [line for line in done.stderr.splitlines() if line.startswith("lrc-kernels: error: ")]
    assert errors == [f"lrc-kernels: error: {tmp_path / 'b.jsonl'}: does not fit the files before it: "
                      "Statistics.layer_names: expected equal values to add statistics, received "
                      "('layer 0', 'layer 1', 'layer 2') and ('layer 0', 'layer 1', 'layer 2', 'layer 3')"], done.stderr
    # torchrun itself reports the failed ranks (with its launcher's traceback); none comes from lrc_kernels.
    assert "lrc_kernels/" not in done.stderr, done.stderr
    assert not (tmp_path / "out" / "results.json").exists()


def test_progress_bar_on_a_terminal_counts_the_files_bytes(tmp_path, rng, capsys, monkeypatch):
    for index in range(2):
        write_vllm(tmp_path / f"p{index}.jsonl", [(2, random_rows(rng, [5], L, K, E))])
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    assert main(["trace", str(tmp_path / "p0.jsonl"), str(tmp_path / "p1.jsonl"), "--num-experts", str(E),
                 "--out", str(tmp_path / "out"), "--seg-lens", "2", "--num-bootstrap", "0", "--no-plots"]) == 0
    bar = capsys.readouterr().err
    assert "trace files" in bar and "2/2 files" in bar, bar
