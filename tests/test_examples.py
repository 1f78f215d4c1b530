"""docs/monitoring.md and examples/train_loop_monitor.py: every code block and command runs as shown."""

import re
import shlex
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
DOC = (ROOT / "docs" / "monitoring.md").read_text()
PYTHON_BLOCKS = re.findall(r"```python\n(.*?)\n```", DOC, flags=re.S)
BASH_BLOCKS = re.findall(r"```bash\n(.*?)\n```", DOC, flags=re.S)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _block(marker):
    (block,) = [block for block in PYTHON_BLOCKS if marker in block]
    return block


def test_doc_has_exactly_the_tested_blocks():
    # The Lightning and TensorBoard blocks are tested in tests/test_trainer_integrations.py.
    assert len(PYTHON_BLOCKS) == 5 and len(BASH_BLOCKS) == 1


def test_trainer_block_logs_lrc_keys(capsys):
    namespace = {}
    exec(compile(_block("LRCCallback().install(trainer)"), "docs/monitoring.md", "exec"), namespace)
    logged, callback, model = namespace["logged"], namespace["callback"], namespace["model"]
    assert logged["step"] == 4
    lrc = {key: value for key, value in logged.items() if key.startswith("lrc/")}
    # SRP at 3 lengths (128-token sequences have no window of 256) + 7 caches (SCH at 4 look-aheads, LRU, LFU,
    # Belady) x 3 sizes (E = 16 and n·E = 64 hold every size), each at model level and as a layer mean.
    assert len(lrc) == 2 * (3 + 7 * 3)
    assert "lrc/hit@4k/sch@16" in lrc and "lrc/srp@64/layer_mean" in lrc
    assert "lrc/srp@256" not in lrc
    assert all(0.0 <= value <= 1.0 for value in lrc.values())
    assert callback.monitor.layer_names == [f"model.layers.{q}.mlp.gate" for q in range(4)]
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())
    assert "lrc/srp@4" in capsys.readouterr().out


def test_plain_loop_block_runs_on_the_example_helpers(capsys):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lrc_kernels.hf import RoutingMonitor, RoutingRecorder

    sys.path.insert(0, str(ROOT / "examples"))
    try:
        from train_loop_monitor import DATA_DIR, token_batches
    finally:
        sys.path.remove(str(ROOT / "examples"))
    model = AutoModelForCausalLM.from_pretrained(DATA_DIR / "tiny_moe").train()
    namespace = dict(RoutingRecorder=RoutingRecorder, RoutingMonitor=RoutingMonitor, model=model,
                     batches=token_batches(AutoTokenizer.from_pretrained(DATA_DIR / "tiny_moe"), 2, 32),
                     optimizer=torch.optim.AdamW(model.parameters()), steps=2, log_every=2)
    exec(compile(_block("monitor.update(recorder.routing())"), "docs/monitoring.md", "exec"), namespace)
    monitor = namespace["monitor"]
    assert monitor.compute()["references"].tolist() == [0, 0, 0, 0]  # reset after the log at step 2
    printed = capsys.readouterr().out
    assert printed.count("'lrc/srp@4'") == 1 and "'lrc/srp@64'" not in printed  # 32 tokens < 64


def test_ddp_block_without_process_group_reports_local_numbers(capsys):
    namespace = {}
    exec(compile(_block("monitor.synced()"), "docs/monitoring.md", "exec"), namespace)
    assert namespace["metrics"]["references"].tolist() == [2 * 32 * 2]
    assert capsys.readouterr().out.strip().endswith(" 128")


def test_example_command_from_the_doc(capsys):
    (command,) = BASH_BLOCKS
    argv = shlex.split(command)
    assert argv[:2] == ["python", "examples/train_loop_monitor.py"]
    # Run in this process (main(argv) is what `python script ...` calls) to skip a second transformers import.
    sys.path.insert(0, str(ROOT / "examples"))
    try:
        from train_loop_monitor import main
    finally:
        sys.path.remove(str(ROOT / "examples"))
    summary = main(argv[2:])
    lines = capsys.readouterr().out.splitlines()
    assert [line.split(":")[0] for line in lines if line.startswith("step")] == ["step 2", "step 4"]
    values = dict(line.split() for line in lines if line.startswith("  lrc/"))
    assert set(values) == set(summary)  # the printed keys of both logs are those of the last summary
    assert "lrc/srp@4" in values and "lrc/hit@1k/belady" in values and "lrc/srp@256" not in values
    assert all(0.0 <= float(value) <= 1.0 for value in values.values())
