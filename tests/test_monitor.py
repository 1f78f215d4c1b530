"""RoutingMonitor: streaming state equals direct library calls on the union of the batches (exact integers)."""

import pytest
import torch

import lrc_kernels as lk
from lrc_kernels.monitor import RoutingMonitor

E, K, N_LAYERS = 6, 2, 3
SEG_LENS = (2, 5)


def _random_topk(generator, num_seqs, num_tokens, drop=0.1):
    ids = torch.rand(num_seqs, num_tokens, E, generator=generator).argsort(-1)[..., :K]
    dropped = torch.rand(num_seqs, num_tokens, K, generator=generator) < drop
    return torch.where(dropped, -1, ids)


def _batches(seed=0):
    """Three batches of different T, with lengths, for every layer."""
    generator = torch.Generator().manual_seed(seed)
    batches = []
    for num_seqs, num_tokens in ((3, 9), (2, 14), (4, 4)):
        routing = {f"layer{q}": _random_topk(generator, num_seqs, num_tokens) for q in range(N_LAYERS)}
        lengths = torch.randint(0, num_tokens + 1, (num_seqs,), generator=generator)
        batches.append((routing, lengths))
    return batches


def _union(batches):
    """Each layer's batches padded with -1 to the longest T and concatenated, plus the joint lengths."""
    max_tokens = max(r["layer0"].shape[1] for r, _ in batches)
    layers = []
    for q in range(N_LAYERS):
        padded = [torch.nn.functional.pad(r[f"layer{q}"], (0, 0, 0, max_tokens - r[f"layer{q}"].shape[1]),
                                          value=-1) for r, _ in batches]
        layers.append(torch.cat(padded))
    return layers, torch.cat([lengths for _, lengths in batches])


def _monitor(**kwargs):
    return RoutingMonitor(seg_lens=SEG_LENS, policies=("sch", "lru", "lfu", "belady"), cache_sizes_in_k=(1, 2, 4),
                          num_experts=E, **kwargs)


def test_state_equals_library_on_union():
    batches = _batches()
    monitor = _monitor()
    for routing, lengths in batches:
        monitor.update(routing, lengths)
    layers, lengths = _union(batches)
    state = monitor.state_dict()["state"]

    for L in SEG_LENS:
        expected = torch.stack([lk.srp_counts(t, E, L, lengths=lengths).sum(dim=(0, 1)) for t in layers])
        assert torch.equal(state[f"srp@{L}"], expected)
    references = torch.stack([((t >= 0) & (torch.arange(t.shape[1]) < lengths[:, None])[..., None]).sum()
                              for t in layers])
    assert torch.equal(state["references"], references)
    stream = lk.concat_layers(layers, E)
    for name, policy, seg_len in [(f"sch@{L}", "sch", L) for L in SEG_LENS] + [(p, p, None) for p in
                                                                              ("lru", "lfu", "belady")]:
        expected = torch.stack([lk.cache_hits(t, E, policy, seg_len=seg_len, lengths=lengths).sum(0)
                                for t in layers])
        assert torch.equal(state[f"hits/{name}"], expected)
        model = lk.cache_hits(stream, N_LAYERS * E, policy, seg_len=seg_len, lengths=lengths).sum(0)
        assert torch.equal(state[f"model_hits/{name}"], model)

    metrics = monitor.compute()
    for L in SEG_LENS:
        hist = state[f"srp@{L}"]
        assert torch.equal(metrics[f"srp@{L}"], lk.srp_score(hist).best_f1)
        assert torch.equal(metrics[f"model/srp@{L}"], lk.srp_score(hist.sum(0)).best_f1)
    # Pooled ratio Σhits/ΣN at m = c·k (layer) and c·n·k (model; c = 4 gives 24 > n·E = 18: omitted).
    for c in (1, 2):
        hits = state["hits/lru"][:, c * K - 1]
        assert torch.equal(metrics[f"hit@{c}k/lru"], hits.double() / references)
        model_hits = state["model_hits/lru"][c * N_LAYERS * K - 1]
        assert torch.equal(metrics[f"model/hit@{c}k/lru"], model_hits.double() / references.sum())
    assert torch.isnan(metrics["hit@4k/lru"]).all()  # m = 8 > E = 6
    assert "model/hit@4k/lru" not in metrics


def test_layers_of_different_experts_and_k_equal_library():
    # Layers of unequal (E, k) run as separate stacked groups; their states share one zero-padded width.
    generator = torch.Generator().manual_seed(3)
    shapes = {"a": (6, 2), "b": (4, 1), "c": (6, 2)}  # (E, k) per layer
    routing = {name: torch.rand(3, 11, e, generator=generator).argsort(-1)[..., :k]
               for name, (e, k) in shapes.items()}
    lengths = torch.tensor([11, 7, 0])
    monitor = RoutingMonitor(seg_lens=SEG_LENS, policies=("sch", "lru", "belady"), model_level=False,
                             num_experts=[e for e, _ in shapes.values()])
    monitor.update(routing, lengths)
    state = monitor.state_dict()["state"]
    for q, (name, (e, _)) in enumerate(shapes.items()):
        topk = routing[name]
        for L in SEG_LENS:
            assert torch.equal(state[f"srp@{L}"][q], lk.srp_counts(topk, e, L, lengths=lengths).sum(dim=(0, 1)))
        for cache, policy, seg_len in [(f"sch@{L}", "sch", L) for L in SEG_LENS] + [("lru", "lru", None),
                                                                                   ("belady", "belady", None)]:
            expected = lk.cache_hits(topk, e, policy, seg_len=seg_len, lengths=lengths).sum(0)
            assert torch.equal(state[f"hits/{cache}"][q], torch.nn.functional.pad(expected, (0, 6 - e)))
        in_length = (torch.arange(topk.shape[1]) < lengths[:, None])[..., None]
        assert int(state["references"][q]) == int(((topk >= 0) & in_length).sum())


def test_list_input_matches_dict_input():
    batches = _batches(1)
    by_dict, by_list = _monitor(), _monitor()
    for routing, lengths in batches:
        by_dict.update(routing, lengths)
        by_list.update([routing[f"layer{q}"] for q in range(N_LAYERS)], lengths)
    for key, value in by_dict.state_dict()["state"].items():
        assert torch.equal(value, by_list.state_dict()["state"][key]), key


def test_reset_and_state_dict_round_trip():
    batches = _batches(2)
    monitor = _monitor(num_bootstrap=20)
    monitor.update(*batches[0])
    saved = monitor.state_dict()
    monitor.update(*batches[1])
    continued = monitor.state_dict()["state"]

    restored = _monitor(num_bootstrap=20)
    restored.load_state_dict(saved)
    restored.update(*batches[1])  # the restored generator draws the same Poisson weights
    for key, value in continued.items():
        assert torch.equal(restored.state_dict()["state"][key], value), key

    monitor.reset()
    assert all(not bool(v.any()) for v in monitor.state_dict()["state"].values())
    with pytest.raises(ValueError, match="config"):
        _monitor(num_bootstrap=0).load_state_dict(saved)


def test_bootstrap_replicates_and_interval():
    batches = _batches(3)
    monitor = _monitor(num_bootstrap=40, generator=torch.Generator().manual_seed(5))
    weights = []
    generator = torch.Generator().manual_seed(5)
    for routing, lengths in batches:
        monitor.update(routing, lengths)
        weights.append(lk.poisson_weights(lengths.shape[0], 40, generator))
    layers, lengths = _union(batches)
    weights = torch.cat(weights)  # [S, B]
    state = monitor.state_dict()["state"]
    per_seq = torch.stack([lk.srp_counts(t, E, 5, lengths=lengths).sum(1) for t in layers])  # [n, S, 6]
    expected = torch.einsum("sb,nsc->nbc", weights, per_seq)
    assert torch.equal(state["srp@5/boot"], expected)
    metrics = monitor.compute()
    replicates = lk.srp_score(expected.sum(0)).best_f1
    low, high = lk.basic_interval(metrics["model/srp@5"], replicates, 0.95)
    assert torch.equal(metrics["model/srp@5/ci_low"], low)
    assert torch.equal(metrics["model/srp@5/ci_high"], high)
    with pytest.raises(ValueError, match="num_bootstrap"):
        _monitor(num_bootstrap=19)


def test_mismatch_errors_add_nothing():
    batches = _batches(4)
    monitor = _monitor()
    monitor.update(*batches[0])
    before = monitor.state_dict()["state"]
    routing, lengths = batches[1]
    with pytest.raises(ValueError, match="missing"):
        monitor.update({k: v for k, v in routing.items() if k != "layer2"}, lengths)
    with pytest.raises(ValueError, match="layers"):
        monitor.update([routing["layer0"]], lengths)
    with pytest.raises(ValueError, match="top_k"):
        monitor.update({k: v[..., :1] for k, v in routing.items()}, lengths)
    bad = dict(routing, layer1=torch.where(routing["layer1"] == 0, E, routing["layer1"]))
    with pytest.raises(ValueError, match=r"routing\['layer1'\]: expected expert ids in \[-1, 6\) \(num_experts = 6\)"):
        monitor.update(bad)
    with pytest.raises(ValueError, match=r"routing\['layer2'\]: expected top_k = 2 slots per token .* k = 3"):
        monitor.update(dict(routing, layer2=torch.cat([routing["layer2"], routing["layer2"][..., :1]], -1)))
    with pytest.raises(ValueError, match=r"missing \[\], unexpected \['layer9'\]"):
        monitor.update(dict(routing, layer9=routing["layer0"]), lengths)
    for key, value in monitor.state_dict()["state"].items():
        assert torch.equal(value, before[key]), key
    with pytest.raises(ValueError, match="num_experts"):
        RoutingMonitor().update(routing)


def test_sync_without_process_group_keeps_numbers_and_blocks_double_counting():
    routing, lengths = _batches(5)[0]
    monitor = _monitor()
    monitor.update(routing, lengths)
    local = monitor.compute()
    with monitor.synced():
        for key, value in monitor.compute().items():
            torch.testing.assert_close(value, local[key], rtol=0, atol=0, equal_nan=True)
        with pytest.raises(RuntimeError, match="unsync"):
            monitor.update(routing, lengths)
    monitor.update(routing, lengths)


def test_log_to_writes_the_summary_as_scalars():
    class RecordingWriter:  # the SummaryWriter.add_scalar interface
        def __init__(self):
            self.scalars = []

        def add_scalar(self, tag, value, step):
            self.scalars.append((tag, value, step))

    monitor = _monitor()
    for routing, lengths in _batches(6):
        monitor.update(routing, lengths)
    writer = RecordingWriter()
    written = monitor.log_to(writer, 7)
    assert written == monitor.summary()
    assert writer.scalars == [(key, value, 7) for key, value in written.items()]
    # 2 SRP + 5 caches (sch@2, sch@5, lru, lfu, belady) x 2 sizes, model level and layer mean: c = 4 is
    # omitted at both levels (m = 8 > E = 6 per layer, m = 24 > n·E = 18 for the model).
    assert len(written) == 2 * (2 + 5 * 2)
    assert not any(key.startswith("lrc/hit@4k") for key in written)


def test_summary_leaves_out_srp_without_windows():
    generator = torch.Generator().manual_seed(7)
    short = {f"layer{q}": _random_topk(generator, 2, 3, drop=0.0) for q in range(N_LAYERS)}  # T = 3 < L = 5
    monitor = _monitor()
    monitor.update(short)
    metrics = monitor.compute()
    assert metrics["srp@5/support"].tolist() == [0] * N_LAYERS and int(metrics["model/srp@5/support"]) == 0
    assert metrics["srp@5"].tolist() == [0.0] * N_LAYERS  # SPEC §9: no window scores 0 ...
    # ... which the summary does not report; L = 2 has 2 windows x E experts x 2 sequences per layer.
    assert metrics["srp@2/support"].tolist() == [2 * E * 2] * N_LAYERS
    summary = monitor.summary(per_layer=True)
    assert not any("srp@5" in key for key in summary)
    assert {"lrc/srp@2", "lrc/srp@2/layer_mean", "lrc/layer0/srp@2"} <= set(summary)


def test_policy_names_and_the_default_sch_at_every_seg_len():
    assert RoutingMonitor().cache_names == ("sch@4", "sch@16", "sch@64", "sch@256", "lru", "lfu", "belady")
    assert _monitor().cache_names == ("sch@2", "sch@5", "lru", "lfu", "belady")
    monitor = RoutingMonitor(seg_lens=SEG_LENS, policies=("belady", "sch@3"), num_experts=E)
    assert monitor.cache_names == ("belady", "sch@3")
    routing, lengths = _batches(8)[0]
    monitor.update(routing, lengths)
    layers, _ = _union([(routing, lengths)])
    expected = torch.stack([lk.cache_hits(t, E, "sch", seg_len=3, lengths=lengths).sum(0) for t in layers])
    assert torch.equal(monitor.state_dict()["state"]["hits/sch@3"], expected)
    for bad in ("sch@0", "sch@x", "sch@03", "fifo"):
        with pytest.raises(ValueError, match="policies"):
            RoutingMonitor(policies=(bad,))
    with pytest.raises(ValueError, match="distinct caches"):
        RoutingMonitor(seg_lens=(2, 5), policies=("sch", "sch@5"))


def test_default_summary_key_count_does_not_grow_with_layers():
    # E = 16, k = 2: cache sizes 2, 4 and 8 fit every layer, and 2n, 4n, 8n fit the n·16 model slots.
    # Keys: 4 L x (model, layer_mean) SRP + 7 caches (sch@4/16/64/256, lru, lfu, belady) x 3 sizes x 2 = 50.
    generator = torch.Generator().manual_seed(3)
    for num_layers in (2, 9):
        monitor = RoutingMonitor(num_experts=16)
        routing = [torch.rand(2, 300, 16, generator=generator).argsort(-1)[..., :2] for _ in range(num_layers)]
        monitor.update(routing)
        assert len(monitor.summary()) == 4 * 2 + 7 * 3 * 2


@pytest.mark.parametrize("monitor_kwargs, library_call", [
    ({"num_bootstrap": 1.5}, lambda: lk.srp(torch.zeros(1, 4, 1, dtype=torch.long), 4, 2, num_bootstrap=1.5)),
    ({"num_bootstrap": -1}, lambda: lk.srp(torch.zeros(1, 4, 1, dtype=torch.long), 4, 2, num_bootstrap=-1)),
    ({"num_bootstrap": 19}, lambda: lk.srp(torch.zeros(1, 4, 1, dtype=torch.long), 4, 2, num_bootstrap=19)),
    ({"confidence": 1.5}, lambda: lk.srp(torch.zeros(1, 4, 1, dtype=torch.long), 4, 2, confidence=1.5)),
    ({"lookup": "row"}, lambda: lk.cache_hits(torch.zeros(1, 4, 1, dtype=torch.long), 4, "lru", lookup="row")),
    ({"free_slot_hits": 1}, lambda: lk.cache_hits(torch.zeros(1, 4, 1, dtype=torch.long), 4, "lru",
                                                  free_slot_hits=1)),
    ({"backend": "gpu"}, lambda: lk.srp_counts(torch.zeros(1, 4, 1, dtype=torch.long), 4, 2, backend="gpu")),
    ({"seg_lens": (2, 2.5)}, lambda: lk.srp_counts(torch.zeros(1, 4, 1, dtype=torch.long), 4, 2.5)),
], ids=["B-float", "B-negative", "B-too-few", "confidence", "lookup", "free_slot_hits", "backend", "seg_len"])
def test_constructor_errors_are_the_library_errors(monitor_kwargs, library_call):
    """The monitor reuses the library's checks, so an argument fails as in the function it feeds."""
    with pytest.raises((TypeError, ValueError)) as expected:
        library_call()
    with pytest.raises(expected.type) as received:
        RoutingMonitor(**monitor_kwargs)
    if "seg_lens" in monitor_kwargs:  # the same check under the monitor's argument name
        assert str(received.value) == str(expected.value).replace("seg_len:", "seg_lens:")
    else:
        assert str(received.value) == str(expected.value)


def test_one_state_table_drives_checkpoints_and_sync():
    monitor = _monitor(num_bootstrap=20)
    monitor.update(*_batches()[0])
    keys = [state.key for state in monitor._table]
    assert list(monitor.state_dict()["state"]) == keys
    assert {key for key in keys if not key.endswith("/boot")} == \
        {"references", *(f"srp@{L}" for L in SEG_LENS), *(f"hits/{name}" for name in monitor.cache_names),
         *(f"model_hits/{name}" for name in monitor.cache_names)}
    assert all(f"{key}/boot" in keys for key in keys if not key.endswith("/boot"))
    with monitor.synced():  # without a process group: the same numbers, from the same table
        assert list(monitor._state) == keys
