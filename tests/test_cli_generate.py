"""``lrc-kernels analyze --generate`` and docs/traces.md: every command and snippet of the page runs, and the
page's table is what the command prints."""

import json
import re
import shlex
import shutil
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")

import lrc_kernels as lk  # noqa: E402
from lrc_kernels.cli.analyze import SAMPLE_TEXT  # noqa: E402
from lrc_kernels.cli.main import main  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
TRACES_DOC = (ROOT / "docs" / "traces.md").read_text()


def _without_seconds(results):
    results = json.loads(json.dumps(results))
    results["meta"].pop("seconds", None)
    return results


def test_doc_command_prints_the_doc_table_and_saves_the_trace(tmp_path, monkeypatch, capsys):
    command, trace_command = [line[2:] for block in re.findall(r"```console\n(.*?)```", TRACES_DOC, flags=re.S)
                              for line in block.splitlines() if line.startswith("$ ")]
    (table,) = re.findall(r"```text\n(.*?)```", TRACES_DOC, flags=re.S)
    shutil.copyfile(SAMPLE_TEXT, tmp_path / "my_text.txt")
    monkeypatch.chdir(tmp_path)
    argv = shlex.split(command)
    assert argv[0] == "lrc-kernels" and main(argv[1:]) == 0
    printed = capsys.readouterr().out.splitlines()
    assert printed[:len(table.splitlines())] == table.splitlines()

    results = json.loads((tmp_path / "report-gen" / "results.json").read_text())
    assert sorted(results["phases"]) == ["decode", "prefill"] and results["meta"]["generate"] == 32
    trace = lk.RoutingTrace.load(tmp_path / "gen.safetensors")
    assert trace.num_sequences == 8 and trace.meta["command"] == "analyze"
    # 64 prompt tokens, then at most 31 forwarded generated tokens (fewer after an EOS).
    assert bool((trace.lengths >= 64).all()) and bool((trace.lengths <= 64 + 31).all())
    for row, length in enumerate(trace.lengths.tolist()):
        assert trace.phase[row, :length].tolist() == [0] * 64 + [1] * (length - 64)
    # The saved trace reports the same numbers from Python (NaN-free here: every row has windows of 16).
    again = lk.analyze(trace, seg_lens=(4, 16), num_bootstrap=200)
    for key in ("layers", "model"):
        assert again[key] == results[key]
    # ... and `lrc-kernels trace` on the file writes the report of the recording.
    argv = shlex.split(trace_command)
    assert argv[:2] == ["lrc-kernels", "trace"] and main(argv[1:] + ["--quiet"]) == 0
    from_file = json.loads((tmp_path / "report-trace" / "results.json").read_text())
    for key in ("layers", "model", "phases", "plan"):
        assert from_file[key] == results[key]
    # The plan is in bytes in both: the trace file carries the model's expert size.
    assert results["plan"]["expert_bytes"] is not None
    assert trace.meta["expert_bytes"] == results["plan"]["expert_bytes"]


def test_phase_option_reports_the_selected_tokens(tmp_path):
    common = ["analyze", "default", "--text", str(SAMPLE_TEXT), "--seq-len", "16", "--max-tokens", "48",
              "--batch-size", "3", "--generate", "6", "--seg-lens", "2", "4", "--num-bootstrap", "20",
              "--no-plots", "--quiet"]
    reports = {}
    for phase in ("all", "decode"):
        assert main(common + ["--phase", phase, "--out", str(tmp_path / phase)]) == 0
        reports[phase] = json.loads((tmp_path / phase / "results.json").read_text())
    decode = reports["decode"]
    assert decode["meta"]["phase"] == "decode" and "phases" not in decode
    assert decode["model"] == reports["all"]["phases"]["decode"]["model"]
    assert decode["layers"] == reports["all"]["phases"]["decode"]["layers"]
    csv_rows = (tmp_path / "all" / "srp.csv").read_text().splitlines()
    assert any(row.startswith("decode/model,") for row in csv_rows)


def test_doc_python_snippet_runs(tmp_path, monkeypatch):
    (block,) = re.findall(r"```python\n(.*?)```", TRACES_DOC, flags=re.S)
    monkeypatch.chdir(tmp_path)
    namespace = {}
    exec(compile(block, "docs/traces.md", "exec"), namespace)
    trace = namespace["trace"]
    assert trace.n_layers == 4 and trace.num_sequences == 2 and trace.phase is not None
    assert torch.equal(trace.topk, namespace["rec"].trace().topk)
