"""The plan section of results.json, the printed plan block, ``lrc-kernels plan`` and docs/planning.md."""

import json
import math
import re
import shlex
from pathlib import Path

import numpy as np
import pytest
import torch

import lrc_kernels as lk
from lrc_kernels.analyze import analyze
from lrc_kernels.cli.main import main
from lrc_kernels.cli.plan import plan_block
from lrc_kernels.plan_report import DEFAULT_TARGETS, hit_rate_by_budget, plan_section

from conftest import generate_trace

ROOT = Path(__file__).resolve().parents[1]
PLANNING = (ROOT / "docs" / "planning.md").read_text()
E, K, SEG_LENS = 8, 2, (2, 6)


@pytest.fixture(scope="module")
def traced(tmp_path_factory):
    """A 3-layer sticky trace with -1 slots and lengths, reported by ``trace`` with a 10-slot budget."""
    directory = tmp_path_factory.mktemp("plan")
    topk = torch.stack([generate_trace("sticky", 5, 30, K, E, drop_prob=0.1, seed=layer) for layer in range(3)])
    lengths = torch.tensor([30, 30, 17, 30, 4])
    path = directory / "t.npz"
    np.savez(path, topk=topk.numpy(), lengths=lengths.numpy())
    out = directory / "report"
    assert main([str(a) for a in ("trace", path, "--num-experts", E, "--seg-lens", *SEG_LENS, "--num-bootstrap",
                                  0, "--cache-slots", 10, "--expert-bytes", 1000, "--out", out, "--quiet")]) == 0
    return topk, lengths, out, json.loads((out / "results.json").read_text())


def _policies():
    return [(f"sch@{L}", "sch", L) for L in SEG_LENS] + [(p, p, None) for p in ("lru", "lfu", "belady")]


def _library_hits(topk, lengths, policy, seg_len):
    return torch.stack([lk.cache_hits(topk[i], E, policy, seg_len=seg_len, lengths=lengths).sum(0)
                        for i in range(topk.shape[0])])


def test_report_carries_the_integer_hits_of_every_curve(traced):
    topk, lengths, _, results = traced
    references = [int(((topk[i] >= 0) & (torch.arange(30) < lengths[:, None])[..., None]).sum()) for i in range(3)]
    for key, policy, seg_len in _policies():
        hits = _library_hits(topk, lengths, policy, seg_len)
        assert [entry["cache"][key]["hits"] for entry in results["layers"]] == hits.tolist()
        assert [entry["cache"][key]["references"] for entry in results["layers"]] == references
    assert results["plan"]["references"] == references and results["plan"]["tokens"] == int(lengths.sum())


def test_plan_section_is_the_library_on_the_report(traced):
    topk, lengths, _, results = traced
    plan = results["plan"]
    assert plan["budget"] == {"slots": 10, "gib": 10 * 1000 / 2**30, "source": "10 slots"}
    total_references = sum(plan["references"])
    for key, policy, seg_len in _policies():
        hits = _library_hits(topk, lengths, policy, seg_len)
        entry = plan["policies"][key]
        optimal = lk.allocate_cache(hits, 10)
        assert entry["optimal"]["sizes"] == optimal.tolist()
        assert entry["uniform"]["sizes"] == [3, 3, 3]
        best = lk.split_hits(hits, optimal)
        assert entry["optimal"]["hits"] == best and entry["optimal"]["hit_rate"] == best / total_references
        misses_per_token = (total_references - best) / int(lengths.sum())
        assert entry["optimal"]["misses_per_token"] == misses_per_token
        assert entry["optimal"]["bytes_per_token"] == 1000 * misses_per_token
        assert entry["optimal"]["tokens_per_s_ceiling"] == 25e9 / (1000 * misses_per_token)
        assert entry["knee"] == lk.cache_knee(hits).tolist()
        rates = hits.double() / torch.tensor(plan["references"], dtype=torch.float64)[:, None]
        for target in DEFAULT_TARGETS:
            assert entry["size_for_target"][f"{target:g}"] == lk.cache_size_for(rates, target).tolist()
        assert hit_rate_by_budget(results, key)["optimal"][1][10] == best / total_references
    model = results["model"]["cache"]
    gap = [b - l for b, l in zip(model["belady"]["hit_rate"], model["lru"]["hit_rate"])]
    assert plan["regret"]["belady"]["lru"]["model"] == gap
    assert sorted(plan["regret"]) == ["belady", "sch@2", "sch@6"]
    assert len(plan["regret"]["sch@2"]["lfu"]["layers"]) == 3


def test_default_budget_is_2k_per_layer_and_gib_budgets_round_down(traced):
    _, _, _, results = traced
    assert plan_section(results)["budget"] == {"slots": 3 * 2 * K, "gib": None,
                                               "source": f"default: 2k = {2 * K} slots per layer"}
    plan = plan_section(results, cache_gib=1e-5, expert_bytes=1000)   # 10737.4 bytes -> 10 experts
    assert plan["budget"]["slots"] == 10 and plan["policies"]["lru"]["optimal"]["slots"] <= 10


def test_plan_command_replans_a_saved_report(traced, tmp_path, capsys):
    _, _, out, results = traced
    assert main(["plan", str(out / "results.json"), "--cache-slots", "10", "--out", str(tmp_path / "same")]) == 0
    printed = capsys.readouterr().out
    assert printed.startswith("plan: budget 10 slots = 9.766 KiB (10 slots); one expert 1000 B (--expert-bytes)")
    assert sorted(p.name for p in (tmp_path / "same").iterdir()) == ["plan.json", "plan.png"]
    assert json.loads((tmp_path / "same" / "plan.json").read_text()) == results["plan"]

    argv = ["plan", str(out / "results.json"), "--cache-gib", "1e-5", "--expert-bytes", "1000", "--bandwidth-gbs",
            "5", "--min-slots", "1", "--out", str(tmp_path / "gib"), "--no-plots", "--quiet"]
    assert main(argv) == 0 and capsys.readouterr().out == ""
    replanned = json.loads((tmp_path / "gib" / "plan.json").read_text())
    assert replanned == json.loads(json.dumps(plan_section(results, cache_gib=1e-5, expert_bytes=1000,
                                                           expert_rule="--expert-bytes", min_slots=1,
                                                           bandwidth_gbs=5.0)))
    assert sorted(p.name for p in (tmp_path / "gib").iterdir()) == ["plan.json"]

    config = tmp_path / "model" / "config.json"
    config.parent.mkdir()
    config.write_text(json.dumps({"model_type": "qwen3_moe", "hidden_size": 64, "moe_intermediate_size": 16,
                                  "dtype": "bfloat16"}))
    assert main(["plan", str(out / "results.json"), "--config", str(config.parent), "--out", str(tmp_path / "cfg"),
                 "--no-plots", "--quiet"]) == 0
    from_config = json.loads((tmp_path / "cfg" / "plan.json").read_text())
    assert from_config["expert_bytes"] == 3 * 64 * 16 * 2
    assert from_config["expert_size_rule"] == "qwen3_moe: 3 x 64 x 16 weights at 2 B (bfloat16)"


def test_plan_errors_are_one_line_naming_the_option(traced, tmp_path, capsys):
    _, _, out, results = traced
    stale = json.loads(json.dumps(results))           # a report written before curves carried their hits
    for entry in stale["layers"]:
        for curve in entry["cache"].values():
            del curve["hits"]
    (tmp_path / "stale.json").write_text(json.dumps(stale))
    (tmp_path / "bad.json").write_text("{")
    (tmp_path / "foreign.json").write_text(json.dumps({"layers": [{"cache": 3}], "model": {}, "meta": {}}))
    (tmp_path / "llama.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 8}))
    saved = str(out / "results.json")
    unsized = dict(results)
    unsized.pop("plan")
    (tmp_path / "unsized.json").write_text(json.dumps(unsized))
    cases = [
        (["plan", str(tmp_path / "missing.json")],
         "missing.json: cannot read a results.json: No such file or directory"),
        (["plan", str(tmp_path / "bad.json")], "bad.json: cannot read a results.json"),
        (["plan", str(tmp_path / "llama.json")], "expected a results.json of lrc-kernels"),
        (["plan", str(tmp_path / "stale.json")], "has no integer 'hits' and 'references'"),
        (["plan", str(tmp_path / "foreign.json")], "foreign.json: not a results.json this lrc-kernels can plan"),
        (["plan", str(tmp_path / "unsized.json"), "--cache-gib", "1"], "--cache-gib: a budget of 1 GiB needs the"),
        (["trace", str(out.parent / "t.npz"), "--num-experts", "8", "--cache-gib", "1"],
         "--cache-gib: a budget of 1 GiB needs the size of one expert; give --expert-bytes or --config"),
        (["plan", saved, "--cache-slots", "2", "--min-slots", "1"], "--cache-slots: expected at least n_layers"),
        (["plan", saved, "--min-slots", "9"], "--min-slots: expected at most the smallest layer's E = 8"),
        (["plan", saved, "--config", str(tmp_path / "llama.json")], "config: model_type 'llama'"),
    ]
    for argv, message in cases:
        assert main(argv + ["--out", str(tmp_path / "out"), "--quiet"]) == 1, argv
        captured = capsys.readouterr()
        assert captured.err.count("\n") == 1 and captured.err.startswith("lrc-kernels: error: "), captured.err
        assert message in captured.err, (message, captured.err)
    for bad in (["--cache-gib", "-1"], ["--cache-slots", "1.5"], ["--bandwidth-gbs", "0"], ["--expert-bytes", "0"],
                ["--cache-gib", "1", "--cache-slots", "3"]):
        assert main(["plan", saved, *bad]) == 2
        assert "lrc-kernels plan: error: argument" in capsys.readouterr().err


def _phased_trace(decode_from):
    topk = torch.stack([generate_trace("sticky", 4, 20, K, E, seed=layer) for layer in range(2)])
    phase = (torch.arange(20) >= decode_from).to(torch.uint8).repeat(4, 1)
    return lk.RoutingTrace(topk, num_experts=E, phase=phase)


def test_phase_plans_are_the_plans_of_each_phase_alone():
    trace = _phased_trace(decode_from=8)
    section = plan_section(analyze(trace, seg_lens=(4,), num_bootstrap=0), total_slots=6, expert_bytes=10)
    assert sorted(section["phases"]) == ["decode", "prefill"]
    for name, tokens in (("prefill", 4 * 8), ("decode", 4 * 12)):
        alone = plan_section(analyze(trace, seg_lens=(4,), num_bootstrap=0, phase=name), total_slots=6,
                             expert_bytes=10)
        assert section["phases"][name] == {key: alone[key] for key in section["phases"][name]}
        assert section["phases"][name]["tokens"] == tokens
    assert "\nplan of the decode tokens alone (48 tokens), same budget:\n" in plan_block(section)


def test_a_phase_without_tokens_plans_nothing_and_prints_dashes():
    section = plan_section(analyze(_phased_trace(decode_from=20), seg_lens=(4,), num_bootstrap=0),
                           expert_bytes=10)
    decode = section["phases"]["decode"]
    assert decode["tokens"] == 0 and decode["references"] == [0, 0]
    lru = decode["policies"]["lru"]
    assert lru["optimal"]["sizes"] == [0, 0] and math.isnan(lru["optimal"]["hit_rate"])
    assert lru["knee"] == [-1, -1] and lru["optimal"]["tokens_per_s_ceiling"] is None
    last_rows = plan_block(section).splitlines()[-5:-1]
    assert all(row.split()[1:] == ["-", "-", "-", "-", "0", "0", "-", "-", "-", "-", "-", "-"] for row in last_rows)


# ------------------------------------------------------------------------------ docs/planning.md and demo

def _console_blocks():
    """(command, the output lines the doc shows under it) for every ``$`` line of the console blocks."""
    steps = []
    for block in re.findall(r"```console\n(.*?)```", PLANNING, flags=re.S):
        for line in block.splitlines():
            if line.startswith("$ "):
                steps.append((line[2:], []))
            elif line.strip() and line.strip() != "...":
                steps[-1][1].append(line)
    return steps


@pytest.fixture(scope="module")
def planning_runs(tmp_path_factory):
    """Run the doc's commands in order in one directory; keep each one's stdout."""
    directory = tmp_path_factory.mktemp("planning")
    runs = []
    previous = Path.cwd()
    import contextlib
    import io
    import os

    os.chdir(directory)
    try:
        for command, shown in _console_blocks():
            argv = shlex.split(command)
            assert argv[0] == "lrc-kernels"
            printed = io.StringIO()
            with contextlib.redirect_stdout(printed), contextlib.redirect_stderr(io.StringIO()):
                status = main(argv[1:])
            runs.append((command, shown, status, printed.getvalue()))
    finally:
        os.chdir(previous)
    return directory, runs


def test_planning_doc_commands_run_and_print_what_it_shows(planning_runs):
    _, runs = planning_runs
    assert [shlex.split(command)[1] for command, *_ in runs][:2] == ["demo", "plan"]
    for command, shown, status, printed in runs:
        assert status == 0, command
        lines = [line.rstrip() for line in printed.splitlines()]
        for line in shown:
            assert line.rstrip() in lines, (command, line)
    demo_output = runs[0][3]
    assert "\nplan: budget 16 slots" in demo_output      # `lrc-kernels demo` prints the plan block


def test_planning_doc_image_is_the_demo_plot(planning_runs):
    directory, _ = planning_runs
    images = re.findall(r"!\[[^\]]*\]\((img/[^)]+)\)", PLANNING)
    assert images == ["img/demo_plan.png"]
    assert (ROOT / "docs" / images[0]).read_bytes().startswith(b"\x89PNG")
    assert (directory / "demo" / "plan.png").read_bytes().startswith(b"\x89PNG")
    results = json.loads((directory / "demo" / "results.json").read_text())
    assert results["plan"]["expert_bytes"] == 3 * 128 * 128 * 4     # the tiny Mixtral: hidden = intermediate = 128
    # the doc's reading of the plot: the smallest budgets whose optimal split reaches a hit rate of 0.8
    stated = re.search(r"needs (\d+) experts \(([\d.]+) MiB\) with LRU, (\d+) \(([\d.]+) MiB\) with\s+SCH\(4\) "
                       r"and (\d+) \(([\d.]+) MiB\) with Belady", PLANNING).groups()
    for (slots, mib), key in zip(zip(stated[::2], stated[1::2]), ("lru", "sch@4", "belady")):
        budgets, rates = hit_rate_by_budget(results, key)["optimal"]
        first = next(budget for budget, rate in zip(budgets, rates) if rate >= 0.8)
        assert (first, round(first * results["plan"]["expert_bytes"] / 2**20, 2)) == (int(slots), float(mib))


def test_planning_doc_python_example_runs():
    (block,) = re.findall(r"```python\n(.*?)```", PLANNING, flags=re.S)
    namespace = {}
    exec(compile(block, "docs/planning.md", "exec"), namespace)
    assert math.isclose(namespace["mixtral"].bytes / 2**20, 336)
