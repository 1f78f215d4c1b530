"""Bench scripts that must keep working without a GPU: the GPU check's correctness part (every Triton kernel
compared with the CPU path under the Triton interpreter at small sizes) and a short monitor-overhead run."""

import os
import pathlib
import re
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent


def test_gpu_check_small_passes_under_the_interpreter():
    result = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu_check.py"), "--small", "--seed", "0"],
                            capture_output=True, text=True, timeout=900,
                            env={**os.environ, "TRITON_INTERPRET": "1"})
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    compared = re.search(r"(\d+)/(\d+) comparisons equal", result.stdout)
    assert compared, result.stdout[-2000:]
    assert compared.group(1) == compared.group(2) and int(compared.group(2)) >= 100


def test_bench_monitor_runs_the_default_monitor_on_a_short_run():
    result = subprocess.run([sys.executable, str(ROOT / "bench" / "bench_monitor.py"), "--steps", "2",
                             "--log-every", "2", "--warmup", "1", "--batch-size", "2", "--seq-len", "64"],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    assert "caches=('sch@4', 'sch@16', 'sch@64', 'sch@256', 'lru', 'lfu', 'belady')" in result.stdout
    assert re.search(r"overhead \(wall\) [+-]\d+\.\d+ %", result.stdout), result.stdout
