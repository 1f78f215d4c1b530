"""Streaming local-routing-consistency monitor for training loops (SPEC §2, §3 "Streaming", §4, §6).

:class:`RoutingMonitor` follows the shape of a torchmetrics ``Metric`` without depending on torchmetrics:
``update(routing)`` folds one batch of routing decisions into additive int64 sufficient statistics,
``compute()`` scores them, ``reset()`` zeroes them, ``sync()`` sums them over a ``torch.distributed``
process group, and ``state_dict()`` / ``load_state_dict()`` checkpoint them. Because every state is a
sum over sequences, monitoring batches one by one (or on several ranks) gives exactly the integers of one
library call on the union of the batches.

The monitor only consumes tensors, so this module imports neither transformers nor any model code.
"""

from __future__ import annotations

import contextlib
import math
from typing import Dict, List, Mapping, Optional, Sequence, Tuple, Union

import torch

from lrc_kernels import basic_interval, bootstrap_indices, poisson_weights, srp_score
from lrc_kernels.srp import weighted_sum
from lrc_kernels._checks import check_choice, check_topk, run_backend, BACKENDS

try:
    import nvtx as _nvtx
except ImportError:  # NVTX ranges are an optional profiling aid
    _nvtx = None

POLICIES = ("sch", "lru", "lfu", "belady")
LOOKUPS = ("token", "sequential")

Routing = Union[Mapping[str, torch.Tensor], Sequence[torch.Tensor]]


def _nvtx_range(name: str):
    if _nvtx is None:
        return contextlib.nullcontext()
    return _nvtx.annotate(name, domain="lrc_kernels")


def _int_tuple(values, name: str, minimum: int) -> Tuple[int, ...]:
    values = tuple(values)
    for value in values:
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"{name}: expected ints, received {type(value).__name__} {value!r}")
        if value < minimum:
            raise ValueError(f"{name}: expected ints >= {minimum}, received {value}")
    if len(set(values)) != len(values):
        raise ValueError(f"{name}: expected distinct values, received {values}")
    return values


def _sch_look_ahead(policy: str) -> int:
    """L of a ``"sch@L"`` policy name."""
    digits = policy[len("sch@"):]
    if not digits.isdigit() or int(digits) < 1 or digits != str(int(digits)):
        raise ValueError(f"policies: expected 'sch@L' with an int L >= 1, received {policy!r}")
    return int(digits)


def _sum_dim1(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor.sum(1)`` for int64 ``[A, B, ...]``.

    On the CPU this is a numpy reduction: torch splits a reduction of a few 10^5 elements over its intra-op
    threads, and waking them cost ~10 ms per call on a busy 2-core machine, against ~0.05 ms in numpy.
    """
    if tensor.device.type == "cpu":
        return torch.from_numpy(tensor.numpy().sum(1))
    return tensor.sum(1)


class RoutingMonitor:
    """Accumulates SRP histograms and cache hit counts of a stream of routed batches.

    Args:
        seg_lens: window lengths L for SRP (and the look-aheads of the ``"sch"`` policy entry).
        policies: cache policies among ``"sch@L"`` (SCH with look-ahead L, any L >= 1), ``"sch"`` (expands
            to ``"sch@L"`` for every L in ``seg_lens``), ``"lru"``, ``"lfu"`` and ``"belady"``. SCH at every L
            is about half of an update; ``("sch@16", "lru", "lfu", "belady")`` is a cheaper choice for a
            training loop (docs/monitoring.md, Cost).
        cache_sizes_in_k: reported cache sizes as multiples c of the working set: m = c·k per layer and
            m = c·n·k at model level. Sizes above E (n·E) are not reported. The state holds every m.
        num_bootstrap: B > 0 adds streaming Poisson-bootstrap CIs (SPEC §3 "Streaming"); needs
            ``round(B·(1-confidence)/2) >= 1`` (B >= 20 at 0.95).
        confidence: CI level in (0, 1).
        model_level: also monitor the model-level stream (SPEC §6): all layers joined by
            ``concat_layers``, cached over n·E slots; model-level SRP pools the layer histograms. Needs
            equal E and k in every layer.
        device: where the state lives; default: the device of the first ``update``. Routing on another
            device is copied there (CUDA state uses the Triton kernels, CPU state the CPU backend).
        generator: CPU ``torch.Generator`` for the Poisson weights. Default: one seeded with
            ``seed + rank``, so DDP ranks draw independent weights and a rerun draws the same ones.
        num_experts: E, an int for every layer or one per layer. Must be known before the first update,
            here or via :meth:`from_sites` / :meth:`from_recorder`.
        top_k: k per layer (int or per layer); default: taken from the first update.
        layer_names: names of the layers in monitor order; default: the first update's dict keys in
            insertion order, or ``"0", "1", ...`` for a list.
        free_slot_hits, lookup: cache options of :func:`lrc_kernels.cache_hits`.
        backend: ``"auto"``, ``"cpu"`` or ``"triton"`` for the library calls.
        seed: seed of the default generator.

    The cache estimate is the **pooled ratio** Σhits/ΣN over every sequence seen, which weighs sequences by
    their reference counts; :func:`lrc_kernels.cache_curve` instead averages per-sequence rates. They agree
    when every sequence has the same number of references (fixed-length batches without -1).
    """

    def __init__(self, seg_lens: Sequence[int] = (4, 16, 64, 256),
                 policies: Sequence[str] = POLICIES, cache_sizes_in_k: Sequence[int] = (1, 2, 4),
                 num_bootstrap: int = 0, confidence: float = 0.95, model_level: bool = True,
                 device: Optional[Union[str, torch.device]] = None,
                 generator: Optional[torch.Generator] = None, *,
                 num_experts: Optional[Union[int, Sequence[int]]] = None,
                 top_k: Optional[Union[int, Sequence[int]]] = None,
                 layer_names: Optional[Sequence[str]] = None, free_slot_hits: bool = True,
                 lookup: str = "token", backend: str = "auto", seed: int = 0):
        self.seg_lens = _int_tuple(seg_lens, "seg_lens", 1)
        policies = tuple(policies)
        specs = []  # (name, policy, seg_len) of every monitored cache
        for policy in policies:
            if policy == "sch":
                specs.extend((f"sch@{L}", "sch", L) for L in self.seg_lens)
            elif isinstance(policy, str) and policy.startswith("sch@"):
                specs.append((policy, "sch", _sch_look_ahead(policy)))
            elif policy in POLICIES:
                specs.append((policy, policy, None))
            else:
                raise ValueError(f"policies: expected entries of {POLICIES} or 'sch@L' (an int L >= 1), "
                                 f"received {policy!r}")
        names = [name for name, _, _ in specs]
        if len(set(names)) != len(names):
            raise ValueError(f"policies: expected distinct caches, received {policies} (caches {names})")
        self.policies = policies
        self.cache_sizes_in_k = _int_tuple(cache_sizes_in_k, "cache_sizes_in_k", 1)
        if isinstance(num_bootstrap, bool) or not isinstance(num_bootstrap, int) or num_bootstrap < 0:
            raise ValueError(f"num_bootstrap: expected an int >= 0, received {num_bootstrap!r}")
        if isinstance(confidence, bool) or not isinstance(confidence, (int, float)) \
                or not 0.0 < confidence < 1.0:
            raise ValueError(f"confidence: expected a float in (0, 1), received {confidence!r}")
        if num_bootstrap > 0:
            bootstrap_indices(num_bootstrap, confidence)  # raises unless lp >= 1
        if lookup not in LOOKUPS:
            raise ValueError(f"lookup: expected one of {LOOKUPS}, received {lookup!r}")
        if not isinstance(free_slot_hits, bool):
            raise TypeError(f"free_slot_hits: expected a bool, received {type(free_slot_hits).__name__}")
        self.num_bootstrap = num_bootstrap
        self.confidence = float(confidence)
        self.model_level = bool(model_level)
        self.free_slot_hits = free_slot_hits
        self.lookup = lookup
        self.backend = backend
        self.seed = seed
        self.device = None if device is None else torch.device(device)
        self._generator = generator
        check_choice(backend, "backend", BACKENDS)
        self._cache_specs: Tuple[Tuple[str, str, Optional[int]], ...] = tuple(specs)
        self.cache_names: Tuple[str, ...] = tuple(name for name, _, _ in self._cache_specs)

        self._layer_names: Optional[List[str]] = None if layer_names is None else [str(n) for n in layer_names]
        if self._layer_names is not None and len(set(self._layer_names)) != len(self._layer_names):
            raise ValueError(f"layer_names: expected distinct names, received {self._layer_names}")
        self._num_experts = self._per_layer(num_experts, "num_experts")
        self._top_k = self._per_layer(top_k, "top_k")
        self._state: Optional[Dict[str, torch.Tensor]] = None
        self._unsynced_state: Optional[Dict[str, torch.Tensor]] = None
        self._synced = False
        if self.device is not None and self._layout_complete():
            self._state = self._zero_state(self.device)

    # ----------------------------------------------------------------------------------------------
    # construction helpers

    @classmethod
    def from_sites(cls, sites, *, stage: Optional[str] = None, **kwargs) -> "RoutingMonitor":
        """A monitor for the router sites of one stack, layers ordered by ``site.layer``.

        Args:
            sites: :class:`lrc_kernels.hf.routers.RouterSite` objects (``name``, ``layer``, ``stage``,
                ``num_experts``, ``top_k``), e.g. ``rec.sites``.
            stage: keep only the sites of this stack (``"encoder"`` / ``"decoder"``); required when the
                sites span several stacks, since a model-level stream joins one stack's layers.
            **kwargs: the other :class:`RoutingMonitor` arguments.
        """
        sites = list(sites)
        if stage is not None:
            sites = [site for site in sites if site.stage == stage]
        stages = sorted({str(site.stage) for site in sites})
        if len(stages) > 1:
            raise ValueError(f"stage: the sites span stacks {stages}; pass stage= to monitor one of them "
                             "(one RoutingMonitor per stack)")
        if not sites:
            raise ValueError(f"sites: expected at least one router site{'' if stage is None else ' of stage ' + repr(stage)}")
        sites.sort(key=lambda site: site.layer)
        return cls(layer_names=[site.name for site in sites], num_experts=[site.num_experts for site in sites],
                   top_k=[site.top_k for site in sites] if all(site.top_k is not None for site in sites)
                   else None, **kwargs)

    @classmethod
    def from_recorder(cls, recorder, *, stage: Optional[str] = None, **kwargs) -> "RoutingMonitor":
        """A monitor for the routers a :class:`lrc_kernels.hf.recorder.RoutingRecorder` records."""
        return cls.from_sites(recorder.sites, stage=stage, **kwargs)

    def _per_layer(self, value, name: str) -> Optional[Union[int, List[int]]]:
        """An int (same for every layer, count still open) or a per-layer list, each value an int >= 1."""
        if value is None:
            return None
        values = [value] if isinstance(value, int) and not isinstance(value, bool) else list(value)
        for entry in values:
            _int_tuple([entry], name, 1)
        if isinstance(value, int):
            return value if self._layer_names is None else values * len(self._layer_names)
        if self._layer_names is not None and len(values) != len(self._layer_names):
            raise ValueError(f"{name}: expected one value per layer ({len(self._layer_names)} layers), "
                             f"received {len(values)}")
        return values

    # ----------------------------------------------------------------------------------------------
    # layout and state

    @property
    def layer_names(self) -> Optional[List[str]]:
        """Layer names in monitor order (model-level slot q·E + e is expert e of layer q); None until known."""
        return None if self._layer_names is None else list(self._layer_names)

    @property
    def num_experts(self) -> Optional[List[int]]:
        """E per layer; None until the layer count is known."""
        return list(self._num_experts) if isinstance(self._num_experts, list) else None

    @property
    def top_k(self) -> Optional[List[int]]:
        """k per layer; None until the layer count is known."""
        return list(self._top_k) if isinstance(self._top_k, list) else None

    def _layout_complete(self) -> bool:
        return self._layer_names is not None and self.num_experts is not None and self.top_k is not None

    def _zero_state(self, device: torch.device) -> Dict[str, torch.Tensor]:
        """Every state tensor, int64 zeros, keyed by a stable name (the ``state_dict`` / ``sync`` order)."""
        num_layers, max_experts, reps = len(self._layer_names), max(self._num_experts), self.num_bootstrap

        def zeros(*shape):
            return torch.zeros(shape, dtype=torch.int64, device=device)

        # Per layer: [n, X], and [n, B, X] for the Σω-weighted replicates ("<key>/boot").
        state = {"references": zeros(num_layers)}
        for L in self.seg_lens:
            state[f"srp@{L}"] = zeros(num_layers, L + 1)
        for name in self.cache_names:
            state[f"hits/{name}"] = zeros(num_layers, max_experts)
        if reps:
            state.update({f"{key}/boot": zeros(num_layers, reps, *value.shape[1:])
                          for key, value in list(state.items())})
        # Model level: [n·E], and [B, n·E] for the replicates.
        if self.model_level:
            for name in self.cache_names:
                state[f"model_hits/{name}"] = zeros(num_layers * self._num_experts[0])
                if reps:
                    state[f"model_hits/{name}/boot"] = zeros(reps, num_layers * self._num_experts[0])
        return state

    def _check_model_level(self, num_experts: List[int], top_k: List[int]) -> None:
        if self.model_level and (len(set(num_experts)) > 1 or len(set(top_k)) > 1):
            raise ValueError(f"model_level: the model-level stream needs equal num_experts and top_k in every "
                             f"layer, received num_experts={num_experts}, top_k={top_k}; pass model_level=False")

    def _bootstrap_generator(self) -> torch.Generator:
        if self._generator is None:
            rank = 0
            if torch.distributed.is_available() and torch.distributed.is_initialized():
                rank = torch.distributed.get_rank()
            self._generator = torch.Generator().manual_seed(self.seed + rank)
        return self._generator

    # ----------------------------------------------------------------------------------------------
    # update

    def _layers_in_order(self, routing: Routing) -> Tuple[List[str], List[torch.Tensor]]:
        if isinstance(routing, Mapping):
            received = [str(name) for name in routing]
            if self._layer_names is None:
                names = received
            else:
                names = self._layer_names
                missing = [n for n in names if n not in routing]
                extra = [n for n in received if n not in set(names)]
                if missing or extra:
                    raise ValueError(f"routing: expected the layers {names}, received {received} "
                                     f"(missing {missing}, unexpected {extra})")
            tensors = [routing[name] for name in names]
        elif isinstance(routing, (list, tuple)):
            tensors = list(routing)
            names = self._layer_names or [str(q) for q in range(len(tensors))]
            if len(tensors) != len(names):
                raise ValueError(f"routing: expected {len(names)} layers (number of layers of the first update "
                                 f"or of layer_names), received {len(tensors)}")
        else:
            raise TypeError(f"routing: expected a dict {{layer_name: LongTensor [B, T, k]}} or a list of "
                            f"tensors, received {type(routing).__name__}")
        if not tensors:
            raise ValueError("routing: expected at least one layer, received none")
        if isinstance(self._num_experts, list) and len(self._num_experts) != len(tensors):
            raise ValueError(f"routing: expected {len(self._num_experts)} layers (one per num_experts entry), "
                             f"received {len(tensors)}")
        shaped = []
        for name, topk in zip(names, tensors):
            if not isinstance(topk, torch.Tensor):
                raise TypeError(f"routing[{name!r}]: expected a torch.Tensor, received {type(topk).__name__}")
            if topk.ndim == 2:
                topk = topk.unsqueeze(0)
            if topk.ndim != 3:
                raise ValueError(f"routing[{name!r}]: expected a tensor [B, T, k] (or [T, k]), received shape "
                                 f"{tuple(topk.shape)}")
            shaped.append(topk)
        batch_shape = tuple(shaped[0].shape[:2])
        for name, topk in zip(names, shaped):
            if tuple(topk.shape[:2]) != batch_shape:
                raise ValueError(f"routing[{name!r}]: expected batch shape [B, T] = {list(batch_shape)} like "
                                 f"routing[{names[0]!r}], received {list(topk.shape[:2])}")
        return names, shaped

    def update(self, routing: Routing, lengths: Optional[torch.Tensor] = None) -> None:
        """Fold one batch into the state.

        Args:
            routing: ``{layer_name: int [B, T, k]}`` expert ids in processing order, ``-1`` = no expert
                (e.g. :meth:`RoutingRecorder.routing`), or a list of ``[B, T, k]`` tensors in monitor layer
                order (``from_sites`` orders by ``RouterSite.layer``). ``[T, k]`` is one sequence. Every
                layer must have the same B and T.
            lengths: optional int ``[B]`` valid prefix lengths; tokens beyond are ignored (SPEC §1). Use it
                for right padding: -1 padding tokens would still occupy window and look-ahead positions.

        Raises:
            ValueError: a different layer set, layer count, k or E than the first update or the
                constructor; ids >= E (the library's validation). Nothing is added when an error is raised.
        """
        if self._synced:
            raise RuntimeError("update: the monitor holds synced (all-reduced) state; call unsync() first")
        with _nvtx_range("RoutingMonitor.update"):
            names, layers = self._layers_in_order(routing)
            if self._num_experts is None:
                raise ValueError("num_experts: unknown; pass num_experts= to RoutingMonitor or build it with "
                                 "RoutingMonitor.from_sites(...) / from_recorder(...)")
            num_experts = self._num_experts if isinstance(self._num_experts, list) \
                else [self._num_experts] * len(layers)
            top_k = [int(t.shape[-1]) for t in layers]
            expected_k = self._top_k if isinstance(self._top_k, list) or self._top_k is None \
                else [self._top_k] * len(layers)
            if expected_k is not None and top_k != expected_k:
                q = next(q for q in range(len(top_k)) if top_k[q] != expected_k[q])
                raise ValueError(f"routing[{names[q]!r}]: expected top_k = {expected_k[q]} slots per token "
                                 f"(first update / constructor), received k = {top_k[q]}")
            self._check_model_level(num_experts, top_k)
            device = self.device if self.device is not None else layers[0].device
            layers = [t.to(device) for t in layers]
            if lengths is not None:
                lengths = lengths.to(device)
            deltas = self._batch_statistics(names, layers, num_experts, lengths)
            if self._state is None:
                self._layer_names, self._num_experts, self._top_k, self.device = names, num_experts, top_k, device
                self._state = self._zero_state(device)
            for key, delta in deltas.items():
                self._state[key] += delta

    def _batch_statistics(self, names: List[str], layers: List[torch.Tensor], num_experts: List[int],
                          lengths: Optional[torch.Tensor]) -> Dict[str, torch.Tensor]:
        """State increments of one batch (computed in full before anything is added, so errors add nothing)."""
        num_layers, num_seqs, num_tokens = len(layers), layers[0].shape[0], layers[0].shape[1]
        device = layers[0].device
        max_experts = max(num_experts)
        per_seq: Dict[str, torch.Tensor] = {}  # key -> int64 [n, S, X], one row per (layer, sequence)
        per_seq["references"] = torch.zeros(num_layers, num_seqs, 1, dtype=torch.int64, device=device)
        for L in self.seg_lens:
            per_seq[f"srp@{L}"] = torch.zeros(num_layers, num_seqs, L + 1, dtype=torch.int64, device=device)
        for name in self.cache_names:
            per_seq[f"hits/{name}"] = torch.zeros(num_layers, num_seqs, max_experts, dtype=torch.int64,
                                                  device=device)

        # Layers with equal (E, k) run as one stacked batch of n·S sequences, validated once; then each
        # metric is one backend call (CONTRACT.md) instead of a public call that would validate again.
        groups: Dict[Tuple[int, int], List[int]] = {}
        for q, topk in enumerate(layers):
            groups.setdefault((num_experts[q], topk.shape[-1]), []).append(q)
        stacked_ids = None
        for (experts, _), members in groups.items():
            index = torch.tensor(members, device=device)
            stacked = torch.cat([layers[q] for q in members]) if len(members) > 1 else layers[members[0]]
            label = f"routing[{names[members[0]]!r}]" if len(members) == 1 else \
                f"routing (layers {[names[q] for q in members]} stacked layer-major into [n*B, T, k])"
            try:
                ids, group_lengths, _ = check_topk(stacked, experts, name=label,
                                                   lengths=None if lengths is None else lengths.repeat(len(members)))
            except ValueError:
                # Name the offending layer rather than a row of the stacked batch.
                for q in members:
                    check_topk(layers[q], experts, name=f"routing[{names[q]!r}]", lengths=lengths)
                raise
            view = (len(members), num_seqs, -1)
            for L in self.seg_lens:
                counts = run_backend("srp", "srp_counts", self.backend, ids, group_lengths, experts, L)
                per_seq[f"srp@{L}"].index_copy_(0, index, _sum_dim1(counts).view(view))
            for name, policy, seg_len in self._cache_specs:
                hits = run_backend("cache", "cache_hits", self.backend, ids, group_lengths, experts, policy, seg_len,
                                   self.free_slot_hits, self.lookup)
                per_seq[f"hits/{name}"][..., :experts].index_copy_(0, index, hits.view(view))
            # check_topk already wrote -1 past each sequence's length.
            per_seq["references"].index_copy_(0, index, (ids >= 0).sum(dim=(1, 2)).view(view))
            stacked_ids, stacked_lengths = ids, group_lengths

        model_per_seq: Dict[str, torch.Tensor] = {}  # key -> int64 [S, n·E]
        if self.model_level and self.cache_names:
            # Model level implies one group holding every layer in order (equal E and k). The ids are validated
            # already, so this is lrc_kernels.concat_layers (SPEC §6) without its second validation pass.
            layer_ids = stacked_ids.view(num_layers, num_seqs, num_tokens, -1)
            offsets = torch.arange(num_layers, device=device, dtype=layer_ids.dtype).view(-1, 1, 1, 1) * num_experts[0]
            stream = torch.where(layer_ids >= 0, layer_ids + offsets, layer_ids)
            stream = stream.permute(1, 2, 0, 3).reshape(num_seqs, num_tokens, -1).to(torch.int32).contiguous()
            for name, policy, seg_len in self._cache_specs:
                model_per_seq[f"model_hits/{name}"] = run_backend(
                    "cache", "cache_hits", self.backend, stream, stacked_lengths[:num_seqs],
                    num_layers * num_experts[0], policy, seg_len, self.free_slot_hits, self.lookup)

        deltas = {key: _sum_dim1(value).squeeze(-1) if key == "references" else _sum_dim1(value)
                  for key, value in per_seq.items()}
        deltas.update({key: value.sum(0) for key, value in model_per_seq.items()})
        if self.num_bootstrap:
            weights = poisson_weights(num_seqs, self.num_bootstrap, self._bootstrap_generator()).to(device)
            for key, value in per_seq.items():
                boot = weighted_sum(weights, value.movedim(1, 0)).movedim(0, 1)  # [n, S, X] -> [n, B, X]
                deltas[f"{key}/boot"] = boot.squeeze(-1) if key == "references" else boot
            for key, value in model_per_seq.items():
                deltas[f"{key}/boot"] = weighted_sum(weights, value)  # [S, X] -> [B, X]
        return deltas

    # ----------------------------------------------------------------------------------------------
    # compute

    def compute(self) -> Dict[str, torch.Tensor]:
        """Score the accumulated state.

        Returns:
            A flat dict of float64 tensors (``[n]`` per layer in :attr:`layer_names` order, ``[]`` model level):

            - ``"srp@L"`` ``[n]``: per-layer SRP best_f1 on the histogram pooled over experts and sequences;
              ``"model/srp@L"`` ``[]``: the layers' histograms pooled (one shared threshold).
            - ``"srp@L/support"`` int64 ``[n]`` and ``"model/srp@L/support"`` int64 ``[]``: pooled (window,
              expert) pairs; 0 means no sequence was long enough for a window, and SRP is then 0 by definition.
            - ``"hit@{c}k/{policy}"`` ``[n]``: pooled hit rate Σhits/ΣN of a cache of m = c·k experts (NaN
              where m > E or no reference was seen); ``"model/hit@{c}k/{policy}"`` ``[]`` with m = c·n·k
              (omitted when m > n·E). ``policy`` is ``"sch@L"``, ``"lru"``, ``"lfu"`` or ``"belady"``.
            - ``"references"`` int64 ``[n]`` and ``"model/references"`` int64 ``[]``: ΣN.
            - with ``num_bootstrap > 0``: ``".../ci_low"`` and ``".../ci_high"`` for every SRP and hit-rate key
              (basic interval of the Poisson-bootstrap replicates; NaN if some replicate saw no reference).
        """
        if self._state is None:
            raise RuntimeError("compute: no state yet; call update() first")
        with _nvtx_range("RoutingMonitor.compute"):
            state, out = self._state, {}
            for L in self.seg_lens:
                hist = state[f"srp@{L}"]
                layer_score = srp_score(hist)
                out[f"srp@{L}"], out[f"srp@{L}/support"] = layer_score.best_f1, layer_score.support
                if self.model_level:
                    model_score = srp_score(hist.sum(0))
                    out[f"model/srp@{L}"], out[f"model/srp@{L}/support"] = model_score.best_f1, model_score.support
                if self.num_bootstrap:
                    boot = state[f"srp@{L}/boot"]  # [n, B, L+1]
                    self._add_interval(out, f"srp@{L}", srp_score(boot).best_f1)
                    if self.model_level:
                        self._add_interval(out, f"model/srp@{L}", srp_score(boot.sum(0)).best_f1)

            references = state["references"]
            out["references"] = references.clone()
            num_layers = len(self._layer_names)
            layer_index = torch.arange(num_layers, device=references.device)
            num_experts = torch.tensor(self._num_experts, device=references.device)
            for c in self.cache_sizes_in_k:
                sizes = c * torch.tensor(self._top_k, device=references.device)
                reported = sizes <= num_experts
                column = torch.minimum(sizes, num_experts) - 1
                for name in self.cache_names:
                    hits = state[f"hits/{name}"][layer_index, column]
                    out[f"hit@{c}k/{name}"] = torch.where(reported, hits.double() / references, math.nan)
                    if self.num_bootstrap:
                        boot_hits = state[f"hits/{name}/boot"][layer_index, :, column]  # [n, B]
                        replicates = boot_hits.double() / state["references/boot"]
                        replicates = torch.where(reported[:, None], replicates, math.nan)
                        self._add_interval(out, f"hit@{c}k/{name}", replicates)
            if self.model_level:
                model_refs = references.sum()
                out["model/references"] = model_refs
                size_factor = num_layers * self._top_k[0]
                for c in self.cache_sizes_in_k:
                    m = c * size_factor
                    if m > num_layers * self._num_experts[0]:
                        continue
                    for name in self.cache_names:
                        out[f"model/hit@{c}k/{name}"] = state[f"model_hits/{name}"][m - 1].double() / model_refs
                        if self.num_bootstrap:
                            replicates = state[f"model_hits/{name}/boot"][:, m - 1].double() \
                                / state["references/boot"].sum(0)
                            self._add_interval(out, f"model/hit@{c}k/{name}", replicates)
            return out

    def _add_interval(self, out: Dict[str, torch.Tensor], key: str, replicates: torch.Tensor) -> None:
        out[f"{key}/ci_low"], out[f"{key}/ci_high"] = basic_interval(out[key], replicates, self.confidence)

    def summary(self, metrics: Optional[Dict[str, torch.Tensor]] = None, *, per_layer: bool = False,
                prefix: str = "lrc/") -> Dict[str, float]:
        """Flatten :meth:`compute` into a few Python floats for a logger.

        Keys (``prefix`` = ``"lrc/"``): ``lrc/srp@L`` and ``lrc/hit@{c}k/{policy}`` (model level, with
        ``/ci_low`` / ``/ci_high`` under bootstrap; left out while NaN, and SRP while it has no window, i.e.
        every sequence is shorter than L), ``lrc/srp@L/layer_mean`` and
        ``lrc/hit@{c}k/{policy}/layer_mean`` (mean of the per-layer values over layers with a value; omitted
        when no layer has one, e.g. c·k > E), and with
        ``per_layer=True`` also ``lrc/{layer_name}/srp@L`` and ``lrc/{layer_name}/hit@{c}k/{policy}`` (NaN
        values, i.e. c·k > E or no reference yet, are left out).
        """
        metrics = self.compute() if metrics is None else metrics
        flat: Dict[str, float] = {}
        for key, value in metrics.items():
            if key.endswith("/support") or key in ("references", "model/references"):
                continue
            scored_key = key.rsplit("/", 1)[0] if key.endswith(("/ci_low", "/ci_high")) else key
            support = metrics.get(f"{scored_key}/support")
            if support is not None:
                # SRP without a single window is 0 by definition, which a plot would misread as "no consistency".
                value = torch.where(support > 0, value, math.nan)
            if key.startswith("model/"):
                if not bool(value.isnan()):
                    flat[prefix + key[len("model/"):]] = float(value)
            elif not key.endswith(("/ci_low", "/ci_high")):
                if not bool(value.isnan().all()):
                    flat[f"{prefix}{key}/layer_mean"] = float(value.nanmean())
                if per_layer:
                    for name, layer_value in zip(self._layer_names, value.tolist()):
                        if not math.isnan(layer_value):
                            flat[f"{prefix}{name}/{key}"] = layer_value
        return flat

    def log_to(self, writer, step: int, *, per_layer: bool = False, prefix: str = "lrc/") -> Dict[str, float]:
        """Write :meth:`summary` as scalars: ``writer.add_scalar(key, value, step)`` for every key.

        ``writer`` is a ``torch.utils.tensorboard.SummaryWriter`` or anything with that ``add_scalar``.
        Returns the summary that was written.
        """
        flat = self.summary(per_layer=per_layer, prefix=prefix)
        for key, value in flat.items():
            writer.add_scalar(key, value, step)
        return flat

    # ----------------------------------------------------------------------------------------------
    # reset, checkpointing, distributed

    def reset(self) -> None:
        """Zero every state tensor (the layout, device and bootstrap generator are kept)."""
        if self._synced:
            raise RuntimeError("reset: the monitor holds synced state; call unsync() first")
        if self._state is not None:
            for tensor in self._state.values():
                tensor.zero_()

    def _config(self) -> dict:
        return {"seg_lens": list(self.seg_lens), "policies": list(self.policies),
                "cache_sizes_in_k": list(self.cache_sizes_in_k), "num_bootstrap": self.num_bootstrap,
                "confidence": self.confidence, "model_level": self.model_level,
                "free_slot_hits": self.free_slot_hits, "lookup": self.lookup}

    def state_dict(self) -> dict:
        """Checkpointable copy: config, layout, every state tensor (int64) and the bootstrap generator state."""
        return {"config": self._config(), "layer_names": self.layer_names, "num_experts": self.num_experts,
                "top_k": self.top_k,
                "state": None if self._state is None else {k: v.detach().clone() for k, v in self._state.items()},
                "generator": None if self._generator is None else self._generator.get_state()}

    def load_state_dict(self, state_dict: dict) -> None:
        """Restore :meth:`state_dict` output; the config (seg_lens, policies, B, ...) must match this monitor's."""
        if self._synced:
            raise RuntimeError("load_state_dict: the monitor holds synced state; call unsync() first")
        if state_dict["config"] != self._config():
            raise ValueError(f"state_dict: expected config {self._config()}, received {state_dict['config']}")
        self._layer_names = state_dict["layer_names"]
        self._num_experts = state_dict["num_experts"]
        self._top_k = state_dict["top_k"]
        if state_dict["state"] is not None and not self._layout_complete():
            raise ValueError("state_dict: state without a complete layout (layer_names, num_experts, top_k)")
        if state_dict["generator"] is not None:
            self._generator = torch.Generator()
            self._generator.set_state(state_dict["generator"])
        if state_dict["state"] is None:
            self._state = None
            return
        self._state = {}
        expected = self._zero_state("cpu")
        for key, tensor in state_dict["state"].items():
            if key not in expected or expected[key].shape != tensor.shape:
                raise ValueError(f"state_dict: unexpected state {key!r} of shape {tuple(tensor.shape)}")
        self.device = self.device or next(iter(state_dict["state"].values())).device
        self._state = {key: state_dict["state"][key].to(self.device, torch.int64).clone() for key in expected}

    def sync(self, process_group=None) -> None:
        """Replace the state by its sum over all ranks (an exact int64 ``all_reduce(SUM)``).

        A no-op on the numbers when no process group is initialised. Either way the monitor is then
        "synced": :meth:`compute` reports the global statistics and :meth:`unsync` restores the local ones
        (``update``, ``reset`` and another ``sync`` refuse until then, so nothing is counted twice). Every
        rank must call it, with the same layout (all ranks updated at least once, or a full layout given
        at construction with ``device=``).
        """
        if self._synced:
            raise RuntimeError("sync: already synced; call unsync() first")
        if self._state is None:
            raise RuntimeError("sync: no state yet; call update() first or construct with a full layout "
                               "and device=")
        with _nvtx_range("RoutingMonitor.sync"):
            self._unsynced_state = self._state
            if torch.distributed.is_available() and torch.distributed.is_initialized():
                keys = list(self._state)
                flat = torch.cat([self._state[key].reshape(-1) for key in keys])
                torch.distributed.all_reduce(flat, op=torch.distributed.ReduceOp.SUM, group=process_group)
                pieces = flat.split([self._state[key].numel() for key in keys])
                self._state = {key: piece.view_as(self._state[key]) for key, piece in zip(keys, pieces)}
            else:
                self._state = {key: value.clone() for key, value in self._state.items()}
            self._synced = True

    def unsync(self) -> None:
        """Restore the local (pre-``sync``) state."""
        if not self._synced:
            raise RuntimeError("unsync: not synced")
        self._state, self._unsynced_state, self._synced = self._unsynced_state, None, False

    @contextlib.contextmanager
    def synced(self, process_group=None):
        """``with monitor.synced(): metrics = monitor.compute()`` — sync, then unsync on exit."""
        self.sync(process_group)
        try:
            yield self
        finally:
            self.unsync()
