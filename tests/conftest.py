"""Routing-trace generators, hypothesis strategies, the SPEC worked examples, the Triton-interpreter setup,
the backend parameter and exact-comparison helpers shared by all tests.

Traces are int64 ``[S, T, k]`` tensors of expert ids in ``[0, E)`` with ``-1`` for "no expert"; a valid id
never repeats inside a row. The generators cover the regimes that stress different code paths: uniform
(no locality), sticky Markov (tunable locality), Zipf (skewed popularity, many LFU ties broken by
recency), phased working sets (sudden working-set changes), cyclic (LRU's worst case) and constant rows.
"""

import os

import torch

# The Triton interpreter must be selected before anything imports triton; torch itself does not. Test modules
# are imported after this file, so they only need TRITON_DEVICE.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
# Where the Triton kernels run: CUDA when present, else the interpreter on CPU tensors.
TRITON_DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")

import zlib
from dataclasses import dataclass
from typing import Optional

import numpy as np
import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st

settings.register_profile(
    "lrc", deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large]
)
settings.load_profile("lrc")

BACKENDS = ["cpu", "triton"]
TRACE_KINDS = ("uniform", "sticky", "zipf", "phased", "cyclic", "constant")
STICKINESS = (0.5, 0.9, 0.99)


# SPEC §8 worked examples; test_reference.py pins every number of them.
# Example A: E = 4, k = 1, T = 8.
EXAMPLE_A = torch.tensor([[[0], [0], [1], [2], [0], [3], [2], [1]]])
# Example B: E = 4, k = 2, T = 6.
EXAMPLE_B = torch.tensor([[[0, 1], [2, 0], [3, 2], [1, 3], [2, 1], [3, 0]]])
# Example C: E = 4, k = 2, T = 4, S = 2, lengths = [4, 3]; sequence 1's last row lies beyond its length.
EXAMPLE_C = torch.tensor([
    [[0, 1], [-1, 2], [-1, -1], [0, 2]],
    [[3, 2], [3, -1], [2, 3], [1, 0]],
])
EXAMPLE_C_LENGTHS = torch.tensor([4, 3])


def assert_equal_ints(actual, expected, what: str = "result") -> None:
    """Exact equality of integer tensors (or nested lists); a failure names the first differing index.

    A failing hypothesis case then reads ``srp_counts: first difference at index (1, 3, 0): 2 != 1`` instead
    of two long tensors. Shapes must match too; tensors are compared on the CPU.
    """
    actual = torch.as_tensor(actual).cpu()
    expected = torch.as_tensor(expected).cpu()
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    assert not actual.is_floating_point() and not expected.is_floating_point(), \
        f"{what}: expected integer tensors, received {actual.dtype} and {expected.dtype}"
    differs = actual.long() != expected.long()
    if bool(differs.any()):
        index = tuple(int(i) for i in differs.nonzero()[0])
        raise AssertionError(f"{what}: first difference at index {index}: {actual[index].item()} != "
                             f"{expected[index].item()} ({int(differs.sum())} of {differs.numel()} entries differ)")


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: larger property-test budgets (still run in CI)")


@pytest.fixture(params=BACKENDS)
def backend(request):
    return request.param


# ------------------------------------------------------------------------------------------- generators

def _uniform_rows(rng, num_tokens, num_slots, num_experts):
    return [list(rng.permutation(num_experts)[:num_slots]) for _ in range(num_tokens)]


def _sticky_rows(rng, num_tokens, num_slots, num_experts, keep_prob):
    """Each slot keeps its previous expert with probability ``keep_prob`` (if still free in the row)."""
    rows = []
    previous = list(rng.permutation(num_experts)[:num_slots])
    for _ in range(num_tokens):
        row = []
        for slot in range(num_slots):
            if previous and previous[slot] not in row and rng.random() < keep_prob:
                row.append(previous[slot])
            else:
                free = [e for e in range(num_experts) if e not in row]
                row.append(free[rng.integers(len(free))])
        rows.append(row)
        previous = row
    return rows


def _zipf_rows(rng, num_tokens, num_slots, num_experts, exponent):
    popularity = 1.0 / np.arange(1, num_experts + 1) ** exponent
    popularity /= popularity.sum()
    ranked = rng.permutation(num_experts)
    return [list(ranked[rng.choice(num_experts, size=num_slots, replace=False, p=popularity)])
            for _ in range(num_tokens)]


def _phased_rows(rng, num_tokens, num_slots, num_experts, phase_len):
    """Rows drawn from a working set of ``min(E, 2k)`` experts that is redrawn every ``phase_len`` tokens."""
    set_size = min(num_experts, 2 * num_slots)
    rows = []
    for token in range(num_tokens):
        if token % phase_len == 0:
            working_set = rng.permutation(num_experts)[:set_size]
        rows.append(list(working_set[rng.permutation(set_size)[:num_slots]]))
    return rows


def _cyclic_rows(rng, num_tokens, num_slots, num_experts, period):
    """Row t holds ids ``(t*k + j) mod period`` (distinct because k <= period), relabelled at random."""
    labels = rng.permutation(num_experts)
    return [[labels[(token * num_slots + slot) % period] for slot in range(num_slots)]
            for token in range(num_tokens)]


def _constant_rows(rng, num_tokens, num_slots, num_experts):
    row = list(rng.permutation(num_experts)[:num_slots])
    return [list(row) for _ in range(num_tokens)]


def default_param(kind, num_slots, num_experts):
    """The kind's parameter when none is given: stickiness, Zipf exponent, phase length or cycle period."""
    return {"sticky": 0.9, "zipf": 1.2, "phased": 8, "cyclic": min(num_experts, num_slots + 1)}.get(kind)


def generate_trace(kind, num_sequences, num_tokens, num_slots, num_experts, *, param=None, drop_prob=0.0,
                   seed=0):
    """A random routing trace -> int64 ``[S, T, k]``.

    Args:
        kind: one of ``TRACE_KINDS``.
        param: ``sticky``: probability a slot keeps its previous expert; ``zipf``: exponent; ``phased``:
            phase length in tokens; ``cyclic``: period in experts (k..E). ``None`` takes ``default_param``.
        drop_prob: probability that a slot is replaced by ``-1`` (valid ids keep their order).
    """
    assert 0 <= num_slots <= num_experts
    rng = np.random.default_rng(seed)
    if param is None:
        param = default_param(kind, num_slots, num_experts)
    sequences = []
    for _ in range(num_sequences):
        if kind == "uniform":
            rows = _uniform_rows(rng, num_tokens, num_slots, num_experts)
        elif kind == "sticky":
            rows = _sticky_rows(rng, num_tokens, num_slots, num_experts, param)
        elif kind == "zipf":
            rows = _zipf_rows(rng, num_tokens, num_slots, num_experts, param)
        elif kind == "phased":
            rows = _phased_rows(rng, num_tokens, num_slots, num_experts, max(int(param), 1))
        elif kind == "cyclic":
            rows = _cyclic_rows(rng, num_tokens, num_slots, num_experts, max(int(param), num_slots, 1))
        elif kind == "constant":
            rows = _constant_rows(rng, num_tokens, num_slots, num_experts)
        else:
            raise ValueError(f"kind: expected one of {TRACE_KINDS}, received {kind!r}")
        sequences.append(rows)
    topk = torch.tensor(np.array(sequences, dtype=np.int64).reshape(num_sequences, num_tokens, num_slots))
    if drop_prob > 0:
        dropped = torch.from_numpy(rng.random((num_sequences, num_tokens, num_slots)) < drop_prob)
        topk = topk.masked_fill(dropped, -1)
    return topk


def random_lengths(num_sequences, num_tokens, seed=0):
    """int64 ``[S]`` in ``[0, T]``, biased towards the extremes (0 and T) that catch boundary bugs."""
    rng = np.random.default_rng(seed)
    choices = [0, num_tokens, *rng.integers(0, num_tokens + 1, size=2)]
    return torch.tensor([choices[rng.integers(len(choices))] for _ in range(num_sequences)], dtype=torch.int64)


# ---------------------------------------------------------------------------------- parametrised cases

@dataclass(frozen=True)
class TraceCase:
    """A named deterministic trace for ``pytest.mark.parametrize`` (``ids=str``)."""

    kind: str
    num_experts: int
    num_slots: int
    num_tokens: int
    seg_len: int
    param: Optional[float] = None
    num_sequences: int = 2
    drop_prob: float = 0.0
    with_lengths: bool = False

    def __str__(self):
        param = "" if self.param is None else f"{self.param:g}"
        name = (f"E{self.num_experts}-k{self.num_slots}-T{self.num_tokens}-L{self.seg_len}-{self.kind}{param}"
                f"-S{self.num_sequences}")
        if self.drop_prob:
            name += f"-drop{self.drop_prob:g}"
        if self.with_lengths:
            name += "-lengths"
        return name

    def build(self):
        """-> ``(topk int64 [S, T, k], lengths int64 [S] or None, E, L)``; the seed derives from the name."""
        seed = zlib.crc32(str(self).encode())
        topk = generate_trace(self.kind, self.num_sequences, self.num_tokens, self.num_slots, self.num_experts,
                              param=self.param, drop_prob=self.drop_prob, seed=seed)
        lengths = random_lengths(self.num_sequences, self.num_tokens, seed) if self.with_lengths else None
        return topk, lengths, self.num_experts, self.seg_len


# ------------------------------------------------------------------------------------ hypothesis strategy

@st.composite
def routing_traces(draw, max_e=16, max_k=4, max_t=40, max_s=3, *, min_e=1, min_k=1, min_t=0, min_s=1,
                   max_extra_l=5, kinds=TRACE_KINDS, minus_one=True, with_lengths=True):
    """Draw ``(topk int64 [S, T, k], lengths int64 [S] or None, E, L)`` with ``L`` in ``1..T+max_extra_l``.

    ``minus_one`` allows random ``-1`` slots; ``with_lengths`` allows a random ``lengths`` tensor.
    """
    num_experts = draw(st.integers(min_e, max_e), label="E")
    num_slots = draw(st.integers(min(min_k, num_experts), min(max_k, num_experts)), label="k")
    num_tokens = draw(st.integers(min_t, max_t), label="T")
    num_sequences = draw(st.integers(min_s, max_s), label="S")
    seg_len = draw(st.integers(1, num_tokens + max_extra_l), label="L")
    kind = draw(st.sampled_from(kinds), label="kind")
    param = None
    if kind == "sticky":
        param = draw(st.sampled_from(STICKINESS), label="stickiness")
    elif kind == "cyclic" and num_slots > 0:
        param = draw(st.integers(num_slots, num_experts), label="period")
    elif kind == "phased":
        param = draw(st.integers(1, max(num_tokens, 1)), label="phase_len")
    drop_prob = draw(st.sampled_from([0.0, 0.2, 0.6]), label="drop_prob") if minus_one else 0.0
    seed = draw(st.integers(0, 2**32 - 1), label="seed")
    topk = generate_trace(kind, num_sequences, num_tokens, num_slots, num_experts, param=param,
                          drop_prob=drop_prob, seed=seed)
    lengths = None
    if with_lengths and draw(st.booleans(), label="has_lengths"):
        lengths = torch.tensor(draw(st.lists(st.integers(0, num_tokens), min_size=num_sequences,
                                             max_size=num_sequences), label="lengths"), dtype=torch.int64)
    return topk, lengths, num_experts, seg_len


# --------------------------------------------------------------------------------------------- layouts

LAYOUTS = ("transposed", "strided_tokens", "strided_slots", "expanded_sequences", "expanded_tokens",
           "int8", "int16", "int32")


def relayout(topk, layout):
    """A non-contiguous view of ``topk`` or a copy in another dtype (SPEC §9: results must not change).

    The expanded layouts repeat one sequence or one token (stride 0), so they hold different values: compare
    a backend's result on the view with its result on ``view.contiguous().long()`` and with the reference.
    """
    if layout == "transposed":
        return topk.transpose(1, 2).contiguous().transpose(1, 2)
    if layout == "strided_tokens":
        return torch.stack([topk, topk.flip(1)], dim=2).reshape(topk.shape[0], -1, topk.shape[2])[:, ::2]
    if layout == "strided_slots":
        return torch.stack([topk, torch.full_like(topk, -1)], dim=-1).flatten(-2)[..., ::2]
    if layout == "expanded_sequences":
        return topk[:1].expand(3, -1, -1)
    if layout == "expanded_tokens":
        return topk[:, :1].expand(-1, topk.shape[1], -1)
    if layout in ("int8", "int16", "int32"):
        return topk.to(getattr(torch, layout))
    raise ValueError(f"layout: expected one of {LAYOUTS}, received {layout!r}")


def relayout_lengths(lengths, num_sequences):
    """Non-contiguous int32 lengths for ``num_sequences`` sequences (``None`` stays ``None``)."""
    if lengths is None:
        return None
    lengths = lengths[:1].expand(num_sequences) if lengths.shape[0] != num_sequences else lengths
    return torch.stack([lengths, lengths], dim=1).to(torch.int32)[:, 0]


def backend_device(backend):
    """Triton runs on CUDA when a GPU is present and in the interpreter on CPU tensors otherwise."""
    return torch.device("cuda" if backend == "triton" and torch.cuda.is_available() else "cpu")


def call_backend(function, topk, *args, lengths=None, backend, **kwargs):
    """``function(topk, *args, lengths=..., backend=backend, **kwargs)`` on the backend's device -> CPU result.

    Inputs already on that device are passed unchanged, so non-contiguous views stay views.
    """
    device = backend_device(backend)
    result = function(topk.to(device), *args, lengths=None if lengths is None else lengths.to(device),
                      backend=backend, **kwargs)
    assert result.device.type == device.type
    return result.cpu()


@pytest.fixture
def one_torch_thread():
    """One intra-op thread: tiny models gain nothing from more, which thrash on a busy 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def assert_compiles_for_sm90(script: str) -> None:
    """Run ``script`` (it compiles Triton kernels for sm_90 and prints "compiled") in a fresh process without
    TRITON_INTERPRET, so the real GPU compiler runs; Triton's bundled ptxas needs no GPU."""
    import subprocess
    import sys

    env = {name: value for name, value in os.environ.items() if name != "TRITON_INTERPRET"}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    result = subprocess.run([sys.executable, "-c", script], cwd=root, env=env, capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0 and "compiled" in result.stdout, result.stderr[-3000:]
