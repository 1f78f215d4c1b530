"""Bench scripts that must keep working without a GPU: small runs of each (their own exactness checks raise on
any disagreement), including the GPU check's correctness part under the Triton interpreter."""

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
    result = subprocess.run([sys.executable, str(ROOT / "bench" / "bench_monitor.py"), "--steps", "2", "--breakdown",
                             "--log-every", "2", "--warmup", "1", "--batch-size", "2", "--seq-len", "64"],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    assert "caches=('sch@4', 'sch@16', 'sch@64', 'sch@256', 'lru', 'lfu', 'belady')" in result.stdout
    assert re.search(r"overhead \(wall\) [+-]\d+\.\d+ %", result.stdout), result.stdout
    assert re.search(r"cache sch@256 +layer level \d+\.\d+, model level \(64 slots\) \d+\.\d+", result.stdout)


def test_bench_srp_small_run_agrees_with_the_dense_baseline():
    # The script raises if the dense baseline, the API and the kernel return different integers.
    result = subprocess.run([sys.executable, str(ROOT / "bench" / "bench_srp.py"), "--sizes", "8", "--tokens", "40",
                             "--seg-lens", "4", "--metrics", "segment_coverage", "--repeats", "1"],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    assert re.search(r"^  all .* \d+\.\dx ", result.stdout, flags=re.M), result.stdout


def test_bench_cache_small_run_agrees_with_both_python_baselines():
    # The script asserts that the kernel, the API and both plain-Python baselines give the same hits.
    result = subprocess.run([sys.executable, str(ROOT / "bench" / "bench_cache.py"), "--sequences", "2", "--tokens",
                             "48", "--experts", "12", "--top-k", "2", "--layers", "2", "--repeats", "1",
                             "--python-sequences", "1"], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    assert "goal api >= 100x python 1-pass" in result.stdout
    for policy in ("lru", "lfu", "belady", "sch(4)", "sch(256)"):
        assert re.search(rf"^{re.escape(policy)} +\d", result.stdout, flags=re.M), policy


def test_bench_validate_small_run_times_both_repeated_id_checks():
    result = subprocess.run([sys.executable, str(ROOT / "bench" / "bench_validate.py"), "--sequences", "4",
                             "--tokens", "16", "--repeats", "1"], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    rows = re.findall(r"^int(?:32|64).* (\d+\.\d+) ms +(\d+\.\d+) ms +(\d+\.\d+)x$", result.stdout, flags=re.M)
    assert len(rows) == 2, result.stdout
