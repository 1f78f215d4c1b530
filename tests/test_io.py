"""lrc_kernels.io: files written exactly as each engine writes them read back equal to the source routing."""

import warnings

import numpy as np
import pytest
import torch

from lrc_kernels import RoutingTrace
from lrc_kernels.io import ReadOptions, TraceReadError, TraceReadWarning, detect_format, expand_paths, read_trace

from engine_dumps import (random_rows, write_megatron, write_sglang, write_sglang_dump, write_vllm,
                          write_vllm_021)

L, K, E = 4, 2, 8


def assert_trace_holds(trace, rows, prompt_lengths=None, layers=None):
    """``trace`` has one row per ``rows[s]`` ``[T_s, layers, k]``, equal on its valid tokens, -1 beyond."""
    layers = list(range(rows[0].shape[1])) if layers is None else layers
    assert trace.topk.shape[:2] == (len(layers), len(rows))
    assert trace.lengths.tolist() == [len(row) for row in rows]
    for s, row in enumerate(rows):
        expected = torch.from_numpy(row[:, layers].transpose(1, 0, 2).astype(np.int64))
        assert torch.equal(trace.topk[:, s, : len(row)].to(torch.int64), expected)
        assert bool((trace.topk[:, s, len(row):] == -1).all())
    if prompt_lengths is None:
        assert trace.phase is None
    else:
        expected_phase = (torch.arange(trace.max_tokens)[None] >= torch.tensor(prompt_lengths)[:, None])
        valid = torch.arange(trace.max_tokens)[None] < trace.lengths[:, None]
        assert torch.equal(trace.phase.bool() & valid, expected_phase & valid)


@pytest.fixture
def rng():
    return np.random.default_rng(0)


# --------------------------------------------------------------------------- vLLM

@pytest.mark.parametrize("dtype", [np.uint8, np.uint16, np.int32])
def test_vllm_base64_npy_reads_back_every_choice(tmp_path, rng, dtype):
    prompts = [5, 3, 7]
    requests = [(p, random_rows(rng, [p + out - 1 for out in outs], L, K, E)) for p, outs in
                zip(prompts, ([4, 2], [1], [6]))]
    write_vllm(tmp_path / "vllm.jsonl", requests, dtype)
    assert detect_format(tmp_path / "vllm.jsonl") == "vllm"
    trace = read_trace(tmp_path / "vllm.jsonl", "auto", ReadOptions(num_experts=E))
    rows = [r for _, choices in requests for r in choices]
    assert_trace_holds(trace, rows, [p for p, choices in requests for _ in choices])
    assert trace.meta["format"] == "vllm" and trace.experts_per_layer == (E,) * L


def test_vllm_021_nested_lists_keep_minus_one_and_split_at_the_prompt(tmp_path, rng):
    requests = [(6, random_rows(rng, [9, 11], L, K, E)), (4, random_rows(rng, [4], L, K, E))]
    for _, choices in requests:   # a shared prompt; the first 2 positions prefix-cached (-1)
        for rows in choices:
            rows[:6 if len(rows) > 4 else 4] = choices[0][:6 if len(rows) > 4 else 4]
        choices[0][:2] = -1
        for rows in choices[1:]:
            rows[:2] = -1
    write_vllm_021(tmp_path / "v021.jsonl", requests)
    trace = read_trace(tmp_path / "v021.jsonl", "auto", ReadOptions(num_experts=E))
    assert_trace_holds(trace, [r for _, choices in requests for r in choices], [6, 6, 4])


def test_vllm_npy_and_npz_arrays_and_layer_subset(tmp_path, rng):
    rows = random_rows(rng, [7, 3], L, K, E, dense_layers=(0,))
    np.save(tmp_path / "one.npy", rows[0].astype(np.uint16))
    np.savez(tmp_path / "many.npz", req0=rows[0].astype(np.int32), req1=rows[1].astype(np.uint8))
    assert detect_format(tmp_path / "many.npz") == "vllm"
    trace = read_trace(tmp_path / "one.npy", "auto", ReadOptions(num_experts=E, layers="1-3"))
    assert_trace_holds(trace, rows[:1], layers=[1, 2, 3])
    assert trace.layer_names == ["layer 1", "layer 2", "layer 3"]
    assert_trace_holds(read_trace(tmp_path / "many.npz", "vllm", ReadOptions(num_experts=E, layers="1,3")),
                       rows, layers=[1, 3])


def test_vllm_dense_layer_of_zeros_warns(tmp_path, rng):
    rows = random_rows(rng, [6], L, 1, E, dense_layers=(0,))
    np.save(tmp_path / "dense.npy", rows[0])
    with pytest.warns(TraceReadWarning, match=r"dense.npy: layer 0 routes every token to expert 0"):
        read_trace(tmp_path / "dense.npy", "vllm", ReadOptions(num_experts=E))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        read_trace(tmp_path / "dense.npy", "vllm", ReadOptions(num_experts=E, layers="1-3"))


# --------------------------------------------------------------------------- SGLang

@pytest.mark.parametrize("openai", [False, True])
def test_sglang_raw_int32_reads_back(tmp_path, rng, openai):
    requests = [(p, random_rows(rng, [p + out - 1], L, K, E)[0]) for p, out in ((5, 3), (2, 1), (4, 9))]
    write_sglang(tmp_path / "sgl.jsonl", requests, openai=openai)
    assert detect_format(tmp_path / "sgl.jsonl") == "sglang"
    trace = read_trace(tmp_path / "sgl.jsonl", "auto", ReadOptions(num_experts=E, num_layers=L, top_k=K))
    assert_trace_holds(trace, [rows for _, rows in requests], [p for p, _ in requests])


def test_sglang_dump_stitches_prefill_chunks_prefix_cache_and_decode(tmp_path, rng):
    """A scheduler simulation: requests arrive over time, prefill in chunks of at most 6 tokens (the chunked
    request first in the next prefill pass), then decode one token per running request in admission order."""
    physical = E + 4
    mapping = np.stack([np.concatenate([rng.permutation(E), rng.integers(0, E, physical - E)]) for _ in range(L)])
    spec = [(5, 4, 0, 0), (9, 3, 0, 0), (3, 1, 0, 2), (8, 5, 3, 3), (4, 6, 0, 5)]  # prompt, output, cached, arrival
    rows = [random_rows(rng, [p + out - 1], L, K, E)[0] for p, out, _, _ in spec]
    for row, (_, _, cached, _) in zip(rows, spec):
        row[:cached] = -1

    def physical_ids(logical):   # any replica of each logical expert
        out = np.full(logical.shape, -1)
        for layer in range(L):
            for index, expert in np.ndenumerate(logical[:, layer]):
                if expert >= 0:
                    out[index[0], layer, index[1]] = rng.choice(np.flatnonzero(mapping[layer] == expert))
        return out

    passes, waiting, running, done = [], [], [], {i: spec[i][2] for i in range(len(spec))}
    step = 0
    while step < 60:
        waiting += [i for i, s in enumerate(spec) if s[3] == step]
        if waiting:
            budget, segments = 6, []
            while waiting and budget:
                i = waiting[0]
                take = min(budget, spec[i][0] - done[i])
                segments.append((i, done[i], take))
                done[i] += take
                budget -= take
                if done[i] == spec[i][0]:
                    waiting.pop(0)
                    running.append(i)
            positions = [p for i, start, n in segments for p in range(start, start + n)]
            ids = np.concatenate([rows[i][start:start + n] for i, start, n in segments])
            passes.append((1, positions, [n for _, _, n in segments], physical_ids(ids)))
        elif running:
            running = [i for i in running if done[i] < len(rows[i])]
            if running:
                positions = [done[i] for i in running]
                ids = np.stack([rows[i][done[i]] for i in running])
                passes.append((2, positions, None, physical_ids(ids)))
                for i in running:
                    done[i] += 1
        step += 1
    passes.insert(3, (4, [], None, np.zeros((0, L, K), np.int64)))   # an idle pass
    write_sglang_dump(tmp_path / "expert_distribution_recorder_1.0_0.pt", passes, mapping)
    path = tmp_path / "expert_distribution_recorder_1.0_0.pt"
    assert detect_format(path) == "sglang-dump"
    trace = read_trace(path, "auto", ReadOptions())
    assert trace.experts_per_layer == (E,) * L and trace.top_k == K
    assert_trace_holds(trace, rows, [p for p, *_ in spec])


def test_sglang_dump_ambiguous_finish_warns(tmp_path):
    mapping = np.arange(E)[None].repeat(1, 0)
    one = np.array([[[1]], [[2]]])
    passes = [(1, [0, 1, 0, 1], [2, 2], np.concatenate([one, one + 2])),   # two requests of 2 prompt tokens
              (2, [2], None, np.array([[[5]]]))]                            # one of them finished: which?
    write_sglang_dump(tmp_path / "tie.pt", passes, mapping)
    with pytest.warns(TraceReadWarning, match=r"records\[1\]: two running requests end at position 1"):
        trace = read_trace(tmp_path / "tie.pt", "sglang-dump", ReadOptions(top_k=1))
    assert trace.lengths.tolist() == [3, 2]


# --------------------------------------------------------------------------- Megatron-Core

def test_megatron_splits_sb_order_into_sequences_and_keeps_layer_numbers(tmp_path, rng):
    layer_numbers, B, s = [1, 2, 4], 3, 5
    steps = [[np.stack(random_rows(rng, [s] * B, 3, K, E))] for _ in range(2)]
    steps[1].append(np.stack(random_rows(rng, [s] * B, 3, K, E)))   # gradient accumulation: 2 micro-batches
    write_megatron(tmp_path / "router_trace_rank0.jsonl", steps, layer_numbers, K, mtp=True)
    assert detect_format(tmp_path / "router_trace_rank0.jsonl") == "megatron"
    trace = read_trace(tmp_path / "router_trace_rank0.jsonl", "auto", ReadOptions(num_experts=E, micro_batch_size=B))
    rows = [batch[b] for batches in steps for batch in batches for b in range(B)]
    assert_trace_holds(trace, rows)
    assert trace.layer_names == ["layer 1", "layer 2", "layer 4"]
    subset = read_trace(tmp_path / "router_trace_rank0.jsonl", "megatron",
                        ReadOptions(num_experts=E, micro_batch_size=B, layers="2,4"))
    assert_trace_holds(subset, rows, layers=[1, 2])


# --------------------------------------------------------------------------- our files

def test_lrc_trace_file_needs_no_num_experts_and_keeps_phases(tmp_path, rng):
    rows = random_rows(rng, [6, 4], L, K, E)
    topk = torch.full((L, 2, 6, K), -1, dtype=torch.int32)
    for s, row in enumerate(rows):
        topk[:, s, : len(row)] = torch.from_numpy(row.transpose(1, 0, 2).astype(np.int32))
    phase = (torch.arange(6)[None] >= torch.tensor([[3], [2]])).to(torch.uint8)
    RoutingTrace(topk, torch.tensor([6, 4]), num_experts=E, phase=phase, meta={"model": "m"}).save(tmp_path / "t.safetensors")
    trace = read_trace(tmp_path / "t.safetensors", "auto", ReadOptions())
    assert_trace_holds(trace, rows, [3, 2])
    assert trace.meta == {"model": "m"}
    assert_trace_holds(read_trace(tmp_path / "t.safetensors", "lrc", ReadOptions(layers="0,2")), rows, [3, 2],
                       layers=[0, 2])
    with pytest.raises(TraceReadError, match="the trace has num_experts 8, --num-experts says 9"):
        read_trace(tmp_path / "t.safetensors", "lrc", ReadOptions(num_experts=9))


def test_lrc_tensor_files_accept_the_api_dtypes_only(tmp_path):
    np.savez(tmp_path / "u8.npz", topk=np.zeros((1, 2, 1), np.uint8))
    with pytest.raises(TraceReadError, match=r"u8.npz: 'topk' must hold signed integers .* found dtype uint8"):
        read_trace(tmp_path / "u8.npz", "auto", ReadOptions(num_experts=4))


def test_expand_paths_directories_globs_and_duplicates(tmp_path):
    for name in ("b.jsonl", "a.jsonl", ".hidden"):
        (tmp_path / name).write_text("{}\n")
    assert expand_paths([tmp_path, tmp_path / "a.jsonl"]) == [tmp_path / "a.jsonl", tmp_path / "b.jsonl"]
    assert expand_paths([str(tmp_path / "*.jsonl")]) == [tmp_path / "a.jsonl", tmp_path / "b.jsonl"]
    with pytest.raises(TraceReadError, match=r"no file matches"):
        expand_paths([str(tmp_path / "*.npz")])


def test_json_lines_readers_report_the_bytes_they_read(tmp_path, rng, monkeypatch):
    import lrc_kernels.io._common as common

    monkeypatch.setattr(common, "_PROGRESS_STEP", 1)   # one call per line instead of one per 4 MB
    write_vllm(tmp_path / "v.jsonl", [(2, random_rows(rng, [5], L, K, E)) for _ in range(3)])
    calls = []
    read_trace(tmp_path / "v.jsonl", "vllm", ReadOptions(num_experts=E, on_bytes=calls.append))
    assert len(calls) == 3 and sum(calls) == (tmp_path / "v.jsonl").stat().st_size
