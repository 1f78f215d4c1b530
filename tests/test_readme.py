"""README: exactly two set-up commands, the test one identical to what CI runs, and runnable Python."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def test_readme_has_two_setup_commands_and_ci_runs_the_test_one():
    commands = re.findall(r"```bash\n(.*?)\n```", README, flags=re.S)
    assert len(commands) == 2
    demo, tests = commands
    assert demo.endswith("lrc-kernels demo") and "pip install torch==2.13.0" in demo
    test_command = tests.split(" && ")[-1]
    assert test_command == "TRITON_INTERPRET=1 python -m pytest -q"
    ci_lines = (ROOT / ".ci" / "run").read_text().splitlines()
    assert test_command in ci_lines
    assert 'python -m pip install --quiet -e ".[test]"' in ci_lines
    assert ci_lines.index("python -m pip install --quiet torch==2.13.0") < ci_lines.index(
        'python -m pip install --quiet -e ".[test]"')


def test_readme_python_example_runs():
    (block,) = re.findall(r"```python\n(.*?)\n```", README, flags=re.S)
    namespace = {}
    exec(compile(block, "README.md", "exec"), namespace)
    assert namespace["curve"].hit_rate.shape == (64,)
    assert 0 < float(namespace["score"].best_f1) < 1


def test_metrics_doc_example_runs_and_matches_its_comments():
    text = (ROOT / "docs" / "metrics.md").read_text()
    (block,) = re.findall(r"```python\n(.*?)\n```", text, flags=re.S)
    namespace = {}
    exec(compile(block, "docs/metrics.md", "exec"), namespace)
    lk, topk = namespace["lk"], namespace["topk"]
    assert lk.srp_counts(topk, 4, 2).sum(0).tolist() == [15, 12, 1]
    assert lk.srp(topk, 4, 2).best_f1.item() == 0.7
    assert list(namespace["scores"]) == [1, 2] and namespace["scores"][2].best_f1.item() == 0.7
    assert namespace["scores"][1].best_f1.item() == 1.0
