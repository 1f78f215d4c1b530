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
    assert re.search(r"paired over the 2 adjacent \(plain, monitored\) steps, median and 95 % bootstrap interval: "
                     r"wall [+-]\d+\.\d+ % \[[+-]\d+\.\d+, [+-]\d+\.\d+\], update \+ log / plain step [+-]\d+\.\d+ %",
                     result.stdout), result.stdout
    assert re.search(r"cache sch@256 +layer level \d+\.\d+, model level \(64 slots\) \d+\.\d+", result.stdout)
    assert re.search(r"joining the model-level stream: \d+\.\d+ \(torch formulation \d+\.\d+\)", result.stdout)
    assert re.search(r"all 7 caches in one call \(as update runs them\): layer level \d+\.\d+, model level "
                     r"\d+\.\d+", result.stdout)


def test_bench_monitor_builds_a_wider_model_of_the_same_layout():
    result = subprocess.run([sys.executable, str(ROOT / "bench" / "bench_monitor.py"), "--hidden-size", "64",
                             "--steps", "2", "--log-every", "2", "--warmup", "0", "--batch-size", "2",
                             "--seq-len", "32"], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    assert "model: 4 layers, 16 experts, top-2, hidden 64," in result.stdout, result.stdout


def test_bench_monitor_samples_one_update_in_n_and_groups_the_pairs():
    command = [sys.executable, str(ROOT / "bench" / "bench_monitor.py"), "--steps", "4", "--log-every", "2",
               "--warmup", "1", "--batch-size", "2", "--seq-len", "32"]
    result = subprocess.run(command + ["--every-n-batches", "2"], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    assert "; update on one monitored step in 2 (sampling)" in result.stdout, result.stdout
    assert re.search(r"of which monitor.update  median \d+\.\d+ ms on the 2 sampled steps", result.stdout)
    assert re.search(r"paired over the 2 groups of 2 adjacent \(plain, monitored\) pairs, .* update / 2 \+ log / "
                     r"plain step [+-]\d+\.\d+ %", result.stdout), result.stdout
    assert "goal <= 3 %" not in result.stdout  # the goal is the default monitor's, not a sample's
    refused = subprocess.run(command + ["--every-n-batches", "3"], capture_output=True, text=True, timeout=600)
    assert refused.returncode == 2 and "--every-n-batches (3) must be in [1, --log-every = 2]" in refused.stderr
    ragged = subprocess.run(command[:2] + ["--steps", "3"] + command[4:] + ["--every-n-batches", "2"],
                            capture_output=True, text=True, timeout=600)
    assert ragged.returncode == 2 and "--steps (3) must be a multiple of --every-n-batches (2)" in ragged.stderr


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


def test_bench_common_generators_timer_and_table(capsys):
    sys.path.insert(0, str(ROOT / "bench"))
    try:
        import _common
    finally:
        sys.path.remove(str(ROOT / "bench"))
    import torch

    sticky = _common.sticky_trace(3, 50, 16, 4, rho=0.99, seed=1)
    uniform = _common.uniform_trace(3, 50, 16, 4, seed=1)
    zipf = _common.zipf_trace(3, 50, 16, 4, seed=1)
    assert torch.equal(uniform, _common.sticky_trace(3, 50, 16, 4, rho=0.0, seed=1))
    for trace in (sticky, uniform, zipf):
        assert trace.dtype == torch.int32 and trace.shape == (3, 50, 4) and trace.is_contiguous()
        rows = trace.reshape(-1, 4)
        assert bool(((rows >= 0) & (rows < 16)).all())
        assert all(len(set(row)) == 4 for row in rows.tolist())

    def kept(trace):  # slots of a token that the next token keeps
        return sum(len(set(a) & set(b)) for seq in trace.tolist() for a, b in zip(seq, seq[1:]))

    assert kept(sticky) > 2 * kept(uniform)  # rho = 0.99 keeps most experts; fresh logits keep ~k²/E
    popularity = torch.bincount(zipf.reshape(-1).long(), minlength=16).sort(descending=True).values
    assert popularity[0] > 3 * popularity[-1]

    clock = iter([0.0, 5.0, 10.0, 12.0, 20.0, 24.0]).__next__  # calls take 5, 2 and 4 "seconds"
    calls = []
    assert _common.best_of(lambda: calls.append(1) or len(calls), 3, warmup=1, clock=clock) == (4, 2.0)
    table = _common.Table(("policy", 6), ("api", 6))
    table.print_header()
    table.print_row("lru", "1.5ms", suffix="  note")
    assert capsys.readouterr().out == "policy    api\nlru     1.5ms  note\n"


def test_bench_read_vllm_small_run_reads_the_whole_dump():
    # The script asserts that the trace holds every response's tokens before timing.
    result = subprocess.run([sys.executable, str(ROOT / "bench" / "bench_read_vllm.py"), "--size-mb", "0.2",
                             "--tokens", "64", "--layers", "4", "--repeats", "1"],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    assert re.search(r"^reader / baseline time: \d+\.\d\dx$", result.stdout, flags=re.M), result.stdout


def test_bench_srp_paper_small_run_agrees_with_the_paper_method():
    # The script asserts equal scores, CIs and histograms of ours and the paper's method.
    result = subprocess.run([sys.executable, str(ROOT / "bench" / "bench_srp_paper.py"), "--sequences", "16",
                             "--tokens", "40", "--experts", "12", "--seg-lens", "4", "16", "--bootstrap", "40",
                             "--repeats", "1", "--traces", "sticky", "zipf"], capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    assert len(re.findall(r"^(?:sticky|zipf) +srp(?:_counts|, B=40) .* \d+\.\dx .* equal$", result.stdout,
                          flags=re.M)) == 4, result.stdout


def test_bench_paper_scale_small_run_checks_every_stage():
    # analyze, the public calls and the paper's method must agree (asserted in the script).
    result = subprocess.run([sys.executable, str(ROOT / "bench" / "bench_paper_scale.py"), "--layers", "3",
                             "--experts", "16", "--sequences", "8", "--tokens", "40", "--fraction", "2",
                             "--seg-lens", "4", "16", "--bootstrap", "40", "--threads", "2"],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    for stage in ("1 trace", "2 layers", "3 model level", "4 report", "belady model", "paper's method"):
        assert re.search(rf"^{re.escape(stage)}.* \d+\.\d{{3}} +\d+\.\d{{3}} +\d+\.\d +\d+\.\d$", result.stdout,
                         flags=re.M), stage
    assert "paper / ours:" in result.stdout


def test_bench_paper_scale_skip_paper_still_breaks_down_every_metric():
    # the docs quote the breakdown of --fraction 32 --skip-paper (e.g. its "lru model" line)
    result = subprocess.run([sys.executable, str(ROOT / "bench" / "bench_paper_scale.py"), "--layers", "3",
                             "--experts", "16", "--sequences", "8", "--tokens", "40", "--fraction", "2",
                             "--seg-lens", "4", "--bootstrap", "40", "--skip-paper"],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    assert re.search(r"^lru model, .* \d+\.\d{3} +\d+\.\d{3} +\d+\.\d +\d+\.\d$", result.stdout, flags=re.M)
    assert "paper's method" not in result.stdout


def test_bench_recorder_decode_small_run_counts_no_host_read():
    # The script exits non-zero if the recorder adds any host read (item, tolist, bool, ...) during generate().
    result = subprocess.run([sys.executable, str(ROOT / "bench" / "bench_recorder_decode.py"), "--repeats", "1",
                             "--new-tokens", "2", "--batch-size", "2", "--prompt", "8"],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    assert re.search(r"overhead \(wall\) [+-]\d+\.\d+ % +\(CPU\) [+-]\d+\.\d+ %", result.stdout), result.stdout
    assert "added by the recorder: 0 = 0.000 per forward pass" in result.stdout


def test_bench_cache_skip_small_run_agrees_without_skips():
    # The script asserts equal hits of the walk with and without block skips.
    result = subprocess.run([sys.executable, str(ROOT / "bench" / "bench_cache_skip.py"), "--shapes", "4x80",
                             "--traces", "zipf", "--sequences", "1", "--tokens", "32", "--repeats", "1"],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    assert len(re.findall(r"^4x80 +zipf .* \d+\.\d\dx$", result.stdout, flags=re.M)) == 6, result.stdout
