"""The command line fails with one line and a documented exit status, and writes only inside ``--out``.

In-process runs (``main([...])`` with captured stderr) cover most cases: a traceback there is an exception
escaping ``main``. The cases where the process itself matters (argparse, Ctrl-C, a missing package, the
entry point) run as subprocesses.
"""

import contextlib
import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lrc_kernels.cli.main import main

ROOT = Path(__file__).resolve().parents[1]
TRACE_LINES = [{"seq": s, "pos": t, "experts": [(s + t) % 4, (s + 2 * t + 1) % 4]} for s in range(24) for t in range(12)
               if (s + t) % 4 != (s + 2 * t + 1) % 4]


@pytest.fixture
def trace_file(tmp_path):
    path = tmp_path / "routing.jsonl"
    path.write_text("".join(json.dumps(record) + "\n" for record in TRACE_LINES))
    return path


def run_in_process(capsys, *argv):
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.err.splitlines()


def run_subprocess(*argv, env=None, cwd=ROOT):
    completed = subprocess.run([sys.executable, "-m", "lrc_kernels.cli.main", *map(str, argv)], cwd=cwd,
                               capture_output=True, text=True, timeout=300, env=env)
    return completed.returncode, completed.stderr.splitlines(), completed.stdout


def assert_one_error(code, lines, expected_code, fragment):
    """Exit 1: ``lrc-kernels: error: ...``; exit 2 (argparse): ``lrc-kernels <command>: error: ...``."""
    assert code == expected_code, lines
    assert len(lines) == 1, lines
    assert lines[0].startswith("lrc-kernels: error: ") or (code == 2 and lines[0].startswith("lrc-kernels ")
                                                           and ": error: " in lines[0]), lines
    assert fragment in lines[0]


# --- bad values: one line, exit 1 (API errors) or 2 (argparse) ----------------------------------------------

CASES = [  # (name, arguments after the trace file, exit status, fragment of the message)
    ("experts-2^63", ["--num-experts", 2 ** 63], 2, "argument --num-experts: expected an integer <= 16777216"),
    ("experts-2^64", ["--num-experts", 2 ** 64], 2, "argument --num-experts: expected an integer <= 16777216"),
    ("experts-5000-digits", ["--num-experts", "9" * 5000], 2, "got 5000 digits"),
    ("seg-len-10^9", ["--num-experts", 4, "--seg-lens", 10 ** 9, "--num-bootstrap", 0], 1, "seg_len"),
    ("bootstrap-10^9", ["--num-experts", 4, "--num-bootstrap", 10 ** 9], 1, "num_bootstrap"),
    ("bootstrap-too-few", ["--num-experts", 4, "--num-bootstrap", 19], 1, "expected at least 20 replicates"),
    ("confidence-nan", ["--num-experts", 4, "--confidence", "nan"], 2,
     "argument --confidence: expected a number in (0, 1), got nan"),
    ("confidence-above-one", ["--num-experts", 4, "--confidence", "1.5"], 2,
     "argument --confidence: expected a number in (0, 1), got 1.5"),
    ("confidence-text", ["--num-experts", 4, "--confidence", "high"], 2, "argument --confidence"),
    ("seed-2^70", ["--num-experts", 4, "--seed", 2 ** 70], 2, "argument --seed"),
    ("id-beyond-e", ["--num-experts", 2], 1, "expert id"),
]


@pytest.mark.parametrize("extra, expected_code, fragment", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_values_give_one_line(capsys, tmp_path, trace_file, extra, expected_code, fragment):
    code, lines = run_in_process(capsys, "trace", trace_file, *extra, "--out", tmp_path / "out", "--no-plots",
                                 "--quiet")
    assert_one_error(code, lines, expected_code, fragment)


JSON_HAZARDS = {
    "pos-10^12": ('{"seq": 0, "pos": 1000000000000, "experts": [1]}\n', "'pos' 1000000000000"),
    "deep-nesting": ('{"seq": 0, "pos": 0, "experts": ' + "[" * 100000 + "]" * 100000 + "}\n", "nested too deeply"),
    "invalid-utf8": (b'{"seq": "\xff", "pos": 0, "experts": [1]}\n', "not UTF-8"),
    "5000-digits": ('{"seq": 0, "pos": ' + "9" * 5000 + ', "experts": [1]}\n', "more than 4300 digits"),
}


@pytest.mark.parametrize("name", list(JSON_HAZARDS))
def test_json_lines_hazards_give_one_line(capsys, tmp_path, name):
    content, fragment = JSON_HAZARDS[name]
    path = tmp_path / "bad.jsonl"
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    code, lines = run_in_process(capsys, "trace", path, "--num-experts", 4, "--out", tmp_path / "out", "--quiet")
    assert_one_error(code, lines, 1, fragment)
    assert str(path) in lines[0]


@pytest.mark.parametrize("suffix, fragment", [(".npz", "not an .npz archive"), (".pt", "not a torch.save file")])
def test_text_files_with_tensor_suffixes(capsys, tmp_path, suffix, fragment):
    path = tmp_path / f"notes{suffix}"
    path.write_text("just some text\n")
    code, lines = run_in_process(capsys, "trace", path, "--num-experts", 4, "--out", tmp_path / "out", "--quiet")
    assert_one_error(code, lines, 1, fragment)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(values=st.lists(st.one_of(
    st.integers(min_value=-2 ** 70, max_value=2 ** 70), st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=12), st.sampled_from(["--seg-lens", "--num-bootstrap", "--confidence", "--seed", "--phase",
                                           "--num-experts", "--out", "--overwrite", "-", "--", "=", "nan", "1e999"])),
    max_size=6))
def test_random_argument_values_never_raise(capsys, tmp_path, trace_file, values):
    """Whatever follows a valid trace command: an exit status and at most one line on stderr, no exception."""
    argv = ["trace", str(trace_file), "--num-experts", "4", "--num-bootstrap", "0", "--no-plots", "--quiet",
            "--out", str(tmp_path / "out"), "--overwrite"] + [str(v) for v in values]
    # a drawn "--out <text>" overrides ours with a relative folder: let it land in a temporary folder
    working_dir = tmp_path / "cwd"
    working_dir.mkdir(exist_ok=True)
    with contextlib.chdir(working_dir):
        code = main(argv)
    err = capsys.readouterr().err
    assert code in (0, 1, 2)
    assert len(err.splitlines()) <= 1 or code == 0, err  # warnings may precede a success


# --- the process: argparse, --version, Ctrl-C, missing packages ----------------------------------------------

def test_argparse_errors_are_one_line_with_exit_2():
    code, lines, _ = run_subprocess("trace")
    assert_one_error(code, lines, 2, "the following arguments are required: FILE")
    assert "usage:" not in lines[0]


def test_version():
    from lrc_kernels import __version__

    code, lines, stdout = run_subprocess("--version")
    assert code == 0 and stdout.strip() == f"lrc-kernels {__version__}" and lines == []


def test_ctrl_c_prints_interrupted_and_exits_130(tmp_path):
    """SIGINT in the middle of a demo run: 'interrupted' on stderr, exit status 130.

    The signal is sent as the demo's analysis starts (after the model ran). The driver installs Python's
    SIGINT handler itself, as Python does in a terminal: a suite started in the background (``nohup``, ``&``)
    inherits SIGINT ignored, and Python then installs none, so the signal would do nothing.
    """
    driver = textwrap.dedent(f"""
        import importlib, os, signal, sys
        from lrc_kernels.cli.main import main
        signal.signal(signal.SIGINT, signal.default_int_handler)
        analysis = importlib.import_module("lrc_kernels.analyze")  # the module, not the function of that name
        real_analyze = analysis.analyze
        def interrupted_analyze(*args, **kwargs):
            os.kill(os.getpid(), signal.SIGINT)  # what a Ctrl-C at this point does
            return real_analyze(*args, **kwargs)
        analysis.analyze = interrupted_analyze
        sys.exit(main(["demo", "--out", {str(tmp_path / "demo")!r}, "--quiet", "--no-plots"]))
    """)
    completed = subprocess.run([sys.executable, "-c", driver], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert completed.returncode == 130, completed.stderr
    assert completed.stderr.strip().splitlines() == ["lrc-kernels: interrupted"]
    assert signal.SIGINT  # the signal the driver sent


def test_missing_matplotlib_names_the_extra_before_any_work(tmp_path, trace_file):
    """Without matplotlib, `trace` fails at once (nothing written), naming pip install 'lrc-kernels[cli]'."""
    blocker = tmp_path / "blocker"
    (blocker / "matplotlib").mkdir(parents=True)
    (blocker / "matplotlib" / "__init__.py").write_text("raise ImportError('matplotlib is blocked for this test')\n")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(blocker), str(ROOT)]))
    code, lines, _ = run_subprocess("trace", trace_file, "--num-experts", 4, "--out", tmp_path / "out", env=env)
    assert_one_error(code, lines, 1, "pip install 'lrc-kernels[cli]'")
    assert "--no-plots" in lines[0]
    assert not (tmp_path / "out").exists()


# --- --out: checked first, never written through a link, no stale files -------------------------------------

def test_symlink_inside_out_is_replaced_not_followed(capsys, tmp_path, trace_file):
    victim = tmp_path / "victim.csv"
    victim.write_text("precious\n")
    out = tmp_path / "old"
    out.mkdir()
    (out / "srp.csv").symlink_to(Path("..") / "victim.csv")
    (out / "results.json").symlink_to(victim)
    code, lines = run_in_process(capsys, "trace", trace_file, "--num-experts", 4, "--num-bootstrap", 0,
                                 "--out", out, "--overwrite", "--no-plots", "--quiet")
    assert code == 0, lines
    assert victim.read_text() == "precious\n"
    assert not (out / "srp.csv").is_symlink() and (out / "srp.csv").read_text().startswith("layer,seg_len")
    assert not (out / "results.json").is_symlink()
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no temporary file left


def test_out_that_is_a_file_fails_first(capsys, tmp_path):
    taken = tmp_path / "taken"
    taken.write_text("x")
    code, lines = run_in_process(capsys, "trace", tmp_path / "missing.jsonl", "--num-experts", 4, "--out", taken)
    assert_one_error(code, lines, 1, f"--out {taken}: exists and is not a directory")  # before the missing file
    code, lines = run_in_process(capsys, "trace", tmp_path / "missing.jsonl", "--num-experts", 4,
                                 "--out", taken / "sub")
    assert_one_error(code, lines, 1, f"--out {taken / 'sub'}: cannot write there")


def test_failed_run_creates_no_out_folder_and_keeps_the_users_own(capsys, tmp_path):
    missing = tmp_path / "missing.jsonl"
    code, lines = run_in_process(capsys, "trace", missing, "--num-experts", 4, "--out", tmp_path / "new" / "report")
    assert_one_error(code, lines, 1, "no such file")
    assert not (tmp_path / "new" / "report").exists()
    (tmp_path / "mine").mkdir()
    run_in_process(capsys, "trace", missing, "--num-experts", 4, "--out", tmp_path / "mine")
    assert (tmp_path / "mine").is_dir()  # the user's own empty folder stays


def test_report_files_get_the_umask_mode_not_0600(capsys, tmp_path, trace_file):
    mask = os.umask(0o022)
    try:
        out = tmp_path / "report"
        assert run_in_process(capsys, "trace", trace_file, "--num-experts", 4, "--num-bootstrap", 0,
                              "--out", out, "--no-plots", "--quiet")[0] == 0
    finally:
        os.umask(mask)
    assert {oct(path.stat().st_mode & 0o777) for path in out.iterdir()} == {oct(0o644)}


def test_analyze_text_or_save_trace_that_is_a_directory_fails_before_the_model_runs(capsys, tmp_path):
    pytest.importorskip("transformers")
    code, lines = run_in_process(capsys, "analyze", "default", "--text", tmp_path, "--out", tmp_path / "a")
    assert_one_error(code, lines, 1, f"{tmp_path}: is a directory, not a text file")
    text = tmp_path / "text.txt"
    text.write_text("hello world\n")
    code, lines = run_in_process(capsys, "analyze", "default", "--text", text, "--save-trace", tmp_path,
                                 "--out", tmp_path / "b")
    assert_one_error(code, lines, 1, f"--save-trace {tmp_path}: is a directory")


def test_non_empty_out_needs_overwrite_which_removes_stale_files(capsys, tmp_path, trace_file):
    out = tmp_path / "report"
    common = ["trace", trace_file, "--num-experts", 4, "--num-bootstrap", 0, "--seg-lens", 2, "--quiet"]
    assert run_in_process(capsys, *common, "--out", out)[0] == 0
    first = {p.name for p in out.iterdir()}
    assert {"results.json", "srp.csv", "srp_vs_L.png"} <= first
    assert set(json.loads((out / "results.json").read_text())["meta"]["outputs"]) == first

    (out / "notes.txt").write_text("mine\n")
    code, lines = run_in_process(capsys, *common, "--out", out, "--no-plots")
    assert_one_error(code, lines, 1, "the folder is not empty; pass --overwrite")

    assert run_in_process(capsys, *common, "--out", out, "--no-plots", "--overwrite")[0] == 0
    assert {p.name for p in out.iterdir()} == {"results.json", "srp.csv", "cache.csv", "coverage.csv", "notes.txt"}


# --- numbers that cannot say anything are marked, not printed as measurements ------------------------------

def test_srp_beyond_every_sequence_is_null_na_and_warned(capsys, tmp_path, trace_file):
    """L = 4096 > T: no window anywhere, so SRP@4096 is null in results.json and n/a in the table."""
    out = tmp_path / "out"
    code = main(["trace", str(trace_file), "--num-experts", "4", "--seg-lens", "2", "4096", "--num-bootstrap", "20",
                 "--out", str(out), "--no-plots"])
    captured = capsys.readouterr()
    assert code == 0
    assert [line for line in captured.err.splitlines() if "SRP@4096" in line] == [
        f"lrc-kernels: warning: SRP@4096 not defined: no sequence has that many tokens (the longest has "
        f"{max(record['pos'] for record in TRACE_LINES) + 1}); reported as null (n/a)"]
    results = json.loads((out / "results.json").read_text())
    for entry in results["layers"] + [results["model"]]:
        assert entry["srp"]["4096"] == {"best_f1": None, "threshold": None, "best_m": None, "act_r": None,
                                        "support": 0, "ci_low": None, "ci_high": None}
        assert entry["srp"]["2"]["best_f1"] is not None
    header, first = captured.out.splitlines()[:2]
    assert "SRP@4096" in header and "n/a" in first and "0.000 [0.000,0.000]" not in captured.out


def test_few_sequences_warn_about_the_intervals(capsys, tmp_path):
    path = tmp_path / "two.jsonl"
    path.write_text("".join(json.dumps({"seq": s, "pos": t, "experts": [(s + t) % 4]}) + "\n"
                            for s in range(2) for t in range(8)))
    assert main(["trace", str(path), "--num-experts", "4", "--seg-lens", "2", "--num-bootstrap", "20",
                 "--out", str(tmp_path / "out"), "--no-plots", "--quiet"]) == 0
    assert capsys.readouterr().err.splitlines() == [
        "lrc-kernels: warning: the bootstrap CIs rest on 2 sequences (fewer than 20): treat them as rough"]


def test_one_layer_has_no_duplicate_model_row(capsys, tmp_path, trace_file):
    assert main(["trace", str(trace_file), "--num-experts", "4", "--seg-lens", "2", "--num-bootstrap", "0",
                 "--out", str(tmp_path / "out"), "--no-plots"]) == 0
    rows = [line.split()[0] for line in capsys.readouterr().out.splitlines()[1:] if line.strip()]
    assert rows[0] == "0" and "model" not in rows


@pytest.mark.parametrize("quiet", [False, True], ids=["bars", "quiet"])
def test_metric_phase_has_a_progress_bar_that_quiet_silences(capsys, monkeypatch, tmp_path, trace_file, quiet):
    """On a terminal the metric phase draws a bar per stream (the layers, then the model level); --quiet none."""
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    argv = ["trace", str(trace_file), "--num-experts", "4", "--seg-lens", "2", "--num-bootstrap", "0",
            "--out", str(tmp_path / "out"), "--no-plots"] + (["--quiet"] if quiet else [])
    assert main(argv) == 0
    err = capsys.readouterr().err
    assert ("metrics of routing.jsonl" in err) != quiet
    assert "Traceback" not in err
