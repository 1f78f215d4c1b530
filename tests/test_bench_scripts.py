"""The GPU check's correctness part runs everywhere: without CUDA it compares every Triton kernel with the
CPU path under the Triton interpreter at small sizes (the timing part needs a GPU, see bench/RESULTS.md)."""

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
