"""RoutingMonitor.sync over 2 gloo processes, and the HF Trainer under torchrun with 2 gloo processes, equal one
process's monitor over the union of their batches."""

import math
import os
import subprocess
import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from lrc_kernels.monitor import RoutingMonitor

WORLD_SIZE, E, K, N_LAYERS, B = 2, 6, 2, 3, 20
MONITOR_ARGS = dict(seg_lens=(2, 5), cache_sizes_in_k=(1, 2), num_experts=E)


def _rank_batches(rank):
    """Two batches per rank (different T and lengths, some -1 slots), distinct across ranks."""
    generator = torch.Generator().manual_seed(100 + rank)
    batches = []
    for num_seqs, num_tokens in ((3, 9), (2, 13)):
        ids = torch.rand(num_seqs, num_tokens, N_LAYERS, E, generator=generator).argsort(-1)[..., :K]
        ids = torch.where(torch.rand(ids.shape, generator=generator) < 0.1, -1, ids)
        routing = {f"layer{q}": ids[:, :, q] for q in range(N_LAYERS)}
        batches.append((routing, torch.randint(0, num_tokens + 1, (num_seqs,), generator=generator)))
    return batches


def _fill(monitor, batches):
    for routing, lengths in batches:
        monitor.update(routing, lengths)
    return monitor


def _worker(rank, init_file, out_dir):
    torch.set_num_threads(1)  # two ranks share the CI machine's cores
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD_SIZE)
    try:
        batches = _rank_batches(rank)
        plain = _fill(RoutingMonitor(**MONITOR_ARGS), batches)
        # Bootstrap: each rank draws its own Poisson weights from seed + rank (the default generator).
        boot = _fill(RoutingMonitor(num_bootstrap=B, seed=7, **MONITOR_ARGS), batches)
        local_state = plain.state_dict()["state"]
        with plain.synced():
            plain_state, plain_metrics = plain.state_dict()["state"], plain.compute()
        with boot.synced():
            boot_state, boot_metrics = boot.state_dict()["state"], boot.compute()
        # unsync restored the local numbers.
        assert all(torch.equal(plain.state_dict()["state"][key], local_state[key]) for key in local_state)
        tap_state, tap_summary = _tap_window(rank)
        torch.save({"plain_state": plain_state, "plain_metrics": plain_metrics, "boot_state": boot_state,
                    "boot_metrics": boot_metrics, "tap_state": tap_state, "tap_summary": tap_summary},
                   f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def _tap_window(rank):
    """Two training forwards of the tiny Mixtral on rank-specific tokens through a RoutingTap, then one log
    window (which syncs). Returns the rank's local state before the window and the window's summary."""
    from hf_models import build_tiny_model
    from lrc_kernels.hf import RoutingTap

    model = build_tiny_model("mixtral").train()
    tap = RoutingTap(model, seg_lens=(2, 4))
    tap.open()
    generator = torch.Generator().manual_seed(200 + rank)
    for _ in range(2):
        model(input_ids=torch.randint(3, 64, (2, 10), generator=generator))
    tap.close()
    local_state = tap.monitor.state_dict()
    return local_state, tap.log_window(per_layer=True)


def _assert_same_metrics(got, expected):
    assert set(got) == set(expected)
    for key in expected:
        assert got[key].dtype == expected[key].dtype, key
        torch.testing.assert_close(got[key], expected[key], rtol=0, atol=0, equal_nan=True, msg=key)


def test_synced_monitors_equal_one_monitor_on_the_union(tmp_path):
    mp.spawn(_worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=WORLD_SIZE, join=True)
    results = [torch.load(tmp_path / f"rank{rank}.pt") for rank in range(WORLD_SIZE)]

    union = RoutingMonitor(**MONITOR_ARGS)
    for rank in range(WORLD_SIZE):
        _fill(union, _rank_batches(rank))
    union_state, union_metrics = union.state_dict()["state"], union.compute()
    assert int(union_state["references"].sum()) > 0

    # The bootstrap reference: one monitor per rank with that rank's generator, states summed.
    boot_parts = [_fill(RoutingMonitor(num_bootstrap=B, generator=torch.Generator().manual_seed(7 + rank),
                                       **MONITOR_ARGS), _rank_batches(rank)) for rank in range(WORLD_SIZE)]
    boot_states = [part.state_dict()["state"] for part in boot_parts]
    boot_union = RoutingMonitor(num_bootstrap=B, **MONITOR_ARGS)
    boot_union.load_state_dict({**boot_parts[0].state_dict(),
                                "state": {key: sum(state[key] for state in boot_states) for key in boot_states[0]}})

    for result in results:
        assert set(result["plain_state"]) == set(union_state)
        for key, value in union_state.items():
            assert value.dtype == torch.int64 and torch.equal(result["plain_state"][key], value), key
        _assert_same_metrics(result["plain_metrics"], union_metrics)
        for key, value in boot_union.state_dict()["state"].items():
            assert torch.equal(result["boot_state"][key], value), key
        _assert_same_metrics(result["boot_metrics"], boot_union.compute())

    # RoutingTap.log_window (what LRCCallback logs) reports the sum of the ranks' states on every rank.
    tap_parts = [result["tap_state"] for result in results]
    tap_union = RoutingMonitor(seg_lens=(2, 4))
    tap_union.load_state_dict({**tap_parts[0], "state": {
        key: sum(part["state"][key] for part in tap_parts) for key in tap_parts[0]["state"]}})
    expected = tap_union.summary(per_layer=True)
    assert not torch.equal(tap_parts[0]["state"]["srp@4"], tap_parts[1]["state"]["srp@4"])
    for result in results:
        assert result["tap_summary"] == expected


def test_hf_trainer_under_torchrun_logs_one_monitor_over_the_union_of_the_ranks_batches(tmp_path):
    """`torchrun --nproc-per-node 2` of the HF Trainer with LRCCallback on CPU (gloo): every rank logs the values
    of one RoutingMonitor fed both ranks' batches of the window, exactly."""
    from test_callbacks import MONITOR_ARGS, _RouterWitness

    tests = Path(__file__).resolve().parent
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(tests.parent), str(tests)]), OMP_NUM_THREADS="1")
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--standalone",
               str(tests / "ddp_trainer_script.py"), str(tmp_path)]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    ranks = [torch.load(tmp_path / f"rank{rank}.pt", weights_only=False) for rank in range(WORLD_SIZE)]

    # 4 optimizer steps of one forward per rank; the ranks' samplers gave them different sequences.
    assert [len(rank["batches"]) for rank in ranks] == [4, 4]
    assert not torch.equal(ranks[0]["batches"][0][1], ranks[1]["batches"][0][1])
    step_logs = [[entry for entry in rank["log_history"] if "loss" in entry] for rank in ranks]
    assert [[entry["step"] for entry in logs] for logs in step_logs] == [[2, 4], [2, 4]]
    for window in range(2):
        union = [batch for rank in ranks for batch in rank["batches"][2 * window:2 * window + 2]]
        expected = _RouterWitness.monitor_over(union, **MONITOR_ARGS).summary()
        assert "lrc/srp@4" in expected
        for logs in step_logs:
            logged = {key: value for key, value in logs[window].items() if key.startswith("lrc/")}
            assert set(logged) == set(expected)
            assert all(logged[key] == expected[key] or (math.isnan(logged[key]) and math.isnan(expected[key]))
                       for key in expected), (window, logged, expected)
