"""Streaming local-routing-consistency monitor for training loops (SPEC §2, §3 "Streaming", §4, §6).

:class:`RoutingMonitor` follows the shape of a torchmetrics ``Metric`` without depending on torchmetrics:
``update(routing)`` folds one batch of routing decisions into additive int64 sufficient statistics,
``compute()`` scores them, ``reset()`` zeroes them, ``sync()`` sums them over a ``torch.distributed``
process group, and ``state_dict()`` / ``load_state_dict()`` checkpoint them. Because every state is a
sum over sequences, monitoring batches one by one (or on several ranks) gives exactly the integers of one
library call on the union of the batches. The states are declared once, in :mod:`lrc_kernels._monitor_state`.

The monitor only consumes tensors, so this module imports neither transformers nor any model code
(:mod:`lrc_kernels.hf` re-exports it next to the recorder that feeds it).
"""

from __future__ import annotations

import contextlib
from typing import Dict, List, Optional, Sequence, Union

import torch

from . import dispatch
from ._checks import check_choice
from ._monitor_inputs import Routing, cache_specs, distinct_ints, layers_in_order, per_layer
from ._monitor_metrics import flatten_metrics, score_state
from ._monitor_state import (Statistic, State, all_reduce, batch_deltas, check_state, declare_statistics,
                             per_sequence_statistics, state_table, zero_state)
from ._nvtx import NvtxRange
from .bootstrap import check_bootstrap_options, poisson_weights
from .cache import LOOKUPS, POLICIES, check_cache_options

_UPDATE_RANGE, _COMPUTE_RANGE, _SYNC_RANGE = (NvtxRange(f"RoutingMonitor.{name}")
                                              for name in ("update", "compute", "sync"))


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

    Example (a cache of 1·k = 2 slots: the free slots take token 0, tokens 1 and 3 hit, token 2 misses twice):
        >>> monitor = RoutingMonitor(seg_lens=(2,), policies=("lru",), num_experts=4)
        >>> monitor.update({"layer0": torch.tensor([[[0, 1], [0, 1], [2, 3], [2, 3]]])})
        >>> monitor.compute()["hit@1k/lru"].tolist()
        [0.75]
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
        self.seg_lens = distinct_ints(seg_lens, "seg_lens", 1)
        self.policies = tuple(policies)
        self._cache_specs = cache_specs(self.policies, self.seg_lens)
        for spec in self._cache_specs:
            check_cache_options(spec.policy, spec.seg_len, free_slot_hits, lookup)
        self.cache_names = tuple(spec.name for spec in self._cache_specs)
        self.cache_sizes_in_k = distinct_ints(cache_sizes_in_k, "cache_sizes_in_k", 1)
        self.num_bootstrap, self.confidence = check_bootstrap_options(num_bootstrap, confidence, None)
        self.model_level = bool(model_level)
        self.free_slot_hits = free_slot_hits
        self.lookup = check_choice(lookup, "lookup", LOOKUPS)
        self.backend = dispatch.check_backend(backend)
        self.seed = seed
        self.device = None if device is None else torch.device(device)
        self._generator = generator

        self._layer_names: Optional[List[str]] = None if layer_names is None else [str(n) for n in layer_names]
        if self._layer_names is not None and len(set(self._layer_names)) != len(self._layer_names):
            raise ValueError(f"layer_names: expected distinct names, received {self._layer_names}")
        self._num_experts = per_layer(num_experts, "num_experts", self._layer_names)
        self._top_k = per_layer(top_k, "top_k", self._layer_names)
        self._statistics: Sequence[Statistic] = ()
        self._table: Sequence[State] = ()
        self._state: Optional[Dict[str, torch.Tensor]] = None
        self._unsynced_state: Optional[Dict[str, torch.Tensor]] = None
        self._synced = False
        if self.device is not None and self._layout_complete():
            self._start_state(self.device)

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

    def _declare_states(self) -> None:
        """The statistics and state table of the (complete) layout."""
        self._statistics = declare_statistics(self.seg_lens, self._cache_specs, self._num_experts,
                                              self.model_level)
        self._table = state_table(self._statistics, len(self._layer_names), self.num_bootstrap)

    def _start_state(self, device: torch.device) -> None:
        self._declare_states()
        self._state = zero_state(self._table, device)

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
        with _UPDATE_RANGE:
            names, layers = layers_in_order(routing, self._layer_names,
                                            len(self._num_experts) if isinstance(self._num_experts, list) else None)
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
            statistics = self._statistics or declare_statistics(self.seg_lens, self._cache_specs, num_experts,
                                                                self.model_level)
            per_sequence = per_sequence_statistics(statistics, names, layers, num_experts, lengths, self.backend,
                                                   self.free_slot_hits, self.lookup)
            weights = None
            if self.num_bootstrap:
                num_seqs = layers[0].shape[0]
                weights = poisson_weights(num_seqs, self.num_bootstrap, self._bootstrap_generator()).to(device)
            deltas = batch_deltas(statistics, per_sequence, weights)
            if self._state is None:
                self._layer_names, self._num_experts, self._top_k, self.device = names, num_experts, top_k, device
                self._start_state(device)
            for state in self._table:
                self._state[state.key] += deltas[state.key]

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
        with _COMPUTE_RANGE:
            return score_state(self._state, self._statistics, num_experts=self._num_experts, top_k=self._top_k,
                               cache_sizes_in_k=self.cache_sizes_in_k, model_level=self.model_level,
                               confidence=self.confidence)

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
        return flatten_metrics(metrics, self._layer_names, per_layer=per_layer, prefix=prefix)

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
            for state in self._table:
                self._state[state.key].zero_()

    def _config(self) -> dict:
        return {"seg_lens": list(self.seg_lens), "policies": list(self.policies),
                "cache_sizes_in_k": list(self.cache_sizes_in_k), "num_bootstrap": self.num_bootstrap,
                "confidence": self.confidence, "model_level": self.model_level,
                "free_slot_hits": self.free_slot_hits, "lookup": self.lookup}

    def state_dict(self) -> dict:
        """Checkpointable copy: config, layout, every state tensor (int64) and the bootstrap generator state."""
        state = None if self._state is None else \
            {entry.key: self._state[entry.key].detach().clone() for entry in self._table}
        return {"config": self._config(), "layer_names": self.layer_names, "num_experts": self.num_experts,
                "top_k": self.top_k, "state": state,
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
        self._declare_states()
        check_state(self._table, state_dict["state"])
        self.device = self.device or next(iter(state_dict["state"].values())).device
        self._state = {entry.key: state_dict["state"][entry.key].to(self.device, torch.int64).clone()
                       for entry in self._table}

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
        with _SYNC_RANGE:
            self._unsynced_state = self._state
            if torch.distributed.is_available() and torch.distributed.is_initialized():
                self._state = all_reduce(self._table, self._state, process_group)
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
